"""The fair policy end to end through the offline engine on tiny-llama: tenants interleave,
outputs do not depend on the policy, and tokens served are reported per tenant."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from surge import LLM, SamplingParams
from surge.config import EngineConfig
from surge.engine.client import EngineClient, InprocEngineClient
from surge.engine.mp_client import MPEngineClient
from surge.engine.protocol import AddRequest, TenantStats

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


async def _weights_then_one_request(client: EngineClient) -> tuple[TenantStats, EngineConfig]:
    await asyncio.wait_for(client.start(), 120)
    try:
        with pytest.raises(ValueError, match=r"tenant_weights\['gold'\]=0 is invalid"):
            await client.set_tenant_weights({"gold": 0})
        await client.set_tenant_weights({"gold": 3})
        async for _ in client.generate(AddRequest("r", _prompt(0), PARAMS, tenant="gold")):
            pass
        for _ in range(500):  # the snapshot after the last step may trail its outputs
            stats = client.stats().tenants.get("gold")
            if stats is not None and stats.served_output_tokens == 4:
                return stats, client.config  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
        raise AssertionError(f"no stats for tenant gold: {client.stats()}")
    finally:
        await client.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["in-process", "engine process"])
def test_weights_set_on_a_running_engine_apply_to_new_service(model_dir: Path,
                                                              kind: str) -> None:
    config = EngineConfig(dtype="float32", max_model_len=128, scheduling_policy="fair")
    client_class = InprocEngineClient if kind == "in-process" else MPEngineClient
    stats, client_config = asyncio.run(_weights_then_one_request(
        client_class(config, str(model_dir))))
    assert (stats.weight, stats.served_prompt_tokens, stats.served_output_tokens) == (3.0, 8, 4)
    assert stats.virtual_tokens == pytest.approx((8 * 1 + 4 * 2) / 3)
    assert config.tenant_weights == {}  # the caller's config is not changed
    if kind == "engine process":
        assert client_config.tenant_weights == {"gold": 3.0}  # what a restart starts with


@pytest.mark.slow
def test_a_burst_borrowing_seats_changes_no_token(model_dir: Path) -> None:
    # "b" comes back with burst credit while "a" holds both seats mid-decode: it borrows
    # them, preempting "a", whose requests are recomputed. Outputs match fcfs, token for token.
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    results = {}
    for policy in ("fair", "fcfs"):
        llm = LLM(model_dir, dtype="float32", max_num_seqs=2, max_model_len=128,
                  scheduling_policy=policy)
        for index in range(4):
            llm.engine.add_request(_prompt(index), params, request_id=f"a{index}", tenant="a")
        outputs: dict[str, list[int]] = {}
        for number in range(200):
            if number == 5:
                for index in range(4, 6):
                    llm.engine.add_request(_prompt(index), params, request_id=f"b{index}",
                                           tenant="b")
            for output in llm.engine.step():
                if output.finished:
                    outputs[output.request_id] = output.outputs[0].token_ids
            if not llm.engine.has_unfinished_requests():
                break
        results[policy] = (outputs, llm.engine.core.stats().num_preemptions)
    (fair_outputs, fair_preemptions), (fcfs_outputs, fcfs_preemptions) = results.values()
    assert fair_preemptions >= 2 and fcfs_preemptions == 0
    assert len(fair_outputs) == 6 and fair_outputs == fcfs_outputs
