"""The fair policy end to end through the offline engine on tiny-llama: tenants interleave,
outputs do not depend on the policy, and tokens served are reported per tenant."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from surge import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def _prompt(index: int) -> list[int]:
    return [3 + (index * 7 + k) % 500 for k in range(8)]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("tiny-llama")


def _finish_order(llm: LLM, tenants: list[str]) -> tuple[list[str], dict[str, list[int]]]:
    """Queue one request per tenant entry (in this order), step to the end; return the
    request ids in finishing order and every request's output tokens."""
    for index, tenant in enumerate(tenants):
        llm.engine.add_request(_prompt(index), PARAMS, request_id=f"{tenant}{index}",
                               tenant=tenant)
    order: list[str] = []
    outputs: dict[str, list[int]] = {}
    while llm.engine.has_unfinished_requests():
        for output in llm.engine.step():
            if output.finished:
                order.append(output.request_id)
                outputs[output.request_id] = output.outputs[0].token_ids
    return order, outputs


@pytest.mark.slow
def test_two_tenants_interleave_under_fair_and_queue_under_priority(model_dir: Path) -> None:
    tenants = ["a"] * 8 + ["b"] * 4  # "a" queued a backlog before "b" came
    results = {}
    for policy in ("fair", "priority"):
        llm = LLM(model_dir, dtype="float32", max_num_seqs=1, max_model_len=128,
                  scheduling_policy=policy)
        results[policy] = _finish_order(llm, tenants)
    fair_order, fair_outputs = results["fair"]
    priority_order, priority_outputs = results["priority"]
    assert fair_order == ["a0", "b8", "a1", "b9", "a2", "b10", "a3", "b11",
                          "a4", "a5", "a6", "a7"]
    assert priority_order == [f"a{i}" for i in range(8)] + [f"b{i}" for i in range(8, 12)]
    assert fair_outputs == priority_outputs  # the policy orders requests, never changes them


def test_generate_reports_tokens_served_per_tenant(model_dir: Path) -> None:
    llm = LLM(model_dir, dtype="float32", max_num_seqs=4, max_model_len=128,
              scheduling_policy="fair", tenant_weights={"gold": 2})
    prompts = [_prompt(i) for i in range(5)]
    outputs = llm.generate(prompts, PARAMS, use_tqdm=False,
                           tenant=["gold", "free", "gold", "free", "free"])
    assert all(len(o.outputs[0].token_ids) == 4 for o in outputs)
    stats = llm.engine.core.stats().tenants
    assert {t: (s.served_prompt_tokens, s.served_output_tokens, s.weight)
            for t, s in stats.items()} == {"gold": (16, 8, 2.0), "free": (24, 12, 1.0)}
    # One tenant for every prompt, and the engine validates the name.
    llm.generate(prompts[:2], PARAMS, use_tqdm=False, tenant="free")
    assert llm.engine.core.stats().tenants["free"].served_output_tokens == 20
    with pytest.raises(ValueError, match="got 1 tenants for 2 prompts"):
        llm.generate(prompts[:2], PARAMS, use_tqdm=False, tenant=["gold"])
    with pytest.raises(ValueError, match="tenant='' is invalid: allowed is a string of 1 to"):
        llm.generate(prompts[:1], PARAMS, use_tqdm=False, tenant="")
    assert not llm.engine.has_unfinished_requests()
