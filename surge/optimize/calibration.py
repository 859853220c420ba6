"""Calibration text and the activation statistics pruning scores use.

Text is the user's file or, by default, the ``train`` split of the built-in corpus
(`surge.eval.corpus`): disjoint from the held-out ``test`` split the gate measures perplexity
on, so pruning never fits the text it is judged by. It is cut into windows that the model
reads with Surge's own forward (`surge.eval.scoring.SequenceScorer`), while a hook on every
decoder projection sums the squares of its inputs per input channel: ``||X_j||^2``, the
activation half of Wanda's score ``|W_ij| * ||X_j||`` and of the structured scores.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from surge.models.linear import Linear
from surge.models.loader import LoadedModel

__all__ = ["CALIBRATION_WINDOW", "calibration_text", "calibration_windows", "input_norms"]

CALIBRATION_WINDOW = 512


def calibration_text(path: str | Path | None) -> str:
    """The text to calibrate on; a missing, non-UTF-8 or empty file is refused by name."""
    if path is None:
        from surge.eval.corpus import builtin_corpus

        return builtin_corpus("train").text
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--calibration file {str(file)!r} not found: give a UTF-8 "
                                "text file, or leave it out for the built-in corpus")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--calibration file {str(file)!r} is not UTF-8 text ({exc.reason} "
                         f"at byte {exc.start})") from None
    if not text.strip():
        raise ValueError(f"--calibration file {str(file)!r} is empty: give text to compute "
                         "activation statistics on")
    return text


def calibration_windows(token_ids: list[int], num_tokens: int, window: int) -> list[list[int]]:
    """Up to ``num_tokens`` tokens as consecutive windows of at most ``window`` tokens."""
    token_ids = token_ids[:num_tokens]
    if len(token_ids) < 2:
        raise ValueError(f"the calibration text is {len(token_ids)} token(s) long: give more "
                         "text")
    return [token_ids[i:i + window] for i in range(0, len(token_ids), window)]


def input_norms(loaded: LoadedModel, windows: list[list[int]], progress: bool = True
                ) -> dict[str, torch.Tensor]:
    """Surge module path of each decoder projection -> sum over calibration tokens of its
    input squared, per input channel (float32 [input_size])."""
    from surge.eval.scoring import SequenceScorer

    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in loaded.model.named_modules():
        if isinstance(module, Linear) and ".layers." in f".{name}":
            handles.append(module.register_forward_pre_hook(_accumulate(name, sums)))
    try:
        scorer = SequenceScorer(loaded, max(len(w) for w in windows))
        for window in tqdm(windows, desc="calibration", unit="window", disable=not progress):
            scorer.hidden_states(window)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def _accumulate(name: str, sums: dict[str, torch.Tensor]) -> Callable[..., None]:
    def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        squares = x.pow(2).sum(dim=0)
        sums[name] = sums[name] + squares if name in sums else squares

    return hook
