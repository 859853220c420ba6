"""Turn a step's logits into next tokens, one row per request, from a `SamplingBatch`.

Rows are handled together: penalties and masks per row, then one greedy argmax for greedy
rows and one sort/filter/sample pass for the rest. A seeded row draws from its own
``torch.Generator``, so its output does not depend on what else shares the batch.

The sampler sees plain values, not engine requests: the runner builds the batch from the
scheduled requests each step, and a test can build one by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from surge.outputs import TokenLogprobs
from surge.sampling_params import GREEDY_EPSILON

__all__ = ["RowPenalties", "SampleResult", "SamplingBatch", "sample"]

T = TypeVar("T")


@dataclass
class SampleResult:
    token_id: int
    logprobs: TokenLogprobs | None = None


@dataclass
class RowPenalties:
    """One row's repetition, presence and frequency penalties and the ids they look at."""

    repetition: float  # 1.0: off
    presence: float  # 0.0: off
    frequency: float  # 0.0: off
    token_ids: list[int]  # prompt and output so far: the repetition penalty sees both
    num_prompt_tokens: int  # presence and frequency count only the ids after the prompt


@dataclass
class SamplingBatch:
    """The sampling settings of one step's rows, in the order of the logits rows.

    The per-row lists hold one entry per row. ``penalties`` and ``banned_token_ids`` stay
    None when no row needs them, so a step without penalties or min_tokens does none of
    that work.
    """

    temperatures: list[float]  # below GREEDY_EPSILON: greedy
    top_k: list[int]  # 0: off
    top_p: list[float]  # 1.0: off
    min_p: list[float]  # 0.0: off
    # A seeded row's own random stream; None: the engine's generator.
    generators: list[torch.Generator | None]
    # None: no logprobs; k: the sampled token's logprob and the top k alternatives.
    num_logprobs: list[int | None]
    penalties: list[RowPenalties | None] | None = None
    # Ids a row may not pick yet: EOS and stop token ids before its min_tokens.
    banned_token_ids: list[list[int]] | None = None
    # Constrained rows (structured outputs) and their allowed tokens as a float32 bias
    # [len(grammar_rows), V]: 0 where allowed, -inf elsewhere. None when no row is
    # constrained, so unconstrained steps do no mask work at all.
    grammar_rows: list[int] | None = None
    grammar_bias: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.temperatures)


def sample(logits: torch.Tensor, batch: SamplingBatch,
           generator: torch.Generator | None = None) -> list[SampleResult]:
    """logits: float32 [N, V], one row per batch row. Unseeded rows draw from ``generator``
    (the engine's, seeded by ``EngineConfig.seed``)."""
    if logits.shape[0] != len(batch):
        raise ValueError(f"logits have {logits.shape[0]} rows but the sampling batch has "
                         f"{len(batch)}: allowed is one batch row per logits row")
    num_logprobs = batch.num_logprobs
    wants_logprobs = any(k is not None for k in num_logprobs)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
    constrained = batch.grammar_rows is not None and batch.grammar_bias is not None
    if constrained:  # out of place: the masked logits are a new tensor
        logits = _mask_disallowed(logits, batch.grammar_rows, batch.grammar_bias)
    if batch.penalties is not None or batch.banned_token_ids is not None:
        logits = logits if constrained else logits.clone()
        if batch.penalties is not None:
            _apply_penalties(logits, batch.penalties)
        if batch.banned_token_ids is not None:
            _mask_banned(logits, batch.banned_token_ids)
    token_ids = logits.argmax(dim=-1)
    random_rows = [row for row, t in enumerate(batch.temperatures) if t >= GREEDY_EPSILON]
    if random_rows:
        token_ids[random_rows] = _sample_random(logits[random_rows], batch, random_rows,
                                                generator)
    ids = token_ids.tolist()
    if raw_logprobs is None:
        return [SampleResult(token_id) for token_id in ids]
    return [SampleResult(token_id, None if k is None
                         else _logprobs_of(raw_logprobs, row, token_id, k))
            for row, (token_id, k) in enumerate(zip(ids, num_logprobs, strict=True))]


def _apply_penalties(logits: torch.Tensor, penalties: list[RowPenalties | None]) -> None:
    for row, penalty in enumerate(penalties):
        if penalty is None:
            continue
        if penalty.repetition != 1.0:
            seen = torch.tensor(penalty.token_ids, device=logits.device).unique()
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / penalty.repetition,
                                            values * penalty.repetition)
        if penalty.presence or penalty.frequency:
            output = torch.tensor(penalty.token_ids[penalty.num_prompt_tokens:],
                                  device=logits.device, dtype=torch.long)
            counts = torch.bincount(output, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= penalty.frequency * counts
            logits[row] -= penalty.presence * (counts > 0).to(logits.dtype)


def _mask_banned(logits: torch.Tensor, banned_token_ids: list[list[int]]) -> None:
    for row, banned in enumerate(banned_token_ids):
        if banned:
            logits[row, banned] = float("-inf")


def _mask_disallowed(logits: torch.Tensor, rows: list[int], bias: torch.Tensor
                     ) -> torch.Tensor:
    """A copy of ``logits`` where tokens a row's grammar does not allow are -inf: the
    grammar bias (0 or -inf) added to its rows, all at once."""
    bias = bias.to(logits.device, non_blocking=True)
    if len(rows) == logits.shape[0]:  # rows are in order (the runner lists them so)
        return logits + bias
    masked = logits.clone()
    index = torch.tensor(rows, device=logits.device)
    masked[index] += bias
    return masked


def _sample_random(logits: torch.Tensor, batch: SamplingBatch, rows: list[int],
                   generator: torch.Generator | None) -> torch.Tensor:
    """Sample ``rows`` of the batch; ``logits`` holds just those rows."""
    device, dtype = logits.device, logits.dtype
    temperatures = torch.tensor(_pick(batch.temperatures, rows), device=device, dtype=dtype)
    logits = logits / temperatures.unsqueeze(1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_logits = _filter_sorted(sorted_logits, _pick(batch.top_k, rows),
                                   _pick(batch.top_p, rows), _pick(batch.min_p, rows))
    probs = torch.softmax(sorted_logits, dim=-1)
    choices = _exponential_race(probs, _pick(batch.generators, rows), generator)
    return order.gather(1, choices.unsqueeze(1)).squeeze(1)


def _pick(values: Sequence[T], rows: list[int]) -> list[T]:
    return [values[row] for row in rows]


def _filter_sorted(sorted_logits: torch.Tensor, top_k: list[int], top_p: list[float],
                   min_p: list[float]) -> torch.Tensor:
    """Apply top-k, top-p and min-p to logits sorted in descending order."""
    device, vocab = sorted_logits.device, sorted_logits.shape[1]
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    top_k_t = torch.tensor([k or vocab for k in top_k], device=device)
    remove = ranks >= top_k_t.unsqueeze(1)
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    top_p_t = torch.tensor(top_p, device=device)
    # Drop a token once the mass strictly before it already reaches top_p (keeps at least one).
    remove |= (probs.cumsum(dim=-1) - probs) >= top_p_t.unsqueeze(1)
    min_p_t = torch.tensor(min_p, device=device)
    remove |= probs < (min_p_t * probs[:, :1].squeeze(1)).unsqueeze(1)
    remove[:, 0] = False
    return sorted_logits.masked_fill(remove, float("-inf"))


def _exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None],
                      generator: torch.Generator | None) -> torch.Tensor:
    """argmax(p / E) with E ~ Exp(1) draws index i with probability p_i (Gumbel-max in
    disguise); each row draws its noise from its own generator when seeded."""
    noise = torch.empty_like(probs)
    for row, own in enumerate(generators):
        noise[row].exponential_(generator=own or generator)
    return (probs / noise).argmax(dim=-1)


def _logprobs_of(raw: torch.Tensor, row: int, token_id: int, k: int) -> TokenLogprobs:
    top: dict[int, float] = {}
    if k:
        values, indices = raw[row].topk(k)
        top = dict(zip(indices.tolist(), values.tolist(), strict=True))
    return TokenLogprobs(token_id, float(raw[row, token_id]), top)
