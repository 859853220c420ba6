"""Statistics over request records: throughput, latency percentiles, errors, goodput, timeline.

Definitions (per request, successful requests only):
  TTFT  time from sending the request to the first streamed chunk that carries text
  TPOT  (e2e - ttft) / (output_tokens - 1), for requests with at least 2 output tokens
  ITL   every gap between successive text-carrying chunks, pooled over all requests
  E2E   time from sending the request to its last byte
Goodput is the rate of requests that succeed and meet every SLO given.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from surge.bench.client import RequestRecord

__all__ = ["PERCENTILES", "Slo", "latency_stats", "summarize", "timeline"]

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")

_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_SLO_ITEM = re.compile(r"^\s*(\w+)\s*[=:]\s*([0-9.]+(?:e-?\d+)?)\s*(s|ms|us)?\s*$")


@dataclass(frozen=True)
class Slo:
    """Service-level objectives, in seconds. ``itl`` bounds a request's longest gap."""

    ttft: float | None = None
    tpot: float | None = None
    itl: float | None = None
    e2e: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> Slo:
        """``"ttft=2s,tpot=100ms"``; metrics ttft, tpot, itl, e2e; units s, ms, us."""
        if not text:
            return cls()
        limits: dict[str, float] = {}
        for item in text.split(","):
            match = _SLO_ITEM.match(item)
            if not match or match.group(1) not in LATENCY_METRICS or not match.group(3):
                raise ValueError(f"bad SLO {item.strip()!r}: write METRIC=VALUE+UNIT with METRIC "
                                 "in ttft, tpot, itl, e2e and UNIT in s, ms, us, "
                                 "e.g. --slo ttft=2s,tpot=100ms")
            name, value, unit = match.groups()
            limits[name] = float(value) * _UNITS[unit]
        return cls(**limits)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def met_by(self, record: RequestRecord) -> bool:
        if not record.ok:
            return False
        checks = (
            (self.ttft, record.ttft),
            (self.tpot, record.tpot),
            (self.itl, max(record.itl, default=None)),
            (self.e2e, record.e2e),
        )
        # A metric a request does not have (TPOT of a 1-token reply) cannot violate its SLO;
        # TTFT of a non-streamed reply is refused earlier, when the config is checked.
        return all(limit is None or value is None or value <= limit for limit, value in checks)


def latency_stats(values: Iterable[float]) -> dict[str, float | int | None]:
    """mean, std, min, p50, p90, p99, max of ``values`` (all None when there are none)."""
    array = np.fromiter(values, dtype=np.float64)
    names = ["mean", "std", "min", *(f"p{p}" for p in PERCENTILES), "max"]
    if array.size == 0:
        return {"count": 0, **dict.fromkeys(names)}
    percentiles = np.percentile(array, PERCENTILES)
    numbers = [array.mean(), array.std(), array.min(), *percentiles, array.max()]
    return {"count": int(array.size), **{n: float(v) for n, v in zip(names, numbers, strict=True)}}


def summarize(records: Sequence[RequestRecord], duration: float, slo: Slo) -> dict[str, Any]:
    """Everything a run reports, as plain JSON-ready data."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    per_s = 1.0 / duration if duration > 0 else 0.0
    return {
        "duration_s": duration,
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "request_throughput": len(ok) * per_s,
        "input_token_throughput": input_tokens * per_s,
        "output_token_throughput": output_tokens * per_s,
        "total_token_throughput": (input_tokens + output_tokens) * per_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "latency": _latencies(ok),
        "errors": _errors(failed),
        "goodput": _goodput(records, slo, per_s),
        "token_source": dict(Counter(r.token_source for r in ok)),
    }


def _latencies(ok: Sequence[RequestRecord]) -> dict[str, dict[str, Any]]:
    return {
        "ttft": latency_stats(r.ttft for r in ok if r.ttft is not None),
        "tpot": latency_stats(t for r in ok if (t := r.tpot) is not None),
        "itl": latency_stats(gap for r in ok for gap in r.itl),
        "e2e": latency_stats(r.e2e for r in ok),
    }


def _errors(failed: Sequence[RequestRecord]) -> dict[str, Any]:
    by_status = Counter(str(r.status) if r.status else "no_response" for r in failed)
    by_type = Counter(r.error_type or "unknown" for r in failed)
    examples: dict[str, str] = {}
    for r in failed:  # one message per type, so a run's JSON says what went wrong
        examples.setdefault(r.error_type or "unknown", r.error or "")
    return {"by_status": dict(by_status), "by_type": dict(by_type), "examples": examples}


def _goodput(records: Sequence[RequestRecord], slo: Slo, per_s: float) -> dict[str, Any] | None:
    if not slo.as_dict():
        return None
    good = sum(slo.met_by(r) for r in records)
    return {
        "slo": slo.as_dict(),
        "good": good,
        "requests_per_s": good * per_s,
        "fraction": good / len(records) if records else 0.0,
    }


def timeline(records: Sequence[RequestRecord], duration: float) -> dict[str, list[int]]:
    """Per second of the run: requests started, completed and failed, and output tokens.

    A streamed request's tokens are spread over the seconds its chunks arrived in (each chunk
    weighs output_tokens / chunks), so a long stream shows as steady output, not one spike.
    """
    seconds = max(1, math.ceil(duration))
    started = np.zeros(seconds, dtype=np.int64)
    completed = np.zeros(seconds, dtype=np.int64)
    failed = np.zeros(seconds, dtype=np.int64)
    tokens = np.zeros(seconds, dtype=np.float64)
    for r in records:
        started[_bucket(r.start, seconds)] += 1
        end = _bucket(r.start + r.e2e, seconds)
        if not r.ok:
            failed[end] += 1
            continue
        completed[end] += 1
        _add_tokens(tokens, r, seconds)
    return {
        "second": list(range(seconds)),
        "started": started.tolist(),
        "completed": completed.tolist(),
        "failed": failed.tolist(),
        "output_tokens": np.rint(tokens).astype(np.int64).tolist(),
    }


def _add_tokens(tokens: np.ndarray, r: RequestRecord, seconds: int) -> None:
    if r.ttft is None or r.output_tokens == 0:
        tokens[_bucket(r.start + r.e2e, seconds)] += r.output_tokens
        return
    chunk_times = r.start + r.ttft + np.concatenate(([0.0], np.cumsum(r.itl)))
    buckets = np.clip(chunk_times.astype(np.int64), 0, seconds - 1)
    np.add.at(tokens, buckets, r.output_tokens / len(chunk_times))


def _bucket(t: float, seconds: int) -> int:
    return min(max(int(t), 0), seconds - 1)
