"""Per-tenant fairness through HTTP: `surge serve` with SmolLM2, fcfs against fair (issue 20).

The same workload as ``bench_fairness.py`` (tenant A sends at ``--flood`` times the rate of
tenants B and C, Poisson arrivals, open loop, overloaded on purpose), but sent to a real
`surge serve` subprocess over HTTP, one per scheduling policy, the tenant named by the
``X-Tenant`` header (``--tenant-header X-Tenant``). So the whole path counts: per-tenant
admission (a flood's 429s are its own), the engine's scheduler, streaming.

Each request streams its completion; TTFT runs from its scheduled arrival to its first text
chunk (a request admitted but without a token by the window's end counts as the window's end;
a 429 has none and is counted apart). Reported per policy and tenant: requests sent, admitted,
429s, output tokens/s within the window, TTFT p50/p99; and:

- the light tenants' TTFT p99 over their TTFT p99 when they run alone (target: at most 2x);
- Jain's index of each tenant's service over its max-min fair share of what was served
  (water-filling the demands: a light tenant's service alone, the flood's offered load; 1.0
  is perfectly fair; target >= 0.95), and the light tenants' service over that share
  (target: within 10%);
- total output throughput of fair over fcfs (target >= 0.95).

    python benchmarks/bench_fairness_http.py                      # ~4 min, quiet machine
    python benchmarks/bench_fairness_http.py --duration 20 --light-rate 0.3   # short check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_fairness import (
    LIGHT,
    TENANTS,
    fairness_index,
    percentile,
    service_over_share,
    tenant_demands,
)

from surge.http.sse import aiter_sse_lines

READY_TIMEOUT_S = 180.0


@dataclass
class Arrival:
    at: float
    tenant: str
    prompt: list[int]


@dataclass
class Record:
    arrival: Arrival
    status: int | None = None  # None: no answer by the window's end
    first_token: float | None = None
    send_lag: float | None = None  # sent this long after its scheduled arrival
    num_output_tokens: int = 0
    finished: bool = False


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="catalogue name, checkpoint dir or .gguf")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    parser.add_argument("--light-rate", type=float, default=0.5,
                        help="requests/s of each light tenant (B, C)")
    parser.add_argument("--flood", type=float, default=10.0, help="A's rate over B's")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="the engine's tokens per step (default: the server's, 512 on "
                             "CPU); a light request arriving waits out the step in flight")
    parser.add_argument("--max-queued-requests", type=int, default=16,
                        help="the server's waiting-queue bound (per-tenant slices of it)")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch threads of the engine (default: torch's)")
    parser.add_argument("--fair-burst-tokens", type=int, default=None,
                        help="the fair policy's burst credit (default: the server's)")
    parser.add_argument("--policies", nargs="+", default=["fcfs", "fair"],
                        choices=["fcfs", "priority", "fair"])
    parser.add_argument("--skip-alone", action="store_true",
                        help="skip the light tenants' run alone (the TTFT baseline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_fairness_http.json")
    return parser.parse_args()


def make_workload(args: argparse.Namespace) -> list[Arrival]:
    """Poisson arrivals per tenant; distinct prompts (no prefix-cache hits between them)."""
    rng = random.Random(args.seed)
    rates = {"A": args.light_rate * args.flood, "B": args.light_rate, "C": args.light_rate}
    arrivals = []
    for tenant, rate in rates.items():
        at = rng.expovariate(rate)
        while at < args.duration:
            arrivals.append(Arrival(at, tenant,
                                    [rng.randrange(1000, 20000) for _ in range(args.prompt_len)]))
            at += rng.expovariate(rate)
    return sorted(arrivals, key=lambda a: a.at)


# -- the server ------------------------------------------------------------------------------


class Server:
    def __init__(self, model: str, policy: str, args: argparse.Namespace) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        extra = ["--num-threads", str(args.num_threads)] if args.num_threads else []
        if args.max_num_batched_tokens:
            extra += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        if args.fair_burst_tokens is not None:
            extra += ["--fair-burst-tokens", str(args.fair_burst_tokens)]
        self.command = [sys.executable, "-m", "surge.cli", "serve", "--model", model,
                        "--port", str(self.port), "--dtype", args.dtype,
                        "--scheduling-policy", policy, "--tenant-header", "X-Tenant",
                        "--max-num-seqs", str(args.max_num_seqs),
                        "--max-queued-requests", str(args.max_queued_requests), *extra]
        self.log_path = Path(tempfile.gettempdir()) / f"bench-fairness-http-{self.port}.log"

    def __enter__(self) -> Server:
        print(f"$ {shlex.join(self.command)}   (log: {self.log_path})", flush=True)
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"surge serve exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)  # polling a subprocess's readiness, with a deadline
        self.process.kill()
        raise RuntimeError(f"surge serve not ready: {self.log_path.read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


# -- the load --------------------------------------------------------------------------------


async def send(http: httpx.AsyncClient, record: Record, start: float,
               args: argparse.Namespace) -> None:
    body = {"prompt": record.arrival.prompt, "max_tokens": args.output_len,
            "temperature": 0, "ignore_eos": True, "stream": True}
    record.send_lag = time.perf_counter() - start - record.arrival.at
    async with http.stream("POST", "/v1/completions", json=body,
                           headers={"X-Tenant": record.arrival.tenant}) as response:
        record.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            return
        async for line in aiter_sse_lines(response):
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                record.finished = True
                return
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                if record.first_token is None:
                    record.first_token = time.perf_counter() - start
                # One chunk per engine step of this request: ~one token (tokens that only
                # complete a character come with the next).
                record.num_output_tokens += 1


async def run_load(url: str, workload: list[Arrival], args: argparse.Namespace
                   ) -> tuple[list[Record], float]:
    records = [Record(a) for a in workload]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        # Warm-up (oneDNN builds kernels per shape; the first batch is slow).
        await asyncio.gather(*(http.post("/v1/completions", json={
            "prompt": [1000 + i] * args.prompt_len, "max_tokens": 4,
            "ignore_eos": True}) for i in range(args.max_num_seqs)))
        start = time.perf_counter()
        tasks = []
        for record in records:
            delay = record.arrival.at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(http, record, start, args)))
        await asyncio.sleep(max(args.duration - (time.perf_counter() - start), 0))
        window = time.perf_counter() - start
        for task in tasks:
            task.cancel()  # what is left after the window is not measured
        await asyncio.gather(*tasks, return_exceptions=True)
    return records, window


# -- report ----------------------------------------------------------------------------------


def summarize(records: list[Record], window: float) -> dict[str, dict[str, float]]:
    summary = {}
    for tenant in TENANTS:
        mine = [r for r in records if r.arrival.tenant == tenant]
        if not mine:
            continue
        admitted = [r for r in mine if r.status != 429]
        ttfts = sorted((r.first_token if r.first_token is not None else window)
                       - r.arrival.at for r in admitted) or [float("nan")]
        summary[tenant] = {
            "sent": len(mine), "admitted": len(admitted),
            "rejected_429": sum(r.status == 429 for r in mine),
            "finished": sum(r.finished for r in mine),
            "tokens_per_s": sum(r.num_output_tokens for r in mine) / window,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "ttfts_by_arrival": [round(t, 3) for t in _by_arrival(admitted, window)],
            "send_lag_p99": percentile(sorted(r.send_lag for r in mine
                                              if r.send_lag is not None) or [float("nan")], 99)}
    return summary


def server_ttft_quantiles(url: str) -> dict[str, dict[str, float]]:
    """The server's own TTFT per tenant (``surge:tenant_time_to_first_token_seconds``, from
    the request's arrival at the API to its first token), p50 and p99 read off the histogram
    as the status page reads it: beside the client's TTFT it tells server time from the load
    generator's and the network's."""
    from surge.apps.status import bucket_quantile, parse_metrics

    snapshot = parse_metrics(httpx.get(url + "/metrics", timeout=30).text)
    return {tenant: {f"server_ttft_{name}": _or_nan(bucket_quantile(q, buckets))
                     for name, q in (("p50", 0.5), ("p99", 0.99))}
            for tenant, buckets in snapshot.tenant_ttft.items()}


def engine_counters(url: str) -> dict[str, float]:
    """The engine's preemptions and prefix-cache hit rate over the run (what fairness costs:
    a preempted request recomputes what the prefix cache no longer holds)."""
    totals: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        for name in ("num_preemptions", "prefix_cache_queries", "prefix_cache_hits"):
            if line.startswith(f"surge:{name}_total{{"):
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    queries = totals.get("prefix_cache_queries", 0.0)
    return {"preemptions": totals.get("num_preemptions", 0.0),
            "prefix_cache_hit_rate": totals.get("prefix_cache_hits", 0.0) / queries
            if queries else float("nan")}


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _by_arrival(admitted: list[Record], window: float) -> list[float]:
    """Each admitted request's TTFT in arrival order (where a tail came from)."""
    ordered = sorted(admitted, key=lambda r: r.arrival.at)
    return [(r.first_token if r.first_token is not None else window) - r.arrival.at
            for r in ordered]


def report(summaries: dict[str, dict[str, dict[str, float]]], windows: dict[str, float],
           engines: dict[str, dict[str, float]], workload: list[Arrival],
           args: argparse.Namespace) -> None:
    print(f"\n{len(workload)} requests in {args.duration:.0f} s; A at {args.flood:g}x the rate "
          f"of B and C ({args.light_rate:g}/s each); prompt {args.prompt_len}, output "
          f"{args.output_len} tokens; windows: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in windows.items()))
    print(f"{'run':6} {'tenant':6} {'sent':>5} {'admit':>5} {'429':>5} {'done':>5} "
          f"{'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'server p50':>10} {'server p99':>10}"
          f" {'send lag p99':>12}")
    for name, summary in summaries.items():
        for tenant, s in summary.items():
            print(f"{name:6} {tenant:6} {s['sent']:5d} {s['admitted']:5d} "
                  f"{s['rejected_429']:5d} {s['finished']:5d} {s['tokens_per_s']:7.1f} "
                  f"{s['ttft_p50']:8.2f}s {s['ttft_p99']:8.2f}s "
                  f"{s.get('server_ttft_p50', float('nan')):9.2f}s "
                  f"{s.get('server_ttft_p99', float('nan')):9.2f}s {s['send_lag_p99']:11.3f}s")
    verdicts: dict[str, dict[str, float]] = {}
    for policy in args.policies:
        summary = summaries[policy]
        demands = tenant_demands(summary, summaries.get("alone"), args)
        verdicts[policy] = {"jain": fairness_index(summary, demands),
                            "light_service_over_share": min(
                                service_over_share(summary, demands)[t] for t in LIGHT),
                            "total_tokens_per_s": sum(s["tokens_per_s"]
                                                      for s in summary.values())}
        if "alone" in summaries:
            verdicts[policy]["light_ttft_p99_over_alone"] = max(
                summary[t]["ttft_p99"] / summaries["alone"][t]["ttft_p99"] for t in LIGHT)
        print(f"{policy}: " + ", ".join(f"{k} {v:.3f}" for k, v in verdicts[policy].items()))
    if "fair" in verdicts and "fcfs" in verdicts:
        ratio = verdicts["fair"]["total_tokens_per_s"] / verdicts["fcfs"]["total_tokens_per_s"]
        print(f"total throughput fair / fcfs: {ratio:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "tenants": summaries, "windows": windows,
                               "engines": engines, "verdicts": verdicts}, indent=2))
    print(f"wrote {out}")


def main() -> None:
    args = parse_args()
    model = args.model
    if not Path(model).exists():
        from surge.hub import pull

        model = str(pull(model, progress=False))
    workload = make_workload(args)
    runs = [] if args.skip_alone else [("alone", "fcfs", [a for a in workload
                                                          if a.tenant in LIGHT])]
    runs += [(policy, policy, workload) for policy in args.policies]
    summaries, windows, engines = {}, {}, {}
    for name, policy, arrivals in runs:
        with Server(model, policy, args) as server:
            records, window = asyncio.run(run_load(server.url, arrivals, args))
            server_ttft = server_ttft_quantiles(server.url)
            engines[name] = engine_counters(server.url)
        summaries[name], windows[name] = summarize(records, window), window
        for tenant, quantiles in server_ttft.items():
            if tenant in summaries[name]:
                summaries[name][tenant].update(quantiles)
        print(f"{name}: {len(records)} sent, {sum(r.status == 429 for r in records)} got 429, "
              f"{engines[name]['preemptions']:.0f} preemptions, prefix-cache hit rate "
              f"{engines[name]['prefix_cache_hit_rate']:.3f}", flush=True)
    report(summaries, windows, engines, workload, args)


if __name__ == "__main__":
    main()
