"""What ``import surge`` offers a user of the offline API: every name in ``__all__`` resolves,
and constrained decoding works with nothing imported but ``surge``'s top level."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jsonschema

import surge
from surge import LLM, SamplingParams, StructuredOutputsParams, TokenLogprobs

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "size": {"enum": ["S", "M", "L"]},
    "count": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["name", "size", "count"], "additionalProperties": False}


def test_every_public_name_resolves() -> None:
    for name in surge.__all__:
        assert getattr(surge, name) is not None, name
    assert surge.StructuredOutputsParams is StructuredOutputsParams


def test_the_top_level_names_import_no_torch() -> None:
    """The bench client and the CLI import ``surge``: only ``LLM`` may load torch."""
    code = ("import sys, surge; surge.StructuredOutputsParams(choice=['a']); "
            "surge.SamplingParams(); surge.TokenLogprobs; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_offline_llm_follows_structured_outputs_params(
        tiny_checkpoint: Callable[[str], Path]) -> None:
    llm = LLM(tiny_checkpoint("tiny-llama"), dtype="float32", max_model_len=256)
    params = [
        SamplingParams(max_tokens=60, temperature=0.9, seed=seed,
                       structured_outputs=StructuredOutputsParams(json=SCHEMA))
        for seed in range(4)]
    params.append(SamplingParams(max_tokens=8, temperature=0, logprobs=2,
                                 structured_outputs=StructuredOutputsParams(
                                     choice=["yes", "no"])))
    outputs = llm.generate(["Describe a shirt:"] * 4 + ["Yes or no?"], params, use_tqdm=False)
    for output in outputs[:4]:
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    choice = outputs[4].outputs[0]
    assert choice.text in ("yes", "no") and choice.finish_reason == "stop"
    assert all(isinstance(entry, TokenLogprobs) for entry in choice.logprobs or [None])
