"""The response cache on an FAQ workload (issue 17): no cache, the exact cache, exact plus
semantic, each a real `surge serve` (SmolLM2-135M-Instruct by default).

The workload asks ``--requests`` questions drawn from a small FAQ (most repeat, some as
paraphrases), greedy, ``--concurrency`` at a time. Per configuration it reports latency
p50/p99, requests/s, and how requests were answered (X-Surge-Cache). It also reports an exact
hit's latency against a full generation, and the semantic tier's precision on labelled
question pairs (paraphrase or not) at the threshold: the share of semantic hits that were
wrong, and the share of true paraphrases caught.

    python benchmarks/bench_cache.py                        # SmolLM2, ~5 min
    python benchmarks/bench_cache.py --quick                # tiny random model, a smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

# (question, paraphrases): the FAQ of a programming tutor.
FAQ: list[tuple[str, list[str]]] = [
    ("How do I reverse a list in Python?", ["How can I reverse a Python list?"]),
    ("What is a closure in JavaScript?", ["Explain JavaScript closures."]),
    ("How do I read a file line by line in Python?",
     ["How can I read a file one line at a time in Python?"]),
    ("What is the difference between a list and a tuple in Python?",
     ["How do Python lists differ from tuples?"]),
    ("How do I remove duplicates from a list in Python?",
     ["How can I deduplicate a Python list?"]),
    ("What does the yield keyword do in Python?", ["What is yield used for in Python?"]),
    ("How do I merge two dictionaries in Python?", ["How can I combine two Python dicts?"]),
    ("What is a pointer in C?", ["Explain pointers in the C language."]),
    ("How do I undo the last git commit?", ["How can I revert my most recent git commit?"]),
    ("What is recursion?", ["Explain what recursion is."]),
    ("How do I center a div in CSS?", ["How can I center a div with CSS?"]),
    ("What is Big O notation?", ["Explain Big O notation."]),
]
# Close in words, different in meaning: a semantic hit on one of these is a wrong answer.
NEGATIVES: list[tuple[str, str]] = [
    ("How do I reverse a list in Python?", "How do I reverse a string in Python?"),
    ("How do I sort a list in Python?", "How do I sort a list in Java?"),
    ("What is a closure in JavaScript?", "What is a promise in JavaScript?"),
    ("How do I read a file line by line in Python?", "How do I write a file in Python?"),
    ("How do I merge two dictionaries in Python?", "How do I merge two lists in Python?"),
    ("What is a pointer in C?", "What is a reference in C++?"),
    ("How do I undo the last git commit?", "How do I amend the last git commit?"),
    ("How do I center a div in CSS?", "How do I hide a div in CSS?"),
    ("What is the difference between a list and a tuple in Python?",
     "What is the difference between a list and a set in Python?"),
    ("What does the yield keyword do in Python?", "What does the return keyword do in Python?"),
]
# More labelled pairs for the semantic tier's precision (not asked in the workload): the
# paraphrases say the same thing in other words; the near misses share most words and differ
# in the one that decides the answer (language, operation, object).
MORE_PARAPHRASES: list[tuple[str, str]] = [
    ("How do I sort a list in Python?", "How can I sort a Python list?"),
    ("How do I install a package with pip?", "How can I install a Python package using pip?"),
    ("What is a REST API?", "Explain what a REST API is."),
    ("How do I create a virtual environment in Python?",
     "How can I make a Python virtual environment?"),
    ("What is the difference between TCP and UDP?", "How does TCP differ from UDP?"),
    ("How do I check the length of a string in Python?",
     "How can I get the length of a Python string?"),
    ("What is a race condition?", "Explain what a race condition is."),
    ("How do I convert a string to an integer in Python?",
     "How can I turn a string into an int in Python?"),
    ("How do I delete a branch in git?", "How can I remove a git branch?"),
    ("What is a hash table?", "Explain hash tables."),
    ("How do I make an HTTP request in Python?", "How can I send an HTTP request with Python?"),
    ("What is a deadlock?", "Explain what a deadlock is."),
    ("How do I find the maximum value in a list in Python?",
     "How can I get the largest element of a Python list?"),
    ("What is dependency injection?", "Explain dependency injection."),
    ("How do I parse JSON in JavaScript?", "How can I parse a JSON string in JavaScript?"),
    ("What is a Docker container?", "Explain what a Docker container is."),
    ("How do I rename a file in Linux?", "How can I rename a file on Linux?"),
    ("What is polymorphism in object-oriented programming?",
     "Explain polymorphism in OOP."),
]
NEAR_MISSES: list[tuple[str, str]] = [
    ("How do I install a package with pip?", "How do I uninstall a package with pip?"),
    ("What is the difference between TCP and UDP?",
     "What is the difference between HTTP and HTTPS?"),
    ("How do I convert a string to an integer in Python?",
     "How do I convert an integer to a string in Python?"),
    ("How do I delete a branch in git?", "How do I create a branch in git?"),
    ("How do I make an HTTP request in Python?", "How do I make an HTTP request in Go?"),
    ("How do I find the maximum value in a list in Python?",
     "How do I find the minimum value in a list in Python?"),
    ("How do I parse JSON in JavaScript?", "How do I parse XML in JavaScript?"),
    ("How do I rename a file in Linux?", "How do I delete a file in Linux?"),
    ("What is a deadlock?", "What is a memory leak?"),
    ("How do I check the length of a string in Python?",
     "How do I check the type of a variable in Python?"),
    ("How do I create a virtual environment in Python?",
     "How do I delete a virtual environment in Python?"),
    ("What is a hash table?", "What is a binary tree?"),
    ("How do I sort a list in Python?", "How do I shuffle a list in Python?"),
    ("How do I center a div in CSS?", "How do I center text in CSS?"),
    ("How do I undo the last git commit?", "How do I view the last git commit?"),
    ("How do I reverse a list in Python?", "How do I copy a list in Python?"),
    ("What is a closure in JavaScript?", "What is a closure in Python?"),
    ("What is a Docker container?", "What is a Docker volume?"),
    ("How do I read a file line by line in Python?",
     "How do I read a file line by line in Java?"),
    ("What is recursion?", "What is iteration?"),
]
# Word order (added with the role guard, surge.cache.semantic.roles_swapped): paraphrases
# that move a phrase or say "to ... from" for "from ... to", and near misses that swap what
# stands on either side of "to", "from" or "than". Mean pooling scores both kinds alike.
ORDER_PARAPHRASES: list[tuple[str, str]] = [
    ("How do I reverse a list in Python?", "In Python, how do I reverse a list?"),
    ("How do I migrate from MySQL to PostgreSQL?",
     "How do I move my data to PostgreSQL from MySQL?"),
    ("How do I convert a list to a string in Python?",
     "In Python, how can I turn a list into a string?"),
    ("What is the difference between TCP and UDP?",
     "What is the difference between UDP and TCP?"),
    ("How do I push a commit to a remote branch in git?",
     "In git, how do I push my commit to the remote branch?"),
    ("How do I copy a file from one directory to another in Linux?",
     "In Linux, how do I copy a file to another directory?"),
]
ORDER_NEAR_MISSES: list[tuple[str, str]] = [
    ("How do I convert Celsius to Fahrenheit in Python?",
     "How do I convert Fahrenheit to Celsius in Python?"),
    ("Is Python faster than Java?", "Is Java faster than Python?"),
    ("How do I copy a file from my laptop to a server?",
     "How do I copy a file from a server to my laptop?"),
    ("How do I migrate from MySQL to PostgreSQL?", "How do I migrate from PostgreSQL to MySQL?"),
    ("How do I convert a list to a dictionary in Python?",
     "How do I convert a dictionary to a list in Python?"),
    ("How do I cast a float to an int in C?", "How do I cast an int to a float in C?"),
]
HIT_LATENCY_REQUESTS = 200
# Answers are cut at --max-tokens (a tutor's answers run longer): kept on purpose here.
CONFIGS = {"no cache": [], "exact": ["--response-cache", "--response-cache-keep-length"],
           "exact + semantic": ["--semantic-cache", "--response-cache-keep-length",
                                "--extra-model", "all-minilm-l6-v2"]}
_LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")


def main() -> None:
    args = parse_args()
    if args.precision_only:
        print(json.dumps(semantic_precision(args.threshold), indent=2))
        return
    rng = random.Random(args.seed)
    workload = build_workload(rng, args.requests, args.paraphrase_share)
    report: dict[str, Any] = {"requests": len(workload), "concurrency": args.concurrency,
                              "max_tokens": args.max_tokens, "configs": {}}
    for name, flags in CONFIGS.items():
        with serving(args, flags) as url:
            report["configs"][name] = asyncio.run(run_workload(url, workload, args))
            if name == "exact":
                report["exact_hit_alone"] = asyncio.run(hit_latency(url, workload[0], args))
        print(f"{name}: {json.dumps(report['configs'][name])}", flush=True)
    report["semantic_precision"] = semantic_precision(args.threshold)
    print(json.dumps(report["semantic_precision"]), flush=True)
    alone = report["exact_hit_alone"]
    print(f"exact hit alone: p50 {alone['hit_p50_ms']:.2f} ms, p99 {alone['hit_p99_ms']:.2f} ms "
          f"(target p50 < 2 ms) against a full generation of {alone['miss_ms']:.0f} ms")
    base = report["configs"]["no cache"]["requests_per_second"]
    report["speedup_exact"] = report["configs"]["exact"]["requests_per_second"] / base
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"exact cache throughput: {report['speedup_exact']:.1f}x; written {args.out}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke: a tiny random-weight model, 40 requests")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--paraphrase-share", type=float, default=0.2)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--precision-only", action="store_true",
                        help="only the semantic tier's precision on the labelled pairs "
                             "(needs no LLM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_cache.json")
    args = parser.parse_args()
    if args.quick:
        args.requests = min(args.requests, 40)
        if args.model is None:
            from surge.testing.make_model import write_checkpoint

            root = Path(tempfile.mkdtemp(prefix="bench_cache_"))
            args.model = str(write_checkpoint("tiny-llama", root / "tiny-llama", seed=0))
    return args


def build_workload(rng: random.Random, count: int, paraphrase_share: float) -> list[str]:
    """Questions with a skewed popularity (a few are asked most), some paraphrased."""
    weights = [1 / (rank + 1) for rank in range(len(FAQ))]
    questions = []
    for _ in range(count):
        question, paraphrases = rng.choices(FAQ, weights)[0]
        questions.append(rng.choice(paraphrases) if rng.random() < paraphrase_share
                         else question)
    return questions


class serving:
    """`surge serve` with ``flags`` on a free port, for the ``with`` block."""

    def __init__(self, args: argparse.Namespace, flags: list[str]) -> None:
        self.command = [sys.executable, "-m", "surge.cli", "serve", "--port", "0",
                        *(["--model", args.model] if args.model else []), *flags]

    def __enter__(self) -> str:
        self.log = tempfile.NamedTemporaryFile(prefix="bench_cache_", suffix=".log",
                                               delete=False)
        self.process = subprocess.Popen(self.command, stdout=self.log,
                                        stderr=subprocess.STDOUT, env=os.environ.copy())
        url = f"http://127.0.0.1:{self._port()}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"no /health 200: see {self.log.name}")

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)

    def _port(self) -> int:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            match = _LISTENING.search(Path(self.log.name).read_bytes())
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"the server never listened: see {self.log.name}")


async def run_workload(url: str, questions: list[str], args: argparse.Namespace
                       ) -> dict[str, Any]:
    latencies: list[float] = []
    by_status: dict[str, list[float]] = {}
    pending = list(enumerate(questions))

    async def worker(client: httpx.AsyncClient) -> None:
        while pending:
            _, question = pending.pop(0)
            body = {"messages": [{"role": "user", "content": question}], "temperature": 0,
                    "max_tokens": args.max_tokens}
            started = time.perf_counter()
            response = await client.post(url + "/v1/chat/completions", json=body)
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            latencies.append(elapsed)
            by_status.setdefault(response.headers.get("x-surge-cache", "none"),
                                 []).append(elapsed)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    wall = time.perf_counter() - started
    return {"requests_per_second": len(latencies) / wall,
            "latency_p50_ms": 1000 * _quantile(latencies, 0.5),
            "latency_p99_ms": 1000 * _quantile(latencies, 0.99),
            "answered": dict(Counter({k: len(v) for k, v in by_status.items()})),
            "p50_ms_by_answer": {k: 1000 * statistics.median(v) for k, v in by_status.items()}}


async def hit_latency(url: str, question: str, args: argparse.Namespace) -> dict[str, float]:
    """One client, one request at a time: an exact hit's latency through HTTP with nothing
    else queued, against the same question's full generation (a fresh ``user`` scope misses)."""
    body = {"messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": args.max_tokens, "user": "hit-latency"}
    async with httpx.AsyncClient(timeout=300) as client:
        started = time.perf_counter()
        miss = await client.post(url + "/v1/chat/completions", json=body)
        miss_seconds = time.perf_counter() - started
        assert miss.headers.get("x-surge-cache") == "miss", miss.headers
        latencies = []
        for _ in range(HIT_LATENCY_REQUESTS):
            started = time.perf_counter()
            response = await client.post(url + "/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - started)
            assert response.headers.get("x-surge-cache") == "hit", response.headers
    return {"hit_p50_ms": 1000 * _quantile(latencies, 0.5),
            "hit_p99_ms": 1000 * _quantile(latencies, 0.99), "miss_ms": 1000 * miss_seconds}


def semantic_precision(threshold: float) -> dict[str, Any]:
    """Each labelled pair's similarity by the default embedding model, and whether the role
    guard refuses it; a pair is matched when it is at or above the threshold and not refused.
    The curve is given with the guard and without it."""
    from surge.cache.semantic import roles_swapped, unit
    from surge.hub import resolve_model
    from surge.models.pooling_models import TextEmbedder

    embedder = TextEmbedder(resolve_model("all-minilm-l6-v2"))

    def scored(pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        vectors = embedder.embed_batch(embedder.tokenize([text for pair in pairs
                                                          for text in pair]))
        return [(float(unit(vectors[2 * i]) @ unit(vectors[2 * i + 1])), roles_swapped(a, b))
                for i, (a, b) in enumerate(pairs)]

    positives = scored([(q, p) for q, paraphrases in FAQ for p in paraphrases]
                       + MORE_PARAPHRASES + ORDER_PARAPHRASES)
    negatives = scored(NEGATIVES + NEAR_MISSES + ORDER_NEAR_MISSES)

    def matched(pairs: list[tuple[float, bool]], t: float, guard: bool = True) -> int:
        return sum(s >= t and not (guard and swapped) for s, swapped in pairs)

    caught, wrong = matched(positives, threshold), matched(negatives, threshold)
    unguarded = matched(negatives, threshold, guard=False)
    curve = {f"{t:.2f}": {
        "paraphrases_caught": matched(positives, t) / len(positives),
        "wrong_pairs_matched": matched(negatives, t) / len(negatives),
        "without_guard": {"paraphrases_caught": matched(positives, t, False) / len(positives),
                          "wrong_pairs_matched": matched(negatives, t, False) / len(negatives)},
    } for t in np.arange(0.80, 0.99, 0.02)}
    return {"threshold": threshold, "pairs": {"paraphrases": len(positives),
                                              "near_misses": len(negatives)},
            "paraphrases_caught": caught / len(positives),
            "wrong_hit_share": wrong / max(caught + wrong, 1),
            "wrong_hit_share_without_guard": unguarded / max(
                matched(positives, threshold, False) + unguarded, 1),
            "curve": curve}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


if __name__ == "__main__":
    main()
