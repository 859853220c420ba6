"""Agreement of a model with a baseline: itself (perfect) and other weights (lower)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from surge.eval import EvalOptions, ModelSpec, evaluate
from surge.eval.agreement import compare_answers
from surge.eval.perplexity import NextTokenAgreement
from surge.eval.prompts import Answer

PROMPTS = ["Hello world, the", "Once upon a time", "1 2 3 4", "The capital of", "Why is"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "suite.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "expected": "zebra", "chat": chat,
                                        "max_tokens": 12}) + "\n"
                            for p in PROMPTS for chat in (True, False)), encoding="utf-8")
    return path


def options(suite: Path) -> EvalOptions:
    return EvalOptions(prompt_file=suite, max_tokens=400, context_length=128, progress=False)


@pytest.mark.slow
def test_a_model_agrees_with_itself(tiny_checkpoint: Callable[[str], Path],
                                    suite: Path) -> None:
    spec = ModelSpec(str(tiny_checkpoint("tiny-llama")), "float32", "cpu")
    report = evaluate(spec, spec, options(suite))
    prompts, text = report.prompt_agreement, report.text_agreement
    assert prompts.identical_answers == 1.0 and prompts.greedy_token_match == 1.0
    assert prompts.next_token.top1_match == 1.0
    assert prompts.next_token.mean_kl == pytest.approx(0.0, abs=1e-6)
    # Every answer token and the position after the last one are compared.
    assert prompts.next_token.num_positions > len(PROMPTS) * 2
    assert text.top1_match == 1.0 and text.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert text.num_positions == 399
    assert report.ratios["perplexity"] == pytest.approx(1.0)
    assert report.model.perplexity.perplexity == report.against.perplexity.perplexity


@pytest.mark.slow
def test_other_weights_agree_less(tiny_checkpoint: Callable[[str], Path],
                                  other_seed_llama: Path, suite: Path) -> None:
    model = ModelSpec(str(other_seed_llama), "float32", "cpu")
    baseline = ModelSpec(str(tiny_checkpoint("tiny-llama")), "float32", "cpu")
    report = evaluate(model, baseline, options(suite))
    prompts, text = report.prompt_agreement, report.text_agreement
    assert prompts.identical_answers < 1.0 and prompts.greedy_token_match < 0.9
    assert prompts.next_token.top1_match < 0.9 and prompts.next_token.mean_kl > 0.01
    assert text.top1_match < 0.9 and text.mean_kl > 0.01
    assert report.ratios["perplexity"] != pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_bfloat16_agrees_closely_with_float32(tiny_checkpoint: Callable[[str], Path],
                                              suite: Path) -> None:
    """The quality gate's intended use: a cheaper variant against its full-precision self."""
    model_dir = str(tiny_checkpoint("tiny-llama"))
    report = evaluate(ModelSpec(model_dir, "bfloat16", "cpu"),
                      ModelSpec(model_dir, "float32", "cpu"), options(suite))
    assert report.model.model["dtype"] == "bfloat16"
    assert report.against.model["dtype"] == "float32"
    assert 0 < report.text_agreement.mean_kl < 0.01
    assert report.ratios["perplexity"] == pytest.approx(1.0, abs=0.01)


def test_greedy_token_match_counts_the_shared_prefix() -> None:
    def answer(ids: list[int]) -> Answer:
        return Answer([1], ids, "")

    model = [answer([5, 6, 7, 8]), answer([1, 2]), answer([])]
    baseline = [answer([5, 6, 0, 8]), answer([1, 2, 3]), answer([])]
    result = compare_answers(model, baseline, NextTokenAgreement(1.0, 0.0, 1))
    assert result.identical_answers == pytest.approx(1 / 3)  # only the two empty answers
    assert result.greedy_token_match == pytest.approx((2 + 2) / (4 + 3))
