"""Llama-family decoder: Llama 2/3, Qwen2, Qwen3 and Mistral.

They differ only by q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3), tied embeddings, rope
scaling and sliding windows (Mistral), all read from ``ModelConfig``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from surge.models.attention import paged_attention
from surge.models.config import ModelConfig, eos_ids_of, rope_settings, stored_dtype
from surge.models.layers import CausalLM, RMSNorm
from surge.models.linear import Linear, LinearMethod
from surge.models.rope import RotaryEmbedding, apply_rotary

__all__ = ["LlamaForCausalLM", "llama_config"]

RopeTables = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) of this step's positions


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, [self.q_size, kv_size, kv_size],
                               config.attention_bias, linear_method)
        self.o_proj = Linear(self.q_size, config.hidden_size, False, linear_method)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.scale = self.head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)  # set by the runner

    def forward(self, rope: RopeTables, x: torch.Tensor) -> torch.Tensor:
        num_tokens, qk_heads = x.shape[0], self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x)
        qk = qkv[:, :qk_heads * self.head_dim].view(num_tokens, qk_heads, self.head_dim)
        v = qkv[:, qk_heads * self.head_dim:].view(num_tokens, self.num_kv_heads, -1)
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, :self.num_heads]),
                            self.k_norm(qk[:, self.num_heads:])), dim=1)
        # q and k heads sit side by side in the fused output: rotate them in one pass.
        qk = apply_rotary(qk, rope)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, self.scale)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, [size, size], False, linear_method)
        self.down_proj = Linear(size, config.hidden_size, False, linear_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None):
        super().__init__()
        self.self_attn = LlamaAttention(config, linear_method)
        self.mlp = LlamaMLP(config, linear_method)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, rope: RopeTables, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(rope, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, linear_method)
                                    for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary: RotaryEmbedding | None = None  # derived, built after loading

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, hidden.dtype)
        for layer in self.layers:
            hidden = layer(rope, hidden)
        return self.norm(hidden)


class LlamaForCausalLM(CausalLM):
    # Checkpoint projections that live inside one merged GEMM here: name -> (module, shard).
    packed_modules: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None = None):
        """``linear_method`` stores and applies the decoder layers' projections (None: the
        serving dtype, unquantized)."""
        super().__init__(config)
        self.model = LlamaModel(config, linear_method)

    def input_embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    def finish_loading(self, device: torch.device, max_positions: int | None) -> None:
        """Tie embeddings and build the rope tables once real weights are in place."""
        super().finish_loading(device, max_positions)
        limit = self.config.max_position_embeddings
        self.model.rotary = RotaryEmbedding(
            self.config.head_dim, min(max_positions or limit, limit), self.config.rope_theta,
            self.config.rope_scaling, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def attention_layers(self) -> list[LlamaAttention]:
        return [layer.self_attn for layer in self.model.layers]



def llama_config(hf: dict[str, Any], architecture: str) -> ModelConfig:
    """The decoder config of a Llama, Qwen2, Qwen3 or Mistral config.json."""
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen2 sliding-window attention (use_sliding_window: true) is not "
                         "supported; set it to false in config.json")
    num_heads = hf["num_attention_heads"]
    theta, scaling = rope_settings(hf)
    return ModelConfig(
        architecture=architecture,
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        # Qwen2 always biases q/k/v; the others say so in `attention_bias`.
        attention_bias=architecture == "Qwen2ForCausalLM" or hf.get("attention_bias", False),
        qk_norm=architecture == "Qwen3ForCausalLM",
        sliding_window=hf.get("sliding_window") if architecture == "MistralForCausalLM" else None,
        hidden_act=hf.get("hidden_act", "silu"),
        torch_dtype=stored_dtype(hf),
        eos_token_ids=eos_ids_of(hf),
        bos_token_id=hf.get("bos_token_id"),
    )
