"""GGUF checkpoints on tiny files written by the test with llama.cpp's writer: config, every
supported tensor type against its float reference, the q/k un-permutation, and refusals."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from surge.models.gguf import SUPPORTED_GGUF_TYPES, GGUFCheckpoint, GGUFError
from surge.models.gguf.reader import GGUFFile
from tests.models.tiny_gguf import (
    FFN,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    TinyGGUF,
    hf_weights,
    llama_permute,
    vocab_tokens,
)

# Worst error per element, as a fraction of the tensor's largest magnitude: half a quantization
# step of each format (8-bit: 1/127 of the block's range; 4-bit: 1/7 or 1/15), with headroom.
_TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 4e-3, "Q8_0": 1 / 127, "Q4_0": 1 / 7,
              "Q4_1": 1 / 15}


def _write(tmp_path: Path, spec: TinyGGUF | None = None, name: str = "tiny.gguf") -> Path:
    return (spec or TinyGGUF()).write(tmp_path / name)


def test_config_is_hugging_face_shaped(tmp_path: Path) -> None:
    config = GGUFCheckpoint(_write(tmp_path)).read_config()
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (
        HIDDEN, FFN, LAYERS)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        HEADS, KV_HEADS, HEAD_DIM)
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    assert config["rope_theta"] == 100000.0
    assert config["max_position_embeddings"] == 512
    assert config["vocab_size"] == len(vocab_tokens()[0])
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, [2])
    assert config["torch_dtype"] == "bfloat16"
    assert "rope_scaling" not in config


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_tensors_round_trip_to_the_float_reference(tmp_path: Path, kind: str) -> None:
    reference = hf_weights()
    checkpoint = GGUFCheckpoint(_write(tmp_path, TinyGGUF(tensor_type=Q[kind])))
    tensors = dict(checkpoint.iter_tensors())
    assert set(tensors) == set(reference)  # tied: no lm_head.weight
    for name, tensor in tensors.items():
        expected = torch.from_numpy(reference[name])
        assert tensor.dtype == torch.float32 and tensor.shape == expected.shape, name
        worst = (tensor - expected).abs().max().item()
        assert worst <= _TOLERANCE[kind] * expected.abs().max().item() + 1e-7, (name, worst)


def test_q_and_k_rows_come_back_in_hugging_face_order(tmp_path: Path) -> None:
    # F32 is stored exactly, so any row left permuted would show as a mismatch.
    reference = hf_weights()
    tensors = dict(GGUFCheckpoint(_write(tmp_path)).iter_tensors())
    q_name = "model.layers.0.self_attn.q_proj.weight"
    for name in (q_name, "model.layers.0.self_attn.k_proj.weight"):
        assert torch.equal(tensors[name], torch.from_numpy(reference[name])), name
    # ... and the file really holds them permuted (else this test would prove nothing).
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "tiny.gguf").tensors}
    assert not np.array_equal(np.asarray(stored["blk.0.attn_q.weight"].data), reference[q_name])


def test_qwen2_tensors_are_not_permuted(tmp_path: Path) -> None:
    reference = hf_weights()
    checkpoint = GGUFCheckpoint(_write(tmp_path, TinyGGUF(arch="qwen2")))
    assert checkpoint.read_config()["architectures"] == ["Qwen2ForCausalLM"]
    tensors = dict(checkpoint.iter_tensors())
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(tensors[name], torch.from_numpy(reference[name]))


def test_untied_head_is_read(tmp_path: Path) -> None:
    reference = hf_weights(tied=False)
    checkpoint = GGUFCheckpoint(_write(tmp_path, TinyGGUF(tied=False)))
    assert checkpoint.read_config()["tie_word_embeddings"] is False
    tensors = dict(checkpoint.iter_tensors())
    assert torch.equal(tensors["lm_head.weight"], torch.from_numpy(reference["lm_head.weight"]))


def _random_k_blocks(kind: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random K-quant blocks with sane fp16 scales (gguf has no K-quant quantizer)."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[Q[kind]]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * cols // block_values, block_bytes), dtype=np.uint8)
    # Where each format keeps its fp16 super-block scale(s): Q4_K/Q5_K d and dmin up front,
    # Q6_K d at the end.
    offsets = (0, 2) if kind in ("Q4_K", "Q5_K") else (block_bytes - 2,)
    for offset in offsets:
        scales = rng.uniform(1e-3, 1e-2, len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def _reference_dequantize(kind: str, data: np.ndarray, rows: int) -> torch.Tensor:
    """transformers' own torch dequantizers: an implementation independent of gguf's numpy."""
    from transformers.integrations.gguf.dequant import dequantize

    flat = dequantize(torch.from_numpy(np.ascontiguousarray(data)).reshape(-1), int(Q[kind]))
    return flat.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_match_an_independent_dequantizer(tmp_path: Path, kind: str) -> None:
    q_name, o_name = ("model.layers.0.self_attn.q_proj.weight",
                      "model.layers.0.self_attn.o_proj.weight")
    stored = {q_name: _random_k_blocks(kind, HEADS * HEAD_DIM, HIDDEN, seed=1),
              o_name: _random_k_blocks(kind, HIDDEN, HEADS * HEAD_DIM, seed=2)}
    spec = TinyGGUF(raw={name: (data, Q[kind]) for name, data in stored.items()})
    checkpoint = GGUFCheckpoint(_write(tmp_path, spec))
    tensors = dict(checkpoint.iter_tensors())
    for name, data in stored.items():
        expected = _reference_dequantize(kind, data, data.shape[0])
        assert expected.abs().max() > 0
        # The file holds q permuted; permuting what we return must give back the file's rows.
        ours = tensors[name].numpy()
        ours = llama_permute(ours, HEADS) if name == q_name else ours
        torch.testing.assert_close(torch.from_numpy(ours), expected, rtol=1e-5, atol=1e-6)
        raw = checkpoint.raw_tensor(name)
        assert (raw.ggml_type, raw.shape) == (kind, tuple(tensors[name].shape))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1"])
def test_raw_tensor_keeps_blocks_with_rows_in_hugging_face_order(tmp_path: Path,
                                                                 kind: str) -> None:
    checkpoint = GGUFCheckpoint(_write(tmp_path, TinyGGUF(tensor_type=Q[kind])))
    tensors = dict(checkpoint.iter_tensors())
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.embed_tokens.weight"):
        raw = checkpoint.raw_tensor(name)
        block_values, block_bytes = gguf.GGML_QUANT_SIZES[Q[kind]]
        rows, cols = tensors[name].shape
        assert raw.ggml_type == kind and raw.shape == (rows, cols)
        assert raw.data.dtype == np.uint8 and raw.data.shape == (rows,
                                                                 cols // block_values * block_bytes)
        assert torch.equal(raw.dequantize(), tensors[name])
    with pytest.raises(KeyError, match="no tensor"):
        checkpoint.raw_tensor("model.layers.9.mlp.up_proj.weight")


def test_unknown_architecture_is_refused_naming_the_supported_ones(tmp_path: Path) -> None:
    path = _write(tmp_path, TinyGGUF(arch="mamba"))
    with pytest.raises(GGUFError, match=r"architecture 'mamba' is not supported.*llama"):
        GGUFCheckpoint(path)


def test_unsupported_tensor_type_is_refused_naming_the_supported_ones(tmp_path: Path) -> None:
    assert "Q5_0" not in SUPPORTED_GGUF_TYPES
    path = _write(tmp_path, TinyGGUF(tensor_type=Q.Q5_0))
    with pytest.raises(GGUFError) as error:
        GGUFCheckpoint(path)
    assert "Q5_0" in str(error.value)
    assert ", ".join(SUPPORTED_GGUF_TYPES) in str(error.value)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.02])
def test_truncated_file_names_the_file_and_the_fix(tmp_path: Path, keep: float) -> None:
    path = _write(tmp_path, TinyGGUF(tensor_type=Q.Q8_0))
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(GGUFError, match="truncated") as error:
        GGUFCheckpoint(path)
    assert str(path) in str(error.value) and "surge pull" in str(error.value)


def test_not_a_gguf_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(GGUFError, match="does not start with 'GGUF'"):
        GGUFCheckpoint(path)
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        GGUFCheckpoint(tmp_path / "missing.gguf")


def llama_cpp_rope_factors(theta: float, dim: int, factor: float, low: float, high: float,
                           original_context: int) -> np.ndarray:
    """What llama.cpp's converter stores as rope_freqs.weight for Llama 3 rope scaling
    (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_freq_wavelen, high_freq_wavelen = original_context / low, original_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (original_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1, Llama 3.2
def test_llama3_rope_factors_become_rope_scaling(tmp_path: Path, factor: float) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factors = llama_cpp_rope_factors(100000.0, HEAD_DIM, factor, 1.0, 4.0, 8192)
    spec = TinyGGUF(extra_tensors={"rope_freqs.weight": factors})
    checkpoint = GGUFCheckpoint(_write(tmp_path, spec))
    config = checkpoint.read_config()
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert "rope_freqs.weight" not in checkpoint.tensor_names()
    # transformers' own Llama 3 rope on the recovered parameters divides each frequency by
    # exactly the factor llama.cpp stored.
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**config), "cpu")
    base = 1.0 / (100000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
    torch.testing.assert_close(inv_freq.double(), base / torch.from_numpy(factors).double(),
                               rtol=1e-5, atol=0)


def test_rope_factors_of_another_kind_are_refused_not_ignored(tmp_path: Path) -> None:
    factors = np.linspace(1, 3, HEAD_DIM // 2, dtype=np.float32) ** 2
    spec = TinyGGUF(extra_tensors={"rope_freqs.weight": factors})
    with pytest.raises(GGUFError, match="rope_freqs"):
        GGUFCheckpoint(_write(tmp_path, spec))


def test_linear_rope_scaling_reaches_the_config(tmp_path: Path) -> None:
    config = GGUFCheckpoint(_write(tmp_path, TinyGGUF(linear_rope_factor=4.0))).read_config()
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_damaged_header_bytes_never_escape_as_other_errors(tmp_path: Path) -> None:
    """Any byte of the header overwritten: the file loads or GGUFError names it, nothing else."""
    original = _write(tmp_path, TinyGGUF(tensor_type=Q.Q8_0)).read_bytes()
    header_end = original.index(b"blk.0.attn_norm.weight") + 200  # into the tensor table
    rng = np.random.default_rng(0)
    for position in rng.integers(4, header_end, 200):
        damaged = bytearray(original)
        damaged[position] = (damaged[position] + rng.integers(1, 256)) % 256
        path = tmp_path / f"damaged-{position}.gguf"
        path.write_bytes(bytes(damaged))
        try:
            GGUFCheckpoint(path).read_config()
        except GGUFError as error:
            assert str(path) in str(error)
        path.unlink()


def assert_reader_agrees_with_gguf_package(path: Path) -> None:
    """Surge's parser against llama.cpp's GGUFReader: every metadata value and tensor."""
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    fields = {key: field for key, field in theirs.fields.items() if not key.startswith("GGUF.")}
    assert set(ours.metadata) == set(fields)
    for key, field in fields.items():
        expected = field.contents()
        assert ours.metadata[key] == (expected.tolist() if hasattr(expected, "tolist")
                                      else expected), key
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for tensor in theirs.tensors:
        info = ours.tensors[tensor.name]
        assert info.type_name == tensor.tensor_type.name
        assert info.dims == tuple(int(n) for n in tensor.shape)
        assert np.array_equal(ours.array(info), np.asarray(tensor.data)), tensor.name


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K"])
def test_reader_agrees_with_gguf_package(tmp_path: Path, kind: str) -> None:
    name = "model.layers.0.self_attn.o_proj.weight"
    raw = ({name: (_random_k_blocks(kind, HIDDEN, HIDDEN, seed=3), Q[kind])}
           if kind.endswith("_K") else {})
    spec = TinyGGUF(tensor_type=Q[kind] if not raw else Q.Q8_0, raw=raw, linear_rope_factor=2.0)
    assert_reader_agrees_with_gguf_package(_write(tmp_path, spec))


def _surge_and_reference_logprobs(path: Path) -> tuple[list[dict[int, float]], torch.Tensor]:
    """Surge's greedy top-5 log-probabilities over 16 steps, and transformers' on the same tokens
    (transformers reads the same file with its own GGUF loader)."""
    import transformers

    from surge import LLM, SamplingParams

    prompt = [5, 80, 100, 7, 200, 33, 12, 150]
    llm = LLM(path, dtype="float32", max_num_seqs=1, max_model_len=64)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5)
    [out] = llm.generate([prompt], params, use_tqdm=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.outputs[0].token_ids])).logits[0]
    reference = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1:-1]
    return [entry.top for entry in out.outputs[0].logprobs], reference


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_logits_equal_transformers(tmp_path: Path, arch: str) -> None:
    # transformers reads no head size from a Qwen3 GGUF and assumes Qwen3's 128.
    head_dim = 128 if arch == "qwen3" else HEAD_DIM
    weights = hf_weights(qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", head_dim=head_dim)
    for name in weights:  # larger weights: sharper, varied next-token choices
        weights[name] = weights[name] * (8 if name.endswith("proj.weight") else 1)
    spec = TinyGGUF(arch=arch, tensor_type=Q.Q8_0, head_dim=head_dim)
    path = spec.write(tmp_path / "tiny.gguf", weights)
    tops, reference = _surge_and_reference_logprobs(path)
    for step, top in enumerate(tops):
        assert max(top, key=top.get) == reference[step].argmax().item(), step
        for token_id, logprob in top.items():
            assert logprob == pytest.approx(reference[step, token_id].item(), abs=1e-4)


def test_tensors_no_model_uses_are_skipped_with_a_warning(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    spec = TinyGGUF(extra_tensors={"blk.0.attn_rot_embd": np.ones(8, np.float32)})
    with caplog.at_level("WARNING", logger="surge.models.gguf.checkpoint"):
        checkpoint = GGUFCheckpoint(_write(tmp_path, spec))
    assert "blk.0.attn_rot_embd" in caplog.text
    assert set(checkpoint.tensor_names()) == set(hf_weights())
