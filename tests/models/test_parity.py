"""Surge against Hugging Face transformers on every tiny preset, and checkpoint loading."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surge import LLM, SamplingParams
from surge.outputs import CompletionOutput

transformers = pytest.importorskip("transformers")

PRESETS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gpt2"]
SUPPORTED = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
             "GPT2LMHeadModel"]
NEW_TOKENS = 32
TEXT_PROMPT = "Hello world, the"
IDS_PROMPT = [random.Random(0).randrange(3, 1024) for _ in range(45)]  # fits every vocab
ENGINE_ARGS = dict(max_num_seqs=4, max_model_len=256)
ATOL = 1e-4


def greedy(logprobs: int | None = 20) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                          logprobs=logprobs)


def surge_generate(model_dir: Path, prompts: list, dtype: str = "float32",
                   params: SamplingParams | None = None,
                   **kwargs: object) -> list[tuple[list[int], CompletionOutput]]:
    llm = LLM(model_dir, dtype=dtype, **ENGINE_ARGS, **kwargs)
    outs = llm.generate(prompts, params or greedy(), use_tqdm=False)
    return [(out.prompt_token_ids, out.outputs[0]) for out in outs]


def hf_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()


def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], **kwargs: object
              ) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy ids and per-step log-softmax rows; EOS disabled (ignore_eos on our side)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False,
                             max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    ids = out.sequences[0, len(prompt_ids):].tolist()
    assert len(ids) == NEW_TOKENS
    return ids, [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits]


def assert_logprobs_close(ours: CompletionOutput, reference: list[torch.Tensor],
                          atol: float, steps: int | None = None) -> None:
    assert ours.logprobs is not None
    for step, (entry, ref) in enumerate(zip(ours.logprobs[:steps], reference, strict=False)):
        ref_top = ref.topk(len(entry.top)).values.tolist()
        assert sorted(entry.top.values(), reverse=True) == pytest.approx(ref_top, abs=atol), step
        for token_id, logprob in entry.top.items():
            assert logprob == pytest.approx(ref[token_id].item(), abs=atol), (step, token_id)


@pytest.fixture(scope="module")
def copy_of(tiny_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
            ) -> Callable[[str, str], Path]:
    def make(preset: str, name: str) -> Path:
        target = tmp_path_factory.mktemp("edited") / name
        shutil.copytree(tiny_checkpoint(preset), target)
        return target

    return make


def edit_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# "chunked": prompts in 7-token chunks over blocks of 5, so chunks and blocks never align.
ENGINES = {"default": {}, "chunked": dict(max_num_batched_tokens=7, block_size=5)}


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_and_logprobs_match_transformers(tiny_checkpoint: Callable[[str], Path],
                                                preset: str, engine: str) -> None:
    model_dir = tiny_checkpoint(preset)
    ours = surge_generate(model_dir, [TEXT_PROMPT, IDS_PROMPT],  # batched together
                          **ENGINES[engine])
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    assert ours[0][0] == hf_tokenizer(TEXT_PROMPT)["input_ids"]
    assert len(ours[0][0]) < len(ours[1][0])
    model = hf_model(model_dir)
    for prompt_ids, completion in ours:
        ids, logprobs = hf_greedy(model, prompt_ids)
        assert completion.token_ids == ids
        # Step 0 compares the logits at the last prompt position (the prefill), later steps
        # the decode path.
        assert_logprobs_close(completion, logprobs, ATOL)


def test_bfloat16_is_close_to_float32_reference(tiny_checkpoint: Callable[[str], Path]) -> None:
    model_dir = tiny_checkpoint("tiny-qwen2")
    [(prompt_ids, completion)] = surge_generate(model_dir, [IDS_PROMPT], dtype="bfloat16")
    ids, logprobs = hf_greedy(hf_model(model_dir), prompt_ids)
    tol = 0.02  # bf16 weights and activations; observed error is about 0.005
    best, runner_up = logprobs[0].topk(2).values.tolist()
    assert best - runner_up > 2 * tol  # a clear winner, so bf16 rounding cannot flip it
    assert completion.token_ids[0] == ids[0]
    assert max(completion.logprobs[0].top, key=completion.logprobs[0].top.get) == ids[0]
    assert_logprobs_close(completion, logprobs, tol, steps=1)


def test_repetition_penalty_matches_transformers(tiny_checkpoint: Callable[[str], Path]
                                                ) -> None:
    model_dir = tiny_checkpoint("tiny-llama")
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                            repetition_penalty=1.3)
    [(prompt_ids, penalized)] = surge_generate(model_dir, [IDS_PROMPT], params=params)
    model = hf_model(model_dir)
    assert penalized.token_ids == hf_greedy(model, prompt_ids, repetition_penalty=1.3)[0]
    assert penalized.token_ids != hf_greedy(model, prompt_ids)[0]  # the penalty mattered


def test_linear_rope_scaling_matches_transformers(copy_of: Callable[[str, str], Path],
                                                  tiny_checkpoint: Callable[[str], Path]
                                                  ) -> None:
    model_dir = copy_of("tiny-llama", "linear-rope")
    edit_config(model_dir, rope_scaling={"rope_type": "linear", "factor": 2.0})
    prompt = IDS_PROMPT * 2  # 90 tokens: positions matter
    [(prompt_ids, completion)] = surge_generate(model_dir, [prompt])
    model = hf_model(model_dir)
    ids, logprobs = hf_greedy(model, prompt_ids)
    assert completion.token_ids == ids
    assert_logprobs_close(completion, logprobs, ATOL)
    # Not vacuous: the preset's own llama3 scaling gives logprobs farther apart than ATOL.
    _, llama3 = hf_greedy(hf_model(tiny_checkpoint("tiny-llama")), prompt_ids)
    assert (torch.stack(llama3) - torch.stack(logprobs)).abs().max() > 10 * ATOL


def test_sliding_window_matches_transformers(copy_of: Callable[[str, str], Path],
                                             tiny_checkpoint: Callable[[str], Path]) -> None:
    model_dir = copy_of("tiny-mistral", "sliding-window")
    edit_config(model_dir, sliding_window=16)
    ids, logprobs = hf_greedy(hf_model(model_dir), IDS_PROMPT)
    assert ids != hf_greedy(hf_model(tiny_checkpoint("tiny-mistral")), IDS_PROMPT)[0]
    for kwargs in ({}, {"max_num_batched_tokens": 8}):  # whole prompt, and chunks of 8
        [(_, completion)] = surge_generate(model_dir, [IDS_PROMPT], **kwargs)
        assert completion.token_ids == ids, kwargs
        assert_logprobs_close(completion, logprobs, ATOL)


def test_sharded_checkpoint_loads_the_same(copy_of: Callable[[str, str], Path],
                                           tiny_checkpoint: Callable[[str], Path]) -> None:
    model_dir = copy_of("tiny-llama", "sharded")
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, model_dir / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))

    [(_, sharded)] = surge_generate(model_dir, [IDS_PROMPT])
    [(_, single)] = surge_generate(tiny_checkpoint("tiny-llama"), [IDS_PROMPT])
    assert sharded.token_ids == single.token_ids
    assert [e.top for e in sharded.logprobs] == [e.top for e in single.logprobs]


def test_pickle_checkpoint_needs_allow_pickle(copy_of: Callable[[str, str], Path],
                                             tiny_checkpoint: Callable[[str], Path]) -> None:
    model_dir = copy_of("tiny-gpt2", "pickle")
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    torch.save(tensors, model_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        LLM(model_dir, dtype="float32")
    [(_, from_pickle)] = surge_generate(model_dir, [IDS_PROMPT], allow_pickle=True)
    [(_, reference)] = surge_generate(tiny_checkpoint("tiny-gpt2"), [IDS_PROMPT])
    assert from_pickle.token_ids == reference.token_ids


def test_unsupported_architecture_lists_the_supported_ones(
        copy_of: Callable[[str, str], Path]) -> None:
    model_dir = copy_of("tiny-llama", "bert")
    edit_config(model_dir, architectures=["BertModel"], model_type="bert")
    with pytest.raises(ValueError, match="BertModel") as info:
        LLM(model_dir, dtype="float32")
    assert all(name in str(info.value) for name in SUPPORTED)
