"""`surge bench`: flags, presets for BENCH.md's workloads, and the compare/plot/fake-server
subcommands. Importing this module is cheap; aiohttp, numpy and matplotlib load on use."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

__all__ = ["WORKLOADS", "add_parser", "config_from_args", "main"]

# BENCH.md's workloads as flag defaults; flags given on the command line win.
WORKLOADS: dict[str, dict[str, Any]] = {
    "W1": {"dataset": "random", "input_len": "128", "output_len": "64", "prompt_kind": "ids",
           "concurrency": [16], "num_requests": 16},
    "W2": {"dataset": "random", "input_len": "uniform:64,512", "output_len": "uniform:32,256",
           "num_requests": 64},
    "W3": {"dataset": "shared-prefix", "prefix_len": 1024, "suffix_len": 32, "output_len": "64",
           "concurrency": [16], "num_requests": 64},
    "W4": {"dataset": "random", "input_len": "128", "output_len": "256", "prompt_kind": "ids",
           "concurrency": [1], "num_requests": 1},
    "E1": {"endpoint": "embeddings", "dataset": "random", "input_len": "12", "prompt_kind": "text",
           "concurrency": [32], "num_requests": 1024},
}
_NEEDS_RATE = ("W2",)

EXAMPLES = """\
examples:
  surge bench --url http://127.0.0.1:8000 --workload W1 --vocab-size 49152
  surge bench --url http://127.0.0.1:8000 --rate 1,2,4,8 --num-requests 200 \\
      --input-len uniform:64,512 --output-len uniform:32,256 --slo ttft=2s,tpot=100ms \\
      --output results/sweep.json
  surge bench --url http://127.0.0.1:8000 --endpoint chat --concurrency 8 --duration 60
  surge bench compare results/vllm.json results/surge.json
  surge bench plot results/sweep.json
  surge bench fake-server --port 8001 --ttft 0.05 --tpot 0.01
  surge bench capacity --profile results/replica.json --rate 20 --ttft-p99 0.5
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="load-test an OpenAI-compatible server: latency percentiles, goodput, plots",
        description="Load generator for OpenAI-compatible servers (Surge, vLLM, llama.cpp).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_target_args(parser)
    _add_load_args(parser)
    _add_dataset_args(parser)
    _add_output_args(parser)
    parser.set_defaults(handler=run_bench)
    commands = parser.add_subparsers(title="other commands", metavar="COMMAND")
    _add_compare(commands)
    _add_plot(commands)
    _add_fake_server(commands)
    _add_capacity(commands)
    return parser


def _add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8000")
    g.add_argument("--endpoint", choices=("completions", "chat", "embeddings", "classify"),
                   help="API to load (default completions)")
    g.add_argument("--model", help="model name to send (default: the first from /v1/models)")
    g.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                   help="extra HTTP header (repeatable)")
    g.add_argument("--no-stream", dest="stream", action="store_false", default=None,
                   help="ask for whole responses (no TTFT, TPOT or ITL)")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", default=None,
                   help="let the model stop early (default: send ignore_eos for fixed lengths)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--extra-body", type=json.loads, metavar="JSON",
                   help='merged into every request body, e.g. \'{"top_p": 0.9}\'')
    g.add_argument("--request-timeout", type=float, metavar="S",
                   help="give up on one request after S seconds (default 600)")


def _add_load_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load shape (several comma-separated values make a sweep)")
    g.add_argument("--workload", choices=sorted(WORKLOADS),
                   help="BENCH.md workload preset; other flags override its settings")
    g.add_argument("--concurrency", type=_int_list, metavar="N[,N...]",
                   help="closed loop: N requests in flight at all times (default 1)")
    g.add_argument("--rate", type=_float_list, metavar="R[,R...]",
                   help="open loop: R requests/s arriving at random (inf: all at once)")
    g.add_argument("--burstiness", type=float,
                   help="Gamma shape of arrival gaps: 1 Poisson (default), <1 burstier")
    g.add_argument("--max-concurrency", type=int, metavar="N",
                   help="open loop: at most N requests in flight")
    g.add_argument("--num-requests", type=int, metavar="N", help="requests per run (default 100)")
    g.add_argument("--duration", type=float, metavar="S",
                   help="run each point for S seconds (prompts cycle; --num-requests caps it)")
    g.add_argument("--warmup", type=int, metavar="N",
                   help="send N requests first and leave them out of the statistics")


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset (seeded: the same flags send the same requests)")
    g.add_argument("--dataset", choices=("random", "shared-prefix", "sharegpt", "jsonl", "images"))
    g.add_argument("--dataset-path", metavar="PATH",
                   help="ShareGPT JSON, JSONL of {\"prompt\": ...}, or a folder of images")
    g.add_argument("--input-len", metavar="DIST",
                   help="prompt tokens: 128, uniform:64,512 or normal:256,64 (default 128)")
    g.add_argument("--output-len", metavar="DIST",
                   help="max_tokens, same forms (default 64, or the dataset's own)")
    g.add_argument("--prompt-kind", choices=("auto", "ids", "text"),
                   help="random prompts as token ids or words (auto: ids for completions "
                        "when the vocabulary size is known)")
    g.add_argument("--prefix-len", type=int, help="shared-prefix: prefix tokens (default 1024)")
    g.add_argument("--suffix-len", type=int, help="shared-prefix: unique tokens (default 32)")
    g.add_argument("--num-prefixes", type=int, help="shared-prefix: distinct prefixes (default 1)")
    g.add_argument("--vocab-size", type=int, help="vocabulary size for random token ids")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.json or its directory: counts tokens when the server "
                        "sends no usage, and sizes random prompts exactly")
    g.add_argument("--image-size", type=int, help="classify: random image side (default 224)")
    g.add_argument("--seed", type=int)


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement and output")
    g.add_argument("--slo", metavar="SPEC",
                   help="goodput objectives, e.g. ttft=2s,tpot=100ms (metrics ttft, tpot, itl, "
                        "e2e; itl bounds each request's longest gap)")
    g.add_argument("--output", metavar="FILE.json",
                   help="write config, summaries, timelines and per-request records")
    g.add_argument("--plot-dir", metavar="DIR",
                   help="write PNG plots here (default with --output: FILE_plots/)")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--profile", metavar="FILE.json",
                   help="capture a torch.profiler Chrome trace of the server's engine in the "
                        "middle of the first load point (the server needs --enable-profiler)")
    g.add_argument("--profile-steps", type=int, metavar="N",
                   help="engine steps the --profile capture records (default 20)")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,16 (got {text!r})") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers like 1,2.5,inf (got {text!r})") from None


_FLAG_FIELDS = (
    "url", "endpoint", "model", "api_key", "stream", "ignore_eos", "temperature", "extra_body",
    "request_timeout", "concurrency", "rate", "burstiness", "max_concurrency", "num_requests",
    "duration", "warmup", "dataset", "dataset_path", "input_len", "output_len", "prompt_kind",
    "prefix_len", "suffix_len", "num_prefixes", "vocab_size", "tokenizer", "image_size", "seed",
    "slo", "profile", "profile_steps",
)


def config_from_args(args: argparse.Namespace) -> Any:
    """Flags given, over the workload preset, over BenchConfig's defaults."""
    from surge.bench.runner import BenchConfig

    if not args.url:
        raise ValueError("--url is required, e.g. surge bench --url http://127.0.0.1:8000")
    settings: dict[str, Any] = dict(WORKLOADS.get(args.workload or "", {}))
    settings.update({k: v for k in _FLAG_FIELDS if (v := getattr(args, k)) is not None})
    if args.workload in _NEEDS_RATE and not settings.get("rate"):
        raise ValueError(f"--workload {args.workload} is open-loop: give --rate, e.g. --rate 2")
    if settings.get("rate") and "concurrency" not in _given(args):
        settings.pop("concurrency", None)  # a preset's concurrency yields to an explicit rate
    if settings.get("duration") and "num_requests" not in _given(args):
        settings["num_requests"] = None  # a duration alone runs for that long
    settings["headers"] = dict(_header(h) for h in args.header)
    return BenchConfig(**settings)


def _given(args: argparse.Namespace) -> set[str]:
    return {k for k in _FLAG_FIELDS if getattr(args, k) is not None}


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"bad --header {text!r}: write NAME:VALUE, e.g. --header X-Team:search")
    return name.strip(), value.strip()


def run_bench(args: argparse.Namespace) -> int:
    from surge.bench.report import format_results, write_json, write_plots
    from surge.bench.runner import run_benchmark

    config = config_from_args(args)
    doc = run_benchmark(config, progress=not args.no_progress)
    print(format_results(doc))
    if "profile" in doc:
        profiled = doc["profile"]
        print(f"\nprofile: {profiled['path']} ({profiled['steps']} engine steps)"
              if profiled["path"] else f"\nprofile not captured: {profiled['error']}")
    if args.output:
        print(f"\nresults: {write_json(doc, args.output)}")
    plot_dir = args.plot_dir or (_default_plot_dir(args.output) if args.output else None)
    if plot_dir and not args.no_plots:
        print("plots: " + ", ".join(str(p) for p in write_plots(doc, plot_dir)))
    return 0 if all(run["summary"]["completed"] for run in doc["runs"]) else 1


def _default_plot_dir(output: str) -> str:
    return (output[:-5] if output.endswith(".json") else output) + "_plots"


def _add_compare(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("compare", help="print two results files side by side with ratios")
    p.add_argument("a", metavar="A.json")
    p.add_argument("b", metavar="B.json")
    p.set_defaults(handler=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from surge.bench.report import format_comparison, read_json

    print(format_comparison(read_json(args.a), read_json(args.b), args.a, args.b))
    return 0


def _add_plot(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("plot", help="(re)draw the PNG plots of a results file")
    p.add_argument("results", metavar="RESULTS.json")
    p.add_argument("--plot-dir", dest="plot_out", metavar="DIR",
                   help="default: RESULTS_plots/ next to the file")
    p.set_defaults(handler=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from surge.bench.report import read_json, write_plots

    out = args.plot_out or _default_plot_dir(args.results)
    print("plots: " + ", ".join(str(p) for p in write_plots(read_json(args.results), out)))
    return 0


def _add_fake_server(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("fake-server",
                            help="serve an OpenAI-compatible fake with scripted latencies")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001, help="0 picks a free port (printed)")
    p.add_argument("--ttft", type=float, default=0.0, metavar="S", help="time to first token")
    p.add_argument("--tpot", type=float, default=0.0, metavar="S", help="time per output token")
    p.add_argument("--output-tokens", type=int, help="tokens per reply (default: max_tokens)")
    p.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests failing")
    p.add_argument("--error-status", type=int, default=500)
    p.add_argument("--no-usage", action="store_true", help="never send usage")
    p.add_argument("--served-model", default="fake-model", help="name listed by /v1/models")
    p.set_defaults(handler=run_fake_server)


def run_fake_server(args: argparse.Namespace) -> int:
    from surge.bench.fake_server import FakeScript, serve

    if not 0 <= args.error_rate <= 1 or math.isnan(args.error_rate):
        raise ValueError(f"--error-rate must be in [0, 1] (got {args.error_rate})")
    script = FakeScript(ttft=args.ttft, tpot=args.tpot, output_tokens=args.output_tokens,
                        error_rate=args.error_rate, error_status=args.error_status,
                        usage=not args.no_usage, model=args.served_model)
    serve(script, args.host, args.port)
    return 0


def _add_capacity(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "capacity", help="replicas needed for R req/s at a TTFT p99 (simulated from a profile)",
        description="Simulate N replicas behind the least_outstanding router, each behaving as "
                    "the measured profile says, and print the smallest N meeting the target "
                    "(docs/scaling.md).")
    p.add_argument("--profile", dest="capacity_profile", required=True, metavar="FILE.json",
                   help="one replica's closed-loop sweep: surge bench --concurrency 1,2,4,8 "
                        "--output FILE.json")
    p.add_argument("--rate", dest="capacity_rate", type=float, required=True, metavar="R",
                   help="offered load in requests/s (Poisson arrivals)")
    p.add_argument("--ttft-p99", type=float, required=True, metavar="S",
                   help="target TTFT p99 in seconds")
    p.add_argument("--profile-replicas", type=int, default=1, metavar="N",
                   help="the profile was measured through a router over N replicas (concurrency "
                        "N, 2N, ...): its numbers are divided by N (default 1)")
    p.add_argument("--shared", type=float, metavar="K",
                   help="the replicas share one host that runs K of them at full speed (e.g. 2 "
                        "cores for one-thread replicas; default: each has its own hardware)")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="requests a replica runs at once (default: the profile's largest "
                        "concurrency); more wait in its queue")
    p.add_argument("--max-replicas", type=int, default=256, metavar="N")
    p.add_argument("--sim-requests", type=int, default=20_000, metavar="N",
                   help="simulated requests per replica count (default 20000)")
    p.add_argument("--work", choices=("fixed", "exponential"), default="fixed",
                   help="request sizes: all alike as in the profile (default), or exponential")
    p.add_argument("--seed", dest="capacity_seed", type=int, default=0)
    p.add_argument("--json", dest="capacity_json", action="store_true",
                   help="print the plan as JSON")
    p.set_defaults(handler=run_capacity)


def run_capacity(args: argparse.Namespace) -> int:
    from surge.bench.capacity import ReplicaCurve, format_plan, plan_as_dict, plan_replicas

    curve = ReplicaCurve.from_bench_json(args.capacity_profile, args.max_batch,
                                         args.profile_replicas)
    plan = plan_replicas(curve, args.capacity_rate, args.ttft_p99,
                         max_replicas=args.max_replicas, num_requests=args.sim_requests,
                         seed=args.capacity_seed, work=args.work, shared=args.shared)
    print(json.dumps(plan_as_dict(plan), indent=2) if args.capacity_json
          else format_plan(curve, plan))
    return 0 if plan.replicas is not None else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m surge.bench ...``: the same as ``surge bench ...``."""
    parser = argparse.ArgumentParser(prog="surge")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"surge bench: error: {exc}", file=sys.stderr)
        return 2
