"""Interactive time to first token with and without a batch running in the background.

One `surge serve` (smollm2-135m shape, random weights, bfloat16; `--preset` to change) takes the
same interactive workload (streamed chat completions from a few concurrent clients) in
alternating phases: without a batch (the peer), then while a batch (`/v1/batches`, low
priority, backing off under interactive load) runs, then again, `--rounds` times. Each "with"
phase submits a fresh batch and cancels it at its end, waiting until no batch line is left in
flight, so the next "without" phase is really idle. Alternating phases puts both conditions
under the same background load of a shared machine.

Prints p50/p95/p99 TTFT of both conditions (samples pooled over the rounds, and per round),
their ratios (with batch / without; 1.0 means the batch costs interactive users nothing; on a
shared machine, trust the round whose "without" phase looks like the others), the
batch's lines per second during the "with" phases (it must keep making progress), and the load
average before and after.

    python benchmarks/bench_batch.py                      # about 5 minutes on 2 cores
    python benchmarks/bench_batch.py --preset tiny-llama --requests 40 --rounds 1
    python benchmarks/bench_batch.py --batch-prompt-words 600   # long batch prompts

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

from surge.http.sse import aiter_sse_lines

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")
_FINISHED = ("completed", "failed", "expired", "cancelled")
_PERCENTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=3,
                        help="without/with phase pairs (samples are pooled)")
    parser.add_argument("--requests", type=int, default=50,
                        help="interactive requests per phase")
    parser.add_argument("--clients", type=int, default=2, help="concurrent interactive clients")
    parser.add_argument("--max-tokens", type=int, default=16, help="interactive output tokens")
    parser.add_argument("--batch-lines", type=int, default=400, help="lines per batch")
    parser.add_argument("--batch-max-tokens", type=int, default=32)
    parser.add_argument("--batch-prompt-words", type=int, default=0,
                        help="filler words per batch prompt (e.g. 600: prompts longer than "
                             "the CPU token budget, read in chunks)")
    parser.add_argument("--batch-concurrency", type=int, default=4)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "bench_batch.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        model = _model(args.preset)
        server, url = _start_server(model, Path(tmp), args)
        try:
            report = asyncio.run(_measure(url, args))
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
    report["load_average_before"], report["load_average_after"] = load_before, os.getloadavg()
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
    without: list[list[float]] = []
    with_batch: list[list[float]] = []
    lines_done, with_seconds = 0, 0.0
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await _interactive(http, 4, args)  # warm-up
        for _ in range(args.rounds):
            without.append(await _interactive(http, args.requests, args))
            ttfts, done, seconds = await _with_batch(http, args)
            with_batch.append(ttfts)
            lines_done, with_seconds = lines_done + done, with_seconds + seconds
    idle = _summary([t for phase in without for t in phase])
    loaded = _summary([t for phase in with_batch for t in phase])
    return {"ttft_without_batch": idle, "ttft_with_batch": loaded,
            "ratios": {name: loaded[name] / idle[name] for name, _ in _PERCENTILES},
            "rounds": [_round(a, b) for a, b in zip(without, with_batch, strict=True)],
            "batch_lines_per_s": lines_done / with_seconds, "batch_lines_done": lines_done}


def _round(without: list[float], with_batch: list[float]) -> dict[str, Any]:
    """One round's summaries and ratios: phases minutes apart share the machine's load
    better than the pooled samples do."""
    idle, loaded = _summary(without), _summary(with_batch)
    return {"without": idle, "with": loaded,
            "ratios": {name: loaded[name] / idle[name] for name, _ in _PERCENTILES}}


async def _with_batch(http: httpx.AsyncClient,
                      args: argparse.Namespace) -> tuple[list[float], int, float]:
    """One "with" phase: TTFTs, batch lines done during it, and its duration."""
    batch_id = await _submit_batch(http, args)
    await _wait_batch(http, batch_id, lambda b: _done(b) >= 2)  # the batch is running
    start_done, started = _done(await _batch(http, batch_id)), time.perf_counter()
    ttfts = await _interactive(http, args.requests, args)
    batch = await _batch(http, batch_id)
    seconds = time.perf_counter() - started
    if batch["status"] in _FINISHED:
        print("warning: the batch ended before the interactive phase did: use more "
              "--batch-lines", file=sys.stderr)
    else:
        (await http.post(f"/v1/batches/{batch_id}/cancel")).raise_for_status()
    await _wait_batch(http, batch_id, lambda b: b["status"] in _FINISHED)  # no line in flight
    return ttfts, _done(batch) - start_done, seconds


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
                async for line in aiter_sse_lines(response):
                    if first is None and line.startswith("data:") and '"content":"' in line \
                            and '"content":""' not in line:
                        first = time.perf_counter()
            ttfts.append((first or time.perf_counter()) - sent)

    await asyncio.gather(*(client() for _ in range(args.clients)))
    return ttfts


async def _submit_batch(http: httpx.AsyncClient, args: argparse.Namespace) -> str:
    # After the line's own words, so prompts share no cached prefix.
    filler = "".join(f" word{j % 97}" for j in range(args.batch_prompt_words))
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "bench", "max_tokens": args.batch_max_tokens,
                       "ignore_eos": True,
                       "messages": [{"role": "user", "content": f"Summarize item {i}." + filler}]}}
             for i in range(args.batch_lines)]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = await http.post("/v1/files", data={"purpose": "batch"},
                               files={"file": ("bench.jsonl", content)})
    uploaded.raise_for_status()
    created = await http.post("/v1/batches", json={"input_file_id": uploaded.json()["id"],
                                                   "endpoint": "/v1/chat/completions",
                                                   "completion_window": "24h"})
    created.raise_for_status()
    return created.json()["id"]


async def _batch(http: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    return (await http.get(f"/v1/batches/{batch_id}")).json()


async def _wait_batch(http: httpx.AsyncClient, batch_id: str, until: Any,
                      timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not until(batch := await _batch(http, batch_id)):
        if time.monotonic() > deadline:
            raise SystemExit(f"batch {batch_id} is stuck: {batch}")
        await asyncio.sleep(0.1)  # polling the batch's progress


def _done(batch: dict[str, Any]) -> int:
    return batch["request_counts"]["completed"] + batch["request_counts"]["failed"]


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"n": len(ordered), "mean": sum(ordered) / len(ordered),
            **{name: pct(q) for name, q in _PERCENTILES}, "max": ordered[-1]}


def _print(report: dict[str, Any]) -> None:
    def line(label: str, s: dict[str, float]) -> str:
        cells = "  ".join(f"{name} {s[name] * 1000:7.1f} ms" for name, _ in _PERCENTILES)
        return f"{label:>22}: {cells}  (n={s['n']})"

    print(line("TTFT without batch", report["ttft_without_batch"]))
    print(line("TTFT with batch", report["ttft_with_batch"]))
    ratios = "  ".join(f"{name} {value:.2f}" for name, value in report["ratios"].items())
    print(f"{'ratio (with/without)':>22}: {ratios}")
    for i, round_ in enumerate(report["rounds"], 1):
        print(line(f"round {i} without", round_["without"]))
        print(line(f"round {i} with", round_["with"]))
        print(f"{'ratio':>22}: " + "  ".join(f"{name} {value:.2f}"
                                             for name, value in round_["ratios"].items()))
    print(f"{'batch throughput':>22}: {report['batch_lines_per_s']:.2f} lines/s "
          f"({report['batch_lines_done']} lines during the interactive phases)")
    before, after = report["load_average_before"], report["load_average_after"]
    print(f"{'load average (1 min)':>22}: {before[0]:.2f} before, {after[0]:.2f} after "
          "(2 cores: above ~0.5 other work competes)")


if __name__ == "__main__":
    main()
