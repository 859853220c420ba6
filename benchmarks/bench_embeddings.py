"""E1 of BENCH.md: embeddings throughput with dynamic batching vs one model call per request.

The real all-MiniLM-L6-v2 (fp32) behind a real `surge serve`, loaded by 32 concurrent clients
that each send one short sentence, wait for the answer and send the next, for a fixed time.
Two servers run one after the other in the same run, on the same sentences:
  1. dynamic batching (`--max-batch-size 32 --max-batch-wait-ms 5`, the defaults);
  2. one model call per request (`--max-batch-size 1`), the peer.
Then, with no server running, the batch compute time of 32 sentences is measured directly.

Prints requests/s of both and their ratio (target >= 3x), and the batched server's p99 latency
against max_wait_ms + 2 x (batch-of-32 compute time) (target: at most that).

    python benchmarks/bench_embeddings.py                 # about 2 minutes on 2 cores
    python benchmarks/bench_embeddings.py --duration 10

Writes results/bench_embeddings.json and results/bench_embeddings.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

RATIO_TARGET = 3.0
MODEL = "all-minilm-l6-v2"
READY_TIMEOUT_S = 180.0
_SUBJECTS = ["The cat", "A small child", "My neighbour", "The old train", "Our server",
             "The river", "A red bicycle", "The new phone", "This recipe", "The teacher"]
_VERBS = ["sleeps on", "walks past", "waits for", "looks at", "talks about", "runs towards",
          "forgets", "repairs", "paints", "finds"]
_OBJECTS = ["the warm window", "a quiet street", "the morning bus", "an empty station",
            "the blue door", "a busy market", "the last page", "a tall tree", "the cold lake",
            "an open field"]


def main() -> None:
    args = parse_args()
    sentences = short_sentences(args.seed, 512)
    results: dict[str, Any] = {"clients": args.clients, "duration_s": args.duration,
                               "max_wait_ms": args.max_wait_ms, "load_average": load_average()}
    for name, flags in (("batched", ["--max-batch-size", str(args.max_batch_size),
                                     "--max-batch-wait-ms", str(args.max_wait_ms)]),
                        ("one_call_per_request", ["--max-batch-size", "1"])):
        print(f"-- {name}: surge serve --model {MODEL} {' '.join(flags)}", flush=True)
        with Server(flags) as server:
            results[name] = asyncio.run(load(server.url, sentences, args))
        print(f"   {results[name]['requests_per_s']:.1f} req/s, p50 "
              f"{results[name]['p50_ms']:.1f} ms, p99 {results[name]['p99_ms']:.1f} ms, "
              f"{results[name]['errors']} errors", flush=True)
    results["batch32_compute_ms"] = batch_compute_ms(sentences, args.max_batch_size)
    report(results)
    save(results, Path(args.out))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per server")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load not counted")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_embeddings")
    return parser.parse_args()


def short_sentences(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
            for _ in range(count)]


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


class Server:
    """`surge serve` on a free port, stopped with SIGTERM on exit."""

    def __init__(self, flags: list[str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "surge.cli", "serve", "--model", MODEL,
                        "--port", str(self.port), "--log-level", "warning", *flags]

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)  # polling /health while the model loads
        raise RuntimeError("the server did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def load(url: str, sentences: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Closed loop: each client sends, waits, sends again. Only the measured window counts."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + args.warmup
    end = start + args.duration

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        i = index
        while loop.time() < end:
            sent = loop.time()
            payload = {"model": MODEL, "input": sentences[i % len(sentences)]}
            async with session.post(f"{url}/v1/embeddings", json=payload) as response:
                await response.read()
                ok = response.status == 200
            done = loop.time()
            if sent >= start and done <= end:
                latencies.append(done - sent)
                errors += not ok
            i += args.clients

    connector = aiohttp.TCPConnector(limit=args.clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(i, session) for i in range(args.clients)))
    values = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors,
            "requests_per_s": len(latencies) / args.duration,
            "p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99)),
            "mean_ms": float(values.mean()), "latencies_ms": values.round(2).tolist()}


def batch_compute_ms(sentences: list[str], batch_size: int) -> float:
    """Median time of one model call on ``batch_size`` sentences, in this process."""
    from surge.models.pooling_models import TextEmbedder, warm_up
    from surge.models.tasks import resolve_model

    embedder = TextEmbedder(resolve_model(MODEL))
    warm_up(embedder)
    ids = embedder.tokenize(sentences)
    times = []
    for round_index in range(12):
        batch = [ids[(round_index * batch_size + j) % len(ids)] for j in range(batch_size)]
        started = time.perf_counter()
        embedder.embed_batch(batch)
        times.append(time.perf_counter() - started)
    return float(np.median(times[2:]) * 1000)


def report(results: dict[str, Any]) -> None:
    batched, single = results["batched"], results["one_call_per_request"]
    ratio = batched["requests_per_s"] / single["requests_per_s"]
    bound = results["max_wait_ms"] + 2 * results["batch32_compute_ms"]
    results["throughput_ratio"] = ratio
    results["p99_bound_ms"] = bound
    print(f"\nE1, {results['clients']} clients, all-MiniLM-L6-v2 fp32 (load average before: "
          f"{results['load_average']}; shared machine: numbers are noisy)")
    print(f"  dynamic batching      {batched['requests_per_s']:8.1f} req/s   p50 "
          f"{batched['p50_ms']:7.1f} ms   p99 {batched['p99_ms']:7.1f} ms")
    print(f"  one call per request  {single['requests_per_s']:8.1f} req/s   p50 "
          f"{single['p50_ms']:7.1f} ms   p99 {single['p99_ms']:7.1f} ms")
    print(f"  throughput ratio      {ratio:8.2f}x   (target >= {RATIO_TARGET:g}x: "
          f"{'met' if ratio >= RATIO_TARGET else 'NOT met'})")
    print(f"  batch-of-32 compute   {results['batch32_compute_ms']:8.1f} ms  -> p99 bound "
          f"max_wait_ms + 2 x compute = {bound:.1f} ms; batched p99 {batched['p99_ms']:.1f} ms "
          f"({'met' if batched['p99_ms'] <= bound else 'NOT met'})")


def save(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {k: ({kk: vv for kk, vv in v.items() if kk != "latencies_ms"}
                   if isinstance(v, dict) else v) for k, v in results.items()}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["batched", "one_call_per_request"]
    left.bar(["dynamic batching", "1 call / request"],
             [results[n]["requests_per_s"] for n in names], color=["tab:green", "tab:gray"])
    left.set_ylabel("requests/s")
    left.set_title(f"E1 throughput ({results['throughput_ratio']:.2f}x)")
    for name, color in zip(names, ["tab:green", "tab:gray"], strict=True):
        values = np.sort(results[name]["latencies_ms"])
        right.plot(values, np.linspace(0, 1, len(values)), color=color, label=name)
    right.axvline(results["p99_bound_ms"], color="tab:red", linestyle="--",
                  label="max_wait + 2 x batch compute")
    right.set_xlabel("latency (ms)")
    right.set_ylabel("fraction of requests")
    right.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
