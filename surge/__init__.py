"""Surge: serve AI models to many users at once."""

from surge.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from surge.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams",
           "StructuredOutputsParams", "TokenLogprobs"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch; importing `surge` for the CLI or the bench client should not.
    if name == "LLM":
        from surge.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'surge' has no attribute {name!r}")
