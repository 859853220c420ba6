"""How closely a model follows a baseline on the same prompts.

- ``identical_answers``: fraction of prompts whose greedy answers are the same tokens;
- ``greedy_token_match``: tokens both answers share before they first differ, over the tokens of
  the longer answer, summed over prompts. Positions after a divergence are not compared: from
  there on the two models continue different texts;
- ``next_token``: teacher forcing. Both models read the same sequences (each prompt followed by
  the baseline's greedy answer); at every position from the prompt's last token on, the top-1
  match rate of their next-token predictions and the mean KL(baseline || model) in nats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from surge.eval.perplexity import NextTokenAgreement
from surge.eval.prompts import Answer
from surge.eval.scoring import SequenceScorer, kl_sum

__all__ = ["PromptAgreement", "compare_answers", "teacher_forced_agreement"]


@dataclass
class PromptAgreement:
    identical_answers: float
    greedy_token_match: float
    num_prompts: int
    next_token: NextTokenAgreement

    def to_dict(self) -> dict:
        return asdict(self)


def compare_answers(model: list[Answer], baseline: list[Answer],
                    next_token: NextTokenAgreement) -> PromptAgreement:
    if len(model) != len(baseline):
        raise ValueError(f"{len(model)} answers against {len(baseline)}: the models must "
                         "answer the same prompts")
    identical = sum(a.token_ids == b.token_ids for a, b in zip(model, baseline, strict=True))
    shared = sum(_common_prefix(a.token_ids, b.token_ids)
                 for a, b in zip(model, baseline, strict=True))
    longest = sum(max(len(a.token_ids), len(b.token_ids))
                  for a, b in zip(model, baseline, strict=True))
    return PromptAgreement(identical / len(model), shared / longest if longest else 1.0,
                           len(model), next_token)


def teacher_forced_agreement(model: SequenceScorer, baseline: SequenceScorer,
                             answers: list[Answer], progress: bool = True
                             ) -> NextTokenAgreement:
    """Compare next-token distributions on each prompt + the baseline's answer."""
    if model.vocab_size != baseline.vocab_size:
        raise ValueError(f"the models' vocabularies differ ({model.vocab_size} and "
                         f"{baseline.vocab_size} tokens): agreement needs the same tokenizer")
    positions, top1, kl = 0, 0, 0.0
    for answer in tqdm(answers, desc="agreement", unit="prompt", disable=not progress):
        sequence = answer.prompt_token_ids + answer.token_ids
        first = len(answer.prompt_token_ids) - 1  # predicts the answer's first token
        ours = model.log_probs(model.hidden_states(sequence)[first:])
        theirs = baseline.log_probs(baseline.hidden_states(sequence)[first:]).to(ours.device)
        positions += ours.shape[0]
        top1 += (ours.argmax(-1) == theirs.argmax(-1)).sum().item()
        kl += kl_sum(theirs, ours)
    return NextTokenAgreement(top1 / positions, kl / positions, positions)


def _common_prefix(a: list[int], b: list[int]) -> int:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return min(len(a), len(b))
