"""Interactive time to first token with and without a batch running in the background.

One `surge serve` (smollm2-135m shape, random weights, bfloat16; `--preset` to change) takes the
same interactive workload twice: streamed chat completions from a few concurrent clients,
first on an idle server (the peer), then while a large batch (`/v1/batches`, low priority,
backing off under interactive load) runs. Prints p50/p99 TTFT of both, the p99 ratio
(with batch / without; 1.0 means the batch costs interactive users nothing), and the batch's
lines per second during the second phase.

    python benchmarks/bench_batch.py                      # about 3 minutes on 2 cores
    python benchmarks/bench_batch.py --preset tiny-llama --requests 40

Writes results/bench_batch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=32, help="interactive requests/phase")
    parser.add_argument("--clients", type=int, default=2, help="concurrent interactive clients")
    parser.add_argument("--max-tokens", type=int, default=16, help="interactive output tokens")
    parser.add_argument("--batch-lines", type=int, default=400)
    parser.add_argument("--batch-max-tokens", type=int, default=32)
    parser.add_argument("--batch-concurrency", type=int, default=4)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "bench_batch.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        model = _model(args.preset)
        server, url = _start_server(model, Path(tmp), args)
        try:
            report = asyncio.run(_measure(url, args))
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
    _print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                       **report}, indent=2))
    print(f"wrote {args.output}")


def _model(preset: str) -> Path:
    from surge.testing.make_model import cache_dir, write_checkpoint

    path = cache_dir() / f"bench-{preset}"
    if not (path / "config.json").is_file():
        write_checkpoint(preset, path, seed=0)
    return path


def _start_server(model: Path, tmp: Path, args: argparse.Namespace
                  ) -> tuple[subprocess.Popen, str]:
    log = (tmp / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "surge.cli", "serve", "--model", str(model), "--dtype",
         args.dtype, "--port", "0", "--served-model-name", "bench", "--batch-data-dir",
         str(tmp / "batch"), "--batch-concurrency", str(args.batch_concurrency)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return process, _wait_ready(process, tmp / "serve.log")
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def _wait_ready(process: subprocess.Popen, log_path: Path) -> str:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        match = _LISTENING.search(log_path.read_bytes())
        if match:
            url = f"http://127.0.0.1:{int(match.group(1))}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
        if process.poll() is not None:
            break
        time.sleep(0.2)  # waiting for the server to come up
    raise SystemExit(f"server did not start:\n{log_path.read_text()[-3000:]}")


async def _measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await _interactive(http, 4, args)  # warm-up
        idle = await _interactive(http, args.requests, args)
        batch_id = await _submit_batch(http, args)
        await _wait_batch(http, batch_id, lambda b: _done(b) >= 2)  # the batch is running
        start_done, started = _done(await _batch(http, batch_id)), time.perf_counter()
        loaded = await _interactive(http, args.requests, args)
        batch = await _batch(http, batch_id)
        lines_per_s = (_done(batch) - start_done) / (time.perf_counter() - started)
        if batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            await http.post(f"/v1/batches/{batch_id}/cancel")
        else:
            print("warning: the batch ended before the interactive phase did: use more "
                  "--batch-lines", file=sys.stderr)
    return {"ttft_without_batch": _summary(idle), "ttft_with_batch": _summary(loaded),
            "p99_ratio": _summary(loaded)["p99"] / _summary(idle)["p99"],
            "batch_lines_per_s": lines_per_s,
            "batch_lines_done": _done(batch) - start_done}


async def _interactive(http: httpx.AsyncClient, count: int,
                       args: argparse.Namespace) -> list[float]:
    """TTFT of ``count`` streamed chat requests from ``args.clients`` concurrent clients."""
    ttfts: list[float] = []
    next_index = iter(range(count))

    async def client() -> None:
        for i in next_index:
            body = {"model": "bench", "stream": True, "max_tokens": args.max_tokens,
                    "ignore_eos": True, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Question {i}: what is new?"}]}
            sent = time.perf_counter()
            first = None
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if first is None and line.startswith("data:") and '"content":"' in line \
                            and '"content":""' not in line:
                        first = time.perf_counter()
            ttfts.append((first or time.perf_counter()) - sent)

    await asyncio.gather(*(client() for _ in range(args.clients)))
    return ttfts


async def _submit_batch(http: httpx.AsyncClient, args: argparse.Namespace) -> str:
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "bench", "max_tokens": args.batch_max_tokens,
                       "ignore_eos": True,
                       "messages": [{"role": "user", "content": f"Summarize item {i}."}]}}
             for i in range(args.batch_lines)]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = (await http.post("/v1/files", data={"purpose": "batch"},
                                files={"file": ("bench.jsonl", content)})).json()
    created = await http.post("/v1/batches", json={"input_file_id": uploaded["id"],
                                                   "endpoint": "/v1/chat/completions",
                                                   "completion_window": "24h"})
    created.raise_for_status()
    return created.json()["id"]


async def _batch(http: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    return (await http.get(f"/v1/batches/{batch_id}")).json()


async def _wait_batch(http: httpx.AsyncClient, batch_id: str, until: Any) -> None:
    while not until(await _batch(http, batch_id)):
        await asyncio.sleep(0.1)  # polling the batch's progress


def _done(batch: dict[str, Any]) -> int:
    return batch["request_counts"]["completed"] + batch["request_counts"]["failed"]


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"n": len(ordered), "mean": sum(ordered) / len(ordered), "p50": pct(0.5),
            "p99": pct(0.99), "max": ordered[-1]}


def _print(report: dict[str, Any]) -> None:
    for name in ("ttft_without_batch", "ttft_with_batch"):
        s = report[name]
        print(f"{name:>20}: p50 {s['p50'] * 1000:7.1f} ms  p99 {s['p99'] * 1000:7.1f} ms  "
              f"(n={s['n']})")
    print(f"{'p99 ratio':>20}: {report['p99_ratio']:.2f} (with batch / without)")
    print(f"{'batch throughput':>20}: {report['batch_lines_per_s']:.2f} lines/s "
          f"({report['batch_lines_done']} lines during the interactive phase)")


if __name__ == "__main__":
    main()
