"""Supported architectures: the `architectures` name in config.json -> model class and config."""

from __future__ import annotations

from typing import Any

from torch import nn

from surge.models.config import ModelConfig, eos_ids_of, rope_settings
from surge.models.gpt2 import GPT2LMHeadModel
from surge.models.llama import LlamaForCausalLM

__all__ = ["SUPPORTED_ARCHITECTURES", "resolve_architecture"]

_LLAMA_FAMILY = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "MistralForCausalLM")
SUPPORTED_ARCHITECTURES = (*_LLAMA_FAMILY, "GPT2LMHeadModel")


def resolve_architecture(hf: dict[str, Any]) -> tuple[type[nn.Module], ModelConfig]:
    names = hf.get("architectures") or []
    for name in names:
        if name in _LLAMA_FAMILY:
            return LlamaForCausalLM, _llama_config(name, hf)
        if name == "GPT2LMHeadModel":
            return GPT2LMHeadModel, _gpt2_config(hf)
    raise ValueError(
        f"architecture {names or hf.get('model_type')!r} is not supported; supported: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def _llama_config(name: str, hf: dict[str, Any]) -> ModelConfig:
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen2 sliding-window attention (use_sliding_window: true) is not "
                         "supported; set it to false in config.json")
    num_heads = hf["num_attention_heads"]
    theta, scaling = rope_settings(hf)
    return ModelConfig(
        architecture=name,
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
        attention_bias=name == "Qwen2ForCausalLM" or hf.get("attention_bias", False),
        qk_norm=name == "Qwen3ForCausalLM",
        sliding_window=hf.get("sliding_window") if name == "MistralForCausalLM" else None,
        hidden_act=hf.get("hidden_act", "silu"),
        torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        eos_token_ids=eos_ids_of(hf),
        bos_token_id=hf.get("bos_token_id"),
    )


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
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
        tie_word_embeddings=True,
        hidden_act=hf.get("activation_function", "gelu_new"),
        torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        eos_token_ids=eos_ids_of(hf),
        bos_token_id=hf.get("bos_token_id"),
    )
