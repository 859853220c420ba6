"""Engine configuration: one dataclass with validated defaults, and its command-line flags."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

__all__ = ["DATA_DIR_ENV", "DTYPES", "INT4_GROUP_SIZES", "KV_CACHE_DTYPES", "QUANTIZATIONS",
           "SCHEDULING_POLICIES", "EngineConfig", "add_engine_args",
           "check_tenant_weights", "require", "user_data_dir"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Weight-only quantization of the decoder's projections (surge.models.quantization).
QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
# Storage of the paged KV cache: auto is the model's dtype; int8 (a scale per token and KV
# head) and fp8 (float8_e4m3fn) hold about twice the tokens in the same memory.
KV_CACHE_DTYPES = ("auto", "bfloat16", "float32", "int8", "fp8")
# fcfs: arrival order, priorities ignored; priority: (priority, arrival); fair: virtual token
# counters share the engine between tenants by weight, priorities order each tenant's requests.
SCHEDULING_POLICIES = ("fcfs", "priority", "fair")
# Where the server keeps what must outlive it (web-app history, batch files and queue).
DATA_DIR_ENV = "SURGE_DATA_DIR"


def user_data_dir() -> Path:
    """``$SURGE_DATA_DIR``, else the platform's user data folder (``~/.local/share/surge``)."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("surge"))


# Compiled decode buckets 1, 2, ..., 64: seven graphs, within torch.compile's 8 per code
# object. Larger batches share the Python cost among many tokens and gain little.
MAX_COMPILED_BATCH = 64


@dataclass
class EngineConfig:
    """Knobs of the engine, named as vLLM names them.

    ``kv_cache_memory_bytes`` sizes the paged KV cache directly; when it is None the cache takes
    ``kv_cache_fraction`` of the memory that is free after the weights load, capped so that it
    never holds more than ``max_num_seqs`` full-length sequences.
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 64
    # None: 512 on CPU (smaller chunks keep activations in cache and decode stalls short),
    # 4096 on CUDA.
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    kv_cache_memory_bytes: int | None = None
    kv_cache_fraction: float = 0.5
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    # On CUDA, decode steps replay captured graphs (surge.engine.cuda_graphs); True runs
    # every step eagerly (vLLM's name for the same switch).
    enforce_eager: bool = False
    # On CPU, decode steps of up to this many sequences run a torch.compile'd forward
    # (surge.engine.compiled_decode), compiled at start-up; 0 runs every step eagerly.
    compile_max_batch: int = 0
    allow_pickle: bool = False
    seed: int = 0
    # Torch intra-op threads of the engine; None leaves torch's default (all cores). Replicas
    # sharing a machine each take a share, so they do not fight over the cores.
    num_threads: int | None = None
    # A Jinja chat template file, for checkpoints that ship none; replaces a shipped one.
    chat_template: str | None = None
    # Weight-only quantization: none keeps the serving dtype (a quantized GGUF is dequantized);
    # int8 per output row; int4 per group of quantization_group_size inputs (32 keeps a GGUF's
    # Q4_0/Q4_1/Q4_K blocks as they are).
    quantization: str = "none"
    quantization_group_size: int = 32
    # With int8/int4: the LM head (and an embedding tied to it) int8 too, one code copy.
    quantize_lm_head: bool = True
    scheduling_policy: str = "priority"
    # Tenant name -> weight (> 0) for the fair policy; tenants not named weigh 1.
    tenant_weights: dict[str, float] = field(default_factory=dict)
    # Fair policy: weighted tokens a tenant returning from idle may be served ahead of the
    # backlogged tenants (its burst borrows seats); None: two steps' token budget; 0: none.
    fair_burst_tokens: int | None = None

    def __post_init__(self) -> None:
        require(self.dtype in DTYPES, "dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        require(self.block_size >= 1, "block_size", self.block_size, "an integer >= 1")
        require(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "an integer >= 1")
        require(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
                 "max_num_batched_tokens", self.max_num_batched_tokens, "an integer >= 1")
        require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len",
                 self.max_model_len, "an integer >= 1")
        require(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
                 "kv_cache_memory_bytes", self.kv_cache_memory_bytes, "a positive integer")
        require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", self.kv_cache_dtype,
                f"one of {', '.join(KV_CACHE_DTYPES)}")
        require(0 < self.kv_cache_fraction <= 1, "kv_cache_fraction", self.kv_cache_fraction,
                 "(0, 1]")
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed",
                 self.seed, "an integer")
        require(isinstance(self.compile_max_batch, int)
                and 0 <= self.compile_max_batch <= MAX_COMPILED_BATCH, "compile_max_batch",
                self.compile_max_batch, f"an integer from 0 (off) to {MAX_COMPILED_BATCH}")
        require(self.num_threads is None or self.num_threads >= 1, "num_threads",
                 self.num_threads, "an integer >= 1")
        require(self.chat_template is None or Path(self.chat_template).is_file(),
                "chat_template", self.chat_template, "a path to an existing Jinja file")
        require(self.quantization in QUANTIZATIONS, "quantization", self.quantization,
                f"one of {', '.join(QUANTIZATIONS)}")
        require(self.quantization_group_size in INT4_GROUP_SIZES, "quantization_group_size",
                self.quantization_group_size, f"one of {', '.join(map(str, INT4_GROUP_SIZES))}")
        require(self.scheduling_policy in SCHEDULING_POLICIES, "scheduling_policy",
                self.scheduling_policy, f"one of {', '.join(SCHEDULING_POLICIES)}")
        self.tenant_weights = check_tenant_weights(self.tenant_weights)
        require(self.fair_burst_tokens is None or self.fair_burst_tokens >= 0,
                "fair_burst_tokens", self.fair_burst_tokens, "an integer >= 0")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in known})


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (HF layout), .gguf file or catalogue name "
                             "(surge pull --list); default: smollm2-135m-instruct")
    parser.add_argument("--dtype", default=d.dtype, choices=DTYPES)
    parser.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--block-size", type=int, default=d.block_size)
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="token budget per step (default: 512 on CPU, 4096 on CUDA)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    parser.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                        help="storage of the KV cache: auto (the model dtype), int8 or fp8 "
                             "(~2x the tokens per byte, quantized on write)")
    parser.add_argument("--no-prefix-caching", dest="enable_prefix_caching",
                        action="store_false")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="on CUDA, run decode steps eagerly instead of replaying captured "
                             "CUDA graphs (no effect on CPU)")
    parser.add_argument("--compile-max-batch", type=int, default=d.compile_max_batch,
                        metavar="N",
                        help="on CPU, compile decode steps of up to N sequences with "
                             "torch.compile at start-up (about 45 s per power-of-two batch "
                             "size; needs a C++ compiler): single-stream decode 1.7-2.1x "
                             "faster on SmolLM2 (default: 0, eager)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow loading pickle (.bin) weights; they can run arbitrary code")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch threads of the engine (default: torch's, all cores)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="Jinja chat template for checkpoints without one (replaces theirs)")
    parser.add_argument("--quantization", default=d.quantization, choices=QUANTIZATIONS,
                        help="weight-only quantization of the decoder's linear layers, CPU only "
                             "(default: none; a quantized GGUF is then dequantized)")
    parser.add_argument("--quantization-group-size", type=int, default=d.quantization_group_size,
                        choices=INT4_GROUP_SIZES,
                        help="inputs per int4 scale (default: 32, GGUF's Q4 block)")
    parser.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction,
                        default=d.quantize_lm_head,
                        help="with --quantization int8|int4, make the LM head (and an "
                             "embedding tied to it) int8 too: less memory and faster one-"
                             "stream decode (default: on; --no-quantize-lm-head keeps it in "
                             "the serving dtype)")
    parser.add_argument("--scheduling-policy", default=d.scheduling_policy,
                        choices=SCHEDULING_POLICIES,
                        help="fcfs: arrival order; priority: by request priority, then "
                             "arrival; fair: share the engine between tenants by weight "
                             f"(default: {d.scheduling_policy})")
    parser.add_argument("--fair-burst-tokens", type=int, default=None,
                        help="fair policy: weighted tokens a tenant back from idle may be "
                             "served ahead of backlogged tenants, borrowing their seats, so "
                             "its burst starts at once (default: two steps' token budget; "
                             "0: the paper's rule, no credit)")


def check_tenant_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Tenant weights as a plain dict, or ``ValueError`` naming the bad entry."""
    require(isinstance(weights, Mapping), "tenant_weights", weights,
            "a mapping of tenant name to weight")
    checked: dict[str, float] = {}
    for tenant, weight in weights.items():
        require(isinstance(tenant, str) and tenant != "", "tenant_weights key", tenant,
                "a non-empty string")
        ok = (isinstance(weight, int | float) and not isinstance(weight, bool)
              and math.isfinite(weight) and weight > 0)
        require(ok, f"tenant_weights[{tenant!r}]", weight, "a finite number > 0")
        checked[tenant] = float(weight)
    return checked


def require(ok: bool, name: str, value: object, allowed: str) -> None:
    """The one check of a configuration value: ``ValueError`` naming it and what is allowed."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: allowed is {allowed}")
