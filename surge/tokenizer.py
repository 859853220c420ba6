"""Tokenizer of a checkpoint: `tokenizer.json`, special tokens and the chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

__all__ = ["ChatTokenizer", "eos_token_ids", "load_tokenizer"]


class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs from tokenizer_config.json."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any], eos_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.chat_template: str | None = config.get("chat_template")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model's tokenizer_config.json has no chat_template; "
                             "use generate() with a plain prompt instead of chat()")
        _check_messages(messages)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=_token_text(self.config.get("bos_token")),
            eos_token=_token_text(self.config.get("eos_token")))


def load_tokenizer(model_dir: str | Path) -> ChatTokenizer:
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: Surge needs a fast tokenizer (tokenizer.json)")
    tokenizer = Tokenizer.from_file(str(path))
    config = _read_json(model_dir / "tokenizer_config.json")
    return ChatTokenizer(tokenizer, config, _eos_ids(model_dir, tokenizer, config))


def eos_token_ids(model_dir: str | Path) -> frozenset[int]:
    """Every id that ends generation for this checkpoint (without building a ChatTokenizer)."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path)) if path.is_file() else None
    return frozenset(_eos_ids(model_dir, tokenizer, _read_json(model_dir /
                                                                "tokenizer_config.json")))


def _eos_ids(model_dir: Path, tokenizer: Tokenizer | None,
             config: dict[str, Any]) -> set[int]:
    """Every id that ends generation: generation_config, config.json and the tokenizer's EOS."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(model_dir / name).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    eos_text = _token_text(config.get("eos_token"))
    if eos_text and tokenizer is not None and tokenizer.token_to_id(eos_text) is not None:
        ids.add(tokenizer.token_to_id(eos_text))
    return ids


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(token: Any) -> str:
    # tokenizer_config stores special tokens as strings or as {"content": ...} dicts.
    if isinstance(token, dict):
        return token.get("content", "")
    return token or ""


def _check_messages(messages: list[dict[str, str]]) -> None:
    allowed = ("system", "user", "assistant")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in allowed:
            raise ValueError(f"messages[{index}].role must be one of {', '.join(allowed)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{index}].content must be a string")


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template error: {message}")
