"""Datasets and arrival processes: seeded, shaped as asked, and statistically right."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from surge.bench.workloads import (
    RANDOM_WORDS,
    DatasetSpec,
    LengthDist,
    arrival_offsets,
    build_dataset,
    load_tokenizer,
)


def _offsets(rate: float, burstiness: float, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.fromiter(itertools.islice(arrival_offsets(rate, burstiness, rng), n), float)


def test_poisson_arrivals_have_the_requested_rate_and_exponential_gaps() -> None:
    n, rate = 20_000, 250.0
    gaps = np.diff(_offsets(rate, 1.0, n), prepend=0.0)
    # The mean of n exponential gaps has relative std 1/sqrt(n) = 0.7%; allow 4 sigma.
    assert abs(gaps.mean() * rate - 1) < 4 / math.sqrt(n)
    # Exponential gaps: coefficient of variation 1, and P(gap > mean) = 1/e.
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    assert (gaps > 1 / rate).mean() == pytest.approx(math.exp(-1), abs=0.02)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_arrivals_keep_the_rate_and_change_only_burstiness(burstiness: float) -> None:
    n, rate = 20_000, 100.0
    gaps = np.diff(_offsets(rate, burstiness, n), prepend=0.0)
    assert gaps.mean() * rate == pytest.approx(1.0, abs=0.05)
    # Gamma(shape=b) gaps have coefficient of variation 1/sqrt(b).
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_infinite_rate_sends_everything_at_once_and_bad_rates_are_refused() -> None:
    assert _offsets(math.inf, 1.0, 5).tolist() == [0.0] * 5
    with pytest.raises(ValueError, match="--rate"):
        _offsets(0.0, 1.0, 1)


def test_arrivals_are_reproducible_from_the_seed() -> None:
    assert np.array_equal(_offsets(10, 1, 100, seed=3), _offsets(10, 1, 100, seed=3))
    assert not np.array_equal(_offsets(10, 1, 100, seed=3), _offsets(10, 1, 100, seed=4))


@pytest.mark.parametrize(("text", "low", "high"), [
    ("128", 128, 128), ("uniform:64,512", 64, 512), ("normal:256,16", 150, 360),
])
def test_length_distributions_parse_and_sample_in_range(text: str, low: int, high: int) -> None:
    values = LengthDist.parse(text).sample(np.random.default_rng(0), 2000)
    assert values.min() >= low and values.max() <= high
    assert str(LengthDist.parse(text)) == text


@pytest.mark.parametrize("text", ["abc", "uniform:5", "uniform:9,3", "gauss:1,2", "0"])
def test_bad_length_distributions_say_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match="uniform:64,512"):
        LengthDist.parse(text)


def _random(n: int = 20, seed: int = 0, **spec: object) -> list:
    fields = {"input_len": LengthDist.parse("uniform:5,40"), **spec}
    return build_dataset(DatasetSpec(**fields), n, np.random.default_rng(seed))


def test_random_token_id_prompts_are_seeded_and_sized() -> None:
    requests = _random(prompt_kind="ids", vocab_size=1000)
    assert requests == _random(prompt_kind="ids", vocab_size=1000)
    assert requests != _random(seed=1, prompt_kind="ids", vocab_size=1000)
    for r in requests:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len
        assert 5 <= r.prompt_len <= 40 and max(r.prompt) < 1000
        assert r.output_len == 64  # the default


def test_random_token_ids_need_a_vocabulary_size() -> None:
    with pytest.raises(ValueError, match="--vocab-size"):
        _random(prompt_kind="ids")


def test_random_text_prompts_have_one_word_per_token() -> None:
    for r in _random(output_len=LengthDist.parse("7")):
        assert isinstance(r.prompt, str) and len(r.prompt.split()) == r.prompt_len
        assert r.output_len == 7


def _word_tokenizer(path: Path) -> Path:
    """One token per word of the generator's word list (and " tok", the fake server's)."""
    words = ["[UNK]", "tok", *sorted(set(RANDOM_WORDS))]
    vocab = {w: i for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def test_a_tokenizer_sizes_text_prompts_exactly(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(_word_tokenizer(tmp_path)))
    spec = DatasetSpec(input_len=LengthDist.parse("12"))
    for r in build_dataset(spec, 5, np.random.default_rng(0), tokenizer):
        assert r.prompt_len == len(tokenizer.encode(r.prompt).ids) == 12


def test_missing_tokenizer_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(str(tmp_path))


def test_shared_prefix_requests_start_with_the_same_prefix() -> None:
    spec = DatasetSpec(name="shared-prefix", prefix_len=100, suffix_len=8, prompt_kind="ids",
                       vocab_size=5000, num_prefixes=2)
    requests = build_dataset(spec, 6, np.random.default_rng(0))
    prefixes = {tuple(r.prompt[:100]) for r in requests}
    assert len(prefixes) == 2
    assert len({tuple(r.prompt[100:]) for r in requests}) == 6  # suffixes are unique
    assert all(r.prompt_len == len(r.prompt) == 108 for r in requests)


def test_shared_prefix_goes_into_the_system_message_for_chat() -> None:
    spec = DatasetSpec(name="shared-prefix", prefix_len=50, suffix_len=5, chat=True)
    requests = build_dataset(spec, 3, np.random.default_rng(0))
    assert len({r.system_prompt for r in requests}) == 1
    assert all(len(r.prompt.split()) == 5 and r.prompt_len == 55 for r in requests)


def test_sharegpt_takes_the_first_exchange_and_its_reply_length(tmp_path: Path) -> None:
    data = [
        {"conversations": [{"from": "human", "value": "a b c d"},
                           {"from": "gpt", "value": "x" * 40}]},
        {"conversations": [{"from": "gpt", "value": "not a prompt"}]},
        {"id": "no conversations"},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    requests = build_dataset(DatasetSpec(name="sharegpt", path=str(path)), 3,
                             np.random.default_rng(0))
    assert [r.prompt for r in requests] == ["a b c d"] * 3
    assert requests[0].output_len == 10  # 40 characters at about 4 per token


def test_jsonl_prompts_keep_their_own_max_tokens(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello there", "max_tokens": 9}\n"just a string"\n\n'
                    '{"prompt": [1, 2, 3]}\n')
    requests = build_dataset(DatasetSpec(name="jsonl", path=str(path)), 3,
                             np.random.default_rng(0))
    by_prompt = {str(r.prompt): r for r in requests}
    assert by_prompt["hello there"].output_len == 9
    assert by_prompt["just a string"].output_len == 64
    assert by_prompt["[1, 2, 3]"].prompt_len == 3


def test_bad_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "wrong key"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2"):
        build_dataset(DatasetSpec(name="jsonl", path=str(path)), 2, np.random.default_rng(0))


def test_file_datasets_need_a_path() -> None:
    with pytest.raises(ValueError, match="--dataset-path"):
        build_dataset(DatasetSpec(name="sharegpt"), 1, np.random.default_rng(0))


def test_classify_requests_carry_png_images() -> None:
    import base64

    spec = DatasetSpec(classify=True, image_size=16)
    requests = build_dataset(spec, 3, np.random.default_rng(0))
    assert all(base64.b64decode(r.image_b64 or "")[:4] == b"\x89PNG" for r in requests)
