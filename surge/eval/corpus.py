"""Evaluation text: a user's file, or the built-in corpus that ships with Python itself.

The built-in corpus is Python's reference documentation as plain English text
(``pydoc_data.topics``: 79 topics, about 465,000 characters in Python 3.11), present in every
CPython install, so `surge eval` needs no download. It is split by topic name, not by position,
so a topic is never cut in half and the split does not move when topics are added:

- ``test`` (held out): every topic whose CRC-32 of its name is divisible by 5, about a fifth
  of the text (15 topics, 100k characters, in Python 3.11);
- ``train``: every other topic, for work that needs text to fit on (calibration, distillation).

Topics are joined in sorted order, separated by a blank line, so the text is deterministic for a
given Python version (the topics' wording changes a little between Python releases).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["BUILTIN_CORPUS", "Corpus", "builtin_corpus", "load_corpus"]

BUILTIN_CORPUS = "pydoc-topics"
Split = Literal["train", "test"]
_HELD_OUT_MODULUS = 5


@dataclass(frozen=True)
class Corpus:
    name: str  # "pydoc-topics:test", or the file's path
    text: str


def builtin_corpus(split: Split = "test") -> Corpus:
    """Python's reference documentation, the held-out ``test`` split or the ``train`` rest."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is invalid: allowed is 'train' or 'test'")
    from pydoc_data.topics import topics

    chosen = [name for name in sorted(topics) if _is_held_out(name) == (split == "test")]
    return Corpus(f"{BUILTIN_CORPUS}:{split}", "\n\n".join(topics[name] for name in chosen))


def load_corpus(path: str | Path | None) -> Corpus:
    """The text of ``path`` (UTF-8), or the built-in held-out split when ``path`` is None."""
    if path is None:
        return builtin_corpus("test")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"text file {str(file)!r} not found: give a UTF-8 text file, or "
                                "leave out --text to use the built-in corpus")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {str(file)!r} is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from None
    if not text.strip():
        raise ValueError(f"text file {str(file)!r} is empty: perplexity needs at least two "
                         "tokens of text")
    return Corpus(str(file), text)


def _is_held_out(topic: str) -> bool:
    # CRC-32 rather than hash(): str hashes are salted per process.
    return zlib.crc32(topic.encode()) % _HELD_OUT_MODULUS == 0
