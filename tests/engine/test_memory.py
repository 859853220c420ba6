"""The engine bounds oneDNN's kernel caches, so its memory stops growing with the number of
distinct step shapes it has met (issue 14, item 9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from surge.engine.memory import KERNEL_CACHE_VARIABLES

# Builds an engine (which must bound the caches before its model loads), then runs four
# SmolLM2-shaped prepacked linears over 300 token counts, as prefill steps of varied length
# do, and reports the RSS growth. Uncapped, the caches keep ~0.5 MB per (shape, count): ~680 MB.
_SCRIPT = """
import json, sys
import psutil, torch
from surge import LLM
LLM(sys.argv[1], dtype="bfloat16", max_num_seqs=2)
shapes = [(576, 1728), (576, 576), (576, 3072), (1536, 576)]
packed = [(k, torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k, dtype=torch.bfloat16),
                                                        1)) for k, n in shapes]
process = psutil.Process()
rss = [process.memory_info().rss]
for m in range(1, 301):
    for k, weight in packed:
        torch.ops.mkldnn._linear_pointwise(torch.randn(m, k, dtype=torch.bfloat16), weight,
                                           None, "none", [], "")
    if m % 150 == 0:
        rss.append(process.memory_info().rss)
print(json.dumps([(b - a) / 2**20 for a, b in zip(rss, rss[1:])]))
"""


def _growth_mib(model: Path, **env: str) -> list[float]:
    """RSS growth (MiB) over the first 150 token counts and over the next 150."""
    clean = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHE_VARIABLES}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(model)], capture_output=True,
                          text=True, timeout=600, env={**clean, "OMP_NUM_THREADS": "1", **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_engine_bounds_the_kernel_caches(tiny_checkpoint: Callable[[str], Path]) -> None:
    model = tiny_checkpoint("tiny-llama")
    first, then = _growth_mib(model)
    # The user's own setting wins: the default 1,024 entries keep every shape seen here.
    unbounded = sum(_growth_mib(model, LRU_CACHE_CAPACITY="1024",
                                ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024"))
    # Bounded, the caches are full after 64 token counts (256 entries over 4 shapes) and
    # old kernels make room for new ones; unbounded every shape stays. (Here each new
    # kernel is larger than those it evicts, so freed memory is not always reused: the
    # bounded RSS still creeps, less than half as fast.)
    assert unbounded > 1.5 * (first + then), (first, then, unbounded)
