"""Random-weight checkpoints of real architectures, in Hugging Face layout, with a local tokenizer.

No model hub is reachable here, so tests and benchmarks use checkpoints that have the exact shapes,
tensor names and config keys of public models (SmolLM2, Qwen2.5, Qwen3, Llama 3.2, GPT-2) but
seeded random weights and a byte-level BPE tokenizer trained locally on a synthetic corpus.
Throughput does not depend on weight values, and the loader, tokenizer and chat paths are the
same ones real checkpoints take.

A checkpoint directory holds `config.json`, `model.safetensors`, `tokenizer.json`,
`tokenizer_config.json` (with a ChatML `chat_template`) and `generation_config.json`.
Same preset and seed, same bytes, in every file. The encoder and vision presets (`tiny-bert`,
`tiny-resnet`, `tiny-vit`, `resnet-50`, `vit-base`) write their own files instead: see
`pool_checkpoints`.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from surge.testing.pool_checkpoints import (
    POOL_FAMILIES,
    bert_config,
    pool_tensor_specs,
    resnet_config,
    vit_config,
    wordpiece_tokenizer_json,
    write_pool_files,
)

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported inside the functions that need them: the CLI imports this
# module for PRESETS to build its parser, and `surge --help` should not pay for torch.

__all__ = [
    "PRESETS",
    "Preset",
    "TensorSpec",
    "cache_dir",
    "ensure_demo_model",
    "generate_weights",
    "train_tokenizer",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

# Special tokens sit at the start of every vocabulary, as in SmolLM2: ids 0, 1, 2.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
BOS_ID, IM_START_ID, EOS_ID = 0, 1, 2
# A chat turn ends at <|im_end|>; plain completion ends at <|endoftext|>. Both stop generation.
EOS_IDS = [EOS_ID, BOS_ID]

INITIALIZER_RANGE = 0.02
FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

Family = Literal["llama", "gpt2", "bert", "resnet", "vit"]


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its Hugging Face name, shape and how it is initialised."""

    name: str
    shape: tuple[int, ...]
    # fan_in: N(0, 1/fan_in), for convolutions and heads of the vision presets.
    init: Literal["normal", "norm", "bias", "fan_in"]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, eq=False)
class Preset:
    """A named architecture shape. `config` is the full config.json; treat it as read-only."""

    name: str
    family: Family
    config: dict[str, Any]
    description: str

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def dtype(self) -> str:
        """The stored dtype's name, e.g. "bfloat16"."""
        return str(self.config["torch_dtype"])

    @property
    def max_position_embeddings(self) -> int:
        key = "n_positions" if self.family == "gpt2" else "max_position_embeddings"
        return int(self.config[key])

    def tensor_specs(self) -> list[TensorSpec]:
        """Every tensor of the checkpoint, in the fixed order the weights are drawn."""
        if self.family == "gpt2":
            return _gpt2_specs(self.config)
        if self.family in POOL_FAMILIES:
            return [TensorSpec(name, shape, init)  # type: ignore[arg-type]
                    for name, shape, init in pool_tensor_specs(self.family, self.config)]
        return _llama_specs(self.config)

    @property
    def num_params(self) -> int:
        """Parameters as Hugging Face counts them (a tied embedding once)."""
        return sum(spec.numel for spec in self.tensor_specs())


def _llama_like(
    architecture: str,
    model_type: str,
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    max_pos: int,
    rope_theta: float,
    rms_eps: float,
    tied: bool,
    dtype: str,
    head_dim: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """config.json of a Llama-family model, keyed as the public checkpoints key it."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        # Written out even where it is hidden/heads, so readers need not derive it.
        "head_dim": head_dim or hidden // heads,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "hidden_act": "silu",
        "rms_norm_eps": rms_eps,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "initializer_range": INITIALIZER_RANGE,
        "tie_word_embeddings": tied,
        "use_cache": True,
        **_token_and_dtype_fields(dtype),
        **extra,
    }


def _gpt2(*, embd: int, layers: int, heads: int, vocab: int, positions: int,
          dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": embd,
        "n_layer": layers,
        "n_head": heads,
        "n_inner": None,
        "n_positions": positions,
        "n_ctx": positions,
        "vocab_size": vocab,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "attn_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "resid_pdrop": 0.1,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "initializer_range": INITIALIZER_RANGE,
        "tie_word_embeddings": True,
        "use_cache": True,
        **_token_and_dtype_fields(dtype),
    }


def _token_and_dtype_fields(dtype: str) -> dict[str, Any]:
    # transformers 5 reads `dtype`; older readers and most tools read `torch_dtype`.
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_IDS, "torch_dtype": dtype, "dtype": dtype}


_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Scaled down so that, with head_dim 32, some frequencies fall in each of llama3's three bands
# (kept, interpolated, divided by `factor`) within a 2048-token context.
_TINY_LLAMA3_SCALING = {**_LLAMA3_SCALING, "factor": 4.0, "original_max_position_embeddings": 512}


def _build_presets() -> dict[str, Preset]:
    bf16, f32 = "bfloat16", "float32"
    presets = [
        Preset("tiny-llama", "llama", _llama_like(
            "LlamaForCausalLM", "llama", hidden=128, layers=4, heads=4, kv_heads=2,
            intermediate=256, vocab=2048, max_pos=2048, rope_theta=500000.0, rms_eps=1e-5,
            tied=False, dtype=f32, rope_scaling=_TINY_LLAMA3_SCALING, attention_bias=False,
            mlp_bias=False), "Llama 3.2 features: GQA, llama3 rope scaling, untied head"),
        Preset("tiny-qwen2", "llama", _llama_like(
            "Qwen2ForCausalLM", "qwen2", hidden=128, layers=3, heads=4, kv_heads=1,
            intermediate=320, vocab=2048, max_pos=2048, rope_theta=1000000.0, rms_eps=1e-6,
            tied=True, dtype=f32, sliding_window=2048, use_sliding_window=False,
            max_window_layers=3), "Qwen2.5 features: qkv bias, one KV head, tied"),
        Preset("tiny-qwen3", "llama", _llama_like(
            "Qwen3ForCausalLM", "qwen3", hidden=128, layers=2, heads=4, kv_heads=2,
            head_dim=64, intermediate=256, vocab=2048, max_pos=2048, rope_theta=1000000.0,
            rms_eps=1e-6, tied=True, dtype=f32, attention_bias=False, sliding_window=None,
            use_sliding_window=False, max_window_layers=2),
            "Qwen3 features: q/k RMSNorm, head_dim != hidden/heads, tied"),
        Preset("tiny-mistral", "llama", _llama_like(
            "MistralForCausalLM", "mistral", hidden=128, layers=2, heads=4, kv_heads=2,
            intermediate=256, vocab=1024, max_pos=2048, rope_theta=1000000.0, rms_eps=1e-5,
            tied=False, dtype=f32, sliding_window=None), "Mistral: GQA, untied, no window"),
        Preset("tiny-gpt2", "gpt2", _gpt2(
            embd=128, layers=2, heads=4, vocab=1024, positions=1024, dtype=f32),
            "GPT-2: learned positions, LayerNorm with bias, Conv1D layout, tied"),
        Preset("smollm2-135m", "llama", _llama_like(
            "LlamaForCausalLM", "llama", hidden=576, layers=30, heads=9, kv_heads=3,
            intermediate=1536, vocab=49152, max_pos=8192, rope_theta=100000.0, rms_eps=1e-5,
            tied=True, dtype=bf16, attention_bias=False, mlp_bias=False),
            "SmolLM2-135M shape"),
        Preset("qwen2.5-0.5b", "llama", _llama_like(
            "Qwen2ForCausalLM", "qwen2", hidden=896, layers=24, heads=14, kv_heads=2,
            intermediate=4864, vocab=151936, max_pos=32768, rope_theta=1000000.0,
            rms_eps=1e-6, tied=True, dtype=bf16, sliding_window=32768,
            use_sliding_window=False, max_window_layers=24), "Qwen2.5-0.5B shape"),
        Preset("qwen3-0.6b", "llama", _llama_like(
            "Qwen3ForCausalLM", "qwen3", hidden=1024, layers=28, heads=16, kv_heads=8,
            head_dim=128, intermediate=3072, vocab=151936, max_pos=40960,
            rope_theta=1000000.0, rms_eps=1e-6, tied=True, dtype=bf16, attention_bias=False,
            sliding_window=None, use_sliding_window=False, max_window_layers=28),
            "Qwen3-0.6B shape"),
        Preset("llama-3.2-1b", "llama", _llama_like(
            "LlamaForCausalLM", "llama", hidden=2048, layers=16, heads=32, kv_heads=8,
            intermediate=8192, vocab=128256, max_pos=131072, rope_theta=500000.0,
            rms_eps=1e-5, tied=True, dtype=bf16, rope_scaling=_LLAMA3_SCALING,
            attention_bias=False, mlp_bias=False), "Llama-3.2-1B shape"),
        Preset("gpt2", "gpt2", _gpt2(
            embd=768, layers=12, heads=12, vocab=50257, positions=1024, dtype=f32),
            "GPT-2 (124M) shape"),
        *_pool_presets(),
    ]
    return {p.name: p for p in presets}


def _pool_presets() -> list[Preset]:
    """Embedding and image-classification models (sentence-transformers / HF vision layout)."""
    return [
        Preset("tiny-bert", "bert", bert_config(
            hidden=64, layers=2, heads=4, intermediate=128, vocab=1024, max_pos=128),
            "BERT encoder with mean pooling and normalisation, WordPiece tokenizer"),
        Preset("tiny-resnet", "resnet", resnet_config(
            embedding=16, hidden_sizes=[32, 64], depths=[1, 2], labels=10, image_size=64),
            "ResNet bottleneck, 2 stages, 10 classes, 64 px"),
        Preset("tiny-vit", "vit", vit_config(
            hidden=32, layers=2, heads=4, intermediate=64, image_size=32, patch=8, labels=10),
            "ViT, 2 layers, 10 classes, 32 px in 8 px patches"),
        Preset("resnet-50", "resnet", resnet_config(
            embedding=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
            labels=1000, image_size=224), "ResNet-50 shape (microsoft/resnet-50), 1000 classes"),
        Preset("vit-base", "vit", vit_config(
            hidden=768, layers=12, heads=12, intermediate=3072, image_size=224, patch=16,
            labels=1000), "ViT-B/16 shape (google/vit-base-patch16-224), 1000 classes"),
    ]


PRESETS: dict[str, Preset] = _build_presets()


def _preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)} "
            "(e.g. `surge make-model --preset tiny-llama --out DIR`)") from None


# --------------------------------------------------------------------------------------------
# Tensor layout: the names and shapes transformers' own classes use
# --------------------------------------------------------------------------------------------

def _llama_specs(cfg: dict[str, Any]) -> list[TensorSpec]:
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), "normal")]
    for i in range(cfg["num_hidden_layers"]):
        specs += _llama_layer_specs(cfg, f"model.layers.{i}")
    specs.append(TensorSpec("model.norm.weight", (hidden,), "norm"))
    if not cfg["tie_word_embeddings"]:
        specs.append(TensorSpec("lm_head.weight", (vocab, hidden), "normal"))
    return specs


def _llama_layer_specs(cfg: dict[str, Any], prefix: str) -> list[TensorSpec]:
    hidden, inter, head_dim = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q_out = cfg["num_attention_heads"] * head_dim
    kv_out = cfg["num_key_value_heads"] * head_dim
    # Qwen2 always biases q/k/v (and never o); Llama-style configs say so in `attention_bias`.
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    attn = f"{prefix}.self_attn"
    specs = [TensorSpec(f"{prefix}.input_layernorm.weight", (hidden,), "norm")]
    for proj, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
        specs.append(TensorSpec(f"{attn}.{proj}.weight", (out, hidden), "normal"))
        if qkv_bias:
            specs.append(TensorSpec(f"{attn}.{proj}.bias", (out,), "bias"))
    specs.append(TensorSpec(f"{attn}.o_proj.weight", (hidden, q_out), "normal"))
    if cfg.get("attention_bias", False):
        specs.append(TensorSpec(f"{attn}.o_proj.bias", (hidden,), "bias"))
    if cfg["model_type"] == "qwen3":
        specs.append(TensorSpec(f"{attn}.q_norm.weight", (head_dim,), "norm"))
        specs.append(TensorSpec(f"{attn}.k_norm.weight", (head_dim,), "norm"))
    specs.append(TensorSpec(f"{prefix}.post_attention_layernorm.weight", (hidden,), "norm"))
    for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                        ("down_proj", (hidden, inter))):
        specs.append(TensorSpec(f"{prefix}.mlp.{proj}.weight", shape, "normal"))
    return specs


def _gpt2_specs(cfg: dict[str, Any]) -> list[TensorSpec]:
    embd, vocab = cfg["n_embd"], cfg["vocab_size"]
    specs = [
        TensorSpec("transformer.wte.weight", (vocab, embd), "normal"),
        TensorSpec("transformer.wpe.weight", (cfg["n_positions"], embd), "normal"),
    ]
    for i in range(cfg["n_layer"]):
        specs += _gpt2_block_specs(cfg, f"transformer.h.{i}")
    specs += _layer_norm_specs("transformer.ln_f", embd)
    return specs  # GPT-2 always ties lm_head to wte, so the head is never stored.


def _gpt2_block_specs(cfg: dict[str, Any], prefix: str) -> list[TensorSpec]:
    embd = cfg["n_embd"]
    inner = cfg.get("n_inner") or 4 * embd
    specs = _layer_norm_specs(f"{prefix}.ln_1", embd)
    # GPT-2 uses Conv1D: weights are stored [in, out], the transpose of nn.Linear.
    for name, fan_in, fan_out in (("attn.c_attn", embd, 3 * embd), ("attn.c_proj", embd, embd)):
        specs += _conv1d_specs(f"{prefix}.{name}", fan_in, fan_out)
    specs += _layer_norm_specs(f"{prefix}.ln_2", embd)
    for name, fan_in, fan_out in (("mlp.c_fc", embd, inner), ("mlp.c_proj", inner, embd)):
        specs += _conv1d_specs(f"{prefix}.{name}", fan_in, fan_out)
    return specs


def _conv1d_specs(prefix: str, fan_in: int, fan_out: int) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.weight", (fan_in, fan_out), "normal"),
            TensorSpec(f"{prefix}.bias", (fan_out,), "bias")]


def _layer_norm_specs(prefix: str, dim: int) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.weight", (dim,), "norm"),
            TensorSpec(f"{prefix}.bias", (dim,), "bias")]


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

# Drawn in fp32 chunks of this many values and cast into the stored dtype, so a 1.2B-parameter
# bf16 checkpoint needs its own size in RAM plus 64 MiB, not 2x in fp32.
_CHUNK = 1 << 24


def generate_weights(preset: str | Preset, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, drawn from one seeded generator in `tensor_specs` order.

    Matrices and embeddings are N(0, 0.02). Norm weights are 1 + N(0, 0.02) and biases
    N(0, 0.02) rather than exactly ones and zeros, so that a loader which drops a bias or a norm
    weight (or applies Gemma's 1 + w) fails a parity test instead of passing by accident.
    """
    import torch

    p = preset if isinstance(preset, Preset) else _preset(preset)
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, p.dtype)
    weights = {}
    with _progress(p) as bar:
        for spec in p.tensor_specs():
            weights[spec.name] = _draw(spec, dtype, gen)
            bar.update(spec.numel)
    return weights


def _draw(spec: TensorSpec, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    import torch

    out = torch.empty(spec.shape, dtype=dtype)
    flat = out.view(-1)
    std = INITIALIZER_RANGE
    if spec.init == "fan_in":
        std = (spec.numel // spec.shape[0]) ** -0.5
    for start in range(0, flat.numel(), _CHUNK):
        values = torch.randn(min(_CHUNK, flat.numel() - start), generator=gen)
        values.mul_(std)
        if spec.init == "norm":
            values.add_(1.0)
        flat[start:start + values.numel()] = values  # the copy casts to the stored dtype
    return out


def _progress(preset: Preset) -> Any:
    from tqdm import tqdm

    # Only the big presets take long enough to deserve a bar; tqdm hides it off a terminal.
    disable = None if preset.num_params > 50_000_000 else True
    return tqdm(total=preset.num_params, unit="param", unit_scale=True, disable=disable,
                desc=f"weights {preset.name}")


# --------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained on a seeded synthetic corpus
# --------------------------------------------------------------------------------------------

_ENGLISH_TEXT = """
the of and to a in is it you that he was for on are with as I his they be at one have this from
or had by not word but what some we can out other were all there when up use your how said an
each she which do their time if will way about many then them write would like so these her long
make thing see him two has look more day could go come did number sound no most people my over
know water than call first who may down side been now find any new work part take get place made
live where after back little only round man year came show every good me give our under name very
through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food
sun four between state keep eye never last let thought city tree cross farm hard start might story
saw far sea draw left late run while press close night real life few north open seem together next
white children begin got walk example ease paper group always music those both mark often letter
until mile river car feet care second book carry took science eat room friend began idea fish
mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual
young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock
order fire south problem piece told knew pass since top whole king space heard best hour better
during hundred five remember step early hold west ground interest reach fast verb sing listen six
table travel less morning ten simple several vowel toward war lay against pattern slow center love
person money serve appear road map rain rule govern pull cold notice voice unit power town fine
certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct able
pound done beauty drive stood contain front teach week final gave green oh quick develop ocean
warm free minute strong special mind behind clear tail produce fact street inch multiply nothing
course stay wheel full force blue object decide surface deep moon island foot system busy test
record boat common gold possible plane stead dry wonder laugh thousand ago ran check game shape
equate hot miss brought heat snow tire bring yes distant fill east paint language among model
server request token batch queue cache memory engine stream user prompt reply
"""

# Multi-byte UTF-8 (2, 3 and 4 bytes per character), so byte-level merges inside characters occur.
_NON_ASCII_TEXT = """
café naïve über jalapeño façade Zürich São résumé crème brûlée fiancée piñata smörgåsbord
日本語 東京 中文 漢字 こんにちは ありがとう Привет мир спасибо γειά σου مرحبا שלום 한국어 नमस्ते
🙂 🚀 👍 🎉 ❤️ 🤖 🌍 € £ ¥ °C ½ — … “quoted” «guillemets» ✓ ∑ π
"""
_ENGLISH, _NON_ASCII = _ENGLISH_TEXT.split(), _NON_ASCII_TEXT.split()

_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "y", "z", "br", "cr", "dr", "fr", "gr", "pr", "tr", "bl", "cl", "fl", "gl", "pl", "sl",
           "ch", "sh", "th", "st", "sp", "sk", "sm", "sn", "sw", "qu", "wh"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ea", "ee", "oo", "ou", "ie", "oa",
           "y"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "d", "nd", "st", "ng", "ck", "rt", "ll", "x"]
_ENDINGS = [".", ".", ".", ".", ".", "?", "!", "...", ":", ";"]
_SEPARATORS = [" "] * 8 + ["\n", "\n\n"]

# The corpus seed is fixed and independent of the checkpoint seed: every checkpoint with the same
# vocabulary size gets the same tokenizer, so checkpoints differing only in seed stay compatible
# (e.g. as draft and target) and one trained tokenizer serves them all.
_CORPUS_SEED = 0


def _pseudo_word(rng: random.Random) -> str:
    syllables = rng.choice((1, 2, 2, 3, 3, 3, 4))
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables))


def _number(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return str(rng.randrange(1900, 2040))
    if kind == 1:
        return f"{rng.randrange(1000)}.{rng.randrange(100):02d}"
    if kind == 2:
        return f"${rng.randrange(1, 10000)}"
    if kind == 3:
        return f"{rng.randrange(101)}%"
    return str(rng.randrange(10 ** rng.randrange(1, 8)))


def _lexicon(vocab_size: int, rng: random.Random) -> list[str]:
    """Words by frequency rank: common English first, then a mix of made-up words and numbers.

    BPE can only create as many tokens as there are distinct strings to merge, so the made-up
    part grows with the vocabulary size.
    """
    seen = set(_ENGLISH) | set(_NON_ASCII)
    rest: list[str] = []
    while len(rest) < vocab_size:
        word = _number(rng) if rng.random() < 0.05 else _pseudo_word(rng)
        if word not in seen:
            seen.add(word)
            rest.append(word)
    return [*_ENGLISH, *_NON_ASCII, *rest]


def _corpus(vocab_size: int, seed: int) -> Iterator[str]:
    """English-like text: Zipf-distributed words in sentences and paragraphs, in chunks."""
    rng = random.Random(seed)
    lexicon = _lexicon(vocab_size, rng)
    cum_weights = _zipf_cum_weights(len(lexicon))
    words = rng.choices(lexicon, cum_weights=cum_weights, k=10 * vocab_size + 30_000)
    chunk: list[str] = []
    i = 0
    while i < len(words):
        n = rng.randint(3, 15)
        chunk.append(_sentence(words[i:i + n], rng) + rng.choice(_SEPARATORS))
        i += n
        if len(chunk) == 256:
            yield "".join(chunk)
            chunk = []
    if chunk:
        yield "".join(chunk)


def _zipf_cum_weights(n: int) -> list[float]:
    total, cum = 0.0, []
    for rank in range(n):
        total += 1.0 / (rank + 3)
        cum.append(total)
    return cum


def _sentence(words: list[str], rng: random.Random) -> str:
    words[0] = words[0][:1].upper() + words[0][1:]
    if len(words) > 5 and rng.random() < 0.4:
        words[rng.randrange(1, len(words) - 1)] += ","
    if rng.random() < 0.1:
        j = rng.randrange(len(words))
        words[j] = rng.choice(('"{}"', "({})", "'{}'")).format(words[j])
    return " ".join(words) + rng.choice(_ENDINGS)


@functools.lru_cache(maxsize=8)
def train_tokenizer(vocab_size: int) -> str:
    """tokenizer.json text of a byte-level BPE with exactly `vocab_size` tokens (specials first).

    Deterministic: the corpus is seeded and the `tokenizers` trainer breaks ties by token id, so
    the result does not depend on thread count or hash seed (checked in the tests). Cached per
    process, since tests write many checkpoints with the same vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, so every string can be encoded even if the corpus lacks some bytes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(vocab_size, _CORPUS_SEED), trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE reached {tokenizer.get_vocab_size()} tokens, not {vocab_size}: "
                           "the synthetic corpus is too small for this vocabulary")
    return tokenizer.to_str(pretty=True)


# ChatML, as Qwen2.5 and SmolLM2 use it. Content may be a string or a list of OpenAI-style parts.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _tokenizer_config(preset: Preset) -> dict[str, Any]:
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
               "special": True}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": ENDOFTEXT,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "added_tokens_decoder": {str(i): {"content": tok, **special}
                                 for i, tok in enumerate(SPECIAL_TOKENS)},
        # The BOS is not prepended (as in Qwen and SmolLM2); the chat template starts turns.
        "add_bos_token": False,
        "add_eos_token": False,
        # Byte-level BPE round-trips exactly; the legacy cleanup would eat spaces before ".".
        "clean_up_tokenization_spaces": False,
        "model_max_length": preset.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }


def _generation_config() -> dict[str, Any]:
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_IDS, "pad_token_id": BOS_ID}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def write_checkpoint(preset: str, out: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write `preset` with weights from `seed` to the directory `out` and return its path.

    The files are written into a temporary directory next to `out` and renamed into place, so a
    crash never leaves half a checkpoint. An existing `out` is replaced if it is empty or holds a
    checkpoint; anything else raises FileExistsError rather than deleting someone's files.
    """
    p = _preset(preset)
    target = Path(out).expanduser().absolute()
    _publish(_write_temp(p, seed, target), target, keep_existing=False)
    return target


def ensure_demo_model(preset: str = "smollm2-135m") -> Path:
    """The `preset` checkpoint (seed 0) in the user's cache, written on first use only.

    Safe if processes race: each writes its own temporary copy, the first rename wins and the
    others keep the winner's.
    """
    p = _preset(preset)
    target = cache_dir() / "models" / f"{p.name}-seed0"
    if _is_complete(target):
        return target
    logger.info("writing the %s demo checkpoint to %s (first use only)", p.name, target)
    _publish(_write_temp(p, 0, target), target, keep_existing=True)
    return target


def cache_dir() -> Path:
    """$SURGE_CACHE_DIR, else $XDG_CACHE_HOME/surge, else ~/.cache/surge."""
    if os.environ.get("SURGE_CACHE_DIR"):
        return Path(os.environ["SURGE_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "surge"


def _write_temp(preset: Preset, seed: int, target: Path) -> Path:
    """Write the checkpoint into a fresh hidden directory beside `target`; return that directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: that makes the directory private (0700), and a checkpoint is not.
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        _write_files(preset, seed, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _write_files(preset: Preset, seed: int, directory: Path) -> None:
    from safetensors.torch import save_file

    if preset.family in POOL_FAMILIES:
        _write_pool_checkpoint(preset, seed, directory)
        return
    _write_json(directory / "config.json", preset.config)
    _write_json(directory / "generation_config.json", _generation_config())
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(preset))
    (directory / "tokenizer.json").write_text(train_tokenizer(preset.vocab_size),
                                             encoding="utf-8")
    weights = generate_weights(preset, seed)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    # safetensors creates its file 0600; give it the umask-derived mode of the files beside it.
    (directory / "model.safetensors").chmod((directory / "config.json").stat().st_mode & 0o777)


def _write_pool_checkpoint(preset: Preset, seed: int, directory: Path) -> None:
    from safetensors.torch import save_file

    _write_json(directory / "config.json", preset.config)
    tokenizer = (_wordpiece_tokenizer(preset.vocab_size) if preset.family == "bert" else None)
    write_pool_files(preset.family, preset.config, directory, tokenizer)
    save_file(generate_weights(preset, seed), directory / "model.safetensors",
              metadata={"format": "pt"})
    (directory / "model.safetensors").chmod((directory / "config.json").stat().st_mode & 0o777)


@functools.lru_cache(maxsize=4)
def _wordpiece_tokenizer(vocab_size: int) -> str:
    return wordpiece_tokenizer_json(_corpus(vocab_size, _CORPUS_SEED), vocab_size)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def _publish(tmp: Path, target: Path, *, keep_existing: bool) -> None:
    """Rename `tmp` to `target`; rename(2) replaces an empty directory but not a full one."""
    try:
        os.rename(tmp, target)
        return
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if keep_existing and _is_complete(target):
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; keep its copy
        return
    _replace(tmp, target)


def _replace(tmp: Path, target: Path) -> None:
    if not _is_checkpoint_dir(target):
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(
            f"{target} exists and is not a checkpoint directory; refusing to replace it. "
            "Pass a new or empty directory, e.g. --out ./models/tiny-llama")
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in FILES)


def _is_checkpoint_dir(path: Path) -> bool:
    """A directory holding config.json and nothing but checkpoint files (ours or a hub's)."""
    if not path.is_dir() or path.is_symlink() or not (path / "config.json").is_file():
        return False
    return all((entry.is_file() and _is_checkpoint_file(entry.name))
               or (entry.is_dir() and entry.name in _CHECKPOINT_SUBDIRS)
               for entry in path.iterdir())


# sentence-transformers keeps the pooling config in a folder of its own.
_CHECKPOINT_SUBDIRS = frozenset({"1_Pooling", "2_Normalize"})


def _is_checkpoint_file(name: str) -> bool:
    return name in FILES or name.endswith((".safetensors", ".json", ".txt", ".model", ".md"))
