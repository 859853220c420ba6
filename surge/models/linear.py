"""Linear layers whose storage and arithmetic are a pluggable *method* (after vLLM's
``LinearMethodBase``), so a quantized or pruned layer is another method, not another model file.

A ``Linear`` knows its shape only: ``input_size`` and one or more ``output_sizes`` (several when
projections of one input share a GEMM, e.g. q/k/v or gate/up, which checkpoints store
separately). Its ``LinearMethod``:

- ``create_weights(layer)`` registers the layer's tensors and, for each name a checkpoint uses
  (``weight``, ``bias``), a weight loader in ``layer.weight_loaders``; the model loader calls
  ``loader(layer, tensor, shard)`` with the checkpoint tensor and which output it fills (None for
  the whole layer). A quantizing method may quantize in its loader and store other tensors.
- ``process_weights_after_loading(layer)`` runs once all weights are in (repack, quantize).
- ``apply(layer, x)`` is the forward pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "LinearMethod", "UnquantizedLinearMethod", "WeightLoader", "can_pack",
           "copy_checked"]

# (layer, checkpoint tensor, shard index or None for the whole output) -> None
WeightLoader = Callable[[nn.Module, torch.Tensor, "int | None"], None]


class LinearMethod(ABC):
    """How a ``Linear`` stores its weights and multiplies by them (stateless: state lives on
    the layer, so one method object can serve every layer of a model)."""

    @abstractmethod
    def create_weights(self, layer: Linear) -> None:
        """Register the layer's tensors and ``layer.weight_loaders`` (on the meta device)."""

    def process_weights_after_loading(self, layer: Linear) -> None:  # noqa: B027 - optional
        """Called once, after every checkpoint tensor has been loaded."""

    @abstractmethod
    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., input_size] -> [..., sum(output_sizes)]."""

    def weight_bytes(self, layer: Linear) -> int:
        """Bytes a forward pass reads from the layer's weights (for GB/s reports)."""
        return sum(t.nbytes for t in layer.parameters(recurse=False))


class Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored and applied by ``method``."""

    def __init__(self, input_size: int, output_sizes: int | Sequence[int], bias: bool,
                 method: LinearMethod | None = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.has_bias = bias
        self.method = method or UnquantizedLinearMethod()
        self.weight_loaders: dict[str, WeightLoader] = {}
        self.method.create_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def shard_rows(self, shard: int | None) -> slice:
        """The output rows a checkpoint shard fills (all of them for None)."""
        if shard is None:
            return slice(0, self.output_size)
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def weight_bytes(self) -> int:
        return self.method.weight_bytes(self)

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, output_sizes={self.output_sizes}, "
                f"bias={self.has_bias}, method={type(self.method).__name__}")


def copy_checked(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy ``tensor`` into ``target`` (casting dtype), refusing a shape mismatch (the loader
    names the checkpoint tensor: the message completes "tensor 'NAME' ...")."""
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"has shape {tuple(tensor.shape)}, the model expects "
                         f"{tuple(target.shape)}")
    target.copy_(tensor)


def _load_rows(name: str) -> WeightLoader:
    """A loader that copies a checkpoint tensor into ``name``'s rows of its shard."""
    def load(layer: nn.Module, tensor: torch.Tensor, shard: int | None) -> None:
        assert isinstance(layer, Linear)
        copy_checked(getattr(layer, name).data[layer.shard_rows(shard)], tensor)

    return load


class UnquantizedLinearMethod(LinearMethod):
    """Weights in the serving dtype. On CPU in float32 or bfloat16 the weight is reordered once
    by oneDNN into its blocked layout (what inductor's CPU freezing does): a plain ``F.linear``
    converts it on every call, prepacked decode GEMVs run at the memory-bandwidth limit (30 GB/s
    here against 19 for ``F.linear``), and bf16 results are bit-identical.
    """

    def create_weights(self, layer: Linear) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.output_size, layer.input_size),
                                    requires_grad=False)
        layer.bias = (nn.Parameter(torch.empty(layer.output_size), requires_grad=False)
                      if layer.has_bias else None)
        layer.packed_weight = None
        layer.weight_loaders["weight"] = _load_rows("weight")
        if layer.has_bias:
            layer.weight_loaders["bias"] = _load_rows("bias")

    def process_weights_after_loading(self, layer: Linear) -> None:
        weight = layer.weight
        if weight is None or not can_pack(weight.device, weight.dtype):
            return
        # Batch-size hint for oneDNN's choice of layout; any batch size works with it.
        layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        layer.weight = None  # the packed copy replaces it (a tied embedding keeps its own)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if layer.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, layer.bias,
                                                      "none", [], "")
        return F.linear(x, layer.weight, layer.bias)

    def weight_bytes(self, layer: Linear) -> int:
        packed = layer.packed_weight
        if packed is None:
            return super().weight_bytes(layer)
        bias = 0 if layer.bias is None else layer.bias.nbytes
        return packed.element_size() * layer.output_size * layer.input_size + bias


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
