"""`surge eval`: the quality gate. Perplexity over held-out text, accuracy on a prompt suite,
and agreement with a baseline model, all measured on Surge's own model code.

>>> from surge.eval import ModelSpec, EvalOptions, evaluate        # doctest: +SKIP
>>> report = evaluate(ModelSpec("model.gguf", dtype="bfloat16"),
...                   against=ModelSpec("model.gguf", dtype="float32"))  # doctest: +SKIP
>>> print(report.table()); report.to_dict()["ratios"]["perplexity"]  # doctest: +SKIP

Names are imported on first use, so `surge --help` (which builds this command's parser)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BUILTIN_CORPUS", "DEFAULT_CONTEXT_LENGTH", "DEFAULT_MAX_TOKENS", "Corpus",
           "EvalModel", "EvalOptions", "EvalReport", "ModelResult", "ModelSpec",
           "NextTokenAgreement", "PerplexityResult", "PromptAgreement", "PromptCase",
           "SequenceScorer", "SuiteResult", "builtin_corpus", "evaluate", "load_corpus",
           "load_suite", "parse_suite", "plan_windows"]

_HOMES = {
    "surge.eval.corpus": ["BUILTIN_CORPUS", "Corpus", "builtin_corpus", "load_corpus"],
    "surge.eval.defaults": ["DEFAULT_CONTEXT_LENGTH", "DEFAULT_MAX_TOKENS"],
    "surge.eval.models": ["EvalModel", "ModelSpec"],
    "surge.eval.perplexity": ["NextTokenAgreement", "PerplexityResult", "plan_windows"],
    "surge.eval.agreement": ["PromptAgreement"],
    "surge.eval.prompts": ["PromptCase", "SuiteResult", "load_suite", "parse_suite"],
    "surge.eval.report": ["EvalReport", "ModelResult"],
    "surge.eval.runner": ["EvalOptions", "evaluate"],
    "surge.eval.scoring": ["SequenceScorer"],
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'surge.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
