"""`surge optimize quantize`: the stored checkpoint loads into exactly the buffers that
quantizing at load builds, and serves the same tokens."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from surge.models.loader import load_model
from surge.models.quantization import pack_int4_columns, unpack_int4_columns
from surge.optimize.export import open_source
from surge.optimize.quantize import quantize_checkpoint


def _state(path: Path, **options: object) -> dict[str, torch.Tensor]:
    loaded = load_model(path, dtype="bfloat16", device="cpu", **options)
    return {**dict(loaded.model.named_buffers()), **dict(loaded.model.named_parameters())}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("method, group_size", [("int8", 32), ("int4", 32), ("int4", 64)])
def test_round_trip_matches_quantizing_at_load(
        tiny_checkpoint: Callable[[str], Path], tmp_path: Path, preset: str, method: str,
        group_size: int) -> None:
    source = tiny_checkpoint(preset)
    quantize_checkpoint(open_source(str(source)), tmp_path, method, group_size)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "surge"
    assert config["quantization_config"]["bits"] == (8 if method == "int8" else 4)
    stored = _state(tmp_path)
    at_load = _state(source, quantization=method, quantization_group_size=group_size)
    assert stored.keys() == at_load.keys()
    for name, tensor in at_load.items():
        assert torch.equal(stored[name], tensor), name
    assert (tmp_path / "tokenizer.json").is_file()


def test_served_tokens_equal_quantizing_at_load(tiny_checkpoint: Callable[[str], Path],
                                                tmp_path: Path) -> None:
    from surge import LLM, SamplingParams

    source = tiny_checkpoint("tiny-llama")
    quantize_checkpoint(open_source(str(source)), tmp_path, "int4")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [100, 200, 300]]
    stored = LLM(str(tmp_path), dtype="bfloat16", device="cpu").generate(
        prompts, params, use_tqdm=False)
    at_load = LLM(str(source), dtype="bfloat16", device="cpu", quantization="int4").generate(
        prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in stored] == [o.outputs[0].token_ids for o in at_load]


def test_stored_checkpoint_refuses_another_quantization(
        tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    quantize_checkpoint(open_source(str(tiny_checkpoint("tiny-llama"))), tmp_path, "int8")
    with pytest.raises(ValueError, match="stored quantized"):
        load_model(tmp_path, dtype="bfloat16", device="cpu", quantization="int4")
    with pytest.raises(ValueError, match="stored quantized"):
        open_source(str(tmp_path))  # optimizing it again


def test_int4_column_packing_round_trips() -> None:
    codes = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    packed = pack_int4_columns(codes)
    assert packed.shape == (3, 4)
    assert int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4
    assert torch.equal(unpack_int4_columns(packed), codes)


def test_gguf_input_gives_a_self_contained_directory(tmp_path: Path) -> None:
    """A .gguf model comes out in HF layout: its tokenizer and chat template as files, and
    int4 weights equal to quantizing the .gguf at load (Q4_0 blocks kept as they are)."""
    from gguf import GGMLQuantizationType

    from surge.tokenizer import load_tokenizer
    from tests.models.tiny_gguf import TinyGGUF

    gguf_file = TinyGGUF(tensor_type=GGMLQuantizationType.Q4_0).write(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    quantize_checkpoint(open_source(str(gguf_file)), out, "int4")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    ours, theirs = load_tokenizer(out), load_tokenizer(gguf_file)
    chat = [{"role": "user", "content": "the cat in a hat"}]
    assert ours.encode(ours.apply_chat_template(chat)) == theirs.encode(
        theirs.apply_chat_template(chat))
    assert ours.eos_token_ids == theirs.eos_token_ids
    stored, at_load = _state(out), _state(gguf_file, quantization="int4")
    assert all(torch.equal(stored[name], tensor) for name, tensor in at_load.items())


@pytest.mark.slow
def test_surge_serve_loads_the_stored_checkpoint(tiny_checkpoint: Callable[[str], Path],
                                                 tmp_path: Path) -> None:
    """`surge serve --model DIR` answers with the same greedy tokens as quantizing at load."""
    import httpx

    from surge import LLM, SamplingParams
    from tests.server._helpers import start_server

    source, out = tiny_checkpoint("tiny-llama"), tmp_path / "int8"
    out.mkdir()
    quantize_checkpoint(open_source(str(source)), out, "int8")
    expected = LLM(str(source), dtype="bfloat16", device="cpu", quantization="int8").generate(
        [[5, 6, 7, 8]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text
    server = start_server(out, tmp_path / "logs", "--dtype", "bfloat16",
                          "--served-model-name", "q8")
    try:
        body = httpx.post(f"{server.url}/v1/completions", timeout=60.0, json={
            "model": "q8", "prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}).json()
    finally:
        server.stop()
    assert body["choices"][0]["text"] == expected, body
