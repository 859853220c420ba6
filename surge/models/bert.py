"""BERT encoders (``BertModel``) with sentence-transformers pooling: text -> one vector.

One readable file: embeddings (word + position + token type, LayerNorm), N post-norm encoder
layers, then the pooling a sentence-transformers checkpoint declares in ``modules.json`` and
``1_Pooling/config.json`` (mean over real tokens, the [CLS] token, max, or mean scaled by
sqrt(length)) and its ``Normalize`` module (unit length, so a dot product is the cosine).
Submodules are named after the checkpoint's tensors, so loading is a checked one-to-one copy.

Padding is masked everywhere (attention and pooling), so an input's vector does not depend on
what else shares its batch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BertConfig", "BertModel", "Pooling", "read_pooling"]

logger = logging.getLogger(__name__)

PoolingMode = Literal["mean", "cls", "max", "mean_sqrt_len"]
_ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> BertConfig:
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type={hf['position_embedding_type']!r} is "
                             "not supported: allowed is 'absolute'")
        if hf.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported: allowed is "
                             f"one of {', '.join(_ACTIVATIONS)}")
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                   intermediate_size=hf["intermediate_size"],
                   max_position_embeddings=hf.get("max_position_embeddings", 512),
                   type_vocab_size=hf.get("type_vocab_size", 2),
                   layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                   hidden_act=hf.get("hidden_act", "gelu"),
                   pad_token_id=hf.get("pad_token_id") or 0)


@dataclass(frozen=True)
class Pooling:
    """How token vectors become one sentence vector (sentence-transformers' modules)."""

    mode: PoolingMode = "mean"
    normalize: bool = False

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``hidden`` [batch, tokens, dim], ``mask`` [batch, tokens] (True: a real token)."""
        if self.mode == "cls":
            pooled = hidden[:, 0]
        elif self.mode == "max":
            pooled = hidden.masked_fill(~mask[..., None], torch.finfo(hidden.dtype).min).amax(1)
        else:
            weights = mask[..., None].to(hidden.dtype)
            total = (hidden * weights).sum(1)
            count = weights.sum(1).clamp(min=1e-9)
            pooled = total / (count.sqrt() if self.mode == "mean_sqrt_len" else count)
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings,
                                                config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Single-segment inputs: token type 0 everywhere, as sentence-transformers encodes.
        hidden = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
                  + self.token_type_embeddings.weight[0])
        return self.LayerNorm(hidden)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        size = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, size // config.num_heads
        self.query, self.key, self.value = (nn.Linear(size, size) for _ in range(3))

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        batch, tokens, size = hidden.shape
        q, k, v = (proj(hidden).view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return out.transpose(1, 2).reshape(batch, tokens, size)


class BertDenseNorm(nn.Module):
    """dense -> residual add -> LayerNorm (BERT's post-norm sublayer output)."""

    def __init__(self, in_size: int, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertDenseNorm(config.hidden_size, config)

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, attn_mask), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertDenseNorm(config.intermediate_size, config)

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden, attn_mask)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))


class BertModel(nn.Module):
    """Token ids [batch, tokens] and a padding mask -> token vectors [batch, tokens, dim]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        # [batch, 1, 1, tokens]: every query sees only real keys.
        attn_mask = mask[:, None, None, :]
        for layer in self.encoder.layer:
            hidden = layer(hidden, attn_mask)
        return hidden

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        """Checkpoint name -> ours: BertForX checkpoints prefix ``bert.``; the pooler head and
        the position-id buffer are not used by sentence embeddings."""
        name = name.removeprefix("bert.")
        if name.startswith(("pooler.", "cls.", "classifier.")) or name.endswith("position_ids"):
            return None
        # Old checkpoints (TF ports) name LayerNorm parameters gamma and beta.
        return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias")


def read_pooling(model_dir: str | Path) -> Pooling:
    """The pooling of a sentence-transformers layout; mean pooling for a plain BertModel."""
    model_dir = Path(model_dir)
    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        logger.info("%s has no modules.json: using mean pooling without normalisation "
                    "(sentence-transformers' default for plain encoders)", model_dir)
        return Pooling("mean", normalize=False)
    modules = json.loads(modules_path.read_text())
    mode: PoolingMode = "mean"
    normalize = False
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Pooling":
            mode = _pooling_mode(model_dir / module.get("path", "1_Pooling") / "config.json")
        elif kind == "Normalize":
            normalize = True
        elif kind not in ("Transformer", "Pooling", "Normalize"):
            raise ValueError(f"{modules_path}: module type {module.get('type')!r} is not "
                             "supported: allowed are Transformer, Pooling and Normalize")
    return Pooling(mode, normalize)


_POOLING_KEYS: dict[str, PoolingMode] = {
    "pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}


def _pooling_mode(path: Path) -> PoolingMode:
    config = json.loads(path.read_text()) if path.is_file() else {}
    chosen = [mode for key, mode in _POOLING_KEYS.items() if config.get(key)]
    others = [key for key, on in config.items()
              if key.startswith("pooling_mode_") and on and key not in _POOLING_KEYS]
    if others or len(chosen) > 1:
        raise ValueError(f"{path}: pooling {chosen + others} is not supported: allowed is "
                         "exactly one of cls, mean, max or mean_sqrt_len tokens")
    return chosen[0] if chosen else "mean"  # type: ignore[return-value]

