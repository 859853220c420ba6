"""`surge eval`: the quality gate. Perplexity over held-out text, accuracy on a prompt suite,
and agreement with a baseline model, all measured on Surge's own model code.

>>> from surge.eval import ModelSpec, EvalOptions, evaluate        # doctest: +SKIP
>>> report = evaluate(ModelSpec("model.gguf", dtype="bfloat16"),
...                   against=ModelSpec("model.gguf", dtype="float32"))  # doctest: +SKIP
>>> print(report.table()); report.to_dict()["ratios"]["perplexity"]  # doctest: +SKIP
"""

from surge.eval.corpus import BUILTIN_CORPUS, Corpus, builtin_corpus, load_corpus
from surge.eval.models import EvalModel, ModelSpec
from surge.eval.perplexity import NextTokenAgreement, PerplexityResult, plan_windows
from surge.eval.prompts import PromptCase, SuiteResult, load_suite, parse_suite
from surge.eval.report import EvalReport, ModelResult
from surge.eval.runner import EvalOptions, evaluate
from surge.eval.scoring import SequenceScorer

__all__ = ["BUILTIN_CORPUS", "Corpus", "EvalModel", "EvalOptions", "EvalReport", "ModelResult",
           "ModelSpec", "NextTokenAgreement", "PerplexityResult", "PromptCase",
           "SequenceScorer", "SuiteResult", "builtin_corpus", "evaluate", "load_corpus",
           "load_suite", "parse_suite", "plan_windows"]
