"""`surge optimize`: make a model cheaper (quantize, prune, distill) and say what it cost.

Every command ends in a checkpoint directory that `surge serve --model DIR` loads, and in the
same quality gate (`surge.optimize.gate`): the result and the original are evaluated side by
side (size on disk, parameters, resident weights, W4/W1 tokens/s, perplexity, agreement), one
table is printed, a quality-against-speed PNG is drawn for every variant tried from the same
original, and ``--gate "ppl_ratio<=1.10,agreement>=0.8"`` exits non-zero when a bound fails.

Modules: ``cli`` (argument parsing, torch-free), ``gate`` (bounds and the end-of-command gate),
``report`` (measurements, table, plot), ``quantize``, ``prune``, ``calibration``, ``export``
(writing HF-layout directories, tokenizer included); ``distill`` lives beside them.
"""

from __future__ import annotations

__all__: list[str] = []
