"""Vision Transformers in Hugging Face's ``ViTForImageClassification`` layout.

Pixels are cut into ``patch_size`` squares by a strided convolution, a learned [CLS] token is
prepended and learned position embeddings added; pre-norm encoder layers follow, and the head
classifies the final [CLS] vector. Submodules are named after the public checkpoints' tensors
(``vit.encoder.layer.0.attention.attention.query.weight``); the renamed layout that newer
transformers releases use in memory (``vit.layers.0.attention.q_proj``) is accepted as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surge.models.resnet import num_labels

__all__ = ["ViTConfig", "ViTForImageClassification"]


@dataclass(frozen=True)
class ViTConfig:
    num_labels: int
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    hidden_act: str = "gelu"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ViTConfig:
        if hf.get("hidden_act", "gelu") not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported: allowed is "
                             "'gelu' (exact or tanh)")
        return cls(num_labels=num_labels(hf), hidden_size=hf.get("hidden_size", 768),
                   num_layers=hf.get("num_hidden_layers", 12),
                   num_heads=hf.get("num_attention_heads", 12),
                   intermediate_size=hf.get("intermediate_size", 3072),
                   image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 16),
                   num_channels=hf.get("num_channels", 3),
                   layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                   qkv_bias=hf.get("qkv_bias", True), hidden_act=hf.get("hidden_act", "gelu"))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size,
                                    config.patch_size, config.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(pixels).flatten(2).transpose(1, 2)


class ViTEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(
            torch.empty(1, config.num_patches + 1, config.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(config)
        self.image_size = config.image_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"pixels of shape {tuple(pixels.shape)}: this ViT takes "
                             f"{self.image_size}x{self.image_size} images")
        patches = self.patch_embeddings(pixels)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat((cls, patches), dim=1) + self.position_embeddings


class ViTSelfAttention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        size = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, size // config.num_heads
        self.query, self.key, self.value = (nn.Linear(size, size, bias=config.qkv_bias)
                                            for _ in range(3))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, tokens, size = hidden.shape
        q, k, v = (proj(hidden).view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(batch, tokens, size)


class ViTDense(nn.Module):
    def __init__(self, in_size: int, out_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class ViTAttention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.attention = ViTSelfAttention(config)
        self.output = ViTDense(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(hidden))


class ViTLayer(nn.Module):
    """Pre-norm: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        size, eps = config.hidden_size, config.layer_norm_eps
        self.layernorm_before = nn.LayerNorm(size, eps=eps)
        self.attention = ViTAttention(config)
        self.layernorm_after = nn.LayerNorm(size, eps=eps)
        self.intermediate = ViTDense(size, config.intermediate_size)
        self.output = ViTDense(config.intermediate_size, size)
        self.approximate = "none" if config.hidden_act == "gelu" else "tanh"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attention(self.layernorm_before(hidden))
        mlp = F.gelu(self.intermediate(self.layernorm_after(hidden)), approximate=self.approximate)
        return hidden + self.output(mlp)


class ViTEncoder(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(config) for _ in range(config.num_layers))


class ViTModel(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.embeddings = ViTEmbeddings(config)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixels)
        for layer in self.encoder.layer:
            hidden = layer(hidden)
        return self.layernorm(hidden)


class ViTForImageClassification(nn.Module):
    """Pixels [batch, 3, H, W] (normalised) -> logits [batch, num_labels]."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = ViTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.vit(pixels)[:, 0])

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        if name.startswith("vit.pooler."):
            return None  # ViTModel checkpoints may carry a pooler the classifier does not use
        match = _RENAMED.match(name)
        if match is None:
            return name
        layer, part = match.groups()
        return f"vit.encoder.layer.{layer}.{_RENAMED_PARTS.get(part, part)}"


# transformers 5's in-memory names -> the public checkpoints' names.
_RENAMED = re.compile(r"vit\.layers\.(\d+)\.(.+)")
_RENAMED_PARTS = {
    "attention.q_proj.weight": "attention.attention.query.weight",
    "attention.q_proj.bias": "attention.attention.query.bias",
    "attention.k_proj.weight": "attention.attention.key.weight",
    "attention.k_proj.bias": "attention.attention.key.bias",
    "attention.v_proj.weight": "attention.attention.value.weight",
    "attention.v_proj.bias": "attention.attention.value.bias",
    "attention.o_proj.weight": "attention.output.dense.weight",
    "attention.o_proj.bias": "attention.output.dense.bias",
    "mlp.fc1.weight": "intermediate.dense.weight",
    "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight",
    "mlp.fc2.bias": "output.dense.bias",
}
