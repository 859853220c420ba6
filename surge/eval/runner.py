"""`evaluate`: everything `surge eval` measures, for one model or a model against a baseline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surge.eval.agreement import PromptAgreement, compare_answers, teacher_forced_agreement
from surge.eval.corpus import Corpus, load_corpus
from surge.eval.defaults import DEFAULT_CONTEXT_LENGTH, DEFAULT_MAX_TOKENS
from surge.eval.models import EvalModel, ModelSpec
from surge.eval.perplexity import NextTokenAgreement, evaluate_text
from surge.eval.prompts import PromptCase, load_suite, run_suite
from surge.eval.report import EvalReport, ModelResult

__all__ = ["EvalOptions", "evaluate"]



@dataclass(frozen=True)
class EvalOptions:
    """What to measure. ``text``/``prompts`` None mean the built-in corpus and suite."""

    perplexity: bool = True
    prompts: bool = True
    text: str | Path | None = None
    prompt_file: str | Path | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS  # tokens of text fed (the first one is not scored)
    context_length: int = DEFAULT_CONTEXT_LENGTH  # capped by the model's own
    stride: int | None = None  # default: half the context
    progress: bool = True

    def __post_init__(self) -> None:
        if not (self.perplexity or self.prompts):
            raise ValueError("nothing to evaluate: leave perplexity or the prompt suite on")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens={self.max_tokens} is invalid: allowed is an integer "
                             ">= 2 (perplexity scores every token after the first)")
        if self.context_length < 2:
            raise ValueError(f"context_length={self.context_length} is invalid: allowed is an "
                             "integer >= 2")
        if self.stride is not None and not 1 <= self.stride <= self.context_length:
            raise ValueError(f"stride={self.stride} is invalid: allowed is 1 to the context "
                             f"length ({self.context_length})")


def evaluate(model: ModelSpec, against: ModelSpec | None = None,
             options: EvalOptions | None = None) -> EvalReport:
    """Read every input first (bad input fails before any model loads), then measure."""
    options = options or EvalOptions()
    corpus = load_corpus(options.text) if options.perplexity else None
    suite = load_suite(options.prompt_file) if options.prompts else None
    models = [EvalModel(spec, options.context_length)
              for spec in ([model, against] if against else [model])]
    results = [ModelResult(m.spec.describe()) for m in models]
    prompt_agreement = _run_prompts(models, results, suite, options) if suite else None
    text_agreement = _run_text(models, results, corpus, options) if corpus else None
    for evaluated, result in zip(models, results, strict=True):
        result.model = evaluated.describe()  # with the dtype and device actually used
    return EvalReport(results[0], results[1] if against else None, text_agreement,
                      prompt_agreement)


def _run_prompts(models: list[EvalModel], results: list[ModelResult],
                 suite: tuple[str, list[PromptCase]], options: EvalOptions
                 ) -> PromptAgreement | None:
    name, cases = suite
    answers = []
    for evaluated, result in zip(models, results, strict=True):
        result.prompts, model_answers = run_suite(evaluated.llm, cases, name, options.progress)
        answers.append(model_answers)
    if len(models) == 1:
        return None
    next_token = teacher_forced_agreement(models[0].scorer, models[1].scorer, answers[1],
                                          options.progress)
    return compare_answers(answers[0], answers[1], next_token)


def _run_text(models: list[EvalModel], results: list[ModelResult], corpus: Corpus,
              options: EvalOptions) -> NextTokenAgreement | None:
    token_ids = models[0].tokenizer.encode(corpus.text)[:options.max_tokens]
    if len(token_ids) < 2:
        raise ValueError(f"text {corpus.name!r} is {len(token_ids)} token(s) long: perplexity "
                         "needs at least 2")
    if len(models) == 2:
        _check_same_tokens(models, corpus.text, token_ids)
    scorers = [m.scorer for m in models]
    perplexities, agreement = evaluate_text(scorers, token_ids, corpus.name, options.stride,
                                            options.progress)
    for result, perplexity in zip(results, perplexities, strict=True):
        result.perplexity = perplexity
    return agreement


def _check_same_tokens(models: list[EvalModel], text: str, token_ids: list[int]) -> None:
    theirs = models[1].tokenizer.encode(text)[:len(token_ids)]
    if theirs != token_ids:
        raise ValueError("the two models tokenize the text differently: perplexity and "
                         "agreement can only be compared between models that share a tokenizer")
