"""Perplexity: windows, the built-in corpus, and parity with Hugging Face transformers."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from surge.eval import EvalOptions, ModelSpec, builtin_corpus, evaluate, plan_windows
from surge.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

TOKENS, CONTEXT, STRIDE = 300, 128, 48  # several overlapping windows and a short last one


def test_every_token_after_the_first_is_scored_once() -> None:
    for num_tokens, context, stride in [(300, 128, 48), (4096, 2048, 1024), (10, 10, 10),
                                        (11, 10, 5), (2, 2, 1)]:
        windows = plan_windows(num_tokens, context, stride)
        scored = [t for w in windows for t in range(w.score_from, w.end)]
        assert scored == list(range(1, num_tokens))
        assert all(w.end - w.begin <= context and w.begin < w.score_from for w in windows)
    # A budget that is a multiple of the stride ends on a full window, not a 1-token tail.
    assert len(plan_windows(4096, 2048, 1024)) == 3


@pytest.mark.parametrize(("args", "message"), [
    ((1, 8, 4), "at least 2"), ((100, 8, 0), "stride=0"), ((100, 8, 9), "stride=9")])
def test_bad_window_plans_are_refused(args: tuple[int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_windows(*args)


def test_builtin_corpus_is_a_fixed_held_out_split() -> None:
    test, train = builtin_corpus("test"), builtin_corpus("train")
    assert test.name == "pydoc-topics:test" and test == builtin_corpus()
    assert 0.1 < len(test.text) / (len(test.text) + len(train.text)) < 0.35
    from pydoc_data.topics import topics

    held_out = topics["import"]  # CRC-32 of "import" is divisible by 5
    assert held_out in test.text and held_out not in train.text
    assert topics["assert"] in train.text and topics["assert"] not in test.text
    assert test.text not in train.text and train.text[:1000] not in test.text
    with pytest.raises(ValueError, match="split='dev'"):
        builtin_corpus("dev")  # type: ignore[arg-type]


def hf_perplexity(model_dir: Path, token_ids: list[int], context: int, stride: int) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                              dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for window in plan_windows(len(token_ids), context, stride):
        ids = torch.tensor([token_ids[window.begin:window.end]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        targets = torch.tensor(token_ids[window.score_from:window.end])
        rows = log_probs[window.score_from - window.begin - 1:-1]
        nll -= rows.gather(1, targets.unsqueeze(1)).sum().item()
        count += targets.numel()
    return math.exp(nll / count)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_perplexity_equals_transformers(tiny_checkpoint: Callable[[str], Path],
                                        preset: str) -> None:
    model_dir = tiny_checkpoint(preset)
    options = EvalOptions(prompts=False, max_tokens=TOKENS, context_length=CONTEXT,
                          stride=STRIDE, progress=False)
    result = evaluate(ModelSpec(str(model_dir), "float32", "cpu"), options=options).model
    ppl = result.perplexity
    assert (ppl.num_tokens, ppl.context_length, ppl.stride) == (TOKENS - 1, CONTEXT, STRIDE)
    assert ppl.corpus == "pydoc-topics:test" and result.model["dtype"] == "float32"
    token_ids = load_tokenizer(model_dir).encode(builtin_corpus().text)[:TOKENS]
    reference = hf_perplexity(model_dir, token_ids, CONTEXT, STRIDE)
    assert ppl.perplexity == pytest.approx(reference, rel=0.01)
    assert math.log(ppl.perplexity) == pytest.approx(ppl.mean_nll)
    # Random weights: close to uniform over the vocabulary, nowhere near a trained model.
    assert ppl.perplexity > 100


def test_context_is_capped_by_the_model(tiny_checkpoint: Callable[[str], Path]) -> None:
    """tiny-gpt2 has 1024 positions: asking for 4096 evaluates 1024-token windows."""
    options = EvalOptions(prompts=False, max_tokens=1100, context_length=4096, progress=False)
    ppl = evaluate(ModelSpec(str(tiny_checkpoint("tiny-gpt2")), "float32", "cpu"),
                   options=options).model.perplexity
    assert (ppl.context_length, ppl.stride, ppl.num_windows) == (1024, 512, 2)
