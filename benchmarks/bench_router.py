"""The router against nginx, the HTTP clients it could use, and prefix affinity on W3.

1. Overhead. Fake replicas that answer at once (`surge bench fake-server`, uvloop) behind
   `surge route --policy round_robin` and behind nginx (round robin, keep-alive upstream, one
   worker process: the router is one process too), both started here. The load generator is
   wrk (C, one thread, a Lua script for the POST), so it is not what limits the numbers.
   In interleaved rounds: p50 latency at concurrency 1, straight to a replica and through each
   proxy (the difference is the added latency), and peak requests/s at concurrency 64, with
   each proxy's CPU time per request (robust to a busy machine). Targets: the router's
   requests/s >= 0.5x nginx's; added p50 <= 1 ms.
2. Clients. CPU time per request of the HTTP clients a Python proxy could forward with
   (aiohttp, httpx, and the router's own httptools-based client), against one fake replica.
3. Prefix affinity. W3 (shared prefixes of 1,024 tokens + 32 unique tokens, token-id prompts)
   over `surge serve --replicas 2` of the smollm2-135m shape (random weights, bfloat16, one
   torch thread each), with `--policy round_robin` and then `--policy prefix_affinity`.
   Reports the prefix-cache hit rate (the replicas' surge:prefix_cache_* counters) and
   throughput. With one shared prefix both policies hit alike (each replica caches it once),
   so the default uses 7 prefixes and a KV cache per replica that holds about 5 of them: round
   robin makes every replica see all 7 and evict, prefix affinity gives each replica 3 or 4.
   (The count is odd on purpose: requests cycle through the prefixes in order, and with an
   even count round robin over 2 replicas would send each prefix to one replica by accident.)

    python benchmarks/bench_router.py                  # about 5 minutes on 2 cores
    python benchmarks/bench_router.py --skip-affinity --rounds 5
    python benchmarks/bench_router.py --affinity-requests 64 --num-prefixes 5   # all of W3

Needs nginx and wrk (Debian: apt-get install -y nginx wrk; tried here when missing and root).
Writes results/bench_router.json and results/bench_router.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RPS_TARGET = 0.5
ADDED_P50_TARGET_MS = 1.0
READY_TIMEOUT_S = 600.0
_BODY = b'{"prompt": "hello", "max_tokens": 4}'
_WRK_SCRIPT = f"""wrk.method = "POST"
wrk.body = '{_BODY.decode()}'
wrk.headers["Content-Type"] = "application/json"
"""
_NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream replicas {{ {servers} keepalive 128; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://replicas;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen[Any], timeout: float = READY_TIMEOUT_S
                 ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError), \
                urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.1)  # polling for readiness
    raise RuntimeError(f"{url} was not healthy within {timeout} s")


@contextlib.contextmanager
def started(command: list[str], log: Path) -> Iterator[subprocess.Popen[Any]]:
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def fake_replica() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([sys.executable, "-m", "surge.bench", "fake-server", "--port",
                                "0"], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline() if process.stdout else ""
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"the fake replica did not start: {line!r}")
    return process, line.rsplit(" ", 1)[-1].strip()


def ensure_tools() -> None:
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} from Debian...", flush=True)
        subprocess.run(["apt-get", "install", "-y", *missing], check=False,
                       stdout=subprocess.DEVNULL)
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"bench_router needs {' and '.join(missing)}: apt-get install -y nginx wrk")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, in ticks
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    with contextlib.suppress(FileNotFoundError), \
            open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(p) for p in file.read().split()]
    return []


# -- wrk ---------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, connections: int, seconds: float, script: Path) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script),
         f"{url}/v1/completions"], capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
              "requests": float(re.search(r"(\d+) requests in", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        result[f"p{pct}_ms"] = float(value) * _UNITS[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    return result


# -- part 1: overhead --------------------------------------------------------------------------


def overhead(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    ensure_tools()
    script = work / "post.lua"
    script.write_text(_WRK_SCRIPT)
    fakes = [fake_replica() for _ in range(args.replicas)]
    urls = [url for _, url in fakes]
    router_port, nginx_port = free_port(), free_port()
    nginx_dir = work / "nginx"
    nginx_dir.mkdir()
    servers = " ".join(f"server {u.removeprefix('http://')};" for u in urls)
    (nginx_dir / "nginx.conf").write_text(
        _NGINX_CONF.format(dir=nginx_dir, servers=servers, port=nginx_port))
    router_cmd = [sys.executable, "-m", "surge.cli", "route", "--policy", "round_robin",
                  "--port", str(router_port), "--log-level", "warning",
                  *[item for url in urls for item in ("--backend", url)]]
    try:
        with started(router_cmd, work / "router.log") as router, \
                started(["nginx", "-c", str(nginx_dir / "nginx.conf"), "-p", str(nginx_dir)],
                        work / "nginx.log") as nginx:
            targets = {"direct": (urls[0], []),
                       "nginx": (f"http://127.0.0.1:{nginx_port}", [nginx.pid]),
                       "router": (f"http://127.0.0.1:{router_port}", [router.pid])}
            for name, (url, _) in targets.items():
                wait_healthy(url if name != "nginx" else urls[0], router)
            time.sleep(0.5)  # nginx has no health route; give it its moment to bind
            return measure_overhead(args, targets, script, nginx.pid)
    finally:
        for process, _ in fakes:
            process.kill()


def measure_overhead(args: argparse.Namespace, targets: dict[str, tuple[str, list[int]]],
                     script: Path, nginx_master: int) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for round_index in range(args.rounds):
        order = list(targets) if round_index % 2 == 0 else list(reversed(targets))
        for name in order:
            url, pids = targets[name]
            if name == "nginx":
                pids = [nginx_master, *children(nginx_master)]
            latency = wrk(url, 1, args.latency_seconds, script)
            before = cpu_seconds(pids)
            peak = wrk(url, args.connections, args.duration, script)
            cpu = cpu_seconds(pids) - before
            rounds[name].append({
                "p50_ms": latency["p50_ms"], "p99_ms": latency["p99_ms"], "rps": peak["rps"],
                "errors": latency["errors"] + peak["errors"],
                "cpu_us_per_request": cpu / peak["requests"] * 1e6 if pids else None})
            print(f"  round {round_index + 1} {name:7s} p50 {latency['p50_ms']:.3f} ms, "
                  f"{peak['rps']:8.0f} req/s", flush=True)
    return summarize_overhead(rounds)


def summarize_overhead(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Other work on a shared machine only ever slows a run down, so each target's best round
    (highest requests/s, lowest p50) is its least disturbed one; medians are kept too."""
    best_of = {"rps": max, "p50_ms": min, "p99_ms": min, "errors": max,
               "cpu_us_per_request": min}

    def pick(name: str, key: str, how: Any) -> float | None:
        values = [r[key] for r in rounds[name] if r[key] is not None]
        return how(values) if values else None

    summary: dict[str, Any] = {
        name: {key: pick(name, key, best_of[key]) for key in rounds[name][0]}
        for name in rounds}
    for name in rounds:
        summary[name]["median_rps"] = pick(name, "rps", statistics.median)
        summary[name]["median_p50_ms"] = pick(name, "p50_ms", statistics.median)
    direct_p50 = summary["direct"]["p50_ms"]
    for name in ("nginx", "router"):
        summary[name]["added_p50_ms"] = summary[name]["p50_ms"] - direct_p50
    summary["router_vs_nginx_rps"] = summary["router"]["rps"] / summary["nginx"]["rps"]
    # Each round runs the two back to back: their ratio shares that round's noise.
    summary["router_vs_nginx_rps_per_round"] = [
        r["rps"] / n["rps"] for r, n in zip(rounds["router"], rounds["nginx"], strict=True)]
    summary["rounds"] = rounds
    return summary


# -- part 2: clients ---------------------------------------------------------------------------


def clients(seconds: float) -> dict[str, Any]:
    process, url = fake_replica()
    try:
        import uvloop  # the router runs on it when installed

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        return {name: runner(measure_client(name, url, seconds))
                for name in ("surge_upstream", "aiohttp", "httpx")}
    finally:
        process.kill()


async def measure_client(name: str, url: str, seconds: float) -> dict[str, float]:
    send = await _client(name, url)
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await send()
            count += 1

    before = _cpu()
    await asyncio.gather(*(worker() for _ in range(32)))
    cpu = _cpu() - before
    await send.close()  # type: ignore[attr-defined]
    return {"requests_per_s": count / seconds, "cpu_us_per_request": cpu / count * 1e6}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _client(name: str, url: str) -> Any:
    headers = {"Content-Type": "application/json"}
    host, port = url.removeprefix("http://").split(":")
    if name == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

        async def send() -> None:
            async with session.post(f"{url}/v1/completions", data=_BODY, headers=headers) as r:
                await r.read()

        send.close = session.close  # type: ignore[attr-defined]
        return send
    if name == "httpx":
        import httpx

        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=64))

        async def send() -> None:
            (await client.post(f"{url}/v1/completions", content=_BODY, headers=headers)).read()

        send.close = client.aclose  # type: ignore[attr-defined]
        return send
    from surge.router.upstream import UpstreamPool, request_head

    pool = UpstreamPool()
    head = request_head("POST", "/v1/completions", f"{host}:{port}".encode(),
                        [(b"content-type", b"application/json")], len(_BODY))

    async def send() -> None:
        response = await pool.request(host, int(port), False, head, _BODY)
        await response.read()
        response.release()

    async def close() -> None:
        pool.close()

    send.close = close  # type: ignore[attr-defined]
    return send


# -- part 3: prefix affinity ---------------------------------------------------------------------


def affinity(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from surge.testing.make_model import ensure_demo_model

    model = args.model or str(ensure_demo_model("smollm2-135m"))
    return {policy: run_policy(args, model, policy, work)
            for policy in ("round_robin", "prefix_affinity")}


def run_policy(args: argparse.Namespace, model: str, policy: str, work: Path
               ) -> dict[str, Any]:
    from surge.bench.runner import BenchConfig, run_benchmark

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "surge.cli", "serve", "--model", model, "--replicas", "2",
               "--policy", policy, "--dtype", "bfloat16", "--num-threads", "1",
               "--kv-cache-memory-bytes", str(args.kv_cache_mib << 20), "--port", str(port),
               "--log-level", "warning"]
    print(f"  {policy}: starting 2 replicas...", flush=True)
    with started(command, work / f"serve-{policy}.log") as router:
        wait_healthy(url, router)
        wait_routable(url, 2)
        config = BenchConfig(url=url, dataset="shared-prefix", prefix_len=1024, suffix_len=32,
                             num_prefixes=args.num_prefixes, output_len=str(args.output_len),
                             vocab_size=49152, concurrency=[args.concurrency],
                             num_requests=args.affinity_requests, seed=1)
        run = run_benchmark(config, progress=False)["runs"][0]["summary"]
        hits, queries = prefix_counters(url)
    result = {"request_throughput": run["request_throughput"],
              "output_token_throughput": run["output_token_throughput"],
              "ttft_p50_s": run["latency"]["ttft"]["p50"], "failed": run["failed"],
              "prefix_cache_hits": hits, "prefix_cache_queries": queries,
              "hit_rate": hits / queries if queries else 0.0}
    print(f"  {policy}: hit rate {result['hit_rate']:.1%}, "
          f"{result['request_throughput']:.2f} req/s, TTFT p50 {result['ttft_p50_s']:.2f} s",
          flush=True)
    return result


def wait_routable(url: str, count: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            if json.load(response)["replicas_routable"] >= count:
                return
        time.sleep(0.2)  # polling for the second replica
    raise RuntimeError(f"{count} replicas were not ready in time")


def prefix_counters(url: str) -> tuple[float, float]:
    with urllib.request.urlopen(f"{url}/router/replicas", timeout=5) as response:
        replicas = json.load(response)["replicas"]
    hits = queries = 0.0
    for replica in replicas:
        with urllib.request.urlopen(f"{replica['url']}/metrics", timeout=5) as response:
            text = response.read().decode()
        hits += _metric(text, "surge:prefix_cache_hits_total")
        queries += _metric(text, "surge:prefix_cache_queries_total")
    return hits, queries


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


# -- report --------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> None:
    over = results.get("overhead")
    if over:
        print("\nrouter overhead (fake replicas answering at once; best of rounds):")
        for name in ("direct", "nginx", "router"):
            row = over[name]
            cpu = row["cpu_us_per_request"]
            added = f", +{row['added_p50_ms']:.3f} ms" if "added_p50_ms" in row else ""
            print(f"  {name:7s} {row['rps']:8.0f} req/s  p50 {row['p50_ms']:.3f} ms{added}"
                  + (f"  {cpu:.0f} µs CPU/request" if cpu else ""))
        ratio = over["router_vs_nginx_rps"]
        added = over["router"]["added_p50_ms"]
        per_round = ", ".join(f"{r:.2f}" for r in over["router_vs_nginx_rps_per_round"])
        print(f"  router/nginx requests/s per round: {per_round}")
        print(f"  router/nginx requests/s: {ratio:.2f}x (target >= {RPS_TARGET}x: "
              f"{'met' if ratio >= RPS_TARGET else 'MISSED'}); added p50 {added:.3f} ms "
              f"(target <= {ADDED_P50_TARGET_MS} ms: "
              f"{'met' if added <= ADDED_P50_TARGET_MS else 'MISSED'})")
    if results.get("clients"):
        print("\nHTTP clients, 32 concurrent requests to one instant replica:")
        for name, row in results["clients"].items():
            print(f"  {name:15s} {row['cpu_us_per_request']:6.1f} µs CPU/request "
                  f"({row['requests_per_s']:.0f} req/s)")
    aff = results.get("affinity")
    if aff:
        rr, pa = aff["round_robin"], aff["prefix_affinity"]
        print("\nW3 over 2 replicas (prefix_affinity vs round_robin):")
        print(f"  prefix-cache hit rate {pa['hit_rate']:.1%} vs {rr['hit_rate']:.1%}; "
              f"throughput {pa['request_throughput'] / rr['request_throughput']:.2f}x "
              f"({pa['request_throughput']:.2f} vs {rr['request_throughput']:.2f} req/s); "
              f"TTFT p50 {pa['ttft_p50_s']:.2f} s vs {rr['ttft_p50_s']:.2f} s")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    over = results.get("overhead")
    if over:
        names = ["direct", "nginx", "router"]
        axes[0].bar(names, [over[n]["rps"] for n in names], color=["grey", "green", "C0"])
        axes[0].set_title("peak requests/s (fake replicas)")
        axes[1].bar(names, [over[n]["p50_ms"] for n in names], color=["grey", "green", "C0"])
        axes[1].set_title("p50 latency at concurrency 1 (ms)")
    aff = results.get("affinity")
    if aff:
        policies = list(aff)
        axes[2].bar(policies, [aff[p]["hit_rate"] * 100 for p in policies], color="C1")
        axes[2].set_title("W3 prefix-cache hit rate (%)")
        for i, p in enumerate(policies):
            axes[2].text(i, aff[p]["hit_rate"] * 100, f"{aff[p]['request_throughput']:.2f} "
                         "req/s", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2, help="fake replicas (default 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per peak run")
    parser.add_argument("--latency-seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--client-seconds", type=float, default=3.0)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-clients", action="store_true")
    parser.add_argument("--skip-affinity", action="store_true")
    parser.add_argument("--model", default=None, help="default: smollm2-135m shape, cached")
    parser.add_argument("--affinity-requests", type=int, default=32,
                        help="W3 has 64; 32 keeps the default run near 5 minutes")
    parser.add_argument("--num-prefixes", type=int, default=7)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--kv-cache-mib", type=int, default=128,
                        help="KV cache per replica (default 128 MiB: about 5 prefixes)")
    parser.add_argument("--output", default="results/bench_router.json")
    args = parser.parse_args()
    results: dict[str, Any] = {"config": vars(args)}
    with tempfile.TemporaryDirectory(prefix="surge-bench-router-") as tmp:
        work = Path(tmp)
        if not args.skip_overhead:
            print("part 1: router and nginx in front of instant fake replicas", flush=True)
            results["overhead"] = overhead(args, work)
        if not args.skip_clients:
            print("part 2: HTTP clients", flush=True)
            results["clients"] = clients(args.client_seconds)
        if not args.skip_affinity:
            print("part 3: prefix affinity vs round robin on W3", flush=True)
            results["affinity"] = affinity(args, work)
    report(results)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    plot(results, output.with_suffix(".png"))
    print(f"\nwrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
