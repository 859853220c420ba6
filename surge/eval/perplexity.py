"""Perplexity over a token stream with a strided window, and next-token agreement on the way.

A text longer than the context is scored in windows of ``context_length`` tokens that start
every ``stride`` tokens (Hugging Face's "perplexity of fixed-length models" recipe): each window
scores only the tokens the previous window did not, so every token after the first is scored
exactly once, with at least ``context_length - stride`` tokens of context (except at the start).

Given a second model (the baseline), the same pass also compares the two next-token
distributions at every scored position: how often their top-1 predictions agree, and the mean
KL(baseline || model) in nats.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from surge.eval.scoring import LOGIT_ROWS, SequenceScorer, kl_sum

__all__ = ["NextTokenAgreement", "PerplexityResult", "Window", "evaluate_text", "plan_windows"]


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed to the model
    end: int  # one past the last token fed
    score_from: int  # first token whose prediction is scored (earlier ones are context only)


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per token
    next_token_accuracy: float  # argmax prediction equals the actual next token
    num_tokens: int  # tokens scored
    num_windows: int
    context_length: int
    stride: int
    corpus: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NextTokenAgreement:
    top1_match: float  # fraction of positions where both models' argmax agree
    mean_kl: float  # mean KL(baseline || model) of next-token distributions, nats
    num_positions: int

    def to_dict(self) -> dict:
        return asdict(self)


def plan_windows(num_tokens: int, context_length: int, stride: int) -> list[Window]:
    """Windows covering tokens [0, num_tokens); token 0 has nothing to predict it."""
    if num_tokens < 2:
        raise ValueError(f"the text has {num_tokens} token(s): perplexity needs at least 2")
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride={stride} is invalid: allowed is 1 to the context length "
                         f"({context_length})")
    windows, scored_until = [], 1
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        windows.append(Window(begin, end, max(scored_until, begin + 1)))
        scored_until = end
        if end == num_tokens:
            break
    return windows


class _Totals:
    """Running sums over scored positions, for one model or a (model, baseline) pair."""

    def __init__(self) -> None:
        self.positions = 0
        self.nll = [0.0, 0.0]
        self.correct = [0, 0]
        self.top1_match = 0
        self.kl = 0.0

    def add(self, log_probs: list[torch.Tensor], targets: torch.Tensor) -> None:
        self.positions += targets.numel()
        for i, rows in enumerate(log_probs):
            self.nll[i] -= rows.gather(1, targets.unsqueeze(1)).sum().item()
            self.correct[i] += (rows.argmax(dim=-1) == targets).sum().item()
        if len(log_probs) == 2:
            model, baseline = log_probs
            self.top1_match += (model.argmax(-1) == baseline.argmax(-1)).sum().item()
            self.kl += kl_sum(baseline, model)


def evaluate_text(scorers: list[SequenceScorer], token_ids: list[int], corpus: str,
                  stride: int | None = None, progress: bool = True
                  ) -> tuple[list[PerplexityResult], NextTokenAgreement | None]:
    """Perplexity of each scorer's model (one, or a model and its baseline) over ``token_ids``.

    With two scorers the windows use the shorter context of the two, so both see the same
    tokens, and the agreement of the first model with the second is measured on the way.
    """
    if len(scorers) == 2 and scorers[0].vocab_size != scorers[1].vocab_size:
        raise ValueError(f"the models' vocabularies differ ({scorers[0].vocab_size} and "
                         f"{scorers[1].vocab_size} tokens): agreement needs the same tokenizer")
    context = min(s.max_len for s in scorers)
    stride = stride or max(1, context // 2)
    windows = plan_windows(len(token_ids), context, stride)
    totals, seconds = _Totals(), [0.0] * len(scorers)
    for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        _score_window(scorers, token_ids, window, totals, seconds)
    results = [_result(totals, i, len(windows), context, stride, corpus, seconds[i])
               for i in range(len(scorers))]
    agreement = None
    if len(scorers) == 2:
        agreement = NextTokenAgreement(totals.top1_match / totals.positions,
                                       totals.kl / totals.positions, totals.positions)
    return results, agreement


def _score_window(scorers: list[SequenceScorer], token_ids: list[int], window: Window,
                  totals: _Totals, seconds: list[float]) -> None:
    ids = token_ids[window.begin:window.end]
    # Rows predicting tokens [score_from, end): hidden states at positions one before them.
    first_row = window.score_from - window.begin - 1
    hidden = []
    for i, scorer in enumerate(scorers):
        start = time.perf_counter()
        hidden.append(scorer.hidden_states(ids)[first_row:-1])
        seconds[i] += time.perf_counter() - start
    device = hidden[0].device
    targets = torch.tensor(token_ids[window.score_from:window.end], device=device)
    for start in range(0, targets.numel(), LOGIT_ROWS):
        rows = []
        for i, (scorer, states) in enumerate(zip(scorers, hidden, strict=True)):
            begin = time.perf_counter()
            rows.append(scorer.log_probs(states[start:start + LOGIT_ROWS]).to(device))
            seconds[i] += time.perf_counter() - begin
        totals.add(rows, targets[start:start + LOGIT_ROWS])


def _result(totals: _Totals, index: int, num_windows: int, context: int, stride: int,
            corpus: str, seconds: float) -> PerplexityResult:
    mean_nll = totals.nll[index] / totals.positions
    return PerplexityResult(math.exp(mean_nll), mean_nll,
                            totals.correct[index] / totals.positions, totals.positions,
                            num_windows, context, stride, corpus, seconds)
