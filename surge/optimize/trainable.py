"""A trainable Llama-family decoder whose parameter names are Hugging Face's tensor names.

Surge's serving model (`surge.models.llama`) fuses q/k/v, reads a paged KV cache and runs
under inference mode: it cannot be trained. Distillation needs ordinary autograd over padded
[batch, time] sequences, so this module re-states the same architecture with plain
`nn.Linear` layers and `scaled_dot_product_attention`. It reuses Surge's RMSNorm and rotary
tables (the numerics the served model uses), and its ``state_dict`` keys are exactly the
checkpoint's tensor names, so loading a teacher and writing a student need no renaming.
A parity test checks its logits against the serving model's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surge.models.config import ModelConfig
from surge.models.layers import RMSNorm
from surge.models.llama import llama_config
from surge.models.registry import find_architecture
from surge.models.rope import RotaryEmbedding, apply_rotary

__all__ = ["LLAMA_FAMILY", "TrainableDecoder", "decoder_config"]

LLAMA_FAMILY = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


def decoder_config(hf: dict[str, Any], role: str) -> ModelConfig:
    """The decoder config of a config.json, or a ValueError saying why it cannot be distilled.

    ``role`` ("teacher" or "student") names the model in the message.
    """
    try:
        arch = find_architecture(hf)
    except ValueError as exc:
        raise ValueError(f"the {role} is not a causal LM Surge can train: {exc}") from None
    if arch.task != "generate":
        raise ValueError(f"the {role} is a {arch.task!r} model ({arch.name}), not a causal "
                         f"language model: distillation needs one of {', '.join(LLAMA_FAMILY)}")
    if arch.name not in LLAMA_FAMILY:
        raise ValueError(f"the {role}'s architecture {arch.name} is a causal LM but distillation "
                         f"supports only the Llama family for now: {', '.join(LLAMA_FAMILY)}")
    return llama_config(hf, arch.name)


class _Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [b, heads, t, d]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class _MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = _Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = _MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class TrainableDecoder(nn.Module):
    """``forward(input_ids [b, t]) -> logits [b, t, vocab]``; sequences start at position 0.

    Right padding needs no attention mask: with causal attention a real token never sees the
    padding after it, and the loss masks the padded positions.
    """

    def __init__(self, hf: dict[str, Any], role: str = "student"):
        super().__init__()
        self.hf_config = dict(hf)
        self.config = decoder_config(hf, role)
        self.model = _Body(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope: dict[tuple[torch.device, int], RotaryEmbedding] = {}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        hidden = self.model.embed_tokens(input_ids)
        positions = torch.arange(t, device=input_ids.device)
        rope = self._rotary(input_ids.device, t).lookup(positions, hidden.dtype)
        mask = self._window_mask(t, input_ids.device)
        for layer in self.model.layers:
            hidden = layer(hidden, rope, mask)
        return self.lm_head(self.model.norm(hidden))

    def _rotary(self, device: torch.device, length: int) -> RotaryEmbedding:
        size = max(length, 2048)
        key = (device, size)
        if key not in self._rope:  # derived tables, never trained or saved
            cfg = self.config
            self._rope = {key: RotaryEmbedding(cfg.head_dim, size, cfg.rope_theta,
                                               cfg.rope_scaling, device)}
        return self._rope[key]

    def _window_mask(self, t: int, device: torch.device) -> torch.Tensor | None:
        window = self.config.sliding_window
        if not window or t <= window:
            return None
        pos = torch.arange(t, device=device)
        return (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)

    # -- weights under their checkpoint names ------------------------------------------------

    def load_tensors(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors in by name; every parameter must be given exactly once
        (an untied head may be absent only when embeddings are tied)."""
        params = dict(self.named_parameters(remove_duplicate=False))
        seen: set[str] = set()
        for name, tensor in tensors:
            if name not in params:
                continue  # e.g. rotary inv_freq buffers some exporters write
            target = params[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, the config "
                                 f"implies {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor.to(target.dtype))
            seen.add(name)
        missing = set(params) - seen
        if self.config.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) this model needs, "
                             f"e.g. {sorted(missing)[:3]}")

    def checkpoint_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every tensor as a checkpoint stores it (a tied head once, as the embedding)."""
        out = {}
        for name, param in self.named_parameters():  # duplicates (the tied head) skipped
            out[name] = param.detach().to("cpu", dtype).contiguous()
        if self.config.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out
