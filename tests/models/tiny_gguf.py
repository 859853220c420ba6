"""Tiny GGUF files written with llama.cpp's own writer, for the GGUF loader and tokenizer tests.

The weights are made in Hugging Face layout and then converted the way llama.cpp's
`convert_hf_to_gguf.py` converts them (q/k rows permuted for Llama, quantized per row), so a test
can compare what Surge reads back with the float tensors it started from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 256, 4, 2, 256, 1
HEAD_DIM = HIDDEN // HEADS
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # llama.cpp type 3, control
USER_TOKENS = ("<think>",)  # type 4, user-defined
MERGES = ("Ġ t", "h e", "Ġt he", "i n", "Ġ a")


def llama_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), applied when converting q/k."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = [], 0
    for byte in range(256):
        if byte in printable:
            spelled.append(chr(byte))
        else:
            spelled.append(chr(256 + extra))
            extra += 1
    return spelled


def vocab_tokens() -> tuple[list[str], list[int]]:
    """Special tokens first (as SmolLM2 has them), then the bytes, merges and a user token."""
    tokens = [*SPECIAL_TOKENS, *byte_alphabet(), *(m.replace(" ", "") for m in MERGES),
              *USER_TOKENS]
    types = [3] * len(SPECIAL_TOKENS) + [1] * (256 + len(MERGES)) + [4] * len(USER_TOKENS)
    return tokens, types


# A SentencePiece vocabulary as llama.cpp stores one (tokenizer.ggml.model = "llama"): pieces
# with scores instead of merges (a merge's rank is its result's score), bytes as <0xNN>.
SPM_PIECES = ("▁", "t", "h", "e", "a", "n", "d", "c", "i", ".", "he", "▁t", "▁the", "▁a", "an",
              "nd", "▁and", "in", "▁c", "<think>")


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(SPM_PIECES) - 1) + [4]
    scores = [0.0] * 259 + [-float(rank) for rank in range(len(SPM_PIECES))]
    return tokens, types, scores


def hf_weights(seed: int = 0, tied: bool = True, qkv_bias: bool = False, qk_norm: bool = False,
               head_dim: int = HEAD_DIM) -> dict[str, np.ndarray]:
    """Random float32 weights of a one-layer Llama (Qwen2 with `qkv_bias`, Qwen3 with
    `qk_norm`), under Hugging Face names."""
    rng = np.random.default_rng(seed)
    vocab = len(vocab_tokens()[0])

    def matrix(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32) * 0.05

    weights = {"model.embed_tokens.weight": matrix(vocab, HIDDEN),
               "model.norm.weight": 1 + matrix(1, HIDDEN)[0]}
    if not tied:
        weights["lm_head.weight"] = matrix(vocab, HIDDEN)
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        weights |= {
            p + "input_layernorm.weight": 1 + matrix(1, HIDDEN)[0],
            p + "post_attention_layernorm.weight": 1 + matrix(1, HIDDEN)[0],
            p + "self_attn.q_proj.weight": matrix(HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": matrix(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": matrix(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": matrix(HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": matrix(FFN, HIDDEN),
            p + "mlp.up_proj.weight": matrix(FFN, HIDDEN),
            p + "mlp.down_proj.weight": matrix(HIDDEN, FFN),
        }
        if qkv_bias:  # drawn last, so the other weights do not change
            weights |= {p + "self_attn.q_proj.bias": matrix(1, HEADS * head_dim)[0],
                        p + "self_attn.k_proj.bias": matrix(1, KV_HEADS * head_dim)[0],
                        p + "self_attn.v_proj.bias": matrix(1, KV_HEADS * head_dim)[0]}
        if qk_norm:
            weights |= {p + "self_attn.q_norm.weight": 1 + matrix(1, head_dim)[0],
                        p + "self_attn.k_norm.weight": 1 + matrix(1, head_dim)[0]}
    return weights


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    _, _, layer, *module, leaf = hf_name.split(".")
    return f"blk.{layer}.{_GGUF_NAMES['.'.join(module)]}.{leaf}"


@dataclass
class TinyGGUF:
    """What to write; every field has the value a plain tiny Llama needs."""

    arch: str = "llama"
    tensor_type: Q = Q.F32
    tied: bool = True
    pre: str = "smollm"
    tokenizer_model: str = "gpt2"
    add_bos: bool = False
    chat_template: str | None = CHAT_TEMPLATE
    linear_rope_factor: float | None = None
    head_dim: int = HEAD_DIM  # may differ from HIDDEN // HEADS, as in Qwen3
    # Stored bytes for a tensor (by HF name), replacing the converted weights: for types
    # gguf cannot quantize (K-quants) the test supplies raw blocks.
    raw: dict[str, tuple[np.ndarray, Q]] = field(default_factory=dict)
    extra_tensors: dict[str, np.ndarray] = field(default_factory=dict)

    def write(self, path: Path, weights: dict[str, np.ndarray] | None = None) -> Path:
        if weights is None:
            weights = hf_weights(tied=self.tied, qkv_bias=self.arch == "qwen2",
                                 qk_norm=self.arch == "qwen3", head_dim=self.head_dim)
        writer = gguf.GGUFWriter(str(path), self.arch)
        self._write_hparams(writer)
        self._write_tokenizer(writer)
        for name, tensor in weights.items():
            self._write_tensor(writer, name, tensor)
        for name, tensor in self.extra_tensors.items():
            writer.add_tensor(name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    def _write_hparams(self, writer: gguf.GGUFWriter) -> None:
        writer.add_block_count(LAYERS)
        writer.add_context_length(512)
        writer.add_embedding_length(HIDDEN)
        writer.add_feed_forward_length(FFN)
        writer.add_head_count(HEADS)
        writer.add_head_count_kv(KV_HEADS)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_freq_base(100000.0)
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_key_length(self.head_dim)
        writer.add_value_length(self.head_dim)
        if self.linear_rope_factor is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(self.linear_rope_factor)

    def _write_tokenizer(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.tokenizer_model)
        if self.tokenizer_model == "llama":
            tokens, types, scores = spm_vocab()
            writer.add_token_scores(scores)
        else:
            tokens, types = vocab_tokens()
            writer.add_tokenizer_pre(self.pre)
            writer.add_token_merges(list(MERGES))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(self.add_bos)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)

    def _write_tensor(self, writer: gguf.GGUFWriter, name: str, tensor: np.ndarray) -> None:
        if name in self.raw:
            data, kind = self.raw[name]
            writer.add_tensor(gguf_name(name), data, raw_dtype=kind)
            return
        if self.arch == "llama" and "q_proj" in name:
            tensor = llama_permute(tensor, HEADS)
        elif self.arch == "llama" and "k_proj" in name:
            tensor = llama_permute(tensor, KV_HEADS)
        kind = self.tensor_type if tensor.ndim == 2 else Q.F32  # llama.cpp keeps norms in F32
        if kind == Q.F32:
            writer.add_tensor(gguf_name(name), tensor)
        elif kind == Q.F16:
            writer.add_tensor(gguf_name(name), tensor.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(tensor, kind), raw_dtype=kind)
