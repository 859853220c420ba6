"""Structured outputs in the offline engine: a random-weight model's output always follows the
constraint (JSON schema, JSON object, regex, choice, grammar), a constraint that cannot compile
fails that request only, and unconstrained requests are untouched by the feature."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import torch

from surge import LLM, SamplingParams
from surge.engine.sampler import SamplingBatch, sample
from surge.engine.structured import GrammarError, StructuredOutputs, validate_constraint
from surge.sampling_params import StructuredOutputsParams
from surge.tokenizer import load_tokenizer

# On the CPU wherever a GPU is: a random-weight model's sampled text (whether a free-form
# JSON string closes within max_tokens) follows the device's random stream. Constrained
# decoding on CUDA is tested in tests/models/test_cuda.py, on outputs bounded by the grammar.
ENGINE_ARGS = dict(dtype="float32", device="cpu", max_num_seqs=32, max_model_len=512)
NAME = {"type": "string", "maxLength": 8}

# At least 20 schemas: nested objects, arrays, enums, bounded numbers, optional fields.
# Strings and arrays are capped, and objects closed (``_closed``), so a random model's output
# finishes within max_tokens.
_SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": NAME}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": -1, "maximum": 1}},
     "required": ["score"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"point": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                         "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"name": NAME, "nickname": NAME}, "required": ["name"],
     "additionalProperties": False},
    {"type": "object", "properties": {"ids": {"type": "array", "maxItems": 4, "items": {
        "type": "integer", "minimum": 0, "maximum": 999}}}, "required": ["ids"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": NAME, "address": {"type": "object", "properties": {
            "city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 5}, "minItems": 1,
     "maxItems": 3},
    {"type": "object", "properties": {"status": {"const": "done"}}, "required": ["status"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0,
                                                           "maximum": 9}, {"type": "null"}]}},
     "required": ["value"]},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]},
                                      "label": {"type": "string", "enum": ["low", "high"]}},
     "required": ["level", "label"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1,
                                                              "maximum": 99}},
        "required": ["sku", "qty"], "additionalProperties": False}}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"temperature": {"type": "number", "exclusiveMinimum": 0,
                                                      "maximum": 100}},
     "required": ["temperature"]},
    {"type": "object", "properties": {"date": {"type": "string",
                                               "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
     "required": ["date"]},
    {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                      "confidence": {"type": "number", "minimum": 0,
                                                     "maximum": 1}},
     "required": ["answer"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                  "maximum": 9}}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"title": {"type": "string", "minLength": 2,
                                                "maxLength": 6}},
     "required": ["title"], "additionalProperties": False},
    {"type": "object", "properties": {"flags": {"type": "array", "items": {"type": "boolean"},
                                                "maxItems": 3}, "count": {"type": "integer",
                                                                          "minimum": 0,
                                                                          "maximum": 3}},
     "required": ["flags", "count"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "meta": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "additionalProperties": False}}, "required": ["kind"], "additionalProperties": False},
]


def _closed(schema: object) -> object:
    """Objects admit no properties beyond those named (as OpenAI's strict mode requires)."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if closed.get("type") == "object":
        closed.setdefault("additionalProperties", False)
    return closed


SCHEMAS: list[dict] = [_closed(schema) for schema in _SCHEMAS]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("tiny-llama")


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(model_dir, **ENGINE_ARGS)


def _constrained(temperature: float = 0.0, seed: int | None = None, max_tokens: int = 96,
                 **constraint: object) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**constraint))


@pytest.mark.slow
def test_every_schema_output_validates(llm: LLM) -> None:
    """Greedy and sampled outputs of 22 schemas, all in one batch, all parse and validate."""
    assert len(SCHEMAS) >= 20
    params = [_constrained(json=s) for s in SCHEMAS]
    params += [_constrained(temperature=1.0, seed=i, json=s) for i, s in enumerate(SCHEMAS)]
    outputs = llm.generate(["Give me JSON:"] * len(params), params, use_tqdm=False)
    for output, param in zip(outputs, params, strict=True):
        completion = output.outputs[0]
        schema = param.structured_outputs.json
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)


def test_json_object_regex_choice_and_grammars(llm: LLM) -> None:
    gbnf = 'root ::= "cat" | "dog" " " [0-9]'
    lark = 'start: "id-" /[a-f]{4}/'
    params = [_constrained(temperature=0.8, seed=3, json_object=True),
              _constrained(regex=r"[0-9]{3}-[a-z]{2}"),
              _constrained(temperature=1.0, seed=5, choice=["alpha", "beta", "gamma"]),
              _constrained(grammar=gbnf), _constrained(grammar=lark),
              _constrained(json=json.dumps(SCHEMAS[0]))]
    outputs = [o.outputs[0] for o in llm.generate(["Hi"] * len(params), params,
                                                  use_tqdm=False)]
    assert all(o.finish_reason == "stop" for o in outputs), [o.text for o in outputs]
    assert isinstance(json.loads(outputs[0].text), dict)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outputs[1].text)
    assert outputs[2].text in ("alpha", "beta", "gamma")
    assert re.fullmatch(r"cat|dog [0-9]", outputs[3].text)
    assert re.fullmatch(r"id-[a-f]{4}", outputs[4].text)
    jsonschema.validate(json.loads(outputs[5].text), SCHEMAS[0])


def test_output_ends_with_eos_once_the_grammar_is_complete(llm: LLM, model_dir: Path) -> None:
    """The grammar allows EOS only when complete; the request finishes there, EOS hidden."""
    out = llm.generate(["Hi"], _constrained(choice=["yes"]), use_tqdm=False)[0].outputs[0]
    tokenizer = load_tokenizer(model_dir)
    assert out.text == "yes" and out.finish_reason == "stop"
    assert out.token_ids[-1] in tokenizer.eos_token_ids
    assert tokenizer.decode(out.token_ids[:-1]) == "yes"


def test_max_tokens_still_cuts_a_constrained_output(llm: LLM) -> None:
    out = llm.generate(["Hi"], _constrained(max_tokens=3, regex="[a-z]{30}"),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_a_constraint_that_cannot_compile_fails_only_its_request(llm: LLM) -> None:
    bad = _constrained(json={"type": "object", "properties": {
        "a": {"type": "string", "pattern": "(unclosed"}}})
    good = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate(["Hi", "Hi", "Hello"],
                           [good, bad, _constrained(choice=["x", "y"])], use_tqdm=False)
    assert outputs[1].outputs[0].finish_reason == "abort" and outputs[1].outputs[0].text == ""
    assert outputs[0].outputs[0].finish_reason == "length"
    assert len(outputs[0].outputs[0].token_ids) == 8
    assert outputs[2].outputs[0].text in ("x", "y")


def test_unconstrained_outputs_are_unchanged_by_constrained_neighbours(
        model_dir: Path) -> None:
    """Greedy parity: the same unconstrained prompts alone, and batched with constrained
    requests. An engine that never saw a constraint builds no grammar machinery at all."""
    prompts = ["Hello", "The quick brown fox", "Once upon a time"]
    plain = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    alone_llm = LLM(model_dir, enable_prefix_caching=False, **ENGINE_ARGS)
    alone = [o.outputs[0].token_ids
             for o in alone_llm.generate(prompts, plain, use_tqdm=False)]
    assert alone_llm.engine.core.runner.structured is None

    mixed_llm = LLM(model_dir, enable_prefix_caching=False, **ENGINE_ARGS)
    constrained = [_constrained(json=SCHEMAS[6]), _constrained(regex="[a-z]{20}")]
    mixed = mixed_llm.generate([*prompts, "Hi", "Yo"], [plain] * 3 + constrained,
                               use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    assert mixed_llm.engine.core.runner.structured is not None
    # The step loop's time on masks is counted where there were masks, and only there.
    assert alone_llm.engine.core.runner.grammar_seconds == 0.0
    assert mixed_llm.engine.core.runner.grammar_seconds > 0.0


@pytest.mark.parametrize("overlap", [True, False])  # a mask thread, or the step loop's own
def test_identical_constraints_compile_once_and_states_are_independent(
        model_dir: Path, overlap: bool) -> None:
    tokenizer = load_tokenizer(model_dir)
    structured = StructuredOutputs(tokenizer.tokenizer.to_str(), tokenizer.vocab_size,
                                   tokenizer.eos_token_ids, overlap=overlap)
    spec = StructuredOutputsParams(choice=["ab", "cd"])
    first, second = structured.compile(spec).result(), structured.compile(spec).result()
    assert len(structured._compiled) == 1
    first.accept(tokenizer.encode("a", add_special_tokens=False)[0])
    bias = structured.fill_bias([first, second]).result()
    assert bias.shape == (2, tokenizer.vocab_size) and bias.dtype == torch.float32
    # Each id is either allowed (0) or not (-inf): nothing in between.
    assert torch.equal(torch.isneginf(bias), bias != 0)
    allowed_first = {tokenizer.decode([i]) for i in (bias[0] == 0).nonzero().flatten().tolist()}
    assert "b" in allowed_first and "c" not in allowed_first
    assert not torch.equal(bias[0], bias[1])  # advancing one left the other at the start
    structured.shutdown()


@pytest.mark.parametrize("spec, problem", [
    (StructuredOutputsParams(json={"type": "object", "properties": {
        "a": {"type": "strin"}}}), "strin"),
    (StructuredOutputsParams(regex="[a-"), "unclosed"),
    (StructuredOutputsParams(grammar='root ::= missing'), "missing"),
    (StructuredOutputsParams(grammar='start: foo'), "unknown name"),
    (StructuredOutputsParams(json="{not json"), "json"),
])
def test_invalid_constraints_name_the_problem(spec: StructuredOutputsParams,
                                               problem: str) -> None:
    with pytest.raises(GrammarError, match=problem):
        validate_constraint(spec)


def test_structured_outputs_params_need_exactly_one_constraint() -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs.regex == "a+"


def _bias(allowed: list[list[bool]]) -> torch.Tensor:
    return torch.where(torch.tensor(allowed), 0.0, float("-inf"))


def test_sampler_masks_only_constrained_rows() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [0.0, 5.0, 1.0, 2.0]])
    # Row 1 may pick ids 2 and 3 only.
    batch = SamplingBatch([0.0, 0.0], [0, 0], [1.0, 1.0], [0.0, 0.0], [None, None],
                          [None, None], grammar_rows=[1],
                          grammar_bias=_bias([[False, False, True, True]]))
    assert [r.token_id for r in sample(logits, batch)] == [1, 3]
    batch.grammar_rows, batch.grammar_bias = [0, 1], _bias(
        [[True, False, True, False], [False, False, True, True]])
    assert [r.token_id for r in sample(logits, batch)] == [2, 3]
