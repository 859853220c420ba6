"""The load generator's own ceiling: how many requests/s it drives against a server that
answers at once, and whether it holds an open-loop rate of 2,000 requests/s.

Every request is a streamed completion (16 prompt token ids, 8 output tokens, usage in the last
chunk), so the generator does its full work per request: SSE parsing, per-chunk timing, token
accounting. The fake server runs in its own process (with uvloop when installed) so that it is
not what limits the number; a second measurement puts it in a thread of the generator's process
(sharing one interpreter), the worst case.

    python benchmarks/bench_loadgen_ceiling.py            # about 30 s
    python benchmarks/bench_loadgen_ceiling.py --requests 50000 --rate 3000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

from surge.bench.fake_server import FakeServerThread
from surge.bench.runner import BenchConfig, run_benchmark

TARGET_RPS = 2000.0


def start_fake_server_process() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "surge.bench", "fake-server", "--port", "0"],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[-1].strip()


def measure(url: str, **load: Any) -> dict[str, Any]:
    config = BenchConfig(url=url, model="fake-model", input_len="16", output_len="8",
                         vocab_size=1000, **load)
    run = run_benchmark(config, progress=False)["runs"][0]
    return {
        "rps": run["summary"]["request_throughput"],
        "failed": run["summary"]["failed"],
        "cpu": run["generator"]["cpu_utilization"],
        "lag_p50_ms": _ms(run["generator"]["schedule_lag_s"], "p50"),
        "lag_p99_ms": _ms(run["generator"]["schedule_lag_s"], "p99"),
        "e2e_p99_ms": _ms(run["summary"]["latency"]["e2e"], "p99"),
    }


def _ms(stats: dict[str, Any] | None, name: str) -> float | None:
    return None if not stats or stats[name] is None else stats[name] * 1e3


def report(name: str, result: dict[str, Any]) -> None:
    lag_text = ""
    if result["lag_p99_ms"] is not None:
        lag_text = (f", sent late by {result['lag_p50_ms']:.1f} ms p50 / "
                    f"{result['lag_p99_ms']:.1f} ms p99")
    # CPU per request is steadier than req/s on a shared machine: it ignores time the
    # generator spent waiting for a core or for the server.
    cpu_us = result["cpu"] / result["rps"] * 1e6 if result["rps"] else float("nan")
    print(f"{name:<46}{result['rps']:>7.0f} req/s {result['rps'] / TARGET_RPS:>5.2f}x target"
          f"  (generator: {result['cpu']:.0%} of a core, {cpu_us:.0f} us CPU/request; "
          f"e2e p99 {result['e2e_p99_ms']:.1f} ms{lag_text}; {result['failed']} failed)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float, default=TARGET_RPS)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()

    print(f"target: {TARGET_RPS:.0f} req/s (streamed completions, 8 tokens each)\n")
    proc, url = start_fake_server_process()
    try:
        closed = measure(url, concurrency=[args.concurrency], num_requests=args.requests)
        report(f"closed loop, concurrency {args.concurrency}", closed)
        opened = measure(url, rate=[args.rate], duration=args.duration, num_requests=None)
        report(f"open loop, Poisson {args.rate:g} req/s, {args.duration:g} s", opened)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    with FakeServerThread() as server:
        shared = measure(server.url, concurrency=[args.concurrency],
                         num_requests=args.requests // 2)
    report("closed loop, fake server in the same process", shared)
    print(f"\nceiling (closed loop, separate server process): {closed['rps']:.0f} req/s = "
          f"{closed['rps'] / TARGET_RPS:.2f}x the {TARGET_RPS:.0f} req/s target; "
          f"one full core would give about {closed['rps'] / max(closed['cpu'], 1e-9):.0f} req/s")
    return 0 if closed["rps"] >= TARGET_RPS else 1


if __name__ == "__main__":
    sys.exit(main())
