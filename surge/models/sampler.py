"""Turn a step's logits into next tokens, honouring each request's SamplingParams.

Rows are handled together: penalties and masks per row, then one greedy argmax for greedy
rows and one sort/filter/sample pass for the rest. A seeded request draws from its own
``torch.Generator``, so its output does not depend on what else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surge.engine.request import Request
from surge.outputs import TokenLogprobs

__all__ = ["SampleResult", "sample"]


@dataclass
class SampleResult:
    token_id: int
    logprobs: TokenLogprobs | None = None


def sample(logits: torch.Tensor, requests: list[Request],
           generator: torch.Generator | None = None) -> list[SampleResult]:
    """logits: float32 [N, V], one row per request, in order. Unseeded requests draw from
    ``generator`` (the engine's, seeded by ``EngineConfig.seed``)."""
    want_logprobs = [r.sampling_params.logprobs is not None for r in requests]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    if _needs_processing(requests):
        logits = logits.clone()
        _apply_penalties(logits, requests)
        _mask_early_stops(logits, requests)
    token_ids = _greedy(logits)
    random_rows = [i for i, r in enumerate(requests) if not r.sampling_params.is_greedy]
    if random_rows:
        sampled = _sample_random(logits[random_rows], [requests[i] for i in random_rows],
                                 generator)
        token_ids[random_rows] = sampled
    ids = token_ids.tolist()
    return [SampleResult(token_id, _logprobs_of(raw_logprobs, row, token_id, request)
                         if wants else None)
            for row, (token_id, request, wants) in enumerate(zip(ids, requests, want_logprobs,
                                                                   strict=True))]


def _needs_processing(requests: list[Request]) -> bool:
    return any(r.sampling_params.has_penalties or _in_min_tokens(r) for r in requests)


def _in_min_tokens(request: Request) -> bool:
    return request.num_output_tokens < request.sampling_params.min_tokens


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    for row, request in enumerate(requests):
        params = request.sampling_params
        if not params.has_penalties:
            continue
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(request.token_ids, device=logits.device).unique()
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / params.repetition_penalty,
                                            values * params.repetition_penalty)
        if params.presence_penalty or params.frequency_penalty:
            output = torch.tensor(request.output_token_ids, device=logits.device,
                                  dtype=torch.long)
            counts = torch.bincount(output, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= params.frequency_penalty * counts
            logits[row] -= params.presence_penalty * (counts > 0).to(logits.dtype)


def _mask_early_stops(logits: torch.Tensor, requests: list[Request]) -> None:
    """Before min_tokens, neither EOS nor a stop token id may be chosen."""
    for row, request in enumerate(requests):
        if _in_min_tokens(request):
            banned = set(request.sampling_params.stop_token_ids)
            if not request.sampling_params.ignore_eos:
                banned |= request.eos_token_ids
            if banned:
                logits[row, sorted(banned)] = float("-inf")


def _sample_random(logits: torch.Tensor, requests: list[Request],
                   generator: torch.Generator | None) -> torch.Tensor:
    temperatures = torch.tensor([r.sampling_params.temperature for r in requests],
                                device=logits.device, dtype=logits.dtype)
    logits = logits / temperatures.unsqueeze(1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_logits = _filter_sorted(sorted_logits, requests)
    probs = torch.softmax(sorted_logits, dim=-1)
    choices = _exponential_race(probs, requests, generator)
    return order.gather(1, choices.unsqueeze(1)).squeeze(1)


def _filter_sorted(sorted_logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Apply top-k, top-p and min-p to logits sorted in descending order."""
    device, vocab = sorted_logits.device, sorted_logits.shape[1]
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    top_k = torch.tensor([r.sampling_params.top_k or vocab for r in requests], device=device)
    remove = ranks >= top_k.unsqueeze(1)
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    top_p = torch.tensor([r.sampling_params.top_p for r in requests], device=device)
    # Drop a token once the mass strictly before it already reaches top_p (keeps at least one).
    remove |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    min_p = torch.tensor([r.sampling_params.min_p for r in requests], device=device)
    remove |= probs < (min_p * probs[:, :1].squeeze(1)).unsqueeze(1)
    remove[:, 0] = False
    return sorted_logits.masked_fill(remove, float("-inf"))


def _exponential_race(probs: torch.Tensor, requests: list[Request],
                      generator: torch.Generator | None) -> torch.Tensor:
    """argmax(p / E) with E ~ Exp(1) draws index i with probability p_i (Gumbel-max in
    disguise); each row draws its noise from its own generator when seeded."""
    noise = torch.empty_like(probs)
    for row, request in enumerate(requests):
        noise[row].exponential_(generator=_generator_of(request, probs.device) or generator)
    return (probs / noise).argmax(dim=-1)


def _generator_of(request: Request, device: torch.device) -> torch.Generator | None:
    seed = request.sampling_params.seed
    if seed is None:
        return None
    if request.generator is None:
        request.generator = torch.Generator(device=device).manual_seed(seed)
    return request.generator


def _logprobs_of(raw: torch.Tensor, row: int, token_id: int, request: Request) -> TokenLogprobs:
    k = request.sampling_params.logprobs or 0
    top: dict[int, float] = {}
    if k:
        values, indices = raw[row].topk(k)
        top = dict(zip(indices.tolist(), values.tolist(), strict=True))
    return TokenLogprobs(token_id, float(raw[row, token_id]), top)
