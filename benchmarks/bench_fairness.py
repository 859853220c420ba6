"""Per-tenant fairness of the engine under a flood: fcfs against fair (issue 20).

Open loop, overloaded on purpose: tenant A sends requests at ``--flood`` times the rate of
tenants B and C (Poisson arrivals, same prompt and output lengths). The offline engine runs
in this process; a request's clock starts at its scheduled arrival, so time spent waiting for
the current step to end counts as queueing, as it would in a server. For each policy it
reports, per tenant, requests sent and finished, output tokens/s within the window, TTFT
p50/p99 (requests that got no token within the window count as the window's end), and:

- the light tenants' TTFT p99 against their TTFT when they run alone (target: at most 2x);
- Jain's index of each tenant's service over its max-min fair share of what was served
  (water-filling the demands: a light tenant's service alone, the flood's offered load; 1.0
  is perfectly fair; target >= 0.95), and the light tenants' service over that share
  (target: within 10%);
- total output throughput of fair over fcfs (target >= 0.95).

With ``--simulate`` no model runs: the scheduler alone is driven on a virtual clock where a
step takes ``--step-ms`` plus ``--token-ms`` per token, so the policies' effect is measured
in seconds, reproducibly, whatever else the machine is doing.

    python benchmarks/bench_fairness.py                       # SmolLM2 if pulled, ~4 min
    python benchmarks/bench_fairness.py --preset tiny-llama --duration 8 --light-rate 1
    python benchmarks/bench_fairness.py --simulate --light-rate 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from surge import LLM, SamplingParams
from surge.engine.kv_cache import BlockManager
from surge.engine.request import Request
from surge.engine.scheduler import make_scheduler
from surge.testing.make_model import write_checkpoint

TENANTS = ("A", "B", "C")
LIGHT = ("B", "C")


@dataclass
class Arrival:
    at: float  # seconds after the start
    tenant: str
    prompt: list[int]


@dataclass
class Record:
    arrival: Arrival
    first_token: float | None = None  # seconds after the start
    finished: float | None = None
    num_output_tokens: int = 0
    token_times: list[float] = field(default_factory=list)


def main() -> None:
    args = parse_args()
    workload = make_workload(args)
    if args.simulate:
        def runner(policy: str, arrivals: list[Arrival]) -> RunResult:
            return simulate(policy, arrivals, args)
    else:
        model = resolve_model(args)

        def runner(policy: str, arrivals: list[Arrival]) -> RunResult:
            return run(policy, model, arrivals, args)
    results = {}
    if not args.skip_alone:
        results["alone"] = runner("fcfs", [a for a in workload if a.tenant in LIGHT])
    for policy in args.policies:
        results[policy] = runner(policy, workload)
    report(results, workload, args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir or .gguf (default: SmolLM2 if pulled, "
                                        "else the --preset checkpoint with random weights)")
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    parser.add_argument("--light-rate", type=float, default=0.5,
                        help="requests/s of each light tenant (B, C)")
    parser.add_argument("--flood", type=float, default=10.0, help="A's rate over B's")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="token budget of a step (a flooded step is this long)")
    parser.add_argument("--fair-burst-tokens", type=int, default=None,
                        help="the fair policy's burst credit (default: the engine's)")
    parser.add_argument("--policies", nargs="+", default=["fcfs", "fair"],
                        choices=["fcfs", "priority", "fair"])
    parser.add_argument("--skip-alone", action="store_true",
                        help="skip the light tenants' run alone (the TTFT baseline)")
    parser.add_argument("--simulate", action="store_true",
                        help="drive the scheduler alone on a virtual clock (no model)")
    # SmolLM2 in float32 on 2 cores, 8 seats: ~90 output tokens/s, as bench_fairness_http
    # measures (faster steps, 20 ms + 0.5 ms a token, never showed its light-tenant bursts).
    parser.add_argument("--step-ms", type=float, default=50.0,
                        help="--simulate: fixed time of a step")
    parser.add_argument("--token-ms", type=float, default=1.5,
                        help="--simulate: time per token of a step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_fairness.json")
    return parser.parse_args()


def resolve_model(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    if args.preset == "smollm2-135m":
        from surge.hub import is_pulled, pull

        if is_pulled("smollm2-135m-instruct"):
            return pull("smollm2-135m-instruct", progress=False)
    path = Path("models") / args.preset
    if not (path / "config.json").is_file():
        print(f"writing {args.preset} checkpoint (random weights) to {path} ...")
        write_checkpoint(args.preset, path)
    return path


def make_workload(args: argparse.Namespace) -> list[Arrival]:
    """Poisson arrivals per tenant over the window, sorted by time; distinct prompts (no
    prefix-cache hits between requests)."""
    rng = random.Random(args.seed)
    rates = {"A": args.light_rate * args.flood, "B": args.light_rate, "C": args.light_rate}
    arrivals = []
    for tenant, rate in rates.items():
        at = rng.expovariate(rate)
        while at < args.duration:
            prompt = [rng.randrange(16, 2000) for _ in range(args.prompt_len)]
            arrivals.append(Arrival(at, tenant, prompt))
            at += rng.expovariate(rate)
    return sorted(arrivals, key=lambda a: a.at)


@dataclass
class RunResult:
    records: dict[str, Record]
    seconds: float  # the window measured: arrivals, plus the step running when they ended


def run(policy: str, model: Path, workload: list[Arrival],
        args: argparse.Namespace) -> RunResult:
    llm = LLM(model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, scheduling_policy=policy,
              fair_burst_tokens=args.fair_burst_tokens)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    # Warm-up: oneDNN builds its kernels once per batch shape; a cold first run looks slow.
    warmup = [[17 + i] * args.prompt_len for i in range(args.max_num_seqs)]
    llm.generate(warmup, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    records: dict[str, Record] = {}
    pending = list(reversed(workload))
    start = time.perf_counter()
    while True:
        now = time.perf_counter() - start
        while pending and pending[-1].at <= now:
            arrival = pending.pop()
            request_id = llm.engine.add_request(arrival.prompt, params, tenant=arrival.tenant)
            records[request_id] = Record(arrival)
        if now >= args.duration:
            break  # a step that started before the end still counts, so the window is now
        if llm.engine.has_unfinished_requests():
            observe(llm.engine.step(), records, time.perf_counter() - start)
        elif pending:
            time.sleep(min(pending[-1].at - now, 0.05))
    llm.engine.abort_request(list(records))  # what is left after the window is not measured
    num_finished = sum(r.finished is not None for r in records.values())
    stats = llm.engine.core.stats()
    print(f"{policy}: {len(records)} requests, {num_finished} finished in the window; "
          f"{stats.num_steps} steps, {stats.num_preemptions} preemptions")
    return RunResult(records, now)


def simulate(policy: str, workload: list[Arrival], args: argparse.Namespace) -> RunResult:
    """The scheduler alone, every sampled token a filler, on a virtual clock."""
    clock = [0.0]
    max_len = args.prompt_len + args.output_len
    scheduler = make_scheduler(policy, BlockManager(args.max_num_seqs * max_len // 16 + 16, 16),
                               args.max_num_seqs, args.max_num_batched_tokens,
                               fair_burst_tokens=args.fair_burst_tokens,
                               clock=lambda: clock[0])
    records: dict[str, Record] = {}
    pending = list(reversed(workload))
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    while clock[0] < args.duration:
        while pending and pending[-1].at <= clock[0]:
            arrival = pending.pop()
            request_id = str(len(records))
            scheduler.add_request(Request(request_id, arrival.prompt, params,
                                          tenant=arrival.tenant, arrival_time=arrival.at))
            records[request_id] = Record(arrival)
        output = scheduler.schedule()
        if output.is_empty:
            clock[0] = pending[-1].at if pending else args.duration
            continue
        clock[0] += (args.step_ms + args.token_ms * output.num_tokens) / 1000
        sampled = {c.request.request_id: 7 for c in output.chunks if c.samples}
        finished = {r.request_id for r in scheduler.update_from_output(output, sampled)}
        for request_id in sampled:
            record_token(records[request_id], clock[0], request_id in finished)
    return RunResult(records, clock[0])


def record_token(record: Record, now: float, finished: bool) -> None:
    if record.first_token is None:
        record.first_token = now
    record.num_output_tokens += 1
    if finished:
        record.finished = now


def observe(outputs: list, records: dict[str, Record], now: float) -> None:
    for output in outputs:
        record = records[output.request_id]
        new = len(output.outputs[0].delta_token_ids)
        if new and record.first_token is None:
            record.first_token = now
        record.num_output_tokens += new
        if output.finished:
            record.finished = now


# -- report ------------------------------------------------------------------------------------

def tenant_summary(result: RunResult) -> dict[str, dict[str, float]]:
    records, duration = result.records, result.seconds
    summary = {}
    for tenant in TENANTS:
        mine = [r for r in records.values() if r.arrival.tenant == tenant]
        if not mine:
            continue
        ttfts = sorted((r.first_token if r.first_token is not None else duration)
                       - r.arrival.at for r in mine)
        summary[tenant] = {
            "sent": len(mine), "finished": sum(r.finished is not None for r in mine),
            "tokens_per_s": sum(r.num_output_tokens for r in mine) / duration,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99)}
    return summary


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def max_min_fair(demands: dict[str, float], capacity: float) -> dict[str, float]:
    """Water-filling: each tenant gets its demand or an equal share of what is left."""
    shares: dict[str, float] = {}
    left = dict(demands)
    while left:
        level = capacity / len(left)
        satisfied = {t: d for t, d in left.items() if d <= level}
        if not satisfied:
            shares.update({t: level for t in left})
            return shares
        for tenant, demand in satisfied.items():
            shares[tenant] = demand
            capacity -= demand
            del left[tenant]
    return shares


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def tenant_demands(summary: dict[str, dict[str, float]],
                   alone: dict[str, dict[str, float]] | None,
                   args: argparse.Namespace) -> dict[str, float]:
    """Each tenant's demand in output tokens/s: what it was served running alone, where that
    was measured (all it asked for, less what the window's end cut off), else what it sent.
    (Not the nominal rates: a light tenant's Poisson arrivals can run 50% over its rate in a
    minute, and a share computed from the nominal rate calls that surplus unfair.)"""
    return {t: alone[t]["tokens_per_s"] if alone and t in alone
            else s["sent"] * args.output_len / args.duration for t, s in summary.items()}


def service_over_share(summary: dict[str, dict[str, float]],
                       demands: dict[str, float]) -> dict[str, float]:
    """Each tenant's service over its max-min fair share of what was served in all."""
    served = {t: s["tokens_per_s"] for t, s in summary.items()}
    shares = max_min_fair(demands, sum(served.values()))
    return {t: served[t] / shares[t] for t in served}


def fairness_index(summary: dict[str, dict[str, float]], demands: dict[str, float]) -> float:
    """Jain's index of each tenant's service over its max-min fair share."""
    return jain(list(service_over_share(summary, demands).values()))


def report(results: dict[str, RunResult], workload: list[Arrival],
           args: argparse.Namespace) -> None:
    summaries = {name: tenant_summary(result) for name, result in results.items()}
    windows = ", ".join(f"{name} {result.seconds:.1f} s" for name, result in results.items())
    print(f"\nwindows measured: {windows}")
    print(f"{len(workload)} requests in {args.duration:.0f} s; A at {args.flood:g}x the rate "
          f"of B and C ({args.light_rate:g}/s each); prompt {args.prompt_len}, output "
          f"{args.output_len} tokens")
    print(f"{'run':8} {'tenant':6} {'sent':>5} {'done':>5} {'tok/s':>8} {'TTFT p50':>9} "
          f"{'TTFT p99':>9}")
    for name, summary in summaries.items():
        for tenant, s in summary.items():
            print(f"{name:8} {tenant:6} {s['sent']:5d} {s['finished']:5d} "
                  f"{s['tokens_per_s']:8.1f} {s['ttft_p50']:8.2f}s {s['ttft_p99']:8.2f}s")
    verdicts = {}
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
    out.write_text(json.dumps({"args": vars(args), "tenants": summaries,
                               "verdicts": verdicts}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
