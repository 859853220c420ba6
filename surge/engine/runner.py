"""Model runner: owns the model and the KV-cache tensors, runs one scheduled step.

It turns a ``SchedulerOutput`` into flat tensors (input ids, positions, slot mapping, block
tables as slot lists, masks), sets them as the forward context, runs the model, computes
logits only at positions that sample, and samples them with a ``SamplingBatch`` built from
the sampling requests' settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from surge.engine.compiled_decode import CompiledDecode
from surge.engine.cuda_graphs import DecodeGraphs
from surge.engine.request import Request
from surge.engine.sampler import RowPenalties, SampleResult, SamplingBatch, sample
from surge.engine.scheduler import ScheduledChunk, SchedulerOutput
from surge.engine.structured import StructuredOutputs
from surge.models.attention import (
    AttentionMetadata,
    PrefillChunk,
    allocate_kv_cache,
    decode_bias,
    forward_context,
    kv_cache_torch_dtype,
)
from surge.models.loader import LoadedModel
from surge.outputs import TokenLogprobs

__all__ = ["ModelRunner"]


@dataclass(frozen=True)
class StepOutput:
    """What a step's forward gives for logits: the hidden state of every scheduled token, or,
    from a compiled decode step (whose graph includes the LM head), every row's logits."""

    hidden: torch.Tensor | None = None
    all_logits: torch.Tensor | None = None

    def logits(self, model: nn.Module, rows: torch.Tensor | slice) -> torch.Tensor:
        if self.all_logits is not None:
            return self.all_logits[rows]
        assert self.hidden is not None
        return model.compute_logits(self.hidden[rows])


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int, seed: int = 0,
                 kv_cache_dtype: str = "auto", max_model_len: int | None = None,
                 cuda_graphs: bool = True, compile_max_batch: int = 0):
        self.model = loaded.model
        self.config = loaded.config
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        # The KV cache's storage dtype; attention quantizes into it when it is not self.dtype.
        self.kv_cache_dtype = kv_cache_torch_dtype(kv_cache_dtype, self.dtype)
        # Unseeded requests sample from this, so a whole run repeats for the same engine seed.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # Set by the engine core once a request asks for structured outputs.
        self.structured: StructuredOutputs | None = None
        # (forward, sampling) seconds of the last execute, for the step breakdown metric.
        self.last_step_seconds = (0.0, 0.0)
        # Seconds the step loop spent computing grammar masks or waiting for them, in all:
        # what every request in a step with a constrained one pays (benchmarks read it).
        self.grammar_seconds = 0.0
        # Decode steps replayed from CUDA graphs (see surge.engine.cuda_graphs); their padding
        # rows write to one extra block past the managed ones.
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(
                self.model, block_size=block_size, trash_slot=num_blocks * block_size,
                max_blocks=-(-(max_model_len or self.config.max_position_embeddings)
                             // block_size),
                num_kv_heads=self.config.num_kv_heads,
                sliding_window=self.config.sliding_window, dtype=self.dtype,
                device=self.device)
        # CPU decode steps of up to compile_max_batch sequences run compiled (see
        # surge.engine.compiled_decode); their padding rows write to the same extra block.
        self.compiled: CompiledDecode | None = None
        if compile_max_batch and self.device.type == "cpu":
            self.compiled = CompiledDecode(
                self.model, max_batch=compile_max_batch, block_size=block_size,
                trash_slot=num_blocks * block_size, num_kv_heads=self.config.num_kv_heads,
                sliding_window=self.config.sliding_window, dtype=self.dtype,
                kv_cache_dtype=self.kv_cache_dtype)
        self._allocate_kv_cache()
        if self.compiled is not None:
            self.compiled.compile()

    def _allocate_kv_cache(self) -> None:
        # Zeroed, not empty: padded decode rows read stale slots, and 0 * NaN would leak NaN.
        # Zeroed eagerly on purpose: lazily mapped zero pages would be faulted in (and zeroed
        # by the kernel, 2 MiB at a time with transparent huge pages) on the first write to
        # each block, which made a fresh engine's prefill 15% slower on CPU.
        padded = self.graphs is not None or self.compiled is not None
        num_blocks = self.num_blocks + padded  # the trash block
        shape = (self.config.num_kv_heads, num_blocks, self.block_size, self.config.head_dim)
        for layer in self.model.attention_layers():
            layer.k_cache = allocate_kv_cache(*shape, self.kv_cache_dtype, self.device)
            layer.v_cache = allocate_kv_cache(*shape, self.kv_cache_dtype, self.device)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(layer.k_cache.nbytes + layer.v_cache.nbytes
                   for layer in self.model.attention_layers())

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> dict[str, SampleResult]:
        """Run one step; returns the sampled token of every request whose chunk completes."""
        started = time.perf_counter()
        chunks = sorted(output.chunks, key=lambda c: c.num_tokens != 1)  # decodes first
        sampling = [(end - 1, chunk.request) for chunk, end in zip(
            chunks, _cumulative_ends(chunks), strict=True) if chunk.samples]
        requests = [request for _, request in sampling]
        # Grammar masks are computed on a worker thread while the model runs (or here, when
        # no core is free for that thread).
        grammar_rows = [row for row, r in enumerate(requests) if r.grammar is not None]
        masks = None
        if grammar_rows and self.structured is not None:
            grammar_started = time.perf_counter()
            masks = self.structured.fill_bias([requests[row].grammar for row in grammar_rows])
            self.grammar_seconds += time.perf_counter() - grammar_started
        step = self._forward(chunks)
        self._record_prompt_logprobs(chunks, step)
        forward_done = time.perf_counter()
        self.last_step_seconds = (forward_done - started, 0.0)
        if not sampling:
            return {}
        rows = torch.tensor([row for row, _ in sampling], device=self.device)
        logits = step.logits(self.model, rows).float()
        batch = self._sampling_batch(requests)
        if masks is not None:
            waited = time.perf_counter()
            batch.grammar_rows, batch.grammar_bias = grammar_rows, masks.result()
            self.grammar_seconds += time.perf_counter() - waited
        results = sample(logits, batch, self.generator)
        self.last_step_seconds = (forward_done - started, time.perf_counter() - forward_done)
        return {r.request_id: res for r, res in zip(requests, results, strict=True)}

    def _forward(self, chunks: list[ScheduledChunk]) -> StepOutput:
        """Hidden states (or logits) of every scheduled token: a captured CUDA graph or a
        compiled forward for an all-decode step that fits one, the eager model otherwise."""
        padded = self.graphs or self.compiled
        if padded is not None and all(c.num_tokens == 1 for c in chunks):
            tables = [self._block_table(c.request.block_ids, c.start + 1) for c in chunks]
            fits = (self.graphs.fits(len(chunks), max(len(t) for t in tables))
                    if self.graphs is not None else padded.fits(len(chunks)))
            if fits:
                out = padded.run(
                    [c.request.token_ids[c.start] for c in chunks], [c.start for c in chunks],
                    [self._slot(c.request.block_ids, c.start) for c in chunks], tables)
                return (StepOutput(hidden=out) if self.graphs is not None
                        else StepOutput(all_logits=out))
        input_ids, positions, metadata = self._prepare(chunks)
        with forward_context(metadata):
            return StepOutput(hidden=self.model(input_ids, positions))

    def _record_prompt_logprobs(self, chunks: list[ScheduledChunk], step: StepOutput) -> None:
        """Append the logprob of each prompt token this chunk's positions predict (position
        p predicts token p + 1), for requests that asked; a recomputed prefill (after a
        preemption) skips positions already recorded."""
        for chunk, end in zip(chunks, _cumulative_ends(chunks), strict=True):
            request = chunk.request
            k = request.sampling_params.prompt_logprobs
            if k is None:
                continue
            if request.prompt_logprobs is None:
                request.prompt_logprobs = [None]
            first = len(request.prompt_logprobs) - 1
            last = min(chunk.start + chunk.num_tokens, request.num_prompt_tokens - 1)
            if not chunk.start <= first < last:
                continue
            offset = end - chunk.num_tokens - chunk.start
            logits = step.logits(self.model, slice(offset + first, offset + last)).float()
            raw = torch.log_softmax(logits, dim=-1)
            targets = request.token_ids[first + 1:last + 1]
            chosen = raw.gather(1, self._tensor(targets).unsqueeze(1)).squeeze(1).tolist()
            top_values, top_ids = raw.topk(k, dim=-1) if k else (None, None)
            for row, (target, logprob) in enumerate(zip(targets, chosen, strict=True)):
                top = ({} if top_ids is None else dict(zip(
                    top_ids[row].tolist(), top_values[row].tolist(), strict=True)))
                request.prompt_logprobs.append(TokenLogprobs(target, logprob, top))

    def _sampling_batch(self, requests: list[Request]) -> SamplingBatch:
        """One pass over the rows; penalty and min_tokens lists only when a row needs them."""
        batch = SamplingBatch([], [], [], [], [], [])
        for row, request in enumerate(requests):
            params = request.sampling_params
            batch.temperatures.append(params.temperature)
            batch.top_k.append(params.top_k)
            batch.top_p.append(params.top_p)
            batch.min_p.append(params.min_p)
            batch.generators.append(self._own_generator(request))
            batch.num_logprobs.append(params.logprobs)
            if params.has_penalties:
                batch.penalties = batch.penalties or [None] * len(requests)
                batch.penalties[row] = RowPenalties(
                    params.repetition_penalty, params.presence_penalty,
                    params.frequency_penalty, request.token_ids, request.num_prompt_tokens)
            if request.num_output_tokens < params.min_tokens:
                batch.banned_token_ids = batch.banned_token_ids or [[] for _ in requests]
                batch.banned_token_ids[row] = _early_stop_ids(request)
        return batch

    def _own_generator(self, request: Request) -> torch.Generator | None:
        """A seeded sampling request's random stream, created at its first sampled token."""
        params = request.sampling_params
        if params.seed is None or params.is_greedy:
            return None
        if request.generator is None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return request.generator

    def _prepare(self, chunks: list[ScheduledChunk]
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for chunk in chunks:
            span = range(chunk.start, chunk.start + chunk.num_tokens)
            input_ids.extend(chunk.request.token_ids[span.start:span.stop])
            positions.extend(span)
            slots.extend(self._slot(chunk.request.block_ids, p) for p in span)
        to_tensor = self._tensor
        metadata = AttentionMetadata(slot_mapping=to_tensor(slots))
        decodes = [c for c in chunks if c.num_tokens == 1]
        if decodes:
            self._prepare_decodes(decodes, metadata)
        token_start = len(decodes)
        for chunk in chunks[len(decodes):]:
            metadata.prefills.append(self._prefill_chunk(chunk, token_start))
            token_start += chunk.num_tokens
        return to_tensor(input_ids), to_tensor(positions), metadata

    def _slot(self, block_ids: list[int], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + (
            position % self.block_size)

    def _block_table(self, block_ids: list[int], length: int) -> list[int]:
        """Blocks holding positions [0, length) of one sequence."""
        return block_ids[:-(-length // self.block_size)]

    def _prepare_decodes(self, decodes: list[ScheduledChunk], meta: AttentionMetadata) -> None:
        lengths = [c.start + 1 for c in decodes]
        tables = [self._block_table(c.request.block_ids, n)
                  for c, n in zip(decodes, lengths, strict=True)]
        max_blocks = max(len(t) for t in tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        meta.num_decodes = len(decodes)
        meta.decode_block_table = self._tensor(padded)
        # One row per (KV head, sequence), the batch order of the decode matmuls.
        meta.decode_bias = decode_bias(self._tensor(lengths), max_blocks * self.block_size,
                                       self.config.sliding_window, self.config.num_kv_heads,
                                       self.dtype)

    def _prefill_chunk(self, chunk: ScheduledChunk, token_start: int) -> PrefillChunk:
        end = chunk.start + chunk.num_tokens
        window = self.config.sliding_window
        if chunk.start == 0 and not (window and end > window):
            return PrefillChunk(token_start, chunk.num_tokens, 0, None, None)
        query_pos = torch.arange(chunk.start, end, device=self.device).unsqueeze(1)
        key_pos = torch.arange(end, device=self.device).unsqueeze(0)
        mask = key_pos <= query_pos
        if window:
            mask &= key_pos > query_pos - window
        blocks = (self._tensor(self._block_table(chunk.request.block_ids, end))
                  if chunk.start else None)
        return PrefillChunk(token_start, chunk.num_tokens, chunk.start, blocks, mask)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


def _early_stop_ids(request: Request) -> list[int]:
    """Before min_tokens, neither EOS nor a stop token id may be chosen."""
    params = request.sampling_params
    banned = set(params.stop_token_ids)
    if not params.ignore_eos:
        banned |= request.eos_token_ids
    return sorted(banned)


def _cumulative_ends(chunks: list[ScheduledChunk]) -> list[int]:
    ends, total = [], 0
    for chunk in chunks:
        total += chunk.num_tokens
        ends.append(total)
    return ends
