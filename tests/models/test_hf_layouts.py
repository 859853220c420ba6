"""Checkpoints as the installed transformers (5.x) writes them with ``save_pretrained``: no
``architectures`` (only ``model_type``), ``rope_parameters``, tied and untied heads, and EOS ids
listed in ``generation_config.json``. Surge's greedy tokens and logprobs must equal transformers'
on the same files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from surge import LLM, SamplingParams
from surge.models.loader import load_model
from tests.models.test_parity import (
    ATOL,
    IDS_PROMPT,
    NEW_TOKENS,
    assert_logprobs_close,
    greedy,
    hf_greedy,
    hf_model,
)

transformers = pytest.importorskip("transformers")

VOCAB = 1024  # the tiny-gpt2 preset's tokenizer, copied next to each checkpoint
PROMPT = IDS_PROMPT * 2  # 90 tokens: past the llama3 variant's original context of 64
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def _configs() -> dict[str, tuple[Any, bool]]:
    """name -> (transformers config, whether to drop ``architectures`` from config.json)."""
    t = transformers
    return {
        "llama-llama3-rope-parameters-tied-no-architectures": (t.LlamaConfig(
            **SMALL, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True), True),
        "qwen2-untied": (t.Qwen2Config(
            **SMALL, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            tie_word_embeddings=False), False),
        "qwen3-tied-no-architectures": (t.Qwen3Config(
            **SMALL, head_dim=32, tie_word_embeddings=True), True),
        "mistral-untied-sliding-window": (t.MistralConfig(
            **SMALL, sliding_window=16, tie_word_embeddings=False), False),
        "gpt2-tied-no-architectures": (t.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1,
            eos_token_id=2), True),
        "gpt2-untied": (t.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False), False),
    }


CONFIGS = _configs()


def save_hf_checkpoint(config: Any, directory: Path, tokenizer_from: Path,
                       drop_architectures: bool) -> Path:
    """What transformers' own ``save_pretrained`` writes, plus a tokenizer Surge can read."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # layers larger than the 0.02 init: varied greedy text, clear winners
        embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
        for param in model.parameters():
            if param.dim() == 2 and id(param) not in embeddings:
                param.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, directory / name)
    if drop_architectures:
        path = directory / "config.json"
        hf = json.loads(path.read_text())
        del hf["architectures"]
        path.write_text(json.dumps(hf))
    return directory


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory,
                  tiny_checkpoint: Callable[[str], Path]) -> Callable[[str], Path]:
    written: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in written:
            config, drop = CONFIGS[name]
            written[name] = save_hf_checkpoint(config, tmp_path_factory.mktemp("hf") / name,
                                               tiny_checkpoint("tiny-gpt2"), drop)
        return written[name]

    return get


def _tensor_names(directory: Path) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_and_logprobs_match_transformers(name: str,
                                                hf_checkpoint: Callable[[str], Path]) -> None:
    directory = hf_checkpoint(name)
    hf = json.loads((directory / "config.json").read_text())
    assert ("architectures" in hf) == (not CONFIGS[name][1])
    untied = "untied" in name
    assert ("lm_head.weight" in _tensor_names(directory)) == untied  # the layout under test
    llm = LLM(directory, dtype="float32", max_num_seqs=4, max_model_len=256)
    [out] = llm.generate([PROMPT], greedy(), use_tqdm=False)
    ids, logprobs = hf_greedy(hf_model(directory), PROMPT)
    assert out.outputs[0].token_ids == ids
    assert_logprobs_close(out.outputs[0], logprobs, ATOL)


def test_untied_head_loads_its_own_weights(hf_checkpoint: Callable[[str], Path]) -> None:
    for name in ("qwen2-untied", "gpt2-untied"):
        model = load_model(hf_checkpoint(name), dtype="float32", device="cpu").model
        reference = hf_model(hf_checkpoint(name))
        with torch.no_grad():  # the head applied to the identity: its weight, transposed
            head = model.lm_head(torch.eye(reference.config.hidden_size)).T
        assert torch.equal(head, reference.lm_head.weight), name
        assert not torch.equal(head, reference.get_input_embeddings().weight), name


def test_rope_parameters_scaling_is_applied(hf_checkpoint: Callable[[str], Path]) -> None:
    config = load_model(hf_checkpoint("llama-llama3-rope-parameters-tied-no-architectures"),
                        dtype="float32", device="cpu").config
    assert config.architecture == "LlamaForCausalLM"  # from model_type
    assert config.rope_theta == 500000.0
    assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "llama3"
    assert config.tie_word_embeddings


@pytest.mark.slow
def test_eos_ids_listed_in_generation_config_stop_generation(
        hf_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    directory = tmp_path / "with-eos-list"
    shutil.copytree(hf_checkpoint("qwen2-untied"), directory)
    ids, _ = hf_greedy(hf_model(directory), PROMPT)
    # A token greedy decoding reaches at step 5 and not before: listed as a second EOS id.
    step = next(i for i in range(5, NEW_TOKENS) if ids[i] not in ids[:i] and ids[i] != 2)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2, ids[step]]).save_pretrained(
        directory)
    assert json.loads((directory / "config.json").read_text())["eos_token_id"] == 2
    assert load_model(directory, dtype="float32", device="cpu").config.eos_token_ids == [
        2, ids[step]]
    llm = LLM(directory, dtype="float32", max_num_seqs=4, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    [out] = llm.generate([PROMPT], params, use_tqdm=False)
    assert out.outputs[0].token_ids == ids[:step + 1]
    assert out.outputs[0].finish_reason == "stop"
