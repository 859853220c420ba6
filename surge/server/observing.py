"""What the generation endpoints tell the request's record (``surge.http.observe``): the
model, the token counts, and each engine request's timestamps, engine-side and as seen here.

Kept apart from ``completions.py`` so the endpoint code only gains one call per fact.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from surge.engine.protocol import EngineCoreOutput
from surge.http.logs import LOG_FORMATS
from surge.http.observe import EngineTimes, Observer, current_record, traces_url
from surge.server.stages import StageRun

__all__ = ["add_observability_args", "begin", "engine_times", "finish_times", "make_observer",
           "observability_settings", "prepared", "record_stage", "stamp"]

SERVICE_NAME = "surge-server"


def add_observability_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("observability")
    group.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                       help="json: every log line a JSON object, and one line per API request "
                            "(request id, tenant, model, status, token counts, timings; never "
                            "prompt text unless --log-prompts)")
    group.add_argument("--otlp-endpoint", type=_endpoint, default=None, metavar="URL",
                       help="export one OpenTelemetry trace per request over OTLP/HTTP to this "
                            "collector (e.g. http://127.0.0.1:4318); off by default")
    group.add_argument("--enable-profiler", action="store_true",
                       help="serve POST /debug/profile (behind the API key): a torch.profiler "
                            "Chrome trace of the engine's next steps")


def _endpoint(text: str) -> str:
    try:
        traces_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def observability_settings(args: argparse.Namespace) -> dict[str, Any]:
    """ServerSettings fields from the flags (absent flags: everything off)."""
    return {"log_format": getattr(args, "log_format", "text"),
            "otlp_endpoint": getattr(args, "otlp_endpoint", None),
            "enable_profiler": getattr(args, "enable_profiler", False)}


def make_observer(log_format: str, log_prompts: bool, otlp_endpoint: str | None) -> Observer:
    """The server's observer; OpenTelemetry is imported only when ``otlp_endpoint`` is set."""
    tracing = None
    if otlp_endpoint:
        from surge.http.tracing import Tracing

        tracing = Tracing(otlp_endpoint, SERVICE_NAME)
    return Observer(json_logs=log_format == "json", log_prompts=log_prompts, tracing=tracing)


def begin(model: str, stream: bool) -> None:
    """The route's own code starts: the gate (auth, body, validation) is behind it."""
    record = current_record()
    if record is not None:
        record.mark_handler()
        record.set(model=model, stream=stream)


def prepared(request_id: str, prompts: Sequence[Sequence[int]], tenant: str | None,
             shown_prompts: Any = None) -> None:
    """The request passed admission under ``request_id``; ``shown_prompts`` only with
    --log-prompts (the observer still leaves them out unless told to log prompts)."""
    record = current_record()
    if record is None:
        return
    record.request_id = request_id
    record.set(prompt_tokens=sum(len(ids) for ids in prompts))
    if tenant is not None:
        record.set(tenant=tenant)
    if shown_prompts is not None:
        record.set(prompt=shown_prompts)


def record_stage(run: StageRun) -> None:
    """A stage's run becomes a ``stage:<name>`` span of the current request (a context
    observer: stages report in the request's own tasks). Stages time themselves on the wall
    clock; records use the monotonic one."""
    record = current_record()
    if record is None:
        return
    offset = time.time() - time.monotonic()
    record.add_span(f"stage:{run.stage}", run.start_ns / 1e9 - offset,
                    run.end_ns / 1e9 - offset, kind=run.kind, decision=run.decision,
                    busy_seconds=round(run.duration_s, 6), error=run.error)


def engine_times(index: int, num_prompt_tokens: int) -> EngineTimes | None:
    """A new engine request's times, sent now; None outside an observed request."""
    record = current_record()
    if record is None:
        return None
    times = EngineTimes(index, time.monotonic(), num_prompt_tokens=num_prompt_tokens)
    record.add_engine(times)
    return times


def stamp(times: EngineTimes | None, update: EngineCoreOutput, received: float) -> None:
    """One engine update arrived at ``received`` and was just detokenized."""
    if times is None:
        return
    now = time.monotonic()
    if times.first_received is None and update.new_token_ids:
        times.first_received = received
    times.last_received = received
    times.scheduled = times.scheduled or update.first_scheduled_time
    if times.detokenize_first is None:
        times.detokenize_first = received
    times.detokenize_last = now
    times.detokenize_seconds += now - received
    timings = update.timings
    if timings is not None:
        times.queued, times.scheduled = timings.queued, timings.scheduled
        times.first_token, times.finished = timings.first_token, timings.finished
        times.num_preemptions = timings.num_preemptions


def finish_times(times: EngineTimes | None, finish_reason: str | None, num_output_tokens: int,
                 output_text: str | None = None) -> None:
    """The engine request is over; ``output_text`` only with --log-prompts."""
    if times is None:
        return
    times.finish_reason = finish_reason
    times.num_output_tokens = num_output_tokens
    record = current_record()
    if record is None:
        return
    record.set(completion_tokens=sum(e.num_output_tokens for e in record.engine))
    reasons = [e.finish_reason for e in record.engine]
    record.set(finish_reason=reasons[0] if len(reasons) == 1 else reasons)
    if output_text is not None:
        outputs = record.fields.setdefault("output", [])
        outputs.append(output_text)
