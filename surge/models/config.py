"""One flat description of a decoder-only model, read from a Hugging Face `config.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelConfig", "eos_ids_of", "rope_settings", "stored_dtype"]


@dataclass
class ModelConfig:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    torch_dtype: str = "float32"
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    def kv_bytes_per_token(self, dtype_size: int) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_size


def stored_dtype(hf: dict[str, Any]) -> str:
    """The dtype a checkpoint's weights were saved in ("torch_dtype", or transformers 5's
    "dtype"), e.g. "bfloat16"; float32 when it does not say."""
    return str(hf.get("torch_dtype") or hf.get("dtype") or "float32").replace("torch.", "")


def eos_ids_of(hf: dict[str, Any]) -> list[int]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [int(eos)]


def rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either the classic keys or transformers 5's `rope_parameters`."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return theta, scaling
