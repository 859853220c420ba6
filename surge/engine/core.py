"""Engine core: scheduler + KV cache + model runner, stepping token ids forward.

It knows nothing of text. ``step()`` runs one scheduled batch and reports, per request, the
tokens it gained and whether it finished. The same object serves the offline ``LLM`` in
process and, later, the engine process behind the HTTP server.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait

import torch

from surge.config import EngineConfig
from surge.engine.compiled_decode import cpp_compiler
from surge.engine.kv_cache import BlockManager
from surge.engine.memory import bound_kernel_caches
from surge.engine.profiler import StepProfiler
from surge.engine.protocol import (
    AddRequest,
    EngineCoreOutput,
    EngineStats,
    ProfileResult,
    RequestTimings,
    StartProfile,
)
from surge.engine.request import FinishReason, Request
from surge.engine.runner import ModelRunner
from surge.engine.sampler import SampleResult
from surge.engine.scheduler import SchedulerOutput, make_scheduler
from surge.engine.step_stats import StepStats
from surge.engine.structured import GrammarState, StructuredOutputs
from surge.models.attention import kv_bytes_per_token, kv_cache_torch_dtype
from surge.models.loader import LoadedModel, load_model
from surge.tokenizer import eos_token_ids, load_tokenizer

__all__ = ["EngineCore", "EngineCoreOutput", "plan_num_blocks"]

logger = logging.getLogger(__name__)

# On CPU the cache competes with everything else in RAM and is zeroed at start-up; cap the
# default at 2 GiB (about 90k tokens of a 135M model) unless the user sizes it explicitly.
_CPU_DEFAULT_CAP_BYTES = 2 << 30
# How long an idle step waits for a grammar compile before returning to the loop (which then
# checks for new commands): long enough not to spin, short enough to stay responsive.
_GRAMMAR_WAIT_SECONDS = 0.01
# Tenant names come from users (API key ids, the `user` field): keep them short.
MAX_TENANT_CHARS = 256


class EngineCore:
    def __init__(self, config: EngineConfig, model_dir: str):
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        bound_kernel_caches()  # before the model loads: the first kernel reads the bounds
        self.loaded: LoadedModel = load_model(
            model_dir, config.dtype, config.device, config.allow_pickle, config.max_model_len,
            quantization=config.quantization,
            quantization_group_size=config.quantization_group_size,
            quantize_lm_head=config.quantize_lm_head)
        model_config = self.loaded.config
        self.max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings)
        self.eos_token_ids = frozenset(model_config.eos_token_ids) | eos_token_ids(model_dir)
        num_blocks = plan_num_blocks(config, self.loaded, self.max_model_len)
        # CUDA graphs' and compiled steps' padding rows write to one extra block: it comes
        # out of the budget.
        cuda_graphs = (self.loaded.device.type == "cuda" and not config.enforce_eager
                       and num_blocks > 1)
        compile_max_batch = (_compile_max_batch(config, self.loaded.device)
                             if num_blocks > 1 else 0)
        num_blocks -= cuda_graphs or compile_max_batch > 0
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = make_scheduler(
            config.scheduling_policy, self.block_manager, config.max_num_seqs,
            config.max_num_batched_tokens or _default_token_budget(self.loaded.device),
            tenant_weights=config.tenant_weights, fair_burst_tokens=config.fair_burst_tokens)
        self.runner = ModelRunner(self.loaded, num_blocks, config.block_size, config.seed,
                                  config.kv_cache_dtype, self.max_model_len,
                                  cuda_graphs=cuda_graphs,
                                  compile_max_batch=compile_max_batch)
        self.num_steps = 0
        self.step_stats = StepStats()  # per-phase step times, for the breakdown metric
        self.profiler: StepProfiler | None = None  # POST /debug/profile, while it records
        self._model_dir = model_dir
        # Structured-output requests whose grammar is still compiling: kept out of the
        # scheduler until it is ready, so they never hold a seat or stall a step.
        self._awaiting_grammar: dict[str, tuple[Request, Future[GrammarState]]] = {}
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB, %s) on %s", num_blocks,
                    config.block_size, self.runner.kv_cache_bytes / 2**20,
                    str(self.runner.kv_cache_dtype).removeprefix("torch."), self.loaded.device)

    @property
    def vocab_size(self) -> int:
        return self.loaded.config.vocab_size

    def add_request(self, command: AddRequest) -> None:
        """Validate against the loaded model and queue; bad input raises ValueError naming
        the field and the allowed range, and changes nothing."""
        ids = command.prompt_token_ids
        if not ids:
            raise ValueError("prompt is empty: allowed is at least 1 token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the model's context is {self.max_model_len}:"
                f" allowed is at most {self.max_model_len - 1} prompt tokens, leaving room for "
                "at least one output token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are unknown: allowed is "
                             f"[0, {self.vocab_size - 1}]")
        if isinstance(command.priority, bool) or not isinstance(command.priority, int):
            raise ValueError(f"priority={command.priority!r} is invalid: allowed is an integer")
        _check_tenant(command.tenant)
        arrival = {"arrival_time": command.arrival_time} if command.arrival_time else {}
        request = Request(
            command.request_id, list(ids), command.params, self.eos_token_ids,
            max_model_len=self.max_model_len, priority=command.priority,
            tenant=command.tenant, **arrival)
        spec = command.params.structured_outputs
        if spec is None:
            self.scheduler.add_request(request)
            return
        if (command.request_id in self._awaiting_grammar
                or command.request_id in self.scheduler.requests):
            raise ValueError(f"request_id={command.request_id!r} is already in the engine")
        self._awaiting_grammar[command.request_id] = (
            request, self._structured_outputs().compile(spec))

    def _structured_outputs(self) -> StructuredOutputs:
        """The grammar engine, created with the first constrained request: its tokenizer
        index is built once per engine, on the compile thread."""
        if self.runner.structured is None:
            tokenizer = load_tokenizer(self._model_dir).tokenizer
            self.runner.structured = StructuredOutputs(
                tokenizer.to_str(), self.vocab_size, self.eos_token_ids,
                overlap=_has_spare_core(self.loaded.device))
        return self.runner.structured

    def _admit_compiled(self) -> list[EngineCoreOutput]:
        """Move requests whose grammar compiled into the scheduler; fail those whose
        grammar did not (that request only)."""
        failed = []
        for request_id, (request, compiled) in list(self._awaiting_grammar.items()):
            if not compiled.done():
                continue
            del self._awaiting_grammar[request_id]
            error = compiled.exception()
            if error is not None:
                logger.warning("request %s: %s", request_id, error)
                failed.append(EngineCoreOutput(request_id, [], finish_reason=FinishReason.ABORT,
                                               error=str(error)))
                continue
            request.grammar = compiled.result()
            self.scheduler.add_request(request)
        return failed

    def _wait_for_grammars(self) -> None:
        pending = [compiled for _, compiled in self._awaiting_grammar.values()]
        if pending:
            wait(pending, timeout=_GRAMMAR_WAIT_SECONDS, return_when=FIRST_COMPLETED)

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        aborted = [r.request_id for r in
                   self.scheduler.finish_requests(request_ids, FinishReason.ABORT)]
        aborted += [rid for rid in request_ids if self._awaiting_grammar.pop(rid, None)]
        return [EngineCoreOutput(rid, [], finish_reason=FinishReason.ABORT) for rid in aborted]

    def finish_request(self, request_id: str, reason: FinishReason,
                       stop_reason: int | str | None) -> None:
        self._awaiting_grammar.pop(request_id, None)
        self.scheduler.finish_requests([request_id], reason, stop_reason)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._awaiting_grammar)

    def stats(self) -> EngineStats:
        kv = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting + len(self._awaiting_grammar),
            kv_cache_usage=kv.usage, num_blocks=kv.num_blocks,
            prefix_cache_queries=kv.prefix_cache_queries, prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions, num_steps=self.num_steps,
            tenants=self.scheduler.tenant_stats(),
            step_breakdown=self.step_stats.snapshot())

    def set_tenant_weights(self, weights: dict[str, float]) -> None:
        """Replace the fair policy's tenant weights (e.g. on a config reload)."""
        self.scheduler.set_tenant_weights(weights)

    def start_profile(self, command: StartProfile) -> ProfileResult | None:
        """Start recording steps; a ProfileResult with the error when one already runs."""
        if self.profiler is not None:
            return ProfileResult(b"", 0, "a profile is already being recorded: allowed is one "
                                        "at a time")
        self.profiler = StepProfiler(command.num_steps, command.max_seconds)
        return None

    def take_profile(self) -> ProfileResult | None:
        """The profile, once its steps are recorded or its time is up; None meanwhile."""
        if self.profiler is None or not self.profiler.done:
            return None
        profiler, self.profiler = self.profiler, None
        return profiler.result()

    def step(self) -> list[EngineCoreOutput]:
        if self.profiler is not None and not self.profiler.done:
            with self.profiler.step():
                return self._step()
        return self._step()

    def _step(self) -> list[EngineCoreOutput]:
        outputs = self._admit_compiled() if self._awaiting_grammar else []
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            if not outputs:
                self._wait_for_grammars()  # only grammars are left: wait, do not spin
            return outputs
        self.num_steps += 1
        scheduled_at = time.perf_counter()
        results = self.runner.execute(scheduled)
        executed_at = time.perf_counter()
        grammar_done = _advance_grammars(scheduled, results)
        self.scheduler.update_from_output(
            scheduled, {rid: result.token_id for rid, result in results.items()})
        if grammar_done:  # with ignore_eos the scheduler would keep them: the grammar ends them
            self.scheduler.finish_requests(grammar_done, FinishReason.STOP)
        now = time.monotonic()
        for chunk in scheduled.chunks:
            request = chunk.request
            result = results.get(request.request_id)
            if result is None:
                continue
            if request.first_token_time is None:
                request.first_token_time = now
            logprobs = [result.logprobs] if result.logprobs is not None else None
            outputs.append(EngineCoreOutput(
                request.request_id, [result.token_id], logprobs, request.finish_reason,
                request.stop_reason, request.num_cached_tokens, request.first_scheduled_time,
                prompt_logprobs=(request.prompt_logprobs
                                 if request.num_output_tokens == 1 else None),
                timings=_timings(request, now) if request.finish_reason is not None
                else None))
        forward, sampling = self.runner.last_step_seconds
        self.step_stats.observe(scheduled_at - started, forward, sampling,
                                time.perf_counter() - executed_at)
        return outputs


def _timings(request: Request, finished: float) -> RequestTimings:
    return RequestTimings(request.arrival_time, request.first_scheduled_time,
                          request.first_token_time, finished, request.num_preemptions)


def _advance_grammars(scheduled: SchedulerOutput, results: dict[str, SampleResult]
                      ) -> list[str]:
    """Feed each constrained request its sampled token; the ids whose grammar has ended.

    A complete grammar allows only EOS next, so a request ends on an EOS token like any
    other (its text never shows the EOS, and ``stop`` is its finish reason): the mask makes
    the step after the last grammar token sample EOS, and the scheduler finishes it there.
    """
    done = []
    for chunk in scheduled.chunks:
        request = chunk.request
        result = results.get(request.request_id)
        if request.grammar is None or result is None:
            continue
        request.grammar.accept(result.token_id)
        if request.grammar.error is not None:
            logger.warning("request %s left its grammar: %s", request.request_id,
                           request.grammar.error)
            done.append(request.request_id)
        elif request.grammar.is_terminated and result.token_id in request.eos_token_ids:
            done.append(request.request_id)
    return done


def _check_tenant(tenant: object) -> None:
    if not isinstance(tenant, str) or not 0 < len(tenant) <= MAX_TENANT_CHARS:
        raise ValueError(f"tenant={tenant!r} is invalid: allowed is a string of 1 to "
                         f"{MAX_TENANT_CHARS} characters")


def plan_num_blocks(config: EngineConfig, loaded: LoadedModel, max_model_len: int) -> int:
    """Blocks that fit the KV budget, never more than max_num_seqs full-length sequences."""
    model = loaded.config  # the cache's dtype sets its bytes: int8 and fp8 hold ~2x the blocks
    bytes_per_block = config.block_size * kv_bytes_per_token(
        model.num_layers, model.num_kv_heads, model.head_dim,
        kv_cache_torch_dtype(config.kv_cache_dtype, loaded.dtype))
    budget = config.kv_cache_memory_bytes or _default_kv_budget(config, loaded.device)
    useful = config.max_num_seqs * (-(-max_model_len // config.block_size))
    num_blocks = min(budget // bytes_per_block, useful)
    if num_blocks < 1:
        raise ValueError(f"the KV-cache budget of {budget} bytes holds no block of "
                         f"{bytes_per_block} bytes; raise kv_cache_memory_bytes")
    return int(num_blocks)


def _compile_max_batch(config: EngineConfig, device: torch.device) -> int:
    """The largest decode batch to compile (0: none), or ValueError where it cannot run."""
    if not config.compile_max_batch:
        return 0
    if device.type != "cpu":
        raise ValueError(f"compile_max_batch={config.compile_max_batch} is invalid on "
                         f"{device.type}: compiled decode steps are for the CPU (on CUDA, "
                         "decode steps replay CUDA graphs unless --enforce-eager)")
    if cpp_compiler() is None:
        raise ValueError(f"compile_max_batch={config.compile_max_batch} is invalid here: "
                         "torch.compile builds CPU code with a C++ compiler, and neither $CXX "
                         "nor g++ is on PATH (install g++, or leave compile_max_batch at 0)")
    return min(config.compile_max_batch, config.max_num_seqs)


def _default_token_budget(device: torch.device) -> int:
    return 4096 if device.type == "cuda" else 512


def _default_kv_budget(config: EngineConfig, device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * config.kv_cache_fraction)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(min(available * config.kv_cache_fraction, _CPU_DEFAULT_CAP_BYTES))


def _has_spare_core(device: torch.device) -> bool:
    """Whether grammar masks can be computed beside the forward pass without taking a core
    from it: always on an accelerator; on the CPU only when torch leaves a core free."""
    return device.type != "cpu" or (os.cpu_count() or 1) > torch.get_num_threads()
