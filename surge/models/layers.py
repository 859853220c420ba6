"""Building blocks shared by the model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MergedLinear", "PackedLinear", "RMSNorm", "can_pack", "pack_linears"]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the model dtype: the order Hugging Face uses, so
        # bf16 results match it bit for bit.
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)


class MergedLinear(nn.Linear):
    """Several projections of one input in a single GEMM (q/k/v, or gate/up).

    Checkpoints store them separately; ``load_shard`` copies each into its rows.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = output_sizes

    def load_shard(self, name: str, shard: int, tensor: torch.Tensor) -> None:
        start = sum(self.output_sizes[:shard])
        target = getattr(self, name)
        target.data[start:start + self.output_sizes[shard]].copy_(tensor)


class PackedLinear(nn.Module):
    """A linear layer whose weight oneDNN has reordered once, ahead of time, into its blocked
    layout (what inductor's CPU freezing does). A plain ``F.linear`` on CPU converts the
    weight on every call; prepacked, decode GEMVs run at the memory-bandwidth limit (30 GB/s
    here against 19 for ``F.linear``) and bf16 results are bit-identical.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # Batch-size hint for oneDNN's choice of layout; any batch size works with it.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linears(module: nn.Module) -> None:
    """Swap every nn.Linear below ``module`` for a PackedLinear (after weights are loaded)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight, child.bias))
        else:
            pack_linears(child)
