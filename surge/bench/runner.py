"""Load shapes: drive a :class:`RequestSender` closed-loop or open-loop and collect records.

Closed loop: ``concurrency`` workers, each sending its next request when its last one ends.
Open loop: requests leave at scheduled arrival times (Poisson or Gamma), whether or not earlier
ones have finished, optionally capped at ``max_concurrency`` in flight. Latency is timed from
when a request is actually sent; the delay between its scheduled and actual send is recorded
as ``schedule_lag`` so a generator that falls behind shows it instead of hiding it.

The generator also watches itself: its CPU use and its event loop's lateness are reported with
every run, with a warning when either suggests the generator, not the server, was the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import numpy as np

from surge.bench.client import Endpoint, RequestRecord, RequestSender, endpoint_url
from surge.bench.metrics import Slo, latency_stats, summarize, timeline
from surge.bench.profile import MidRunProfile
from surge.bench.workloads import (
    BenchRequest,
    DatasetSpec,
    LengthDist,
    arrival_offsets,
    build_dataset,
    load_tokenizer,
)

__all__ = ["BenchConfig", "LoadPoint", "run_benchmark", "run_benchmark_async"]

RESULT_FORMAT = "surge-bench/1"
DEFAULT_POOL_SIZE = 1000  # distinct requests cycled through in a --duration run
MAX_POOL_SIZE = 200_000  # about 3 s to build; beyond it prompts repeat (and are reported)
_CPU_WARN = 0.85  # fraction of one core
_MIN_WARN_DURATION_S = 1.0  # shorter runs are mostly start-up work
_LAG_WARN_S = 0.010  # a loaded shared machine shows a few ms even when idle


@dataclass
class BenchConfig:
    """Everything a run depends on; saved whole with its results."""

    url: str
    endpoint: str = "completions"
    model: str | None = None  # None: the first model listed by GET /v1/models
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = True
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    # Load: several values make a sweep; rates make it open-loop.
    concurrency: list[int] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_requests: int | None = 100
    duration: float | None = None
    warmup: int = 0
    # Dataset
    dataset: str = "random"
    dataset_path: str | None = None
    input_len: str = "128"
    output_len: str | None = None
    prompt_kind: str = "auto"
    prefix_len: int = 1024
    suffix_len: int = 32
    num_prefixes: int = 1
    vocab_size: int | None = None
    tokenizer: str | None = None
    image_size: int = 224
    seed: int = 0
    # Measurement
    slo: str | None = None
    request_timeout: float = 600.0
    # A torch.profiler trace of the server's engine, captured mid-way through the first
    # load point (surge.bench.profile; the server needs --enable-profiler).
    profile: str | None = None
    profile_steps: int = 20

    def __post_init__(self) -> None:
        endpoint_url(self.url, self.endpoint)  # validates both
        if self.concurrency and self.rate:
            raise ValueError("give --concurrency (closed loop) or --rate (open loop), not both; "
                             "cap an open loop's requests in flight with --max-concurrency")
        if self.num_requests is None and self.duration is None:
            raise ValueError("give --num-requests N or --duration SECONDS")
        _check_positive("num_requests", self.num_requests)
        _check_positive("duration", self.duration)
        _check_positive("max_concurrency", self.max_concurrency)
        if not 1 <= self.profile_steps <= 10_000:
            raise ValueError(f"--profile-steps must be in [1, 10000] (got {self.profile_steps})")
        for c in self.concurrency:
            _check_positive("concurrency", c)
        if any(math.isinf(r) for r in self.rate) and self.duration and not self.max_concurrency:
            raise ValueError("--rate inf with --duration would open requests without end: "
                             "add --max-concurrency N, or give --num-requests instead")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0 (got {self.warmup})")
        if Slo.parse(self.slo).ttft is not None and not self.streams:
            raise ValueError("a TTFT SLO needs a streamed generation endpoint; drop --no-stream")
        self.dataset_spec()  # validates lengths and prompt kind

    @property
    def streams(self) -> bool:
        return self.stream and self.endpoint in ("completions", "chat")

    def load_points(self) -> list[LoadPoint]:
        if self.rate:
            return [LoadPoint("open", rate=r, max_concurrency=self.max_concurrency,
                              burstiness=self.burstiness) for r in self.rate]
        return [LoadPoint("closed", concurrency=c) for c in self.concurrency or [1]]

    def resolved_prompt_kind(self) -> str:
        if self.prompt_kind != "auto":
            if self.prompt_kind not in ("ids", "text"):
                raise ValueError(f"--prompt-kind must be auto, ids or text "
                                 f"(got {self.prompt_kind!r})")
            return self.prompt_kind
        knows_vocab = self.vocab_size is not None or self.tokenizer is not None
        return "ids" if self.endpoint == "completions" and knows_vocab else "text"

    def dataset_spec(self) -> DatasetSpec:
        kind = self.resolved_prompt_kind()
        if kind == "ids" and not (self.vocab_size or self.tokenizer) and self.dataset in (
                "random", "shared-prefix"):
            raise ValueError("random token-id prompts need the vocabulary size: pass "
                             "--vocab-size (e.g. --vocab-size 49152) or --tokenizer DIR, "
                             "or use --prompt-kind text")
        if kind == "ids" and self.endpoint != "completions":
            raise ValueError(f"token-id prompts work with the completions endpoint only; "
                             f"the {self.endpoint} endpoint needs --prompt-kind text")
        return DatasetSpec(
            name=self.dataset, path=self.dataset_path,
            input_len=LengthDist.parse(self.input_len),
            output_len=LengthDist.parse(self.output_len) if self.output_len else None,
            prompt_kind=kind, prefix_len=self.prefix_len, suffix_len=self.suffix_len,
            num_prefixes=self.num_prefixes, vocab_size=self.vocab_size,
            chat=self.endpoint == "chat", classify=self.endpoint == "classify",
            image_size=self.image_size,
        )


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"--{name.replace('_', '-')} must be > 0 (got {value})")


@dataclass(frozen=True)
class LoadPoint:
    mode: str  # "closed" or "open"
    concurrency: int | None = None
    rate: float | None = None
    burstiness: float = 1.0
    max_concurrency: int | None = None

    @property
    def value(self) -> float:
        """The swept quantity: concurrency for a closed loop, request rate for an open one."""
        value = self.concurrency if self.mode == "closed" else self.rate
        return math.nan if value is None else float(value)

    def label(self) -> str:
        if self.mode == "closed":
            return f"concurrency {self.concurrency}"
        rate = "inf" if math.isinf(self.rate or 0) else f"{self.rate:g}"
        shape = "Poisson" if self.burstiness == 1 else f"Gamma b={self.burstiness:g}"
        cap = f", max {self.max_concurrency} in flight" if self.max_concurrency else ""
        return f"rate {rate} req/s ({shape}{cap})"


@dataclass
class PointResult:
    load: LoadPoint
    records: list[RequestRecord]
    duration: float
    generator: dict[str, Any]
    pool_size: int  # distinct requests the run drew from


Item = tuple[bytes, BenchRequest]
OnDone = Callable[[RequestRecord], None]


def run_benchmark(config: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Run every load point of ``config``; return the results as JSON-ready data."""
    return asyncio.run(run_benchmark_async(config, progress))


async def run_benchmark_async(config: BenchConfig, progress: bool = True) -> dict[str, Any]:
    tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer else None
    spec = config.dataset_spec()
    slo = Slo.parse(config.slo)
    async with _session(config) as session:
        model = config.model or await discover_model(session, config.url)
        endpoint = Endpoint(config.endpoint, model, config.stream, config.ignore_eos,
                            config.temperature, config.extra_body)
        sender = RequestSender(session, endpoint_url(config.url, config.endpoint), endpoint,
                               tokenizer)
        warmup = await _warm_up(config, sender, spec, tokenizer)
        results = []
        profile = MidRunProfile(session, config.url, config.profile, config.profile_steps,
                                config.num_requests, config.duration) \
            if config.profile else None
        for index, point in enumerate(config.load_points()):
            requests = build_dataset(spec, _pool_size(config, point),
                                     _rng(config.seed, index, 0), tokenizer)
            items = _items(endpoint, requests)
            results.append(await run_point(sender, items, point, config,
                                           _rng(config.seed, index, 1), progress,
                                           profile if index == 0 else None))
        profiled = await profile.finish() if profile is not None else None
    doc = _result_document(config, model, warmup, results, slo)
    if profiled is not None:
        doc["profile"] = profiled
    return doc


def _session(config: BenchConfig) -> aiohttp.ClientSession:
    headers = dict(config.headers)
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    # No connection limit: the load shape, not the pool, decides how many are in flight.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=config.request_timeout)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)


async def discover_model(session: aiohttp.ClientSession, url: str) -> str:
    models_url = endpoint_url(url, "completions").replace("/v1/completions", "/v1/models")
    try:
        async with session.get(models_url) as resp:
            resp.raise_for_status()
            return str((await resp.json())["data"][0]["id"])
    except (TimeoutError, aiohttp.ClientError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"could not list models at {models_url} ({exc}); "
                         "pass the model name, e.g. --model my-model") from None


def _rng(seed: int, point: int, purpose: int) -> np.random.Generator:
    """Independent streams per load point and purpose (0 prompts, 1 arrivals, 2 warm-up), so
    changing one never shifts another."""
    return np.random.default_rng([seed, point, purpose])


def _pool_size(config: BenchConfig, point: LoadPoint) -> int:
    """Distinct requests to build. A --duration run cycles through them, and a repeated
    prompt can be served from a prefix cache, so an open loop gets enough for its expected
    count; a closed loop's count is unknown in advance (repeats are reported)."""
    if config.num_requests:
        return config.num_requests
    if point.mode == "open" and point.rate and math.isfinite(point.rate):
        expected = point.rate * (config.duration or 0) * 1.2 + 100
        return max(DEFAULT_POOL_SIZE, min(math.ceil(expected), MAX_POOL_SIZE))
    return DEFAULT_POOL_SIZE


def _items(endpoint: Endpoint, requests: list[BenchRequest]) -> list[Item]:
    # Bodies are encoded before the clock starts, keeping JSON encoding off the hot path.
    return [(endpoint.body(r), r) for r in requests]


async def _warm_up(config: BenchConfig, sender: RequestSender, spec: DatasetSpec,
                   tokenizer: Any) -> dict[str, int]:
    """Requests sent before the first load point and left out of every statistic; their
    prompts are distinct from the measured ones so they cannot warm a prefix cache for them."""
    if not config.warmup:
        return {"requests": 0, "failed": 0}
    requests = build_dataset(spec, config.warmup, _rng(config.seed, 0, 2), tokenizer)
    points = config.load_points()
    concurrency = points[0].concurrency or points[0].max_concurrency or 16
    records = await _closed_loop(sender, iter(_items(sender.endpoint, requests)),
                                 min(concurrency, config.warmup), time.perf_counter(), None,
                                 lambda r: None)
    return {"requests": len(records), "failed": sum(not r.ok for r in records)}


async def run_point(sender: RequestSender, items: list[Item], point: LoadPoint,
                    config: BenchConfig, arrival_rng: np.random.Generator,
                    progress: bool, profile: MidRunProfile | None = None) -> PointResult:
    """One load point: the measured phase, timed from its first send to its last reply."""
    source = _request_stream(items, config)
    # The collector pause is outermost so its final collection is not billed to the run.
    with _no_full_gc(), _Progress(point, config, progress) as bar, _SelfMonitor() as monitor:
        if profile is not None:  # a mid-run capture rides on the progress callback
            bar.update = _also(bar.update, profile.on_record)  # type: ignore[method-assign]
            profile.start()
        start = time.perf_counter()
        if point.mode == "closed":
            records = await _closed_loop(sender, source, point.concurrency or 1, start,
                                         config.duration, bar.update)
        else:
            arrivals = arrival_offsets(point.rate or math.inf, point.burstiness, arrival_rng)
            records = await _open_loop(sender, source, arrivals, point.max_concurrency,
                                       start, config.duration, bar.update)
        duration = time.perf_counter() - start
    records.sort(key=lambda r: r.index)
    return PointResult(point, records, duration, monitor.report(records, duration, point),
                       len(items))


def _also(first: Callable[[RequestRecord], None],
          then: Callable[[RequestRecord], None]) -> Callable[[RequestRecord], None]:
    def both(record: RequestRecord) -> None:
        first(record)
        then(record)

    return both


@contextlib.contextmanager
def _no_full_gc() -> Iterator[None]:
    """Hold off full (generation 2) garbage collections while a load point runs.

    A full collection walks every live object, and a run keeps tens of thousands of records:
    measured here, it stalled the event loop for up to 56 ms at 2,000 req/s, which would show
    up as latency and schedule lag. Young collections still run, and aiohttp leaves little
    cyclic garbage for the old generation (about one object per three requests).
    """
    young, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, 1 << 30)
    try:
        yield
    finally:
        gc.set_threshold(young, middle, old)
        gc.collect()


def _request_stream(items: list[Item], config: BenchConfig) -> Iterator[Item]:
    if config.duration is None:
        return iter(items)
    stream = itertools.cycle(items)
    return itertools.islice(stream, config.num_requests) if config.num_requests else stream


async def _closed_loop(sender: RequestSender, source: Iterator[Item], concurrency: int,
                       start: float, duration: float | None, on_done: OnDone
                       ) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    numbering = itertools.count()
    deadline = math.inf if duration is None else start + duration

    async def worker() -> None:
        # All workers pull from one iterator; single-threaded asyncio makes that safe.
        for body, request in source:
            if time.perf_counter() >= deadline:
                return
            record = await sender.send(next(numbering), body, request, start)
            records.append(record)
            on_done(record)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def _open_loop(sender: RequestSender, source: Iterator[Item], arrivals: Iterator[float],
                     max_concurrency: int | None, start: float, duration: float | None,
                     on_done: OnDone) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    in_flight: set[asyncio.Task[None]] = set()
    seats = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def send(index: int, item: Item, offset: float) -> None:
        try:
            record = await sender.send(index, item[0], item[1], start)
        finally:
            if seats is not None:
                seats.release()
        record.schedule_lag = record.start - offset
        records.append(record)
        on_done(record)

    deadline = math.inf if duration is None else start + duration
    for index, (item, offset) in enumerate(zip(source, arrivals)):  # noqa: B905 - both unbounded
        if start + offset >= deadline:
            break
        # Always yield, even when late, so sends already due start before the next is made.
        await asyncio.sleep(max(start + offset - time.perf_counter(), 0.0))
        if seats is not None:
            # Waiting for a seat here, not in the task, keeps an infinite rate from piling up
            # unbounded waiting tasks; the wait still counts in the request's schedule lag.
            await seats.acquire()
        if time.perf_counter() >= deadline:
            if seats is not None:
                seats.release()
            break
        task = asyncio.create_task(send(index, item, offset))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    while in_flight:
        await asyncio.wait(set(in_flight))
    return records


class _SelfMonitor:
    """Measures the generator itself: CPU time used, and how late a 10 ms timer fires (a busy
    event loop delays every response it reads, inflating the latencies it reports)."""

    PERIOD_S = 0.01

    def __enter__(self) -> _SelfMonitor:
        self.cpu_start = time.process_time()
        self.lateness: list[float] = []
        self.task = asyncio.get_running_loop().create_task(self._watch())
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.cpu_start
        self.task.cancel()

    async def _watch(self) -> None:
        while True:
            due = time.perf_counter() + self.PERIOD_S
            await asyncio.sleep(self.PERIOD_S)
            self.lateness.append(time.perf_counter() - due)

    def report(self, records: list[RequestRecord], duration: float,
               point: LoadPoint) -> dict[str, Any]:
        lag = latency_stats(r.schedule_lag for r in records) if point.mode == "open" else None
        return {
            "cpu_seconds": self.cpu,
            "cpu_utilization": self.cpu / duration if duration > 0 else 0.0,
            "event_loop_lateness_s": latency_stats(self.lateness),
            "schedule_lag_s": lag,
            "warnings": self._warnings(duration, lag, point),
        }

    def _warnings(self, duration: float, lag: dict[str, Any] | None,
                  point: LoadPoint) -> list[str]:
        warnings = []
        utilization = self.cpu / duration if duration > 0 else 0.0
        if utilization > _CPU_WARN and duration >= _MIN_WARN_DURATION_S:
            warnings.append(f"the generator process was busy {utilization:.0%} of one core: it "
                            "may be the bottleneck (see benchmarks/bench_loadgen_ceiling.py)")
        late = latency_stats(self.lateness)["p99"]
        if late is not None and late > _LAG_WARN_S:
            warnings.append(f"the generator's event loop ran up to {late * 1e3:.1f} ms late (p99):"
                            " measured latencies include that much client-side delay")
        if lag and not point.max_concurrency and (lag["p99"] or 0) > _LAG_WARN_S:
            warnings.append(f"requests left up to {lag['p99'] * 1e3:.1f} ms (p99) after their "
                            "scheduled arrival: the generator could not keep up with the rate")
        return warnings


class _Progress:
    """A tqdm bar counting finished requests (and errors), or nothing when disabled."""

    def __init__(self, point: LoadPoint, config: BenchConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.total = config.num_requests if config.duration is None else None
        self.label = point.label()
        self.failed = 0

    def __enter__(self) -> _Progress:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.label, unit="req", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.25)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.close()

    def update(self, record: RequestRecord) -> None:
        if not self.enabled:
            return
        if not record.ok:
            self.failed += 1
            self.bar.set_postfix_str(f"errors={self.failed}", refresh=False)
        self.bar.update(1)


def _result_document(config: BenchConfig, model: str, warmup: dict[str, int],
                     points: list[PointResult], slo: Slo) -> dict[str, Any]:
    import msgspec

    return {
        "format": RESULT_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        # Secrets stay out of a file that gets shared: header values may hold tokens too.
        "config": {**asdict(config), "api_key": "***" if config.api_key else None,
                   "headers": dict.fromkeys(config.headers, "***"),
                   "model": model, "prompt_kind": config.resolved_prompt_kind()},
        "environment": _environment(),
        "warmup": warmup,
        "runs": [
            {
                "load": {**asdict(p.load), "label": p.load.label(),
                         "value": p.load.value if math.isfinite(p.load.value) else None},
                "summary": summarize(p.records, p.duration, slo),
                "timeline": timeline(p.records, p.duration),
                "generator": p.generator,
                "warnings": [*p.generator["warnings"], *_token_warnings(p.records),
                             *_repeat_warnings(p)],
                "records": msgspec.to_builtins(p.records),
            }
            for p in points
        ],
    }


def _repeat_warnings(point: PointResult) -> list[str]:
    if len(point.records) <= point.pool_size:
        return []
    return [f"{len(point.records)} requests cycled through {point.pool_size} distinct prompts: "
            "a server's prefix cache may have served repeats; give --num-requests N to build "
            "N distinct ones"]


def _token_warnings(records: list[RequestRecord]) -> list[str]:
    if any(r.token_source == "chunks" for r in records):
        return ["output tokens were counted as streamed chunks: the server sent no usage and "
                "no --tokenizer was given (a chunk may hold several tokens)"]
    return []


def _environment() -> dict[str, Any]:
    import os

    from surge import __version__

    return {
        "surge_version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "event_loop": type(asyncio.get_running_loop()).__module__,
        "clock": "time.perf_counter (monotonic)",
    }
