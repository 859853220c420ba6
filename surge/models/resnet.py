"""ResNet image classifiers in Hugging Face's ``ResNetForImageClassification`` layout.

Covers the bottleneck (ResNet-50/101/152) and basic (ResNet-18/34) variants: a 7x7 stride-2
stem with max-pooling, stages of residual blocks (the first block of a stage may downsample and
project its shortcut), global average pooling and a linear head. Submodules are named after the
checkpoint's tensors (``resnet.encoder.stages.0.layers.0.layer.1.convolution.weight``), so
loading is a checked one-to-one copy. Inference runs in channels-last memory format, which
oneDNN's CPU convolutions prefer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ResNetConfig", "ResNetForImageClassification", "num_labels"]


@dataclass(frozen=True)
class ResNetConfig:
    num_labels: int
    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    layer_type: str = "bottleneck"
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ResNetConfig:
        if hf.get("layer_type", "bottleneck") not in ("bottleneck", "basic"):
            raise ValueError(f"layer_type={hf['layer_type']!r} is not supported: allowed is "
                             "'bottleneck' or 'basic'")
        if hf.get("hidden_act", "relu") != "relu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported: allowed is "
                             "'relu'")
        return cls(num_labels=num_labels(hf), num_channels=hf.get("num_channels", 3),
                   embedding_size=hf.get("embedding_size", 64),
                   hidden_sizes=tuple(hf.get("hidden_sizes", (256, 512, 1024, 2048))),
                   depths=tuple(hf.get("depths", (3, 4, 6, 3))),
                   layer_type=hf.get("layer_type", "bottleneck"),
                   downsample_in_first_stage=hf.get("downsample_in_first_stage", False),
                   downsample_in_bottleneck=hf.get("downsample_in_bottleneck", False))


def num_labels(hf: dict[str, Any]) -> int:
    """Classes of a classifier config: from id2label, as transformers counts them."""
    labels = hf.get("id2label")
    if labels:
        return len(labels)
    if hf.get("num_labels"):
        return int(hf["num_labels"])
    raise ValueError("config.json has neither id2label nor num_labels: a classifier needs its "
                     "class names")


class ResNetConvLayer(nn.Module):
    """Convolution (no bias) -> BatchNorm -> optional ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, activation: bool = True) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                                     padding=kernel_size // 2, bias=False)
        self.normalization = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU() if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(x)))


class ResNetEmbedder(nn.Module):
    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.embedder = ResNetConvLayer(config.num_channels, config.embedding_size, 7, 2)
        self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooler(self.embedder(x))


class ResNetShortCut(ResNetConvLayer):
    """1x1 projection of the residual where a block changes width or resolution."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, 1, stride, activation=False)


class ResNetBlock(nn.Module):
    """One residual block: bottleneck (1x1 reduce, 3x3, 1x1 expand) or basic (3x3, 3x3)."""

    def __init__(self, config: ResNetConfig, in_channels: int, out_channels: int,
                 stride: int) -> None:
        super().__init__()
        needs_projection = in_channels != out_channels or stride != 1
        self.shortcut = (ResNetShortCut(in_channels, out_channels, stride) if needs_projection
                         else nn.Identity())
        if config.layer_type == "basic":
            layers = [ResNetConvLayer(in_channels, out_channels, 3, stride),
                      ResNetConvLayer(out_channels, out_channels, 3, activation=False)]
        else:
            reduced = out_channels // 4
            in_stride = stride if config.downsample_in_bottleneck else 1
            mid_stride = 1 if config.downsample_in_bottleneck else stride
            layers = [ResNetConvLayer(in_channels, reduced, 1, in_stride),
                      ResNetConvLayer(reduced, reduced, 3, mid_stride),
                      ResNetConvLayer(reduced, out_channels, 1, activation=False)]
        self.layer = nn.Sequential(*layers)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.layer(x) + self.shortcut(x))


class ResNetStage(nn.Module):
    def __init__(self, config: ResNetConfig, in_channels: int, out_channels: int,
                 stride: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ResNetBlock(config, in_channels, out_channels, stride),
            *(ResNetBlock(config, out_channels, out_channels, 1) for _ in range(depth - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ResNetEncoder(nn.Module):
    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        widths = (config.embedding_size, *config.hidden_sizes)
        self.stages = nn.ModuleList(
            ResNetStage(config, widths[i], widths[i + 1],
                        2 if i > 0 or config.downsample_in_first_stage else 1, depth)
            for i, depth in enumerate(config.depths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


class ResNetModel(nn.Module):
    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.embedder = ResNetEmbedder(config)
        self.encoder = ResNetEncoder(config)
        self.pooler = nn.AdaptiveAvgPool2d(1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pooler(self.encoder(self.embedder(pixels)))


class ResNetForImageClassification(nn.Module):
    """Pixels [batch, 3, H, W] (normalised) -> logits [batch, num_labels]."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        self.resnet = ResNetModel(config)
        self.classifier = nn.Sequential(nn.Flatten(),
                                        nn.Linear(config.hidden_sizes[-1], config.num_labels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        return self.classifier(self.resnet(pixels))

    @staticmethod
    def optional_tensor(name: str) -> bool:
        # BatchNorm's step counter is a training statistic: checkpoints may leave it out.
        return name.endswith("num_batches_tracked")

    def finish_loading(self, device: torch.device, max_positions: int | None) -> None:
        self.to(memory_format=torch.channels_last)
