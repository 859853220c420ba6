"""The sampler on plain tensors and a hand-built SamplingBatch: no model, no engine."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from surge.engine.sampler import RowPenalties, SamplingBatch, sample

VOCAB = 8


def make_batch(rows: int, **per_row: list[Any]) -> SamplingBatch:
    """Greedy rows without logprobs, unless ``per_row`` overrides a field."""
    fields: dict[str, Any] = dict(temperatures=[0.0] * rows, top_k=[0] * rows,
                                  top_p=[1.0] * rows, min_p=[0.0] * rows,
                                  generators=[None] * rows, num_logprobs=[None] * rows)
    fields.update(per_row)
    return SamplingBatch(**fields)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 0, 0, 0, 0, 0], [5.0, 0, 0, 0, 0, 0, 0, 6.0]])
    assert [r.token_id for r in sample(logits, make_batch(2))] == [1, 7]


def test_a_seeded_row_does_not_depend_on_its_neighbours() -> None:
    logits = torch.randn(3, VOCAB, generator=seeded(0))
    alone = sample(logits[1:2], make_batch(1, temperatures=[1.0], generators=[seeded(7)]))
    together = sample(logits, make_batch(3, temperatures=[1.0, 1.0, 0.0],
                                         generators=[None, seeded(7), None]), seeded(99))
    assert together[1].token_id == alone[0].token_id


def test_filters_that_keep_one_token_sample_the_argmax() -> None:
    logits = torch.randn(3, VOCAB, generator=seeded(1))
    batch = make_batch(3, temperatures=[1.0] * 3, top_k=[1, 0, 0], top_p=[1.0, 1e-6, 1.0],
                       min_p=[0.0, 0.0, 1.0])
    for _ in range(5):
        assert [r.token_id for r in sample(logits, batch, seeded(3))] == \
            logits.argmax(dim=-1).tolist()


def test_repetition_penalty_demotes_seen_tokens() -> None:
    logits = torch.tensor([[0.0, 4.0, 3.0, 0, 0, 0, 0, 0]])
    penalty = RowPenalties(2.0, 0.0, 0.0, token_ids=[1], num_prompt_tokens=1)
    assert sample(logits, make_batch(1, penalties=[penalty]))[0].token_id == 2
    assert logits[0, 1] == 4.0  # the caller's logits are left alone


def test_presence_and_frequency_count_only_output_tokens() -> None:
    logits = torch.tensor([[0.0, 4.0, 3.5, 0, 0, 0, 0, 0]])
    in_prompt = RowPenalties(1.0, 1.0, 0.0, token_ids=[1, 1], num_prompt_tokens=2)
    assert sample(logits, make_batch(1, penalties=[in_prompt]))[0].token_id == 1
    in_output = RowPenalties(1.0, 0.0, 0.3, token_ids=[5, 1, 1], num_prompt_tokens=1)
    assert sample(logits, make_batch(1, penalties=[in_output]))[0].token_id == 2


def test_banned_ids_are_never_picked() -> None:
    logits = torch.tensor([[9.0, 8.0, 1.0, 0, 0, 0, 0, 0]] * 2)
    batch = make_batch(2, banned_token_ids=[[0, 1], []])
    assert [r.token_id for r in sample(logits, batch)] == [2, 0]


def test_logprobs_only_for_rows_that_ask() -> None:
    logits = torch.randn(2, VOCAB, generator=seeded(2))
    results = sample(logits, make_batch(2, num_logprobs=[3, None]))
    entry = results[0].logprobs
    assert entry is not None and results[1].logprobs is None
    expected = torch.log_softmax(logits[0], dim=-1)
    assert entry.token_id == results[0].token_id
    assert entry.logprob == pytest.approx(float(expected.max()))
    assert list(entry.top.values()) == pytest.approx(expected.topk(3).values.tolist())


def test_rows_must_match_the_logits() -> None:
    with pytest.raises(ValueError, match="logits have 2 rows but the sampling batch has 1"):
        sample(torch.zeros(2, VOCAB), make_batch(1))
