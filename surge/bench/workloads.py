"""What the load generator sends, and when: datasets of prompts and arrival processes.

Everything here is seeded and pure (no I/O except reading a user's dataset file), so the same
config always yields the same prompts, lengths and arrival times.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DATASETS",
    "RANDOM_WORDS",
    "BenchRequest",
    "DatasetSpec",
    "LengthDist",
    "arrival_offsets",
    "build_dataset",
    "estimate_tokens",
    "load_tokenizer",
]

DATASETS = ("random", "shared-prefix", "sharegpt", "jsonl", "images")

# Common English words: almost every one is a single token (with its leading space) in GPT-2,
# Llama and Qwen tokenizers, so a prompt of N of them is about N tokens even without a tokenizer.
_WORD_TEXT = (
    "the of and to in is was for on are with as his they be at one have this from or had by hot "
    "word but what some we can out other were all there when up use your how said an each she "
    "which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over "
    "know water than call first who may down side been now find any new work part take get place "
    "made live where after back little only round man year came show every good me give our under "
    "name very through just form sentence great think say help low line differ turn cause much "
    "mean before move right boy old too same tell does set three want air well also play small end "
    "put home read hand port large spell add even land here must big high such follow act why ask "
    "men change went light kind off need house picture try us again animal point mother world near "
    "build self earth father head stand own page should country found answer school grow study "
    "still learn plant cover food sun four between state keep eye never last let thought city tree "
    "cross farm hard start might story saw far sea draw left late run while press close night real"
)
RANDOM_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request's content. ``prompt_len`` is in tokens: exact for token ids, else from the
    tokenizer when one is given, else estimated (the server's ``usage`` replaces it when given)."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int
    system_prompt: str | None = None  # chat only: the shared prefix of W3 goes here
    image_b64: str | None = None  # classify only


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A distribution of token counts: ``128``, ``uniform:64,512`` or ``normal:256,64``."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str | int) -> LengthDist:
        text = str(text).strip()
        kind, _, params = text.partition(":")
        try:
            if not params:
                return cls._checked("fixed", float(int(kind)))
            a, b = (float(x) for x in params.split(","))
        except ValueError:
            raise ValueError(_LENGTH_HELP.format(text=text)) from None
        if kind not in ("uniform", "normal"):
            raise ValueError(_LENGTH_HELP.format(text=text))
        return cls._checked(kind, a, b)

    @classmethod
    def _checked(cls, kind: str, a: float, b: float = 0.0) -> LengthDist:
        if a < 1 or (kind == "uniform" and b < a) or (kind == "normal" and b < 0):
            raise ValueError(_LENGTH_HELP.format(text=f"{kind}:{a},{b}"))
        return cls(kind, a, b)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            values = np.full(n, self.a)
        elif self.kind == "uniform":
            values = rng.integers(int(self.a), int(self.b), endpoint=True, size=n)
        else:
            values = np.rint(rng.normal(self.a, self.b, size=n))
        return np.maximum(values, 1).astype(np.int64)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        return f"{self.kind}:{self.a:g},{self.b:g}"


_LENGTH_HELP = (
    "bad length distribution {text!r}: use a token count (128), 'uniform:LO,HI' (uniform:64,512) "
    "or 'normal:MEAN,STD' (normal:256,64), all >= 1"
)


@dataclass(frozen=True)
class DatasetSpec:
    """How to build prompts; the CLI fills it from flags."""

    name: str = "random"
    path: str | None = None
    input_len: LengthDist = LengthDist("fixed", 128)
    output_len: LengthDist | None = None  # None: from the dataset file, else 64 tokens
    prompt_kind: str = "text"  # "ids" or "text"
    prefix_len: int = 1024
    suffix_len: int = 32
    num_prefixes: int = 1
    vocab_size: int | None = None
    chat: bool = False  # put the shared prefix in a system message
    classify: bool = False  # requests carry images, not prompts
    image_size: int = 224


DEFAULT_OUTPUT_LEN = 64


def build_dataset(
    spec: DatasetSpec, n: int, rng: np.random.Generator, tokenizer: Any | None = None
) -> list[BenchRequest]:
    """``n`` requests drawn from ``spec``; the same ``rng`` state gives the same requests."""
    if spec.name not in DATASETS:
        raise ValueError(f"unknown dataset {spec.name!r}: choose one of {', '.join(DATASETS)}")
    if spec.name in ("sharegpt", "jsonl", "images") and not spec.path:
        raise ValueError(f"--dataset {spec.name} needs --dataset-path FILE, e.g. "
                         f"--dataset {spec.name} --dataset-path {_EXAMPLE_PATHS[spec.name]}")
    if spec.classify and spec.name not in ("random", "images"):
        raise ValueError("the classify endpoint sends images: use --dataset random (noise "
                         "images of --image-size) or --dataset images --dataset-path DIR")
    if spec.classify and spec.name == "random":
        return random_images(spec, n, rng)
    builder = {
        "random": _random_dataset,
        "shared-prefix": _shared_prefix_dataset,
        "sharegpt": _sharegpt_dataset,
        "jsonl": _jsonl_dataset,
        "images": _image_dataset,
    }[spec.name]
    return builder(spec, n, rng, tokenizer)


_EXAMPLE_PATHS = {
    "sharegpt": "ShareGPT_V3_unfiltered_cleaned_split.json",
    "jsonl": "prompts.jsonl",
    "images": "./images/",
}


def _output_lens(spec: DatasetSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    dist = spec.output_len or LengthDist("fixed", DEFAULT_OUTPUT_LEN)
    return dist.sample(rng, n)


def _random_dataset(spec: DatasetSpec, n: int, rng: np.random.Generator,
                    tokenizer: Any | None) -> list[BenchRequest]:
    input_lens = spec.input_len.sample(rng, n)
    output_lens = _output_lens(spec, rng, n)
    return [
        _random_prompt(spec, int(length), rng, tokenizer, int(out))
        for length, out in zip(input_lens, output_lens, strict=True)
    ]


def _random_prompt(spec: DatasetSpec, length: int, rng: np.random.Generator,
                   tokenizer: Any | None, output_len: int) -> BenchRequest:
    if spec.prompt_kind == "ids":
        ids = random_token_ids(length, rng, _vocab_size(spec, tokenizer))
        return BenchRequest(ids, length, output_len)
    text, prompt_len = random_text(length, rng, tokenizer)
    return BenchRequest(text, prompt_len, output_len)


def random_token_ids(length: int, rng: np.random.Generator, vocab_size: int) -> list[int]:
    return rng.integers(0, vocab_size, size=length).tolist()


def random_text(length: int, rng: np.random.Generator, tokenizer: Any | None) -> tuple[str, int]:
    """Random words about ``length`` tokens long; with a tokenizer, cut to exactly that length
    (re-encoding the decoded text can still differ by a token, so its count is returned)."""
    words = [RANDOM_WORDS[i] for i in rng.integers(0, len(RANDOM_WORDS), size=length)]
    text = " ".join(words)
    if tokenizer is None:
        return text, length
    ids = tokenizer.encode(text, add_special_tokens=False).ids[:length]
    text = tokenizer.decode(ids)
    return text, count_tokens(tokenizer, text)


def _vocab_size(spec: DatasetSpec, tokenizer: Any | None) -> int:
    if spec.vocab_size:
        return spec.vocab_size
    if tokenizer is not None:
        # Added tokens (specials) sit at the end of the vocabulary; random prompts avoid them.
        return tokenizer.get_vocab_size(with_added_tokens=False)
    raise ValueError("random token-id prompts need the vocabulary size: pass --vocab-size "
                     "(e.g. --vocab-size 49152) or --tokenizer DIR, or use --prompt-kind text")


def _shared_prefix_dataset(spec: DatasetSpec, n: int, rng: np.random.Generator,
                           tokenizer: Any | None) -> list[BenchRequest]:
    """W3: every request starts with one of ``num_prefixes`` long prefixes, then unique tokens."""
    prefixes = [_random_prompt(spec, spec.prefix_len, rng, tokenizer, 0)
                for _ in range(spec.num_prefixes)]
    output_lens = _output_lens(spec, rng, n)
    requests = []
    for i in range(n):
        prefix = prefixes[i % spec.num_prefixes]
        suffix = _random_prompt(spec, spec.suffix_len, rng, tokenizer, 0)
        requests.append(_join_prefix(spec, prefix, suffix, int(output_lens[i])))
    return requests


def _join_prefix(spec: DatasetSpec, prefix: BenchRequest, suffix: BenchRequest,
                 output_len: int) -> BenchRequest:
    total = prefix.prompt_len + suffix.prompt_len
    if spec.chat:
        assert isinstance(prefix.prompt, str) and isinstance(suffix.prompt, str)
        return BenchRequest(suffix.prompt, total, output_len, system_prompt=prefix.prompt)
    if isinstance(prefix.prompt, list):
        assert isinstance(suffix.prompt, list)
        return BenchRequest(prefix.prompt + suffix.prompt, total, output_len)
    return BenchRequest(f"{prefix.prompt} {suffix.prompt}", total, output_len)


def _sharegpt_dataset(spec: DatasetSpec, n: int, rng: np.random.Generator,
                      tokenizer: Any | None) -> list[BenchRequest]:
    """ShareGPT JSON: the first human turn is the prompt; the reply's length is the output
    length unless --output-len is given."""
    with open(spec.path or "", encoding="utf-8") as f:
        conversations = json.load(f)
    pairs = [pair for item in conversations if (pair := _first_exchange(item))]
    if not pairs:
        raise ValueError(f"{spec.path}: no conversation with a human turn followed by a reply; "
                         "expected [{\"conversations\": [{\"from\": \"human\", \"value\": ...}, "
                         "{\"from\": \"gpt\", \"value\": ...}]}, ...]")
    order = _sample_indices(rng, len(pairs), n)
    fixed_out = spec.output_len.sample(rng, n) if spec.output_len else None
    requests = []
    for k, idx in enumerate(order):
        prompt, reply = pairs[idx]
        out = int(fixed_out[k]) if fixed_out is not None else estimate_tokens(reply, tokenizer)
        requests.append(BenchRequest(prompt, estimate_tokens(prompt, tokenizer), max(out, 1)))
    return requests


def _first_exchange(item: Any) -> tuple[str, str] | None:
    if not isinstance(item, dict):
        return None
    turns = item.get("conversations") or item.get("conversation")
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    first, second = turns[0], turns[1]
    if not (isinstance(first, dict) and isinstance(second, dict)):
        return None
    if first.get("from") not in ("human", "user") or not first.get("value"):
        return None
    return str(first["value"]), str(second.get("value", ""))


def _jsonl_dataset(spec: DatasetSpec, n: int, rng: np.random.Generator,
                   tokenizer: Any | None) -> list[BenchRequest]:
    """One JSON per line: {"prompt": "..." or [ids], "max_tokens": 64} or a bare string."""
    rows = []
    with open(spec.path or "", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                rows.append(_parse_jsonl_row(line, spec.path or "", line_no))
    if not rows:
        raise ValueError(f"{spec.path}: no prompts (expected one JSON per line, "
                         "e.g. {\"prompt\": \"Hello\", \"max_tokens\": 64})")
    order = _sample_indices(rng, len(rows), n)
    fixed_out = _output_lens(spec, rng, n)
    requests = []
    for k, idx in enumerate(order):
        prompt, out = rows[idx]
        prompt_len = len(prompt) if isinstance(prompt, list) else estimate_tokens(prompt, tokenizer)
        out = out if out is not None and spec.output_len is None else int(fixed_out[k])
        requests.append(BenchRequest(prompt, prompt_len, out))
    return requests


def _parse_jsonl_row(line: str, path: str, line_no: int) -> tuple[str | list[int], int | None]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{line_no}: not JSON ({exc})") from None
    if isinstance(row, str):
        return row, None
    prompt = row.get("prompt") if isinstance(row, dict) else None
    if not isinstance(prompt, str | list):
        raise ValueError(f"{path}:{line_no}: expected {{\"prompt\": \"...\"}} or a JSON string")
    out = row.get("max_tokens", row.get("output_len"))
    return prompt, int(out) if out is not None else None


def _image_dataset(spec: DatasetSpec, n: int, rng: np.random.Generator,
                   tokenizer: Any | None) -> list[BenchRequest]:
    """Every image file of a folder, sampled in a seeded order."""
    files = sorted(p for p in Path(spec.path or "").iterdir()
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if not files:
        raise ValueError(f"{spec.path}: no .png/.jpg/.jpeg/.webp/.bmp files")
    encoded = [base64.b64encode(p.read_bytes()).decode("ascii") for p in files]
    order = _sample_indices(rng, len(files), n)
    return [BenchRequest("", 0, 0, image_b64=encoded[i]) for i in order]


def random_images(spec: DatasetSpec, n: int, rng: np.random.Generator,
                  pool_size: int = 8) -> list[BenchRequest]:
    """Noise PNGs for classification; a small pool is cycled (encoding is slow, content is not
    what a classifier's latency depends on)."""
    from PIL import Image  # matplotlib's own dependency, so always installed with it

    pool = []
    for _ in range(min(pool_size, n)):
        pixels = rng.integers(0, 256, size=(spec.image_size, spec.image_size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        pool.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return [BenchRequest("", 0, 0, image_b64=pool[i % len(pool)]) for i in range(n)]


def _sample_indices(rng: np.random.Generator, population: int, n: int) -> list[int]:
    """A seeded shuffle, repeated when more requests than rows are asked for."""
    rounds = math.ceil(n / population)
    return np.concatenate([rng.permutation(population) for _ in range(rounds)])[:n].tolist()


def estimate_tokens(text: str, tokenizer: Any | None) -> int:
    """Token count by tokenizer, else the usual 4-characters-per-token estimate."""
    if tokenizer is not None:
        return count_tokens(tokenizer, text)
    return max(1, round(len(text) / 4))


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def load_tokenizer(path: str) -> Any:
    """A ``tokenizers.Tokenizer`` from a checkpoint directory or a ``tokenizer.json`` file."""
    from tokenizers import Tokenizer

    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {file}: --tokenizer takes a directory holding "
                                "tokenizer.json (a Hugging Face checkpoint) or the file itself")
    return Tokenizer.from_file(str(file))


def arrival_offsets(rate: float, burstiness: float, rng: np.random.Generator) -> Iterator[float]:
    """Seconds from the start at which successive requests arrive, forever.

    Gaps are Gamma(shape=burstiness, scale=1/(rate*burstiness)): the mean gap is 1/rate for any
    burstiness; burstiness 1 is a Poisson process, below 1 burstier, above 1 more regular.
    An infinite rate sends everything at once.
    """
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"--rate and --burstiness must be > 0 (got rate={rate}, "
                         f"burstiness={burstiness}); use --rate inf to send all at once")
    if math.isinf(rate):
        while True:
            yield 0.0
    now = 0.0
    scale = 1.0 / (rate * burstiness)
    while True:
        # Drawn in blocks: one numpy call per 1,024 arrivals keeps the dispatcher cheap.
        for gap in rng.gamma(burstiness, scale, size=1024).tolist():
            now += gap
            yield now

