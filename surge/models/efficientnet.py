"""EfficientNet-Lite image classifiers (Lite0: ``surge pull efficientnet-lite0``).

EfficientNet-B0's table of MBConv blocks (inverted bottleneck: 1x1 expand, depthwise kxk,
1x1 project, residual when shape allows) with the Lite changes for integer-friendly mobile
inference: no squeeze-and-excite, ReLU6 instead of swish, and stem (32) and head (1280) widths
fixed rather than scaled. Convolutions pad like TensorFlow's ``SAME`` (asymmetric for stride 2),
because the weights were trained in TensorFlow.

The checkpoint keeps the original tensors and names (``_blocks.3._depthwise_conv.weight``,
``_blocks.3._bn1.running_var``, ...). Each batch norm is folded into the convolution before it
once the weights are loaded: one conv with a bias instead of a conv and a normalisation.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHITECTURE", "LITE0_PREPROCESSOR", "LITE0_STAGES", "EfficientNetLiteConfig",
           "EfficientNetLiteForImageClassification", "Stage", "write_checkpoint"]

ARCHITECTURE = "EfficientNetLiteForImageClassification"


@dataclass(frozen=True)
class Stage:
    """One row of the EfficientNet-B0 table: ``repeats`` MBConv blocks; the first one strides
    and changes width, the others keep both."""

    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int


# EfficientNet-B0 (Tan & Le 2019, table 1) stages 2-8; Lite0 uses width and depth 1.0.
LITE0_STAGES = (
    Stage(1, 3, 1, 1, 32, 16), Stage(2, 3, 2, 6, 16, 24), Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80), Stage(3, 5, 1, 6, 80, 112), Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class EfficientNetLiteConfig:
    num_labels: int
    stages: tuple[Stage, ...] = LITE0_STAGES
    stem_channels: int = 32
    head_channels: int = 1280
    batch_norm_eps: float = 1e-3
    num_channels: int = 3

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> EfficientNetLiteConfig:
        labels = hf.get("id2label") or {}
        num_labels = len(labels) or int(hf.get("num_labels") or 0)
        if num_labels <= 0:
            raise ValueError("config.json has neither id2label nor num_labels: a classifier "
                             "needs its class names")
        if hf.get("hidden_act", "relu6") != "relu6":
            raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported: "
                             "EfficientNet-Lite uses 'relu6'")
        rows = hf.get("stages")
        stages = tuple(_stage(row) for row in rows) if rows else LITE0_STAGES
        return cls(num_labels=num_labels, stages=stages,
                   stem_channels=int(hf.get("stem_channels", 32)),
                   head_channels=int(hf.get("head_channels", 1280)),
                   batch_norm_eps=float(hf.get("batch_norm_eps", 1e-3)),
                   num_channels=int(hf.get("num_channels", 3)))

    def blocks(self) -> Iterator[tuple[int, int, int, int, int]]:
        """(kernel, stride, expand_ratio, in_channels, out_channels) of every block in order."""
        for stage in self.stages:
            for repeat in range(stage.repeats):
                first = repeat == 0
                yield (stage.kernel, stage.stride if first else 1, stage.expand_ratio,
                       stage.in_channels if first else stage.out_channels, stage.out_channels)


def _stage(row: Any) -> Stage:
    if not (isinstance(row, list | tuple) and len(row) == 6
            and all(isinstance(v, int) and v > 0 for v in row)):
        raise ValueError(f"config.json stages entry {row!r} is invalid: allowed is six positive "
                         "integers [repeats, kernel, stride, expand_ratio, in, out]")
    return Stage(*row)


class SameConv2d(nn.Conv2d):
    """Conv2d padded like TensorFlow's ``SAME``: output size ceil(input / stride), with the odd
    pixel of padding at the bottom/right. For stride 1 that is PyTorch's symmetric padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding=kernel_size // 2 if stride == 1 else 0, groups=groups,
                         bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        pad_h = _same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = _same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)


def _same_padding(size: int, kernel: int, stride: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


class ConvBN(nn.Module):
    """A convolution and its batch norm, as trained; ``fold()`` merges them into one conv with a
    bias (done once at load: same maths, one op instead of two)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, eps: float = 1e-3) -> None:
        super().__init__()
        self.conv = SameConv2d(in_channels, out_channels, kernel_size, stride, groups)
        self.bn: nn.BatchNorm2d | None = nn.BatchNorm2d(out_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x

    @torch.no_grad()
    def fold(self) -> None:
        """conv weight * gamma / sqrt(var + eps) per output channel, bias beta - mean * that
        scale; computed in float64, so folding only rounds once, to the serving dtype."""
        if self.bn is None:
            return
        bn, weight = self.bn, self.conv.weight
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        folded = weight.double() * scale[:, None, None, None]
        bias = bn.bias.double() - bn.running_mean.double() * scale
        self.conv.weight = nn.Parameter(folded.to(weight.dtype), requires_grad=False)
        self.conv.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=False)
        self.bn = None


class MBConvBlock(nn.Module):
    """Inverted bottleneck: [expand 1x1 -> ReLU6] -> depthwise kxk -> ReLU6 -> project 1x1
    (linear), plus the input when stride and width are unchanged. No squeeze-and-excite."""

    def __init__(self, kernel: int, stride: int, expand_ratio: int, in_channels: int,
                 out_channels: int, eps: float) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = ConvBN(in_channels, hidden, 1, eps=eps) if expand_ratio != 1 else None
        self.depthwise = ConvBN(hidden, hidden, kernel, stride, groups=hidden, eps=eps)
        self.project = ConvBN(hidden, out_channels, 1, eps=eps)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.expand(x)) if self.expand is not None else x
        h = self.project(F.relu6(self.depthwise(h)))
        return h + x if self.residual else h


# Checkpoint names (EfficientNet-PyTorch's, which mirror TensorFlow's) -> this module's.
_RENAMES = [
    (re.compile(r"^_conv_stem\."), "stem.conv."), (re.compile(r"^_bn0\."), "stem.bn."),
    (re.compile(r"^_conv_head\."), "head.conv."), (re.compile(r"^_bn1\."), "head.bn."),
    (re.compile(r"^_fc\."), "classifier."),
    (re.compile(r"^_blocks\.(\d+)\._expand_conv\."), r"blocks.\1.expand.conv."),
    (re.compile(r"^_blocks\.(\d+)\._bn0\."), r"blocks.\1.expand.bn."),
    (re.compile(r"^_blocks\.(\d+)\._depthwise_conv\."), r"blocks.\1.depthwise.conv."),
    (re.compile(r"^_blocks\.(\d+)\._bn1\."), r"blocks.\1.depthwise.bn."),
    (re.compile(r"^_blocks\.(\d+)\._project_conv\."), r"blocks.\1.project.conv."),
    (re.compile(r"^_blocks\.(\d+)\._bn2\."), r"blocks.\1.project.bn."),
]


class EfficientNetLiteForImageClassification(nn.Module):
    """Pixels [batch, 3, H, W] (normalised as preprocessor_config.json says) -> logits.

    Built with its batch norms; ``finish_loading`` folds them once the weights are in.
    """

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__()
        self.config = config
        eps = config.batch_norm_eps
        self.stem = ConvBN(config.num_channels, config.stem_channels, 3, stride=2, eps=eps)
        self.blocks = nn.ModuleList(MBConvBlock(*spec, eps=eps) for spec in config.blocks())
        self.head = ConvBN(config.stages[-1].out_channels, config.head_channels, 1, eps=eps)
        self.classifier = nn.Linear(config.head_channels, config.num_labels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(pixels.contiguous(memory_format=torch.channels_last)))
        for block in self.blocks:
            x = block(x)
        x = F.relu6(self.head(x))
        return self.classifier(x.mean(dim=(2, 3)))

    # Loader hooks (surge.models.loader) -------------------------------------------------------

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        for pattern, replacement in _RENAMES:
            renamed, count = pattern.subn(replacement, name)
            if count:
                return renamed
        return name  # unknown: the loader names it as not belonging to the model

    @staticmethod
    def optional_tensor(name: str) -> bool:
        return name.endswith("num_batches_tracked")  # a training counter

    def finish_loading(self, device: torch.device | None = None,
                       max_positions: int | None = None) -> None:
        for module in self.modules():
            if isinstance(module, ConvBN):
                module.fold()
        self.to(memory_format=torch.channels_last)  # what oneDNN's CPU convolutions prefer


def _check_tensors(tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Every checkpoint tensor belongs to the model, with its shape, and none is missing (what
    surge.models.loader checks at load; checked at conversion too, to fail there)."""
    expected = model.state_dict()
    found: set[str] = set()
    for name, tensor in tensors.items():
        target = model.checkpoint_name(name)
        if target not in expected:
            raise ValueError(f"checkpoint tensor {name!r} does not belong to EfficientNet-Lite "
                             "with these stages; is config.json the right one?")
        if tuple(tensor.shape) != tuple(expected[target].shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the "
                             f"model expects {tuple(expected[target].shape)}")
        found.add(target)
    missing = sorted(n for n in expected if n not in found and not model.optional_tensor(n))
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} EfficientNet-Lite tensors, e.g. "
                         f"{missing[:3]}")


# --------------------------------------------------------------------------------------------
# Writing the Hugging Face-layout folder (done once, by `surge pull efficientnet-lite0`)
# --------------------------------------------------------------------------------------------

# TensorFlow's EfficientNet-Lite evaluation: RGB 0-255 minus 127, divided by 128; the center
# 224/256 of the image, bicubic-resized to 224x224 (efficientnet/lite/efficientnet_lite_builder
# .py MEAN_RGB/STDDEV_RGB; preprocessing.py CROP_PADDING = 32).
LITE0_PREPROCESSOR = {
    "image_processor_type": "EfficientNetLiteImageProcessor",
    "do_resize": True, "size": {"shortest_edge": 224}, "crop_pct": 224 / 256,
    "resample": 3, "do_rescale": False, "do_normalize": True,
    "image_mean": [127.0, 127.0, 127.0], "image_std": [128.0, 128.0, 128.0],
}


def write_checkpoint(state_dict: dict[str, torch.Tensor], labels: Sequence[str],
                     out: str | Path, name: str = "efficientnet-lite0") -> Path:
    """Write config.json (with id2label), model.safetensors (the original tensors, unfolded)
    and preprocessor_config.json into the existing folder ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    config = EfficientNetLiteConfig(num_labels=len(labels))
    tensors = {k: v.contiguous() for k, v in state_dict.items()
               if not k.endswith("num_batches_tracked")}
    # Fail here, at conversion, rather than at first serve: every tensor must belong.
    with torch.device("meta"):
        _check_tensors(tensors, EfficientNetLiteForImageClassification(config))
    hf = {"architectures": [ARCHITECTURE], "model_type": "efficientnet_lite", "name": name,
          "num_channels": config.num_channels, "stem_channels": config.stem_channels,
          "head_channels": config.head_channels, "batch_norm_eps": config.batch_norm_eps,
          "stages": [list(vars(stage).values()) for stage in config.stages],
          "hidden_act": "relu6", "padding": "tensorflow-same", "image_size": 224,
          # No label2id: ImageNet names two concepts twice (657/744 missile, 836/837 sunglasses).
          "id2label": {str(i): label for i, label in enumerate(labels)}}
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps(LITE0_PREPROCESSOR, indent=2) + "\n",
                                                  encoding="utf-8")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "model.safetensors").chmod((out / "config.json").stat().st_mode & 0o777)
    return out
