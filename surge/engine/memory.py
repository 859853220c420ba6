"""Bounds on the CPU kernel caches that would otherwise grow with every new step shape.

A prepacked linear (``surge.models.linear``) runs through oneDNN, which builds a kernel (a
primitive) for each input shape and keeps it in two LRU caches of 1,024 entries each by
default: oneDNN's primitive cache and ideep's computation cache. A serving engine meets a new
token count at nearly every prefill step, so both fill up, at about half a megabyte an entry
for a 135M-parameter model: the engine's RSS grew by a few hundred MB over a soak and looked
like a leak (issue 14, item 9). Capping both at 256 entries bounds that memory at about a
tenth of it; the 256 hold every decode batch size a typical deployment cycles through and
the recent prefill sizes, and a miss costs one kernel creation (about a millisecond).
Measured on 4 SmolLM2-shaped linears over 400 token counts: +888 MiB uncapped, +103 MiB
capped at 64 (``benchmarks/bench_soak.py`` shows the engine's RSS over a soak).

Either variable set in the environment wins (``LRU_CACHE_CAPACITY=1024`` restores the
default); both are read when the first kernel is built, so this runs before the model loads.
"""

from __future__ import annotations

import os

__all__ = ["KERNEL_CACHE_ENTRIES", "KERNEL_CACHE_VARIABLES", "bound_kernel_caches"]

KERNEL_CACHE_ENTRIES = 256
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> dict[str, str]:
    """Cap both caches at ``entries`` unless the environment already says; the settings in
    effect."""
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(entries))
    return {name: os.environ[name] for name in KERNEL_CACHE_VARIABLES}
