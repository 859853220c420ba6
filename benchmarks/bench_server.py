"""`surge serve` over HTTP against the offline engine, and the server under 10x overload.

BENCH.md's W1 (burst) and W2 (mixed, Poisson arrivals) run in one go, on the same checkpoint
(smollm2-135m shape, random weights, bfloat16), with the same prompts:
  1. through HTTP: `surge serve` as a subprocess, loaded by Surge's own load generator
     (streaming completions with token-id prompts, greedy, ignore_eos);
  2. through the offline engine (`surge.LLM`) in this process while no server runs: W1 all at
     once, W2 replaying the same arrival times.
The machine is shared, so W1 runs in rounds that alternate the two paths, several bursts each
with fresh prompts; the ratio compares the best burst of each (the median is shown too).
Prints output tokens/s and the HTTP/offline ratio (target: >= 0.90 on W1), and W2's TTFT,
TPOT, ITL and end-to-end percentiles for both.

Then overload: a server started with small `--max-num-seqs` and `--max-queued-requests` gets
10x the request rate it sustains from up to 10x as many clients as it admits, then a flood of
that many clients retrying the moment they are refused. Reports the latency of the 429 answers
(target: p99 < 100 ms) and the peak RSS (VmHWM) of the API-server and engine processes, with
RSS sampled throughout to show it stays bounded.

    python benchmarks/bench_server.py                       # about 8 minutes on 2 cores
    python benchmarks/bench_server.py --rounds 1 --w2-rate 2 --flood-duration 0

Writes results/bench_server.json and results/bench_server.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from surge.bench.client import RequestRecord
from surge.bench.metrics import Slo, latency_stats, summarize
from surge.bench.runner import BenchConfig, run_benchmark
from surge.bench.workloads import BenchRequest, arrival_offsets, build_dataset
from surge.testing.make_model import write_checkpoint

W1_TARGET_RATIO = 0.90
OVERLOAD_P99_TARGET_S = 0.100
READY_TIMEOUT_S = 600.0
DRAIN_TIMEOUT_S = 60.0
W1_OUTPUT_TOKENS = 64


def main() -> None:
    args = parse_args()
    model_dir = ensure_model(args.model, args.preset)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    print(f"model {model_dir}; W1 {args.rounds} rounds x {args.w1_repeats} bursts per path; "
          f"W2 arrivals Poisson at {args.w2_rate:g} req/s; load {load_average()}", flush=True)
    offline = OfflineEngine(model_dir, args.dtype)  # loaded once, idle while a server runs
    w2 = w2_config(vocab_size, args)
    http_w1, offline_w1 = [], []
    for round_index in range(args.rounds):
        # The server is stopped before the offline engine runs: they never share the CPU.
        w1 = w1_config(vocab_size, args, round_index)
        with ServerProcess(model_dir, args, []) as server:
            http_w1.append(run_benchmark(replace(w1, url=server.url)))
            if round_index == 0:
                http_w2 = run_benchmark(replace(w2, url=server.url))
                http_memory = server.memory()
        offline_w1.append(offline.run(w1))
        if round_index == 0:
            offline_w2 = offline.run(w2)
    offline.close()
    check_same_prompts([*http_w1, http_w2], [*offline_w1, offline_w2])
    results = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "model": str(model_dir), "dtype": args.dtype, "cpu_count": os.cpu_count(),
        "W1": compare_w1(http_w1, offline_w1),
        "W2": compare_w2(http_w2, offline_w2, args.w2_rate),
        "http_server_memory_mib": http_memory,
    }
    results["overload"], sampler = run_overload(model_dir, vocab_size, args,
                                                results["W1"]["http"]["best"])
    results["load_average_end"] = load_average()
    report(results)
    save(results, sampler, Path(args.out))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir (default: models/PRESET, written once)")
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--engine-mode", help="passed to `surge serve --engine-mode`")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra `surge serve` argument (repeatable), e.g. --server-arg=--x")
    parser.add_argument("--rounds", type=int, default=2,
                        help="W1 rounds, alternating HTTP and offline (the machine is shared: "
                             "alternating keeps a noisy minute from favouring one path)")
    parser.add_argument("--w1-repeats", type=int, default=3,
                        help="W1 bursts per round and path, each with its own prompts")
    parser.add_argument("--w2-rate", type=float, default=1.0, help="W2 Poisson rate, req/s")
    parser.add_argument("--overload-max-num-seqs", type=int, default=8)
    parser.add_argument("--overload-max-queued", type=int, default=8,
                        help="--max-queued-requests of the overloaded server")
    parser.add_argument("--overload-factor", type=int, default=10,
                        help="offered load over capacity: request rate and clients")
    parser.add_argument("--overload-rate", type=float,
                        help="overload arrival rate, req/s (default: factor x the W1 HTTP "
                             "request rate)")
    parser.add_argument("--overload-duration", type=float, default=20.0, metavar="S")
    parser.add_argument("--flood-duration", type=float, default=10.0, metavar="S",
                        help="then clients that retry at once, without backoff (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_server.json")
    args = parser.parse_args()
    if args.rounds < 1 or args.w1_repeats < 1:
        parser.error("--rounds and --w1-repeats must be >= 1")
    return args


def ensure_model(model: str | None, preset: str) -> Path:
    if model:
        return Path(model)
    path = Path("models") / preset
    if not (path / "config.json").is_file():
        print(f"writing {preset} checkpoint (random weights) to {path} ...", flush=True)
        write_checkpoint(preset, path)
    return path


def load_average() -> str:
    """The 1-minute load average: above the core count, other work shares the machine."""
    with contextlib.suppress(OSError):
        return Path("/proc/loadavg").read_text().split()[0]
    return "?"


# -- workloads --------------------------------------------------------------------------------

def _common(vocab_size: int, seed: int) -> dict[str, Any]:
    # The URL is filled in per server.
    return {"url": "http://127.0.0.1:1", "endpoint": "completions", "stream": True,
            "ignore_eos": True, "temperature": 0.0, "dataset": "random", "prompt_kind": "ids",
            "vocab_size": vocab_size, "seed": seed}


def w1_config(vocab_size: int, args: argparse.Namespace, round_index: int) -> BenchConfig:
    """BENCH.md's W1, ``w1_repeats`` times: each load point draws its own prompts, and each
    round its own seed, so no burst is served from another's prefix cache.

    Three bursts' worth of warm-up requests of the same shapes go first: oneDNN builds kernels
    once per batch shape, and requests arriving over HTTP a little apart make steps of more
    varied shapes than the offline engine's (a fresh server measured here took three or four
    bursts to reach its steady rate).
    """
    return BenchConfig(**_common(vocab_size, args.seed + 1000 * round_index),
                       input_len="128", output_len=str(W1_OUTPUT_TOKENS),
                       concurrency=[16] * args.w1_repeats, num_requests=16, warmup=48)


def w2_config(vocab_size: int, args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(**_common(vocab_size, args.seed + 500), input_len="uniform:64,512",
                       output_len="uniform:32,256", rate=[args.w2_rate], num_requests=64,
                       warmup=8)


def point_requests(config: BenchConfig, point: int) -> list[BenchRequest]:
    """The requests the load generator sends at load point ``point`` of ``config``.

    Built as the runner builds them (a seeded generator per load point and purpose), so the
    offline engine gets the same prompts; ``check_same_prompts`` verifies it against the
    prompt lengths the server reported.
    """
    rng = np.random.default_rng([config.seed, point, 0])
    return build_dataset(config.dataset_spec(), config.num_requests or 0, rng)


def warmup_requests(config: BenchConfig) -> list[BenchRequest]:
    return build_dataset(config.dataset_spec(), config.warmup,
                         np.random.default_rng([config.seed, 0, 2]))


def arrival_times(config: BenchConfig, point: int, count: int) -> list[float]:
    if not config.rate:
        return [0.0] * count  # a closed loop as wide as the workload: all at once
    offsets = arrival_offsets(config.rate[point], config.burstiness,
                              np.random.default_rng([config.seed, point, 1]))
    return [next(offsets) for _ in range(count)]


# -- the server -------------------------------------------------------------------------------

class ServerProcess:
    """`surge serve` in a subprocess: started, awaited on /health, and stopped with SIGTERM."""

    def __init__(self, model_dir: Path, args: argparse.Namespace, flags: list[str]) -> None:
        self.port = args.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "surge.cli", "serve", "--model", str(model_dir),
                        "--host", "127.0.0.1", "--port", str(self.port), "--dtype", args.dtype,
                        *flags, *args.server_arg]
        if args.engine_mode:
            self.command += ["--engine-mode", args.engine_mode]
        self.log_path = Path(tempfile.gettempdir()) / f"surge-bench-server-{self.port}.log"
        self.exit_code: int | None = None

    def __enter__(self) -> ServerProcess:
        print(f"\n$ {shlex.join(self.command)}   (log: {self.log_path})", flush=True)
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.process.kill()
            self.process.wait()
            self.log.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.process.wait(DRAIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"server did not exit {DRAIN_TIMEOUT_S:.0f} s after SIGTERM; killing it")
            self.process.kill()
            self.exit_code = self.process.wait()
        self.log.close()
        print(f"server stopped (exit code {self.exit_code})", flush=True)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"`surge serve` exited with code {self.process.returncode} "
                                   f"before it was ready:\n{self.log_tail()}")
            if http_status(self.url + "/health") == 200:
                return
            time.sleep(0.2)  # polling a subprocess's readiness, with a deadline
        raise RuntimeError(f"`surge serve` not ready after {READY_TIMEOUT_S:.0f} s:\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def pids(self) -> dict[str, int]:
        """The API server and the processes it started, by role."""
        found = {"api_server": self.process.pid}
        for pid in descendants(self.process.pid):
            command = proc_cmdline(pid)
            if "resource_tracker" in command:
                role = "resource_tracker"  # multiprocessing's helper, not Surge's
            elif "engine" not in found:
                role = "engine"
            else:
                role = f"child {pid}"
            found[role] = pid
        return found

    def memory(self) -> dict[str, dict[str, float]]:
        """Peak (VmHWM) and current (VmRSS) resident memory per process, in MiB."""
        return {role: {"peak_mib": proc_status_kib(pid, "VmHWM") / 1024,
                       "rss_mib": proc_status_kib(pid, "VmRSS") / 1024}
                for role, pid in self.pids().items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def descendants(root: int) -> list[int]:
    """Every live process below ``root``, parents before children (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                # The command may contain ") ": the fields after the last one are fixed.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    queue = deque([root])
    while queue:
        for child in sorted(children.get(queue.popleft(), [])):
            found.append(child)
            queue.append(child)
    return found


def proc_cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    return ""


def proc_status_kib(pid: int, field_name: str) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return float(line.split()[1])
    return float("nan")


@dataclass
class RssSampler:
    """Samples each server process's RSS every ``period`` seconds on a background thread."""

    server: ServerProcess
    period: float = 0.25
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    phases: list[tuple[float, str]] = field(default_factory=list)

    def __enter__(self) -> RssSampler:
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self, phase: str) -> None:
        self.phases.append((time.monotonic() - self._start, phase))

    def peak(self) -> dict[str, float]:
        roles = {role for _, rss in self.samples for role in rss}
        return {role: max(rss.get(role, 0.0) for _, rss in self.samples) for role in roles}

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            rss = {role: proc_status_kib(pid, "VmRSS") / 1024
                   for role, pid in self.server.pids().items()}
            self.samples.append((time.monotonic() - self._start, rss))


# -- the offline engine -----------------------------------------------------------------------

class OfflineEngine:
    """``surge.LLM`` in this process, replaying the load generator's requests."""

    def __init__(self, model_dir: Path, dtype: str) -> None:
        from surge import LLM

        print(f"\noffline engine: LLM({str(model_dir)!r}, dtype={dtype!r})", flush=True)
        self.llm: Any = LLM(model_dir, dtype=dtype)

    def close(self) -> None:
        self.llm = None  # frees its weights and KV cache before the overload phase

    def run(self, config: BenchConfig) -> dict[str, Any]:
        """Each load point of ``config``, summarized like the load generator's runs."""
        replay(self.llm, warmup_requests(config), [0.0] * config.warmup)
        runs = []
        for point in range(len(config.load_points())):
            requests = point_requests(config, point)
            records, duration = replay(self.llm, requests,
                                       arrival_times(config, point, len(requests)))
            runs.append({"summary": summarize(records, duration, Slo()),
                         "prompt_lens": [r.prompt_len for r in requests]})
        rates = ", ".join(f"{r['summary']['output_token_throughput']:.0f}" for r in runs)
        print(f"  offline: {rates} output tok/s", flush=True)
        return {"runs": runs}


def replay(llm: Any, requests: list[BenchRequest],
           offsets: list[float]) -> tuple[list[RequestRecord], float]:
    """Add each request at its arrival offset and step the engine; time it as the load
    generator times an HTTP stream (TTFT, gaps between tokens, end to end)."""
    from surge import SamplingParams

    engine = llm.engine
    pending = deque(enumerate(zip(requests, offsets, strict=True)))
    records: dict[str, RequestRecord] = {}
    last_token_at: dict[str, float] = {}
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0][1][1] <= now:
            index, (request, _) = pending.popleft()
            params = SamplingParams(max_tokens=request.output_len, temperature=0.0,
                                    ignore_eos=True)
            request_id = engine.add_request(request.prompt, params)
            records[request_id] = RequestRecord(index, now, prompt_tokens=request.prompt_len,
                                                token_source="usage", status=200)
        if not engine.has_unfinished_requests():
            time.sleep(max(pending[0][1][1] - now, 0.0))  # idle until the next arrival
            continue
        for output in engine.step():
            track_output(records[output.request_id], output, last_token_at,
                         time.perf_counter() - start)
    duration = time.perf_counter() - start
    return sorted(records.values(), key=lambda r: r.index), duration


def track_output(record: RequestRecord, output: Any, last_token_at: dict[str, float],
                 now: float) -> None:
    new_tokens = len(output.outputs[0].delta_token_ids)
    if new_tokens:
        if record.ttft is None:
            record.ttft = now - record.start
        else:
            record.itl.append(now - last_token_at[output.request_id])
        last_token_at[output.request_id] = now
        record.output_tokens += new_tokens
    if output.finished:
        record.e2e = now - record.start


def check_same_prompts(http_docs: list[dict[str, Any]],
                       offline_docs: list[dict[str, Any]]) -> None:
    """The server's reported prompt lengths must match the offline prompts, in order."""
    for http, offline in zip(http_docs, offline_docs, strict=True):
        for served_run, local_run in zip(http["runs"], offline["runs"], strict=True):
            served = [r["prompt_tokens"] for r in served_run["records"]]
            if served != local_run["prompt_lens"]:
                print("WARNING: prompts differ between the HTTP and offline runs; the ratios "
                      "compare different work", flush=True)
                return


def compare_w1(http_docs: list[dict[str, Any]],
               offline_docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best and median output tok/s over every W1 burst of each path, and their ratios.

    The best burst is the one least disturbed by other work on a shared machine; the median
    says how typical it was.
    """
    sides = {"http": _burst_rates(http_docs), "offline": _burst_rates(offline_docs)}
    result: dict[str, Any] = {
        side: {"bursts_output_tok_s": rates, "best": max(rates),
               "median": float(np.median(rates))}
        for side, rates in sides.items()}
    for stat in ("best", "median"):
        result[f"ratio_{stat}"] = result["http"][stat] / result["offline"][stat]
    result["http_warnings"] = sorted({w for d in http_docs for r in d["runs"]
                                      for w in r["warnings"]})
    return result


def _burst_rates(docs: list[dict[str, Any]]) -> list[float]:
    return [run["summary"]["output_token_throughput"] for doc in docs for run in doc["runs"]]


def compare_w2(http_doc: dict[str, Any], offline_doc: dict[str, Any],
               rate: float) -> dict[str, Any]:
    served = http_doc["runs"][0]["summary"]
    local = offline_doc["runs"][0]["summary"]
    return {"rate": rate, "http": served, "offline": local,
            "ratio": served["output_token_throughput"] / local["output_token_throughput"],
            "http_warnings": http_doc["runs"][0]["warnings"]}


# -- overload ---------------------------------------------------------------------------------

def run_overload(model_dir: Path, vocab_size: int, args: argparse.Namespace,
                 w1_http_tok_s: float) -> tuple[dict[str, Any], RssSampler]:
    """A server that admits about ``admitted`` requests at once (running + queued) gets
    ``factor`` times the request rate it sustains, from up to ``factor x admitted`` clients;
    then (the flood) that many clients that retry the moment they are refused."""
    admitted = args.overload_max_num_seqs + args.overload_max_queued
    clients = admitted * args.overload_factor
    rate = args.overload_rate or args.overload_factor * w1_http_tok_s / W1_OUTPUT_TOKENS
    flags = ["--max-num-seqs", str(args.overload_max_num_seqs),
             "--max-queued-requests", str(args.overload_max_queued)]
    common = {**_common(vocab_size, args.seed + 2000), "input_len": "128",
              "output_len": str(W1_OUTPUT_TOKENS), "num_requests": None}
    phases: dict[str, Any] = {}
    with ServerProcess(model_dir, args, flags) as server, RssSampler(server) as sampler:
        print(f"overload: Poisson {rate:.1f} req/s, at most {clients} in flight, "
              f"{args.overload_duration:g} s", flush=True)
        sampler.mark("overload")
        doc = run_benchmark(BenchConfig(**{**common, "url": server.url}, rate=[rate],
                                        max_concurrency=clients,
                                        duration=args.overload_duration))
        phases["overload"] = summarize_phase(doc)
        if args.flood_duration > 0:
            print(f"flood: {clients} clients retrying at once, {args.flood_duration:g} s",
                  flush=True)
            sampler.mark("flood")
            doc = run_benchmark(BenchConfig(**{**common, "url": server.url},
                                            concurrency=[clients],
                                            duration=args.flood_duration))
            phases["flood"] = summarize_phase(doc)
        memory = server.memory()
    return {"admitted": admitted, "clients": clients, "rate": rate, "phases": phases,
            "memory_end_mib": memory, "peak_sampled_rss_mib": sampler.peak(),
            "rss_timeline": [{"t": t, **rss} for t, rss in sampler.samples],
            "phase_starts": sampler.phases}, sampler


def summarize_phase(doc: dict[str, Any]) -> dict[str, Any]:
    run = doc["runs"][0]
    records = run["records"]
    statuses: dict[str, int] = {}
    for r in records:
        key = str(r["status"] or "no_response")
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "duration_s": run["summary"]["duration_s"],
        "statuses": statuses,
        "completed": run["summary"]["completed"],
        "output_token_throughput": run["summary"]["output_token_throughput"],
        "latency_429_s": latency_stats(r["e2e"] for r in records if r["status"] == 429),
        "latency_ok_e2e_s": run["summary"]["latency"]["e2e"],
        "generator": {k: run["generator"][k] for k in ("cpu_utilization",
                                                       "event_loop_lateness_s")},
        "warnings": run["warnings"],
    }


# -- report -----------------------------------------------------------------------------------

def report(results: dict[str, Any]) -> None:
    w1, w2 = results["W1"], results["W2"]
    print(f"\n{'output tok/s':24s} {'HTTP':>8s} {'offline':>8s} {'HTTP/offline':>13s}")
    for stat in ("best", "median"):
        print(f"{'W1 (' + stat + ' burst)':24s} {w1['http'][stat]:8.1f} "
              f"{w1['offline'][stat]:8.1f} {w1[f'ratio_{stat}']:13.2f}")
    print(f"{'W2':24s} {w2['http']['output_token_throughput']:8.1f} "
          f"{w2['offline']['output_token_throughput']:8.1f} {w2['ratio']:13.2f}")
    verdict = "met" if w1["ratio_best"] >= W1_TARGET_RATIO else "NOT met"
    print(f"W1 target HTTP >= {W1_TARGET_RATIO:.0%} of offline: {verdict} "
          f"({w1['ratio_best']:.0%}, best burst of each)")
    print(f"  every burst, HTTP:    {_rates(w1['http']['bursts_output_tok_s'])}")
    print(f"  every burst, offline: {_rates(w1['offline']['bursts_output_tok_s'])}")
    print(f"\nW2 latency, ms (Poisson {w2['rate']:g} req/s)    p50 / p99: HTTP    offline")
    for metric in ("ttft", "tpot", "itl", "e2e"):
        served, local = w2["http"]["latency"][metric], w2["offline"]["latency"][metric]
        print(f"  {metric:5s} {'':30s} {ms(served['p50'])} / {ms(served['p99'])}   "
              f"{ms(local['p50'])} / {ms(local['p99'])}")
    for warning in [*w1["http_warnings"], *w2["http_warnings"]]:
        print(f"  load generator: {warning}")
    report_overload(results["overload"])
    print(f"\nload average at the end: {results['load_average_end']} on "
          f"{results['cpu_count']} cores (higher means other work shared the machine)")


def _rates(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def report_overload(overload: dict[str, Any]) -> None:
    print(f"\noverload: server admits about {overload['admitted']} requests at once "
          f"(--max-num-seqs + --max-queued-requests)")
    for name, phase in overload["phases"].items():
        rejected = phase["latency_429_s"]
        if not rejected["count"]:
            verdict = "not measured: no 429 answers"
        else:
            verdict = "met" if rejected["p99"] < OVERLOAD_P99_TARGET_S else "NOT met"
        print(f"  {name}: {phase['duration_s']:.1f} s, statuses {phase['statuses']}, "
              f"{phase['output_token_throughput']:.0f} output tok/s")
        print(f"    429 latency ms: p50 {ms(rejected['p50'])}, p99 {ms(rejected['p99'])}, "
              f"max {ms(rejected['max'])}; target p99 < 100 ms: {verdict}")
        for warning in phase["warnings"]:
            print(f"    load generator: {warning}")
    peaks = overload["peak_sampled_rss_mib"]
    for role, mem in overload["memory_end_mib"].items():
        print(f"  {role}: peak RSS (VmHWM) {mem['peak_mib']:.0f} MiB; highest sampled "
              f"{peaks.get(role, float('nan')):.0f} MiB; at the end {mem['rss_mib']:.0f} MiB")


def ms(seconds: float | None) -> str:
    return "     -" if seconds is None else f"{seconds * 1e3:6.0f}"


def save(results: dict[str, Any], sampler: RssSampler, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, sampler, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


def plot(results: dict[str, Any], sampler: RssSampler, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    plot_throughput(axes[0], results["W1"], results["W2"])
    plot_w2_latency(axes[1], results["W2"])
    plot_rss(axes[2], sampler, results["overload"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_throughput(ax: Any, w1: dict[str, Any], w2: dict[str, Any]) -> None:
    labels = [f"W1 best burst\nHTTP/offline {w1['ratio_best']:.2f}",
              f"W1 median burst\nHTTP/offline {w1['ratio_median']:.2f}",
              f"W2\nHTTP/offline {w2['ratio']:.2f}"]
    x = np.arange(len(labels))
    for offset, side, color in ((-0.2, "offline", "tab:gray"), (0.2, "http", "tab:blue")):
        values = [w1[side]["best"], w1[side]["median"],
                  w2[side]["output_token_throughput"]]
        ax.bar(x + offset, values, 0.4, label=side, color=color)
        for xi, value in zip(x + offset, values, strict=True):
            ax.text(xi, value, f"{value:.0f}", ha="center", va="bottom")
    ax.set_xticks(x, labels)
    ax.set_title("output tokens/s")
    ax.legend()


def plot_w2_latency(ax: Any, w2: dict[str, Any]) -> None:
    labels = [f"{m} {p}" for m in ("ttft", "tpot", "e2e") for p in ("p50", "p99")]
    x = np.arange(len(labels))
    for offset, side, color in ((-0.2, "offline", "tab:gray"), (0.2, "http", "tab:blue")):
        values = [w2[side]["latency"][label.split()[0]][label.split()[1]] or 0.0
                  for label in labels]
        ax.bar(x + offset, values, 0.4, label=side, color=color)
    ax.set_xticks(x, labels, rotation=30)
    ax.set_yscale("log")
    ax.set_ylabel("seconds")
    ax.set_title(f"W2 latency (Poisson {w2['rate']:g} req/s)")
    ax.legend()


def plot_rss(ax: Any, sampler: RssSampler, overload: dict[str, Any]) -> None:
    roles = sorted({role for _, rss in sampler.samples for role in rss})
    times = [t for t, _ in sampler.samples]
    peaks = sampler.peak()
    for role in roles:
        ax.plot(times, [rss.get(role, np.nan) for _, rss in sampler.samples],
                label=f"{role} (peak {peaks[role]:.0f} MiB)")
    for start, phase in sampler.phases:
        p99 = overload["phases"].get(phase, {}).get("latency_429_s", {}).get("p99")
        answered = "no 429s" if p99 is None else f"429 p99 {p99 * 1e3:.0f} ms"
        ax.axvline(start, color="black", linestyle=":")
        ax.text(start, 0.02, f" {phase}: {answered}", rotation=90, va="bottom", fontsize=8,
                transform=ax.get_xaxis_transform())
    ax.set_title(f"overload: {overload['clients']} clients vs {overload['admitted']} admitted; "
                 "RSS")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.legend()


if __name__ == "__main__":
    main()
