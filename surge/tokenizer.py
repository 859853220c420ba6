"""Tokenizer of a checkpoint: `tokenizer.json` or a GGUF file's vocabulary, special tokens and
the chat template.

A checkpoint directory keeps its chat template in one of three places (transformers 5 writes
`chat_template.jinja`; older versions `chat_template.json` or a key of tokenizer_config.json);
a GGUF file keeps it in its metadata. `--chat-template FILE` supplies one for checkpoints that
ship none (base models) and replaces a shipped one.
"""

from __future__ import annotations

import datetime
import functools
import json
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors

from surge.models.gguf import GGUFVocab, is_gguf, open_vocab

__all__ = ["SUPPORTED_GGUF_PRE_TOKENIZERS", "ChatTokenizer", "eos_token_ids", "gguf_tokenizer",
           "load_tokenizer"]

class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs from tokenizer_config.json (or a
    GGUF file's metadata): special tokens, EOS ids and the chat template."""

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

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """``tools`` (OpenAI function tools) is passed to the template as transformers passes
        it; only templates that read a ``tools`` variable see it."""
        if not self.chat_template:
            raise ValueError("this model has no chat template (chat_template.jinja, "
                             "chat_template.json or tokenizer_config.json); pass one with "
                             "--chat-template FILE, or use generate() with a plain prompt")
        _check_messages(messages)
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token=_token_text(self.config.get("bos_token")),
            eos_token=_token_text(self.config.get("eos_token")))


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> Any:
    """The template as transformers renders it: sandboxed, blocks trimmed, `{% break %}`,
    `raise_exception` and `strftime_now` (Llama 3 templates print today's date)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def load_tokenizer(model: str | Path, chat_template: str | Path | None = None) -> ChatTokenizer:
    """The tokenizer of a checkpoint directory or a `.gguf` file.

    `chat_template` is a Jinja file that replaces the checkpoint's template (or supplies one).
    """
    model = Path(model)
    if is_gguf(model):
        vocab = open_vocab(model)
        tokenizer, config = gguf_tokenizer(vocab)
        eos = _gguf_eos_ids(vocab)
    else:
        path = model / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: Surge needs a fast tokenizer "
                                    "(tokenizer.json)")
        tokenizer = Tokenizer.from_file(str(path))
        config = _read_json(model / "tokenizer_config.json")
        config["chat_template"] = _directory_chat_template(model, config)
        eos = _eos_ids(model, tokenizer, config)
    if chat_template is not None:
        config["chat_template"] = _read_template_file(Path(chat_template))
    return ChatTokenizer(tokenizer, config, eos)


def eos_token_ids(model: str | Path) -> frozenset[int]:
    """Every id that ends generation for this checkpoint (without building a ChatTokenizer)."""
    model = Path(model)
    if is_gguf(model):
        return frozenset(_gguf_eos_ids(open_vocab(model)))
    path = model / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path)) if path.is_file() else None
    return frozenset(_eos_ids(model, tokenizer, _read_json(model / "tokenizer_config.json")))


def _gguf_eos_ids(vocab: GGUFVocab) -> set[int]:
    """End of sequence, and end of turn where the file names one (Llama 3's <|eot_id|>)."""
    return {i for i in (vocab.eos_token_id, vocab.eot_token_id) if i is not None}


def _directory_chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    """The template a transformers-saved directory ships, newest layout first."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _read_json(model_dir / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    # A list holds named templates (e.g. "default", "tool_use"); plain chat uses "default".
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _read_template_file(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"chat template {path} not found: --chat-template takes a "
                                "Jinja file such as chat_template.jinja")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":  # a chat_template.json as transformers writes it
        text = json.loads(text).get("chat_template", "")
    if not text.strip():
        raise ValueError(f"chat template {path} is empty")
    return text


# -- tokenizers from GGUF metadata -------------------------------------------------------------

# The split regexes of llama.cpp's pre-tokenizer types (llama-vocab.cpp), by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZER_STYLES = {
    # GPT-2's own regex (built into ByteLevel).
    "default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2",
    # Each digit alone, then GPT-2's regex (SmolLM, StarCoder).
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3",
    "dbrx": "llama3", "falcon3": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
}
SUPPORTED_GGUF_PRE_TOKENIZERS = tuple(_PRE_TOKENIZER_STYLES)
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4  # llama.cpp token types


def gguf_tokenizer(vocab: GGUFVocab) -> tuple[Tokenizer, dict[str, Any]]:
    """The `Tokenizer` a GGUF file's vocabulary describes (byte-level BPE, or SentencePiece BPE
    with byte fallback), plus the tokenizer_config-like dict ChatTokenizer reads."""
    if vocab.model == "gpt2":
        tokenizer = _byte_level_tokenizer(vocab)
    elif vocab.model == "llama":
        tokenizer = _sentencepiece_tokenizer(vocab)
    else:
        raise ValueError(f"GGUF tokenizer model {vocab.model!r} is not supported; Surge reads "
                         "'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE) vocabularies")
    post = _post_processor(vocab)
    if post is not None:
        tokenizer.post_processor = post
    return tokenizer, _gguf_config(vocab)


def _byte_level_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    if vocab.pre not in _PRE_TOKENIZER_STYLES:
        raise ValueError(f"GGUF pre-tokenizer {vocab.pre!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_GGUF_PRE_TOKENIZERS)}")
    spelled = [_byte_level_spelling(token) for token in vocab.tokens]
    merges = [merge.split(" ", 1) for merge in vocab.merges]
    tokenizer = Tokenizer.from_str(json.dumps(_bpe_json(vocab, spelled, merges, False)))
    tokenizer.pre_tokenizer = _pre_tokenizer(_PRE_TOKENIZER_STYLES[vocab.pre])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    """Llama 2 / Mistral style: "▁" for spaces, merges by score, unknown text as <0xNN> bytes."""
    merges = ([merge.split(" ", 1) for merge in vocab.merges] if vocab.merges
              else _merges_from_scores(vocab.tokens, vocab.scores))
    tokenizer = Tokenizer.from_str(json.dumps(_bpe_json(vocab, vocab.tokens, merges, True)))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if vocab.add_space_prefix else "never",
        split=False)
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1 if vocab.add_space_prefix else 0, 0)])
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float] | None) -> list[list[str]]:
    """Merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    ranked by the token's score (as transformers and llama.cpp rank them)."""
    if scores is None:
        raise ValueError("GGUF SentencePiece vocabulary has neither merges nor scores "
                         "(tokenizer.ggml.scores); the file is incomplete")
    ids = {token: index for index, token in enumerate(tokens)}
    ranked = []
    for token, score in zip(tokens, scores, strict=True):
        splits = [(token[:cut], token[cut:]) for cut in range(1, len(token))
                  if token[:cut] in ids and token[cut:] in ids]
        splits.sort(key=lambda pair: (ids[pair[0]], ids[pair[1]]))
        ranked += [(score, left, right) for left, right in splits]
    ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [[left, right] for _, left, right in ranked]


def _bpe_json(vocab: GGUFVocab, spelled: list[str], merges: list[list[str]],
              byte_fallback: bool) -> dict[str, Any]:
    """tokenizer.json text for the model and added tokens: the only way to give an added token
    an id of its own choosing, which control tokens spelled outside the byte alphabet need."""
    kinds = enumerate(zip(vocab.tokens, vocab.token_types, strict=True))
    added = [{"id": index, "content": token, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": kind != _USER_DEFINED}
             for index, (token, kind) in kinds if kind in (_UNKNOWN, _CONTROL, _USER_DEFINED)]
    return {"version": "1.0", "added_tokens": added, "model": {
        "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": byte_fallback, "byte_fallback": byte_fallback,
        "ignore_merges": False,
        "vocab": {token: index for index, token in enumerate(spelled)}, "merges": merges}}


def _pre_tokenizer(style: str) -> pre_tokenizers.PreTokenizer:
    if style == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if style == "digits":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    split = _LLAMA3_SPLIT if style == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _post_processor(vocab: GGUFVocab) -> processors.PostProcessor | None:
    """Adds BOS/EOS around an encoded text where the file's add_bos/add_eos flags say so."""
    before = [vocab.bos_token_id] if vocab.add_bos_token and vocab.bos_token_id is not None else []
    after = [vocab.eos_token_id] if vocab.add_eos_token and vocab.eos_token_id is not None else []
    if not before and not after:
        return None
    names = {i: vocab.tokens[i] for i in before + after}
    single = [names[i] for i in before] + ["$A"] + [names[i] for i in after]
    pair = single + ["$B:1"] + [f"{names[i]}:1" for i in after]
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=[(text, i) for i, text in names.items()])


def _gguf_config(vocab: GGUFVocab) -> dict[str, Any]:
    def text(token_id: int | None) -> str | None:
        return vocab.tokens[token_id] if token_id is not None else None

    return {"chat_template": vocab.chat_template, "bos_token": text(vocab.bos_token_id),
            "eos_token": text(vocab.eos_token_id), "unk_token": text(vocab.unk_token_id),
            "pad_token": text(vocab.pad_token_id), "add_bos_token": vocab.add_bos_token,
            "add_eos_token": vocab.add_eos_token}


@functools.cache
def _byte_alphabet() -> tuple[dict[int, str], frozenset[str]]:
    """GPT-2's byte -> printable character table, and its characters (the alphabet that
    byte-level BPE tokens are spelled in)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    table: dict[int, str] = {}
    unprintable = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:  # control bytes and space move past 255, in byte order
            table[byte] = chr(256 + unprintable)
            unprintable += 1
    return table, frozenset(table.values())


def _byte_level_spelling(token: str) -> str:
    """The token as byte-level BPE spells it: llama.cpp stores added tokens as raw text."""
    table, alphabet = _byte_alphabet()
    if all(ch in alphabet for ch in token):
        return token
    return "".join(table[b] for b in token.encode("utf-8"))


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


def _check_messages(messages: list[dict[str, Any]]) -> None:
    allowed = ("system", "user", "assistant", "tool")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in allowed:
            raise ValueError(f"messages[{index}].role must be one of {', '.join(allowed)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{index}].content must be a string")


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template error: {message}")
