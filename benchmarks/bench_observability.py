"""What tracing and JSON request logs cost: `surge serve` with them off and on, in one run.

"on" is `--otlp-endpoint` (spans exported over OTLP/HTTP to a receiver in this process, which
decodes them as a collector would) plus `--log-format json` (one line per request, written to
the server's log file as a deployment writes to stdout). Both servers serve the same checkpoint
(smollm2-135m shape, random weights, bfloat16) one at a time, never together; rounds alternate
off and on so a noisy minute on a shared machine does not favour one side.

Per round and side:
  - W1 (BENCH.md): bursts of 16 concurrent streamed completions, 128-token prompts, 64 output
    tokens (ignore_eos, greedy); output tokens/s and TTFT p50 per burst.
  - light: 32 sequential requests (16-token prompts, 4 output tokens): TTFT p50 where a
    per-request cost is not hidden behind a batched prefill.
Then the API process's own cost per request, measured in this process without a server: one
finished request's record through the observer (a JSON line, and 10 spans built and handed to
the batching exporter), in CPU microseconds of the event loop's thread (the exporter's own
thread, which sends the batches, is not counted).

Targets: W1 throughput on/off >= 0.97 (under 3% lost) and TTFT p50 on - off < 1 ms.

    python benchmarks/bench_observability.py                # about 6 minutes on 2 quiet cores
    python benchmarks/bench_observability.py --rounds 1 --w1-repeats 1 --warmup 16   # short

Writes results/bench_observability.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_server import ServerProcess, ensure_model, load_average

from surge.bench.runner import BenchConfig, run_benchmark
from surge.testing.otlp import OTLPReceiver

THROUGHPUT_TARGET = 0.97
TTFT_TARGET_MS = 1.0


def main() -> None:
    args = parse_args()
    model_dir = ensure_model(args.model, args.preset)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    print(f"model {model_dir}; {args.rounds} round(s) x {args.w1_repeats} W1 burst(s) per "
          f"side; load {load_average()}", flush=True)
    sides: dict[str, dict[str, list[float]]] = {
        side: {"w1_tok_s": [], "w1_ttft_p50_ms": [], "light_ttft_p50_ms": []}
        for side in ("off", "on")}
    with OTLPReceiver() as receiver:
        flags = {"off": [], "on": ["--otlp-endpoint", receiver.endpoint, "--log-format", "json"]}
        for round_index in range(args.rounds):
            for side in ("off", "on") if round_index % 2 == 0 else ("on", "off"):
                with ServerProcess(model_dir, args, flags[side]) as server:
                    measure(server.url, vocab_size, args, round_index, sides[side])
                    if side == "on":
                        json_lines = count_request_lines(server)
        spans = len(receiver.spans)
    results = {"command": shlex.join([sys.executable, *sys.argv]), "model": str(model_dir),
               "load_average_end": load_average(), "sides": sides,
               "spans_received": spans, "json_request_lines_last_on_server": json_lines,
               "api_process_us_per_request": api_cost(args.api_iterations)}
    summarize(results)
    report(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {out}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir (default: models/PRESET, written once)")
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--engine-mode", help="passed to `surge serve --engine-mode`")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG")
    parser.add_argument("--rounds", type=int, default=2, help="off/on rounds (alternating)")
    parser.add_argument("--w1-repeats", type=int, default=3, help="W1 bursts per round and side")
    parser.add_argument("--warmup", type=int, default=48, help="W1 warm-up requests per server")
    parser.add_argument("--light-requests", type=int, default=32)
    parser.add_argument("--api-iterations", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_observability.json")
    args = parser.parse_args()
    if min(args.rounds, args.w1_repeats, args.light_requests) < 1:
        parser.error("--rounds, --w1-repeats and --light-requests must be >= 1")
    return args


def _config(vocab_size: int, seed: int, **fields: Any) -> BenchConfig:
    return BenchConfig(url="http://127.0.0.1:1", endpoint="completions", stream=True,
                       ignore_eos=True, temperature=0.0, dataset="random", prompt_kind="ids",
                       vocab_size=vocab_size, seed=seed, **fields)


def measure(url: str, vocab_size: int, args: argparse.Namespace, round_index: int,
            into: dict[str, list[float]]) -> None:
    """W1 bursts (fresh prompts per burst and round: no prefix-cache help), then light."""
    w1 = _config(vocab_size, args.seed + 1000 * round_index, input_len="128",
                 output_len="64", concurrency=[16] * args.w1_repeats, num_requests=16,
                 warmup=args.warmup)
    for run in run_benchmark(replace(w1, url=url), progress=False)["runs"]:
        summary = run["summary"]
        into["w1_tok_s"].append(summary["output_token_throughput"])
        into["w1_ttft_p50_ms"].append(summary["latency"]["ttft"]["p50"] * 1000)
    light = _config(vocab_size, args.seed + 7 + 1000 * round_index, input_len="16",
                    output_len="4", concurrency=[1], num_requests=args.light_requests, warmup=4)
    run = run_benchmark(replace(light, url=url), progress=False)["runs"][0]
    into["light_ttft_p50_ms"].append(run["summary"]["latency"]["ttft"]["p50"] * 1000)


def count_request_lines(server: ServerProcess) -> int:
    server.log.flush()
    return sum(1 for line in server.log_path.read_text(errors="replace").splitlines()
               if line.startswith("{") and '"logger":"surge.request"' in line)


def api_cost(iterations: int) -> dict[str, float]:
    """One finished request through the observer, off and on, in this process: the CPU the
    API process spends per request beyond serving it."""
    from surge.http import logs
    from surge.http.observe import Observer
    from surge.http.tracing import Tracing

    handler = logging.FileHandler("/dev/null")
    handler.setFormatter(logs.JsonFormatter())
    request_logger = logging.getLogger("surge.request")
    request_logger.addHandler(handler)
    request_logger.setLevel(logging.INFO)
    request_logger.propagate = False
    scope = {"type": "http", "headers": [], "state": {}}
    with OTLPReceiver() as receiver:
        tracing = Tracing(receiver.endpoint, "bench")
        observers = {"off": Observer(), "on": Observer(json_logs=True, tracing=tracing)}
        cost = {}
        for side, observer in observers.items():
            elapsed = 0.0
            for _ in range(iterations):
                record = _typical_record()
                started = time.thread_time()
                observer.finish(record, scope)
                elapsed += time.thread_time() - started
            cost[side] = elapsed / iterations * 1e6
        tracing.shutdown()
    request_logger.removeHandler(handler)
    return cost


def _typical_record() -> Any:
    from surge.http.observe import EngineTimes, RequestRecord

    t = time.monotonic()
    record = RequestRecord("POST", "/v1/completions", t - 1.0,
                           "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    record.handler_start, record.response_start, record.end = t - 0.999, t - 0.99, t
    record.status, record.request_id = 200, "cmpl-bench"
    record.set(model="m", stream=True, prompt_tokens=128, completion_tokens=64,
               finish_reason="length", tenant="anonymous")
    record.add_span("tokenization", t - 0.998, t - 0.997)
    record.add_engine(EngineTimes(0, t - 0.996, t - 0.995, t - 0.9, t - 0.8, t - 0.01,
                                  t - 0.79, t - 0.009, t - 0.79, t - 0.008, 0.002, 128, 64,
                                  "length"))
    return record


def summarize(results: dict[str, Any]) -> None:
    off, on = results["sides"]["off"], results["sides"]["on"]
    results["w1_throughput_ratio_best"] = max(on["w1_tok_s"]) / max(off["w1_tok_s"])
    results["w1_throughput_ratio_median"] = median(on["w1_tok_s"]) / median(off["w1_tok_s"])
    results["w1_ttft_p50_delta_ms"] = median(on["w1_ttft_p50_ms"]) - median(
        off["w1_ttft_p50_ms"])
    results["light_ttft_p50_delta_ms"] = median(on["light_ttft_p50_ms"]) - median(
        off["light_ttft_p50_ms"])


def report(results: dict[str, Any]) -> None:
    off, on = results["sides"]["off"], results["sides"]["on"]
    print("\n                       off            on")
    for key, label in (("w1_tok_s", "W1 output tok/s"), ("w1_ttft_p50_ms", "W1 TTFT p50 ms"),
                       ("light_ttft_p50_ms", "light TTFT p50 ms")):
        print(f"{label:<20} {_fmt(off[key]):>12}  {_fmt(on[key]):>12}   (per burst/round: "
              f"off {', '.join(f'{v:.1f}' for v in off[key])}; "
              f"on {', '.join(f'{v:.1f}' for v in on[key])})")
    ratio = results["w1_throughput_ratio_best"]
    print(f"\nW1 throughput on/off: best {ratio:.3f}, median "
          f"{results['w1_throughput_ratio_median']:.3f}  (target >= {THROUGHPUT_TARGET}: "
          f"{'met' if ratio >= THROUGHPUT_TARGET else 'NOT met'})")
    for key, label in (("w1_ttft_p50_delta_ms", "W1"), ("light_ttft_p50_delta_ms", "light")):
        delta = results[key]
        print(f"{label} TTFT p50 on - off: {delta:+.2f} ms  (target < {TTFT_TARGET_MS} ms: "
              f"{'met' if delta < TTFT_TARGET_MS else 'NOT met'})")
    api = results["api_process_us_per_request"]
    print(f"API process per request (observer, CPU of the loop thread): off {api['off']:.1f} "
          f"us, on {api['on']:.1f} us")
    print(f"spans received: {results['spans_received']}; JSON request lines (last 'on' "
          f"server): {results['json_request_lines_last_on_server']}; load average at end "
          f"{results['load_average_end']}")


def _fmt(values: list[float]) -> str:
    return f"{median(values):.1f}"


if __name__ == "__main__":
    main()
