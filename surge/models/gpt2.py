"""GPT-2: learned positions, LayerNorm, GELU (tanh), fused c_attn, LM head tied (by default)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surge.models.attention import paged_attention
from surge.models.config import ModelConfig, eos_ids_of, stored_dtype
from surge.models.layers import CausalLM
from surge.models.linear import Linear, LinearMethod

__all__ = ["GPT2LMHeadModel", "gpt2_config"]

# GPT-2 checkpoints use Conv1D, which stores weights as [in, out]; nn.Linear wants [out, in].
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        size = config.hidden_size
        self.c_attn = Linear(size, 3 * size, True, linear_method)
        self.c_proj = Linear(size, size, True, linear_method)
        self.scale = self.head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)  # set by the runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = (t.reshape(shape) for t in self.c_attn(x).chunk(3, dim=-1))
        return self.c_proj(paged_attention(q, k, v, self.k_cache, self.v_cache, self.scale))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None):
        super().__init__()
        self.c_fc = Linear(config.hidden_size, config.intermediate_size, True, linear_method)
        self.c_proj = Linear(config.intermediate_size, config.hidden_size, True, linear_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config, linear_method)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config, linear_method)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden))
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, linear_method) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            hidden = block(hidden)
        return self.ln_f(hidden)


class GPT2LMHeadModel(CausalLM):
    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None = None):
        """``linear_method``: as for ``LlamaForCausalLM``."""
        super().__init__(config)
        self.transformer = GPT2Model(config, linear_method)

    def input_embedding(self) -> nn.Embedding:
        return self.transformer.wte

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def attention_layers(self) -> list[GPT2Attention]:
        return [block.attn for block in self.transformer.h]

    def checkpoint_name(self, name: str) -> str | None:
        """Map a checkpoint tensor name to ours; None for tensors to skip."""
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return None  # causal-mask buffers
        if name == "lm_head.weight":
            return None if self.config.tie_word_embeddings else name  # tied: wte is the head
        return name if name.startswith("transformer.") else f"transformer.{name}"

    @staticmethod
    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if name.endswith(_CONV1D_WEIGHTS) else tensor


def gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    hidden = hf["n_embd"]
    return ModelConfig(
        architecture="GPT2LMHeadModel",
        hidden_size=hidden,
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        num_kv_heads=hf["n_head"],
        head_dim=hidden // hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("n_positions", 1024),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        hidden_act=hf.get("activation_function", "gelu_new"),
        torch_dtype=stored_dtype(hf),
        eos_token_ids=eos_ids_of(hf),
        bos_token_id=hf.get("bos_token_id"),
    )
