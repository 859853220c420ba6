"""What request stages cost a request (issue 21: stages that do nothing add < 0.2 ms).

Runs the server's stage path exactly as /v1/chat/completions does (``RequestContext.stages
.before`` on a validated request body and a real Starlette request, then one post filter per
choice fed every streamed piece of text, then closed), with:

  none      no stages at all (``NO_STAGES``: what a server without --stage runs)
  no-op     one async pre-stage and one post-stage that change nothing
  no-op x3  three of each
  builtins  the PII redactor (both ways) and an output filter, on text with no match

and prints the time per request and the overhead over ``none``, against the 0.2 ms target.
Each configuration runs interleaved with the others, several rounds, median of rounds.

    python benchmarks/bench_stages.py                    # ~20 s
    python benchmarks/bench_stages.py --chunks 256 --rounds 9
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.requests import Request

from surge.server.schemas import ChatCompletionRequest
from surge.server.stages import NO_STAGES, RequestStages
from surge.stages.api import StageRequest
from surge.stages.output_filter import OutputFilter
from surge.stages.pii import PIIRedactor
from surge.stages.pipeline import LoadedStage, StageMetrics, StagePipeline

TARGET_MS = 0.2
TEXT = ("The quick brown fox jumps over the lazy dog while the model keeps writing words "
        "that hold no address, no number and nothing blocked. ")


class NoOpPre:
    async def before(self, request: StageRequest) -> None:
        return None


class NoOpPost:
    blocking = False

    def open(self, request: StageRequest) -> _Pass:
        return _Pass()


class _Pass:
    def on_text(self, text: str) -> str:
        return text

    def on_end(self) -> str:
        return ""


def _pipeline(stages: list[Any]) -> StagePipeline:
    loaded = [LoadedStage(f"{type(s).__name__}{i}", s) for i, s in enumerate(stages)]
    return StagePipeline(loaded, StageMetrics(CollectorRegistry(), loaded), [])


def _http_request() -> Request:
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                    "headers": [(b"content-type", b"application/json")], "query_string": b""})


def _body() -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({
        "model": "m", "max_tokens": 64, "temperature": 0.7,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Tell me about foxes and dogs, briefly."}]})


async def _one_request(stages: RequestStages, pieces: list[str]) -> None:
    session = await stages.before("chat", _body(), _http_request())
    post = session.choice_filter()
    if post is None:
        return
    for i, piece in enumerate(pieces):
        await post.text(piece, i == len(pieces) - 1)
    post.close()


async def _baseline(pieces: list[str]) -> None:
    """What the request path does anyway with no stages: build the body and request."""
    _body(), _http_request()


async def _time(stages: RequestStages | None, pieces: list[str], requests: int) -> float:
    """CPU seconds per request (this process's: the loop runs here alone), so a loaded
    machine slows the benchmark but does not inflate the result."""
    started = time.process_time()
    for _ in range(requests):
        if stages is None:
            await _baseline(pieces)
        else:
            await _one_request(stages, pieces)
    return (time.process_time() - started) / requests


async def main_async(args: argparse.Namespace) -> None:
    words = (TEXT * (args.chunks // 10 + 2)).split(" ")
    pieces = [w + " " for w in words[:args.chunks]]  # ~one word per engine update
    configs: dict[str, RequestStages | None] = {
        "body only": None,
        "none": NO_STAGES,
        "no-op": _pipeline([NoOpPre(), NoOpPost()]),
        "no-op x3": _pipeline([NoOpPre(), NoOpPre(), NoOpPre(), NoOpPost(), NoOpPost(),
                               NoOpPost()]),
        "builtins": _pipeline([PIIRedactor(), OutputFilter(words=["forbidden phrase"])]),
    }
    for stages in configs.values():  # warm up
        await _time(stages, pieces, 50)
    rounds: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, stages in configs.items():
            rounds[name].append(await _time(stages, pieces, args.requests))
    median = {name: statistics.median(times) * 1e3 for name, times in rounds.items()}
    print(f"CPU per request ({args.chunks} streamed pieces, {args.requests} requests x "
          f"{args.rounds} rounds, median of rounds; target: stages that do nothing add "
          f"< {TARGET_MS} ms)")
    print(f"{'config':<10} {'ms/request':>11} {'over none':>10} {'of target':>10}")
    for name, ms in median.items():
        over = ms - median["none"]
        share = "" if name in ("body only", "none") else f"{over / TARGET_MS:>9.0%}"
        print(f"{name:<10} {ms:>11.4f} {over:>+10.4f} {share:>10}")
    print(f"no-op stages add {median['no-op'] - median['none']:.4f} ms per request "
          f"({(median['no-op'] - median['none']) / TARGET_MS:.0%} of the 0.2 ms target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=64,
                        help="streamed pieces per request (default 64)")
    parser.add_argument("--requests", type=int, default=400, help="per round (default 400)")
    parser.add_argument("--rounds", type=int, default=5, help="default 5")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
