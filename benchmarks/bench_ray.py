"""Replicas on Ray against local replicas, and the cold start from zero.

1. Throughput. Two `surge serve --replicas N` routers of the same tiny model run side by side
   in this run: one with local replicas, one with `--backend ray` (a Ray head this script
   starts; each replica an actor reserving --replica-cpus). Closed-loop load (C clients, each
   posting /v1/completions back to back) goes to one router for a window, then the other,
   alternating for R rounds, so a busy machine hurts both alike. Target: Ray's requests/s
   within 10% of local's (ratio >= 0.9). (Before the Ray launcher reset the niceness Ray
   gives its workers, 15, the ratio was 0.66 on 2 busy cores.)
2. Cold start. `surge serve --min-replicas 0 --replicas 0` (local, then Ray): the time of the
   first request, which starts a replica and is held until it is ready, and the cold start the
   router measured (`surge:router_cold_start_seconds`). Target: first answer within the cold
   start + 1 s.

    python benchmarks/bench_ray.py                       # about 4 minutes on 2 busy cores
    python benchmarks/bench_ray.py --seconds 20 --rounds 3 --clients 8

Writes results/bench_ray.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

RATIO_TARGET = 0.9
_LISTENING = re.compile(rb"router listening on (http://[\d.]+:\d+)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llama", help="make-model preset to serve")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0, help="per load window")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-cold-start", action="store_true")
    parser.add_argument("--out", default="results/bench_ray.json")
    args = parser.parse_args()

    import ray

    from surge.testing.make_model import write_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    model = write_checkpoint(args.preset, work / args.preset, seed=0)
    ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20)
    address = ray.get_runtime_context().gcs_address
    results: dict[str, Any] = {"preset": args.preset, "replicas": args.replicas,
                               "clients": args.clients, "max_tokens": args.max_tokens}
    try:
        results["throughput"] = asyncio.run(_throughput(args, model, address, work))
        if not args.skip_cold_start:
            results["cold_start"] = [_cold_start(model, work, backend, address)
                                     for backend in ("local", "ray")]
    finally:
        ray.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


def _serve(model: Path, work: Path, name: str, *extra: str) -> tuple[subprocess.Popen[bytes],
                                                                      str, Path]:
    log = work / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "surge.cli", "serve", "--model", str(model), "--dtype",
             "float32", "--port", "0", "--num-threads", "1",
             "--health-interval", "0.5", *extra], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (match := _LISTENING.search(log.read_bytes())):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{name} never listened:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)  # polling the log for the address line
    return process, match.group(1).decode(), log


def _wait_routable(url: str, count: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            replicas = httpx.get(f"{url}/router/replicas", timeout=5).json()["replicas"]
            if sum(r["state"] == "healthy" and not r["starting"] for r in replicas) == count:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # polling the router's status
    raise RuntimeError(f"{url}: {count} replicas not ready in {timeout} s")


async def _throughput(args: argparse.Namespace, model: Path, address: str,
                      work: Path) -> dict[str, Any]:
    common = ["--replicas", str(args.replicas)]
    local = _serve(model, work, "local", *common)
    remote = _serve(model, work, "ray", *common, "--backend", "ray", "--ray-address", address,
                    "--replica-cpus", "0.5")
    routers = {"local": local, "ray": remote}
    try:
        for _, url, _ in routers.values():
            _wait_routable(url, args.replicas)
        rps: dict[str, list[float]] = {"local": [], "ray": []}
        for _ in range(args.rounds):
            for name, (_, url, _) in routers.items():
                rps[name].append(await _load(url, args))
                print(f"{name}: {rps[name][-1]:.1f} requests/s", flush=True)
    finally:
        for process, _, _ in routers.values():
            process.terminate()
        for process, _, _ in routers.values():
            process.wait(60)
    medians = {name: statistics.median(values) for name, values in rps.items()}
    ratio = medians["ray"] / medians["local"]
    return {"requests_per_s": rps, "median": medians, "ray_over_local": round(ratio, 3),
            "target": RATIO_TARGET, "met": ratio >= RATIO_TARGET}


async def _load(url: str, args: argparse.Namespace) -> float:
    body = {"prompt": "Hello there", "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True}
    done = 0
    failed = 0
    stop_at = time.monotonic() + args.seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done, failed
        while time.monotonic() < stop_at:
            answer = await http.post("/v1/completions", json=body)
            if answer.status_code == 200:
                done += 1
            else:
                failed += 1

    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
        elapsed = time.monotonic() - started
    if failed:
        print(f"{url}: {failed} requests failed", flush=True)
    return done / elapsed


def _cold_start(model: Path, work: Path, backend: str, address: str) -> dict[str, Any]:
    extra = ["--backend", backend, "--ray-address", address, "--replica-cpus", "0.5"] \
        if backend == "ray" else []
    process, url, _ = _serve(model, work, f"zero-{backend}", "--replicas", "0",
                             "--min-replicas", "0", "--max-replicas", "1",
                             "--idle-timeout", "600", *extra)
    try:
        started = time.monotonic()
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4},
                            timeout=300)
        first = time.monotonic() - started
        cold = httpx.get(f"{url}/router/replicas", timeout=5).json()["scale_to_zero"]
    finally:
        process.terminate()
        process.wait(60)
    measured = cold["last_cold_start_s"]
    result = {"backend": backend, "status": answer.status_code,
              "first_answer_s": round(first, 2), "cold_start_s": measured,
              "met": answer.status_code == 200 and first <= (measured or 0) + 1.0}
    print(f"cold start ({backend}): {result}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
