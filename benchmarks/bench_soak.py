"""Engine memory under a long steady load (issue 14, item 9): does RSS keep growing?

Starts `surge serve` (tiny-llama shape unless --model; process engine), runs --clients
closed-loop clients with varied prompts and lengths for --minutes, samples the API's and the
engine's RSS every --sample seconds, and reports the growth from the end of --warmup minutes to
the end (target < 5% for the engine). ``--malloc-arena-max N`` sets MALLOC_ARENA_MAX for the
server (glibc keeps one heap arena per thread that touched malloc, and returns little of it).

    python benchmarks/bench_soak.py --minutes 30                  # the issue's soak
    python benchmarks/bench_soak.py --minutes 1 --warmup 0.25     # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from bench_overload import start_server

from surge.testing.make_model import write_checkpoint


def main() -> None:
    args = parse_args()
    if args.malloc_arena_max:
        os.environ["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    import tempfile

    model = Path(args.model) if args.model else write_checkpoint(
        "tiny-llama", Path(tempfile.mkdtemp()) / "tiny-llama", seed=0)
    args.max_queued_requests = 4 * args.clients
    server, url = start_server(model, args)
    try:
        api = psutil.Process(server.pid)
        engine = psutil.Process(httpx.get(f"{url}/health").json()["engine_pid"])
        samples = asyncio.run(soak(url, args, api, engine))
    finally:
        server.terminate()
        server.wait(60)
    report(samples, args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="minutes")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds")
    parser.add_argument("--malloc-arena-max", type=int, default=0)
    return parser.parse_args()


async def soak(url: str, args: argparse.Namespace, api: psutil.Process,
               engine: psutil.Process) -> list[tuple[float, float, float, int]]:
    """(seconds, API RSS MiB, engine RSS MiB, requests done) every --sample seconds."""
    stop = time.monotonic() + args.minutes * 60
    done = 0
    samples: list[tuple[float, float, float, int]] = []
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        async def client() -> None:
            nonlocal done
            while time.monotonic() < stop:
                words = " ".join(rng.choice(("alpha", "beta", "gamma", "delta"))
                                 for _ in range(rng.randint(5, 200)))
                body = {"prompt": words, "max_tokens": rng.randint(1, 64),
                        "temperature": rng.choice((0, 0.8)), "stream": rng.random() < 0.5}
                response = await http.post("/v1/completions", json=body)
                done += response.status_code == 200

        async def sampler() -> None:
            started = time.monotonic()
            while time.monotonic() < stop:
                samples.append((time.monotonic() - started, rss(api), rss(engine), done))
                await asyncio.sleep(args.sample)  # the sampling period

        await asyncio.gather(sampler(), *(client() for _ in range(args.clients)))
    return samples


def rss(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def report(samples: list[tuple[float, float, float, int]], args: argparse.Namespace) -> None:
    after_warmup = [s for s in samples if s[0] >= args.warmup * 60] or samples[-1:]
    first, last = after_warmup[0], samples[-1]
    for name, index in (("API", 1), ("engine", 2)):
        growth = (last[index] - first[index]) / first[index] * 100
        print(f"{name:>6} RSS: {first[index]:.0f} MiB after warm-up -> {last[index]:.0f} MiB "
              f"at {last[0] / 60:.1f} min ({growth:+.1f}%; target < 5% for the engine)")
    print(f"requests completed: {last[3]} ({last[3] / max(last[0], 1):.1f}/s)")


if __name__ == "__main__":
    main()
