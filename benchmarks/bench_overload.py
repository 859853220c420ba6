"""Goodput under a flood of clients that ignore Retry-After (issue 14, item 4).

Starts `surge serve` (tiny-llama shape unless --model, process engine, small queue), then:
  1. baseline: --clients well-behaved clients in a closed loop (a request, its answer, the next)
     for --duration seconds: completed requests/s (goodput) and latency p50/p99;
  2. flood: the same clients plus --flood clients that resend the moment they get a 429.
Reports goodput under flood / baseline (target >= 0.70), the 429 latency p50/p99 (target
p99 < 100 ms), and the CPU seconds the API and engine processes used in each phase.

    python benchmarks/bench_overload.py                      # ~1 minute
    python benchmarks/bench_overload.py --duration 5 --flood 50   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import psutil

from surge.testing.make_model import write_checkpoint

BODY = {"prompt": "overload benchmark prompt", "max_tokens": 16, "ignore_eos": True,
        "temperature": 0}


def main() -> None:
    args = parse_args()
    model = Path(args.model) if args.model else write_checkpoint(
        "tiny-llama", Path(tempfile.mkdtemp()) / "tiny-llama", seed=0)
    server, url = start_server(model, args)
    try:
        api = psutil.Process(server.pid)
        engine = psutil.Process(httpx.get(f"{url}/health").json()["engine_pid"])
        asyncio.run(phase(url, args.clients, 0, 3.0))  # warm-up
        # This process imported torch (to write the model): a full collection walking those
        # objects paused every client at once for up to 120 ms, measured as 429 latency.
        gc.collect()
        gc.freeze()
        results = {}
        for name, flood in (("baseline", 0), ("flood", args.flood)):
            cpu_before = cpu(api), cpu(engine)
            results[name] = asyncio.run(phase(url, args.clients, flood, args.duration))
            results[name]["api_cpu_s"] = cpu(api) - cpu_before[0]
            results[name]["engine_cpu_s"] = cpu(engine) - cpu_before[1]
        report(results, args)
    finally:
        server.terminate()
        server.wait(60)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--flood", type=int, default=200)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-queued-requests", type=int, default=8)
    return parser.parse_args()


def start_server(model: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    log = Path(tempfile.mkdtemp()) / "serve.log"
    command = [sys.executable, "-m", "surge.cli", "serve", "--model", str(model),
               "--dtype", "float32", "--port", "0", "--num-threads", "1", "--no-apps",
               "--max-num-seqs", str(args.clients),
               "--max-queued-requests", str(args.max_queued_requests)]
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "SURGE_DATA_DIR": str(log.parent)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        match = re.search(rb"listening on http://127\.0\.0\.1:(\d+)", log.read_bytes())
        if match:
            url = f"http://127.0.0.1:{int(match.group(1))}"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    return server, url
            except httpx.TransportError:
                pass
        time.sleep(0.2)  # polling for readiness
    server.kill()
    raise SystemExit(f"server not ready:\n{log.read_text()[-2000:]}")


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def phase(url: str, clients: int, flood: int, duration: float) -> dict[str, Any]:
    """aiohttp, not httpx: 200 clients resending at once made httpx's per-request CPU the
    bottleneck, so the 429 latency measured was this process's queue, not the server's."""
    done: list[float] = []
    refused: list[float] = []
    stop = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=clients + flood + 8)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as http:
        async def send() -> tuple[int, float, str | None]:
            started = time.monotonic()
            async with http.post("/v1/completions", json=BODY) as response:
                await response.read()
                return (response.status, time.monotonic() - started,
                        response.headers.get("Retry-After"))

        async def polite() -> None:
            while time.monotonic() < stop:
                status, seconds, retry_after = await send()
                if status == 200:
                    done.append(seconds)
                else:
                    await asyncio.sleep(float(retry_after or "1"))

        async def rude() -> None:
            while time.monotonic() < stop:
                status, seconds, _ = await send()
                (refused if status == 429 else done).append(seconds)

        polite_tasks = [polite() for _ in range(clients)]
        await asyncio.gather(*polite_tasks, *(rude() for _ in range(flood)))
    return {"goodput": len(done) / duration, "p50": pct(done, 50), "p99": pct(done, 99),
            "rejected": len(refused), "reject_p50": pct(refused, 50),
            "reject_p99": pct(refused, 99)}


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    base, flood = results["baseline"], results["flood"]
    for name, r in results.items():
        print(f"{name:>8}: goodput {r['goodput']:.2f} req/s, p50 {fmt(r['p50'])}, "
              f"p99 {fmt(r['p99'])}; 429s {r['rejected']} (p50 {fmt(r['reject_p50'])}, "
              f"p99 {fmt(r['reject_p99'])}); CPU s api {r['api_cpu_s']:.1f}, "
              f"engine {r['engine_cpu_s']:.1f}")
    ratio = flood["goodput"] / base["goodput"] if base["goodput"] else 0.0
    p99 = flood["reject_p99"]
    print(f"goodput under a flood of {args.flood} / baseline: {ratio:.2f} (target >= 0.70); "
          f"429 p99 {fmt(p99)} (target < 100 ms)")


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


if __name__ == "__main__":
    main()
