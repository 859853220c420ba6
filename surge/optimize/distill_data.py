"""Training data of a distillation: token sequences with the positions the loss counts.

Three sources, mixable (``--data`` repeats):

- ``builtin``: the training split of `surge.eval.corpus` (never its held-out test split, which
  the quality gate measures perplexity on);
- a UTF-8 text file: tokenized once and cut into blocks of ``seq_len`` tokens;
- a ``.jsonl`` file of prompts: one JSON object a line with ``"prompt"`` (a user message,
  rendered with the chat template unless ``"chat": false``) or ``"messages"`` (a conversation),
  answered by the teacher through Surge's offline engine (sequence-level distillation, Kim &
  Rush 2016). A line may carry its own ``"response"``; then the teacher is not asked. Only the
  answer's tokens count in the loss.

Examples are ordered by a seeded permutation per epoch, so the samples of any step are a pure
function of (seed, step): resuming and data-parallel ranks need no data state beyond the step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["BUILTIN", "Example", "PromptItem", "batch_tensors", "load_examples", "read_prompts",
           "sample_indices"]

BUILTIN = "builtin"
_MIN_BLOCK = 8  # a text's last block shorter than this teaches too little to keep


@dataclass(frozen=True)
class Example:
    """``ids``: the tokens fed; ``mask[i]`` 1 when token i is a target (predicted from i - 1)."""

    ids: list[int]
    mask: list[int]

    @property
    def targets(self) -> int:
        return sum(self.mask)


@dataclass(frozen=True)
class PromptItem:
    line: int
    prompt_ids: list[int]
    response: str | None  # given in the file, else the teacher answers


# An answerer turns prompt token lists into answer token lists (the teacher's engine).
Answerer = Callable[[list[list[int]]], list[list[int]]]


def load_examples(sources: Sequence[str], tokenizer: Any, seq_len: int,
                  answer: Answerer | None) -> tuple[list[Example], list[str]]:
    """Every example of every source, and a line describing each source."""
    if seq_len < 2:
        raise ValueError(f"--seq-len {seq_len} is invalid: allowed is 2 or more")
    examples: list[Example] = []
    described = []
    for source in sources:
        if source == BUILTIN:
            from surge.eval.corpus import builtin_corpus

            corpus = builtin_corpus("train")
            found = text_examples(corpus.text, tokenizer, seq_len, corpus.name)
        elif source.lower().endswith(".jsonl"):
            found = prompt_examples(read_prompts(source, tokenizer), tokenizer, seq_len, answer,
                                    source)
        else:
            found = text_examples(_read_text(source), tokenizer, seq_len, source)
        examples += found
        described.append(f"{source}: {len(found)} sequences, "
                         f"{sum(e.targets for e in found)} target tokens")
    return examples, described


def _read_text(source: str) -> str:
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--data {source!r} not found: give a UTF-8 text file, a .jsonl "
                                f"of prompts, or {BUILTIN!r} for the built-in corpus")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--data {source!r} is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from None
    if not text.strip():
        raise ValueError(f"--data {source!r} is empty: there is nothing to train on")
    return text


def text_examples(text: str, tokenizer: Any, seq_len: int, source: str) -> list[Example]:
    """The text's tokens cut into blocks of ``seq_len``; every token after the first counts."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    blocks = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    blocks = [b for b in blocks if len(b) >= min(_MIN_BLOCK, seq_len)]
    if not blocks:
        raise ValueError(f"--data {source!r} has {len(ids)} token(s): too little to train on")
    return [Example(block, [0] + [1] * (len(block) - 1)) for block in blocks]


def read_prompts(source: str, tokenizer: Any) -> list[PromptItem]:
    """The prompts of a JSONL file, as the token ids the teacher sees (errors name the line)."""
    text = _read_text(source)
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"--data {source!r} line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f'{where} must be an object such as {{"prompt": "..."}}')
        response = item.get("response")
        if response is not None and not isinstance(response, str):
            raise ValueError(f'{where}: "response" must be a string')
        items.append(PromptItem(number, _prompt_ids(item, tokenizer, where), response))
    if not items:
        raise ValueError(f"--data {source!r} has no prompts: there is nothing to train on")
    return items


def _prompt_ids(item: dict, tokenizer: Any, where: str) -> list[int]:
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f'{where}: "messages" must be a non-empty list of '
                             '{"role": ..., "content": ...}')
        return _chat_ids(tokenizer, messages, where)
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f'{where} needs a non-empty "prompt" string (or "messages")')
    chat = item.get("chat", True)
    if not isinstance(chat, bool):
        raise ValueError(f'{where}: "chat" must be true or false')
    if not chat:
        return tokenizer.encode(prompt, add_special_tokens=True)
    return _chat_ids(tokenizer, [{"role": "user", "content": prompt}], where)


def _chat_ids(tokenizer: Any, messages: list, where: str) -> list[int]:
    if not tokenizer.chat_template:
        raise ValueError(f'{where} is a chat prompt but the teacher has no chat template: add '
                         '"chat": false to send it as plain text')
    try:
        text = tokenizer.apply_chat_template(messages)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_examples(items: list[PromptItem], tokenizer: Any, seq_len: int,
                    answer: Answerer | None, source: str) -> list[Example]:
    """Prompt + answer sequences (cut at ``seq_len``); only answer tokens count."""
    # A prompt longer than the sequence keeps its end (the question, the assistant header)
    # and room for at least one answer token; the teacher answers what the student sees.
    prompts = {item.line: item.prompt_ids[-(seq_len - 1):] for item in items}
    asked = [item for item in items if item.response is None]
    answers: dict[int, list[int]] = {}
    if asked:
        if answer is None:
            raise ValueError(f"--data {source!r} has prompts without a response and no teacher "
                             "engine to answer them")
        for item, ids in zip(asked, answer([prompts[i.line] for i in asked]), strict=True):
            answers[item.line] = ids
    examples = []
    for item in items:
        reply = answers.get(item.line)
        if reply is None:
            reply = tokenizer.encode(item.response or "", add_special_tokens=False)
        prompt = prompts[item.line]
        ids = (prompt + reply)[:seq_len]
        mask = [0] * len(prompt) + [1] * (len(ids) - len(prompt))
        if sum(mask):
            examples.append(Example(ids, mask))
    if not examples:
        raise ValueError(f"--data {source!r}: no prompt got an answer to train on")
    return examples


# -- order and batches ------------------------------------------------------------------------

def sample_indices(num_examples: int, seed: int, start: int, count: int) -> list[int]:
    """Example indices of global samples [start, start + count): epoch e visits every example
    once, in the order of a permutation seeded by (seed, e)."""
    out: list[int] = []
    position = start
    while len(out) < count:
        epoch, offset = divmod(position, num_examples)
        order = _permutation(num_examples, seed, epoch)
        take = min(count - len(out), num_examples - offset)
        out += order[offset:offset + take]
        position += take
    return out


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def batch_tensors(examples: Sequence[Example], pad_id: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [b, t], mask [b, t]) right-padded to the longest example."""
    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, :len(example.ids)] = torch.tensor(example.ids)
        mask[row, :len(example.mask)] = torch.tensor(example.mask)
    return ids.to(device), mask.to(device)
