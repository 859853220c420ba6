"""GGUF checkpoints: llama.cpp's one-file format, read as a Hugging Face config and tensors.

A GGUF file carries the hyper-parameters as metadata under llama.cpp's key names
(``llama.embedding_length``), the tensors under llama.cpp's names (``blk.0.attn_q.weight``),
often quantized in blocks (Q8_0, Q4_K, ...), and the whole tokenizer (vocabulary, merges,
special tokens, chat template). `GGUFCheckpoint` translates the first two into what a Hugging Face
checkpoint directory holds, so the loader needs no GGUF-specific path; `GGUFVocab` hands the third
to `surge.tokenizer`.

`reader.GGUFFile` parses the container and memory-maps the tensor data; llama.cpp's own Python
package (`gguf`) supplies the type table and the numpy dequantizers, the reference
implementation of every block format.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from surge.models.gguf.reader import GGUFFile, GGUFFormatError, TensorInfo

if TYPE_CHECKING:  # torch is for the tensors; the tokenizer reads this module's vocabulary too
    import torch

__all__ = ["SUPPORTED_GGUF_ARCHITECTURES", "SUPPORTED_GGUF_TYPES", "GGUFCheckpoint", "GGUFError",
           "GGUFVocab", "RawTensor", "is_gguf", "open_gguf", "open_vocab", "read_vocab"]

# llama.cpp architecture name -> (Hugging Face class, whether conversion permuted q/k rows).
# llama.cpp's converter interleaves the rotary halves of q and k for Llama only; Qwen2 and Qwen3
# are written in Hugging Face order (rotary mode NEOX).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}
SUPPORTED_GGUF_ARCHITECTURES = tuple(_ARCHITECTURES)
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

# llama.cpp tensor name (after `blk.N.`) -> Hugging Face name (after `model.layers.N.`).
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
logger = logging.getLogger(__name__)
_FIX = "re-download it (for a catalogue model: `surge pull NAME`)"


class GGUFError(ValueError):
    """A GGUF file that Surge cannot load; the message names the file and what to do."""


@dataclass(frozen=True)
class RawTensor:
    """One tensor as stored: still quantized, rows already in Hugging Face order.

    ``data`` is the stored array: for F32/F16 the values, otherwise uint8 with one row of
    ``blocks * bytes_per_block`` bytes per output row (llama.cpp quantizes along rows, so a row
    permutation moves whole rows of blocks). ``shape`` is the Hugging Face (rows, columns) shape.
    """

    name: str
    gguf_name: str
    ggml_type: str
    shape: tuple[int, ...]
    data: np.ndarray

    def dequantize(self) -> torch.Tensor:
        from gguf import GGMLQuantizationType, quants

        values = quants.dequantize(self.data, GGMLQuantizationType[self.ggml_type])
        values = np.ascontiguousarray(values, dtype=np.float32)
        # F32 tensors come back as views of the read-only memory map; torch wants its own copy.
        import torch

        return torch.from_numpy(values if values.flags.writeable else values.copy())


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer a GGUF file describes, under names a reader of tokenizer.json knows."""

    model: str  # tokenizer.ggml.model: "gpt2" is byte-level BPE, "llama" is SentencePiece BPE
    pre: str  # tokenizer.ggml.pre: which split regex the merges were learned with
    tokens: list[str]
    token_types: list[int]  # 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    merges: list[str]  # "left right", best first; SentencePiece files often have none
    scores: list[float] | None  # SentencePiece: a merge's rank is its result's score
    add_space_prefix: bool  # SentencePiece: "▁" before the text, as sentencepiece does
    bos_token_id: int | None
    eos_token_id: int | None
    eot_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


class GGUFCheckpoint:
    """A `.gguf` file through the loader's Checkpoint contract (`read_config`, `iter_tensors`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open_gguf(self.path)
        self.architecture = self._string("general.architecture")
        if self.architecture not in _ARCHITECTURES:
            raise GGUFError(f"{self.path}: architecture {self.architecture!r} is not supported; "
                            f"supported GGUF architectures: {', '.join(_ARCHITECTURES)}")
        self._tensors: dict[str, TensorInfo] = self._file.tensors
        self._check_tensor_types()
        self._hf_to_gguf = {hf: name for name in self._tensors if (hf := _hf_name(name))}
        unknown = sorted(set(self._tensors) - set(self._hf_to_gguf.values())
                         - {"rope_freqs.weight"})  # read into the config's rope_scaling
        if unknown:  # the loader reports any tensor the model then lacks
            logger.warning("%s: skipping %d tensors no %s model uses, e.g. %s", self.path,
                           len(unknown), self.architecture, unknown[:3])

    # -- the Checkpoint contract -------------------------------------------------------------

    def read_config(self) -> dict[str, Any]:
        """A config.json-like dict with Hugging Face keys, from the file's metadata."""
        arch = self.architecture
        hidden = self._int(f"{arch}.embedding_length")
        heads = self._int(f"{arch}.attention.head_count")
        head_dim = (self._meta(f"{arch}.attention.key_length")
                    or self._meta(f"{arch}.rope.dimension_count") or hidden // heads)
        config: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[arch][0]],
            "model_type": arch,
            "hidden_size": hidden,
            "intermediate_size": self._int(f"{arch}.feed_forward_length"),
            "num_hidden_layers": self._int(f"{arch}.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._meta(f"{arch}.attention.head_count_kv") or heads,
            "head_dim": int(head_dim),
            "rms_norm_eps": float(self._meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._meta(f"{arch}.rope.freq_base", 10000.0)),
            "max_position_embeddings": self._int(f"{arch}.context_length"),
            "vocab_size": self._tensor("token_embd.weight").shape[0],
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
            "bos_token_id": self._meta("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._eos_ids() or None,
        }
        scaling = self._rope_scaling()
        if scaling:
            config["rope_scaling"] = scaling
        return config

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, float32 tensor) for every tensor, q/k rows back in HF order."""
        for hf_name in self._hf_to_gguf:
            yield hf_name, self.raw_tensor(hf_name).dequantize()

    # -- beyond the contract -------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        return list(self._hf_to_gguf)

    def raw_tensor(self, name: str) -> RawTensor:
        """The tensor `name` (a Hugging Face name) as stored, rows un-permuted but not decoded."""
        if name not in self._hf_to_gguf:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        stored = self._tensors[self._hf_to_gguf[name]]
        data = self._file.array(stored)
        heads = self._permuted_heads(name)
        if heads:
            data = _unpermute_rows(data, heads)
        return RawTensor(name, stored.name, stored.type_name, stored.shape, data)

    def vocab(self) -> GGUFVocab:
        return read_vocab(self._file)

    # -- internals ------------------------------------------------------------------------------

    def _check_tensor_types(self) -> None:
        for tensor in self._tensors.values():
            if tensor.type_name not in SUPPORTED_GGUF_TYPES:
                raise GGUFError(f"{self.path}: tensor {tensor.name} has type "
                                f"{tensor.type_name}, which Surge does not read; "
                                f"supported GGUF types: {', '.join(SUPPORTED_GGUF_TYPES)}")
        if "rope_freqs.weight" in self._tensors and self._llama3_rope() is None:
            raise GGUFError(f"{self.path}: its per-frequency rope factors (rope_freqs.weight) "
                            "do not follow Llama 3's rope scaling, the only kind Surge reads "
                            "from GGUF; load the Hugging Face checkpoint directory instead")

    def _permuted_heads(self, hf_name: str) -> int | None:
        """How many heads llama.cpp's converter interleaved in this tensor's rows, if any."""
        if not _ARCHITECTURES[self.architecture][1]:
            return None
        arch = self.architecture
        heads = self._int(f"{arch}.attention.head_count")
        if ".self_attn.q_proj." in hf_name:
            return heads
        if ".self_attn.k_proj." in hf_name:
            return int(self._meta(f"{arch}.attention.head_count_kv") or heads)
        return None

    def _eos_ids(self) -> list[int]:
        ids = [self._meta(key) for key in ("tokenizer.ggml.eos_token_id",
                                            "tokenizer.ggml.eot_token_id")]
        return list(dict.fromkeys(int(i) for i in ids if i is not None))

    def _rope_scaling(self) -> dict[str, Any] | None:
        if "rope_freqs.weight" in self._tensors:
            return self._llama3_rope()
        kind = self._meta(f"{self.architecture}.rope.scaling.type")
        if kind in (None, "none"):
            return None
        scaling: dict[str, Any] = {
            "rope_type": kind,
            "factor": float(self._meta(f"{self.architecture}.rope.scaling.factor", 1.0))}
        original = self._meta(f"{self.architecture}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling

    @functools.cached_property
    def _rope_freqs(self) -> np.ndarray:
        return np.asarray(self._file.array(self._tensors["rope_freqs.weight"]), np.float64)

    def _llama3_rope(self) -> dict[str, Any] | None:
        """Llama 3 rope scaling, recovered from the per-frequency factors llama.cpp stores
        instead of its parameters (None when they do not fit it)."""
        arch = self.architecture
        heads = self._int(f"{arch}.attention.head_count")
        dim = int(self._meta(f"{arch}.rope.dimension_count")
                  or self._int(f"{arch}.embedding_length") // heads)
        theta = float(self._meta(f"{arch}.rope.freq_base", 10000.0))
        return llama3_rope_from_factors(self._rope_freqs, theta, dim)

    def _tensor(self, name: str) -> Any:
        if name not in self._tensors:
            raise GGUFError(f"{self.path} has no tensor {name!r}; is it a complete "
                            f"{self.architecture} model? If it was cut short, {_FIX}")
        return self._tensors[name]

    def _meta(self, key: str, default: Any = None) -> Any:
        return self._file.metadata.get(key, default)

    def _int(self, key: str) -> int:
        value = self._meta(key)
        if value is None:
            raise GGUFError(f"{self.path} lacks the metadata key {key!r} that a "
                            f"{self.architecture} model needs; {_FIX}")
        return int(value)

    def _string(self, key: str) -> str:
        value = self._meta(key)
        if not isinstance(value, str):
            raise GGUFError(f"{self.path} lacks the metadata key {key!r}; {_FIX}")
        return value


def read_vocab(file: GGUFFile) -> GGUFVocab:
    """The tokenizer metadata of an open GGUF file."""
    def meta(key: str, default: Any = None) -> Any:
        return file.metadata.get(f"tokenizer.{key}", default)

    tokens = meta("ggml.tokens")
    if not tokens:
        raise GGUFError(f"{file.path} carries no tokenizer (tokenizer.ggml.tokens); Surge "
                        "needs one to serve text")
    model = meta("ggml.model", "gpt2")
    return GGUFVocab(
        model=model, pre=meta("ggml.pre", "default"), tokens=tokens,
        token_types=meta("ggml.token_type") or [1] * len(tokens), merges=meta("ggml.merges", []),
        scores=meta("ggml.scores"), add_space_prefix=bool(meta("ggml.add_space_prefix", True)),
        bos_token_id=meta("ggml.bos_token_id"), eos_token_id=meta("ggml.eos_token_id"),
        eot_token_id=meta("ggml.eot_token_id"), unk_token_id=meta("ggml.unknown_token_id"),
        pad_token_id=meta("ggml.padding_token_id"),
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
        add_bos_token=bool(meta("ggml.add_bos_token", model == "llama")),
        add_eos_token=bool(meta("ggml.add_eos_token", False)),
        chat_template=meta("chat_template"))


def open_vocab(path: str | Path) -> GGUFVocab:
    return read_vocab(open_gguf(Path(path)))


def llama3_rope_from_factors(factors: np.ndarray, theta: float, dim: int,
                             original_context: int = 8192) -> dict[str, Any] | None:
    """Llama 3 rope-scaling parameters that give these per-frequency factors, or None.

    llama.cpp's converter turns (factor, low_freq_factor, high_freq_factor, original context L)
    into one divisor per frequency: 1 for short wavelengths, `factor` for long ones, and between
    them 1 / ((1 - s) / factor + s) with s = (L / wavelength - low) / (high - low). s is linear in
    1 / wavelength, so the middle band gives its slope and intercept; any L with the matching
    low and high gives the same frequencies, so L is Llama 3's 8192. Accepted only if the
    parameters reproduce every factor.
    """
    wavelengths = 2 * np.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if factors.shape != wavelengths.shape:
        return None
    factor = float(factors.max())
    middle = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factor <= 1 or middle.sum() < 2:
        return None
    smooth = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelengths[middle], smooth, 1)
    # Rounded: the stored factors are float32, so the fit carries noise past 6 decimals.
    low = round(float(-intercept * original_context / slope), 6)
    high = round(float(low + original_context / slope), 6)
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
              "high_freq_factor": high,
              "original_max_position_embeddings": original_context}
    rebuilt = _llama3_factors(wavelengths, factor, low, high, original_context)
    return params if np.allclose(rebuilt, factors, rtol=1e-4) else None


def _llama3_factors(wavelengths: np.ndarray, factor: float, low: float, high: float,
                    original_context: int) -> np.ndarray:
    smooth = (original_context / wavelengths - low) / (high - low)
    middle = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelengths < original_context / high, 1.0,
                    np.where(wavelengths > original_context / low, factor, middle))


def _hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a llama.cpp tensor name; None for tensors HF models do not have."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return None


def _unpermute_rows(data: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute`: per head, rows (2, d/2) were reordered as (d/2, 2)."""
    rows = data.shape[0]
    rest = data.shape[1:]
    per_head = rows // heads
    return np.ascontiguousarray(
        data.reshape(heads, per_head // 2, 2, *rest).swapaxes(1, 2).reshape(data.shape))


@functools.lru_cache(maxsize=4)
def _cached_file(path: str, size: int, mtime_ns: int) -> GGUFFile:
    """One parse per file and process: the engine reads tensors, the server the vocabulary."""
    del size, mtime_ns  # part of the cache key only: a rewritten file is parsed again
    return GGUFFile(path)


def open_gguf(path: Path) -> GGUFFile:
    """The parsed file; a missing, foreign, truncated or damaged one raises naming the fix."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --model takes a .gguf file, a checkpoint "
                                "directory or a catalogue name")
    stat = os.stat(path)
    try:
        return _cached_file(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except GGUFFormatError as error:
        raise GGUFError(f"{path} cannot be read as GGUF: it {error}; if it is a model "
                        f"download, {_FIX}") from error
