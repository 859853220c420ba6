"""Structured outputs (issue 16): what a JSON schema costs on BENCH.md's W1, and whether the
output always follows the schema. Real SmolLM2-135M-Instruct (``smollm2-135m-instruct``).

Three W1 bursts in the same process, interleaved over ``--repeats`` rounds (16 concurrent
requests of 128 random prompt tokens, 64 output tokens, greedy):
  unconstrained       every request free (``ignore_eos``);
  constrained         every request under one JSON schema (compiled once, then cached);
  mixed               half constrained, half free.
The schema forces more than 64 tokens, so constrained requests also stop at max_tokens and
every run produces the same number of tokens. Reported: output tokens/s, CPU ms per output
token (all threads of the process: the cost, which a busy machine distorts far less than wall
time), and TPOT p50/p99 (per request: time between its first and last token over the tokens
in between), with
ratios against the unconstrained run; the free requests of the mixed burst against the
free requests of the unconstrained one (target: under 3% slower); constrained throughput
against unconstrained (target: >= 0.9x).

Grammar compile time: the grammar engine's tokenizer index (once per engine), a schema's
first compile (cold) and a repeat (cached), on a fresh ``StructuredOutputs``.

Schema suite: 22 schemas (nested objects, arrays, enums, bounded numbers, optional fields),
each with a prompt asking for it, through the chat template, greedy; every output must
parse and validate with ``jsonschema``. Reported: the share that does, and each failure.

    python benchmarks/bench_structured.py               # 7 rounds (about 2 minutes on 2 cores)
    python benchmarks/bench_structured.py --quick       # 1 round: a smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import jsonschema
import torch

from surge import LLM, SamplingParams, StructuredOutputsParams
from surge.engine.structured import StructuredOutputs

W1_REQUESTS, W1_PROMPT, W1_OUTPUT = 16, 128, 64
MODES = ("unconstrained", "constrained", "mixed")

# An extraction record: strings, an enum, a bounded integer, an optional field, and a fixed
# array of 32 bounded integers, so the output needs well over 64 tokens.
W1_SCHEMA: dict[str, Any] = {
    "type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60},
        "category": {"enum": ["book", "film", "album", "game"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                 "maxItems": 4},
        "note": {"type": "string", "maxLength": 40},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                   "minItems": 32, "maxItems": 32}},
    "required": ["title", "category", "rating", "tags", "scores"],
    "additionalProperties": False}

_NAME = {"type": "string", "maxLength": 24}
_SHORT = {"type": "string", "maxLength": 60}


def _obj(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


# (prompt, schema): what a user of an extraction or classification endpoint would send.
SUITE: list[tuple[str, dict[str, Any]]] = [
    ("Give the name and age of a fictional person.",
     _obj(["name", "age"], name=_NAME, age={"type": "integer", "minimum": 0, "maximum": 120})),
    ("Is water wet? Answer with a boolean field 'answer'.",
     _obj(["answer"], answer={"type": "boolean"})),
    ("Classify the sentiment of: 'I love this phone.'",
     _obj(["sentiment"], sentiment={"enum": ["positive", "negative", "neutral"]})),
    ("Rate the movie Titanic from 1 to 10.",
     _obj(["rating"], rating={"type": "integer", "minimum": 1, "maximum": 10})),
    ("Give a probability between 0 and 1 that it rains tomorrow.",
     _obj(["p"], p={"type": "number", "minimum": 0, "maximum": 1})),
    ("List three fruits.",
     _obj(["fruits"], fruits={"type": "array", "items": _NAME, "minItems": 3, "maxItems": 3})),
    ("Describe a point in 2D space.",
     _obj(["point"], point=_obj(["x", "y"], x={"type": "number", "minimum": -100,
                                               "maximum": 100},
                                y={"type": "number", "minimum": -100, "maximum": 100}))),
    ("Describe a user with an address.",
     _obj(["user"], user=_obj(["name", "address"], name=_NAME, address=_obj(
         ["city", "zip"], city=_NAME, zip={"type": "string", "pattern": "^[0-9]{5}$"},
         street=_SHORT)))),
    ("Give a product with an optional discount.",
     _obj(["sku", "price"], sku={"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
          price={"type": "number", "exclusiveMinimum": 0, "maximum": 10000},
          discount={"type": "number", "minimum": 0, "maximum": 0.9})),
    ("Give an order with up to three line items.",
     _obj(["order_id", "items"], order_id={"type": "integer", "minimum": 1},
          items={"type": "array", "minItems": 1, "maxItems": 3, "items": _obj(
              ["sku", "qty"], sku=_NAME, qty={"type": "integer", "minimum": 1,
                                             "maximum": 99})})),
    ("What day of the week is it? Pick one.",
     _obj(["day"], day={"enum": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]})),
    ("Give today's date.",
     _obj(["date"], date={"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"})),
    ("Give a color in RGB.",
     _obj(["r", "g", "b"], r={"type": "integer", "minimum": 0, "maximum": 255},
          g={"type": "integer", "minimum": 0, "maximum": 255},
          b={"type": "integer", "minimum": 0, "maximum": 255})),
    ("Give a 2x2 matrix of small integers.",
     _obj(["matrix"], matrix={"type": "array", "minItems": 2, "maxItems": 2, "items": {
         "type": "array", "minItems": 2, "maxItems": 2, "items": {
             "type": "integer", "minimum": -9, "maximum": 9}}})),
    ("Answer yes or no with a confidence: is the sky blue?",
     _obj(["answer"], answer={"enum": ["yes", "no"]},
          confidence={"type": "number", "minimum": 0, "maximum": 1})),
    ("Give a status that is done or an error message.",
     _obj(["status"], status={"anyOf": [{"const": "done"}, _obj(["error"], error=_SHORT)]})),
    ("Give a value that may be null.",
     _obj(["value"], value={"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                      {"type": "null"}]})),
    ("Give a book with its author and year.",
     _obj(["title", "author", "year"], title=_SHORT, author=_NAME,
          year={"type": "integer", "minimum": 1400, "maximum": 2030},
          isbn={"type": "string", "pattern": "^[0-9]{13}$"})),
    ("Give up to four tags for a blog post about cooking.",
     _obj(["tags"], tags={"type": "array", "maxItems": 4, "items": {
         "enum": ["food", "recipe", "baking", "health", "travel"]}})),
    ("Give a temperature reading in Celsius with a unit.",
     _obj(["value", "unit"], value={"type": "number", "minimum": -90, "maximum": 60},
          unit={"const": "C"})),
    ("Give an event with a start and an end hour.",
     _obj(["name", "start", "end"], name=_NAME,
          start={"type": "integer", "minimum": 0, "maximum": 23},
          end={"type": "integer", "minimum": 0, "maximum": 23})),
    ("Give a list of up to three people with names and roles.",
     {"type": "array", "minItems": 1, "maxItems": 3, "items": _obj(
         ["name", "role"], name=_NAME, role={"enum": ["admin", "editor", "viewer"]})}),
]


def main() -> None:
    args = parse_args()
    llm = LLM(args.model, dtype=args.dtype, enable_prefix_caching=False)
    rng = random.Random(args.seed)
    vocab = llm.engine.core.vocab_size
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(W1_PROMPT)]
               for _ in range(W1_REQUESTS)]
    result: dict[str, Any] = {"model": args.model, "dtype": args.dtype,
                              "threads": torch.get_num_threads(), "repeats": args.repeats}
    result["compile"] = bench_compile(llm)
    print("grammar compile timed; W1 bursts ...", flush=True)
    result["w1"] = bench_w1(llm, prompts, args.repeats)
    result["suite"] = bench_suite(llm, args.suite_max_tokens)
    report(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="catalogue name, checkpoint directory or .gguf")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=7,
                        help="rounds of the three bursts (the median round is reported; "
                             "3 rounds move the mixed-burst TPOT ratio by +-8%%, more "
                             "than the 3%% it is held to)")
    parser.add_argument("--quick", action="store_true", help="one round: a smoke run")
    parser.add_argument("--suite-max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_structured.json")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    return args


# -- compile time ----------------------------------------------------------------------------


def bench_compile(llm: LLM) -> dict[str, float]:
    """Seconds, on a fresh grammar engine built as the engine core builds its own."""
    core = llm.engine.core
    structured = StructuredOutputs(llm.get_tokenizer().tokenizer.to_str(), core.vocab_size,
                                   core.eos_token_ids)
    try:
        first = _timed(lambda: structured.compile(StructuredOutputsParams(json=W1_SCHEMA))
                       .result())
        cold = [_timed(lambda s=s: structured.compile(StructuredOutputsParams(json=s)).result())
                for _, s in SUITE]
        cached = [_timed(lambda s=s: structured.compile(StructuredOutputsParams(json=s))
                         .result()) for _, s in SUITE]
    finally:
        structured.shutdown()
    return {"first_grammar_with_tokenizer_index_s": first,
            "cold_compile_median_s": statistics.median(cold), "cold_compile_max_s": max(cold),
            "cached_compile_median_s": statistics.median(cached),
            "cached_compile_max_s": max(cached)}


def _timed(work: Any) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


# -- W1 --------------------------------------------------------------------------------------


def w1_params(constrained: bool) -> SamplingParams:
    if constrained:
        return SamplingParams(max_tokens=W1_OUTPUT, temperature=0.0,
                              structured_outputs=StructuredOutputsParams(json=W1_SCHEMA))
    return SamplingParams(max_tokens=W1_OUTPUT, temperature=0.0, ignore_eos=True)


def bench_w1(llm: LLM, prompts: list[list[int]], repeats: int) -> dict[str, Any]:
    plans = {"unconstrained": [False] * W1_REQUESTS, "constrained": [True] * W1_REQUESTS,
             "mixed": [i % 2 == 0 for i in range(W1_REQUESTS)]}
    run_burst(llm, prompts[:4], [w1_params(c) for c in (False, True, False, True)])  # warm up
    rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for round_index in range(repeats):
        # Interleaved, in alternating order, so drift on a shared machine (its load rising or
        # falling during the run) hits all three alike.
        for mode in MODES if round_index % 2 == 0 else MODES[::-1]:
            row = run_burst(llm, prompts, [w1_params(c) for c in plans[mode]])
            rounds[mode].append(row)
            print(f"round {round_index + 1}/{repeats} {mode:14s} "
                  f"{row['tokens_per_s']:7.1f} tok/s", flush=True)
    return {mode: _median_round(runs) for mode, runs in rounds.items()}


def run_burst(llm: LLM, prompts: list[list[int]],
              params: list[SamplingParams]) -> dict[str, Any]:
    """All requests at once through the engine's step loop; per-request token times."""
    engine = llm.engine
    runner = engine.core.runner
    grammar_before = runner.grammar_seconds
    started, cpu_started = time.perf_counter(), time.process_time()
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    constrained = {rid: sp.structured_outputs is not None
                   for rid, sp in zip(ids, params, strict=True)}
    times: dict[str, list[float]] = {rid: [] for rid in ids}
    finish: dict[str, str | None] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            completion = out.outputs[0]
            times[out.request_id].extend(now for _ in completion.delta_token_ids)
            if out.finished:
                finish[out.request_id] = completion.finish_reason
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    grammar = runner.grammar_seconds - grammar_before
    tokens = sum(len(t) for t in times.values())
    # CPU seconds (all threads) per token: the cost, which a busy machine's scheduling
    # distorts far less than wall time.
    row: dict[str, Any] = {"seconds": elapsed, "output_tokens": tokens,
                           "tokens_per_s": tokens / elapsed,
                           "cpu_ms_per_token": cpu / tokens * 1e3,
                           # The step loop's time computing or awaiting grammar masks: every
                           # request sharing those steps waits that long, constrained or not.
                           "grammar_share": grammar / elapsed,
                           "finish_reasons": sorted(set(finish.values()), key=str)}
    for kind, wanted in (("constrained", True), ("free", False)):
        tpots = [_tpot(times[rid]) for rid in ids if constrained[rid] == wanted]
        if tpots:
            row[f"{kind}_tpot_ms"] = {"p50": _pct(tpots, 50) * 1e3, "p99": _pct(tpots, 99) * 1e3}
            row[f"{kind}_tokens"] = sum(len(times[rid]) for rid in ids
                                        if constrained[rid] == wanted)
    return row


def _tpot(token_times: list[float]) -> float:
    if len(token_times) < 2:
        return float("nan")
    return (token_times[-1] - token_times[0]) / (len(token_times) - 1)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ranked[len(ranked) // 2], "all_tokens_per_s": [r["tokens_per_s"] for r in runs],
            "grammar_share_median": statistics.median(r["grammar_share"] for r in runs)}


# -- schema suite ----------------------------------------------------------------------------


def bench_suite(llm: LLM, max_tokens: int) -> dict[str, Any]:
    conversations = [[{"role": "user", "content": f"{prompt} Answer in JSON."}]
                     for prompt, _ in SUITE]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0,
                             structured_outputs=StructuredOutputsParams(json=schema))
              for _, schema in SUITE]
    outputs = llm.chat(conversations, params, use_tqdm=False)
    failures = []
    for index, ((_, schema), output) in enumerate(zip(SUITE, outputs, strict=True)):
        text = output.outputs[0].text
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            failures.append({"schema": index, "finish_reason": output.outputs[0].finish_reason,
                             "text": text[:200], "error": str(exc).splitlines()[0][:200]})
    samples = [o.outputs[0].text for o in outputs[:3]]
    return {"schemas": len(SUITE), "valid": len(SUITE) - len(failures),
            "valid_share": (len(SUITE) - len(failures)) / len(SUITE), "failures": failures,
            "samples": samples}


# -- report ----------------------------------------------------------------------------------


def report(result: dict[str, Any]) -> None:
    print(f"\nmodel {result['model']} {result['dtype']}, {result['threads']} threads, "
          f"median of {result['repeats']} round(s)")
    compile_ = result["compile"]
    print(f"grammar compile: first (with tokenizer index) "
          f"{compile_['first_grammar_with_tokenizer_index_s'] * 1e3:.0f} ms, cold median "
          f"{compile_['cold_compile_median_s'] * 1e3:.2f} ms (max "
          f"{compile_['cold_compile_max_s'] * 1e3:.2f}), cached median "
          f"{compile_['cached_compile_median_s'] * 1e3:.3f} ms")
    w1 = result["w1"]
    base = w1["unconstrained"]
    print(f"\n{'W1':14s} {'tok/s':>8s} {'ratio':>6s} {'CPU ms/tok':>11s} {'TPOT p50':>9s} "
          f"{'p99':>7s} {'constr. p50':>12s} {'p99':>7s}  finish")
    for mode in MODES:
        row = w1[mode]
        free = row.get("free_tpot_ms", {})
        con = row.get("constrained_tpot_ms", {})
        print(f"{mode:14s} {row['tokens_per_s']:8.1f} "
              f"{row['tokens_per_s'] / base['tokens_per_s']:6.3f} "
              f"{row['cpu_ms_per_token']:11.1f} "
              f"{free.get('p50', float('nan')):9.1f} {free.get('p99', float('nan')):7.1f} "
              f"{con.get('p50', float('nan')):12.1f} {con.get('p99', float('nan')):7.1f}  "
              f"{','.join(map(str, row['finish_reasons']))}")
    ratios = {
        "constrained_vs_unconstrained_tokens_per_s":
            w1["constrained"]["tokens_per_s"] / base["tokens_per_s"],
        "mixed_vs_unconstrained_tokens_per_s": w1["mixed"]["tokens_per_s"]
            / base["tokens_per_s"],
        "mixed_free_tpot_p50_vs_unconstrained": w1["mixed"]["free_tpot_ms"]["p50"]
            / base["free_tpot_ms"]["p50"],
        "constrained_vs_unconstrained_cpu_per_token": w1["constrained"]["cpu_ms_per_token"]
            / base["cpu_ms_per_token"]}
    result["ratios"] = ratios
    print(f"\nconstrained / unconstrained tok/s: "
          f"{ratios['constrained_vs_unconstrained_tokens_per_s']:.3f} (target >= 0.9)")
    print(f"constrained / unconstrained CPU per token: "
          f"{ratios['constrained_vs_unconstrained_cpu_per_token']:.3f} (the cost; lower is "
          f"better)")
    print(f"free requests in the mixed burst, TPOT p50 vs all-free: "
          f"{ratios['mixed_free_tpot_p50_vs_unconstrained']:.3f} (target <= 1.03)")
    # Wall-clock ratios on a shared 2-core host move by +-10% between identical bursts; the
    # step loop's own time on grammars is the cost itself, free of that noise.
    print(f"step loop time on grammar masks (median round): constrained "
          f"{w1['constrained']['grammar_share_median']:.1%}, mixed "
          f"{w1['mixed']['grammar_share_median']:.1%} of the burst: what a free request "
          f"sharing steps with constrained ones pays (target < 3%)")
    suite = result["suite"]
    print(f"\nschema suite: {suite['valid']}/{suite['schemas']} outputs parse and validate "
          f"({suite['valid_share']:.0%})")
    for failure in suite["failures"]:
        print(f"  schema {failure['schema']} ({failure['finish_reason']}): {failure['error']}"
              f" :: {failure['text']!r}")
    for sample in suite["samples"]:
        print(f"  sample: {sample}")


if __name__ == "__main__":
    main()
