"""Incremental detokenization against a tiny byte-level BPE whose tokens split characters."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from surge.engine.detokenize import MAX_PENDING_TOKENS, IncrementalDetokenizer, decode_tokens
from surge.sampling_params import SamplingParams

SPECIALS = ["<|endoftext|>", "<|im_end|>"]
ENGLISH = (
    "The quick brown fox jumps over the lazy dog while the hello world program prints its "
    "greeting. Streaming text arrives token by token; a stop string ends it. "
)
# Mostly English, so the merges go there and the rarer multi-byte text stays split into
# pieces, some of them straddling two characters (the end of 日 with the start of 本).
CORPUS = [ENGLISH] * 30 + ["Un café au lait, s'il vous plaît.", "日本語のテキストです。",
                           "Party time 🎉 with emoji 😀 and 👍🏽."] * 3
SAMPLES = [
    "Hello world",
    " hello world, un café au lait.",
    "日本語のテキストです。",
    "Party 🎉 time 😀👍🏽 ok",
    "mixed: café 日本語 🎉 and the lazy dog\n\tend",
    "éééé日日日🎉🎉🎉",
]
# Units, not code points: 👍🏽 is two.
ALPHABET = [*"abc xyz.,\n", "é", "日", "本", "語", "🎉", "😀", "👍🏽"]
PIECES = st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=3).map("".join)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer()


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on CORPUS in well under a second."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text).ids


def random_steps(ids: list[int], rng: random.Random) -> list[list[int]]:
    """Split ids into consecutive steps of 0..4 ids (0: an engine step that produced nothing)."""
    steps, i = [], 0
    while i < len(ids):
        n = rng.randint(0, 4)
        steps.append(ids[i:i + n])
        i += n
    return steps


def stream(
    tok: Tokenizer, steps: list[list[int]], params: SamplingParams, prompt: list[int] | None = None
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed steps like the engine does; stop at the first stop-string match."""
    detok = IncrementalDetokenizer(tok, prompt or [], params)
    deltas, matched = [], None
    for step in steps:
        matched = detok.add_tokens(step)
        deltas.append(detok.take_delta(finished=matched is not None))
        # Everything handed out so far must stay the start of the final text.
        assert detok.output_text.startswith("".join(deltas))
        if matched is not None:
            break
    else:
        deltas.append(detok.take_delta(finished=True))
    return detok, deltas, matched


def expected_cut(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Reference: cut at the match that ends first (ties: the one starting first)."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not found:
        return text, None
    end, start, stop = min(found)
    return text[:end if include else start], stop


def test_tokenizer_really_splits_characters(tok: Tokenizer) -> None:
    for char in ["日", "🎉", "😀"]:
        pieces = [tok.decode([i]) for i in encode(tok, char)]
        assert len(pieces) > 1 and "\ufffd" in "".join(pieces)
    # Some token holds the end of one character and the start of the next.
    assert any(tok.decode([i]).count("\ufffd") > 1 for i in encode(tok, "日本語"))


@pytest.mark.parametrize("text", SAMPLES)
def test_random_splits_match_full_decode(tok: Tokenizer, text: str) -> None:
    ids = encode(tok, text)
    rng = random.Random(text)
    for _ in range(50):
        detok, deltas, _ = stream(tok, random_steps(ids, rng), SamplingParams())
        assert "".join(deltas) == detok.output_text == decode_tokens(tok, ids) == text
        assert not any("\ufffd" in d for d in deltas)


def test_one_token_at_a_time_never_shows_partial_char(tok: Tokenizer) -> None:
    ids = encode(tok, "日本語 🎉😀👍🏽 café")
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    for i in ids:
        detok.add_tokens([i])
        assert "\ufffd" not in detok.output_text
        assert "\ufffd" not in detok.take_delta(finished=False)
    assert detok.output_text == "日本語 🎉😀👍🏽 café"


@settings(max_examples=150, deadline=None)
@given(
    chars=st.lists(st.sampled_from(ALPHABET), max_size=30),
    stops=st.lists(PIECES, max_size=3),
    include=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_stream_equals_reference(
    tok: Tokenizer, chars: list[str], stops: list[str], include: bool, seed: int
) -> None:
    text = "".join(chars)
    ids = encode(tok, text)
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    detok, deltas, matched = stream(tok, random_steps(ids, random.Random(seed)), params)
    want_text, want_stop = expected_cut(text, stops, include)
    assert (detok.output_text, matched) == (want_text, want_stop)
    assert "".join(deltas) == want_text
    assert not any("\ufffd" in d for d in deltas)


def run_stop(tok: Tokenizer, text: str, stop: list[str], include: bool = False) -> tuple:
    ids = encode(tok, text)
    params = SamplingParams(stop=stop, include_stop_str_in_output=include)
    detok, deltas, matched = stream(tok, [[i] for i in ids], params)
    assert "".join(deltas) == detok.output_text
    return detok.output_text, matched


def test_stop_within_one_token(tok: Tokenizer) -> None:
    assert tok.encode(" hello").tokens == ["Ġhello"]
    assert run_stop(tok, "say hello world", ["ell"]) == ("say h", "ell")


def test_stop_spanning_tokens(tok: Tokenizer) -> None:
    assert len(encode(tok, "o wo")) > 1
    assert run_stop(tok, "hello world again", ["o wo"]) == ("hell", "o wo")
    # Across tokens that each hold only part of a character.
    assert run_stop(tok, "x 日本語 y", ["本語"]) == ("x 日", "本語")


def test_stop_at_very_beginning(tok: Tokenizer) -> None:
    text, matched = run_stop(tok, "STOP and more", ["STOP"])
    assert (text, matched) == ("", "STOP")


def test_earlier_stop_wins_regardless_of_list_order(tok: Tokenizer) -> None:
    assert run_stop(tok, "the lazy dog, the quick fox", ["quick", "lazy"]) == ("the ", "lazy")


def test_include_stop_str_in_output(tok: Tokenizer) -> None:
    assert run_stop(tok, "the lazy dog", ["lazy"], include=True) == ("the lazy", "lazy")


def test_stop_split_over_steps_is_found_in_held_back_text(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["fox jumps"]))
    assert detok.add_tokens(encode(tok, "brown fox")) is None
    # " fox" may begin the stop string: all but len-1 chars go out.
    assert detok.take_delta(finished=False) == "b"
    assert detok.add_tokens(encode(tok, " jumps over")) == "fox jumps"
    assert detok.take_delta(finished=False) == "rown "
    assert detok.output_text == "brown "
    # After the match nothing more is ever emitted.
    assert detok.add_tokens(encode(tok, " again")) is None
    assert detok.take_delta(finished=True) == ""
    assert detok.output_text == "brown "


def test_held_back_text_released_on_finish(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["xyz"]))
    assert detok.add_tokens(encode(tok, "hello wor")) is None
    assert detok.take_delta(finished=False) == "hello w"
    assert detok.take_delta(finished=False) == ""
    assert detok.take_delta(finished=True) == "or"
    assert detok.output_text == "hello wor"


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok: Tokenizer, skip: bool) -> None:
    eot, im_end = (tok.token_to_id(s) for s in SPECIALS)
    ids = [*encode(tok, "Hello"), im_end, *encode(tok, " world"), eot]
    detok, deltas, _ = stream(tok, [[i] for i in ids], SamplingParams(skip_special_tokens=skip))
    want = "Hello world" if skip else "Hello<|im_end|> world<|endoftext|>"
    assert "".join(deltas) == detok.output_text == want


def test_stop_string_on_special_token_text(tok: Tokenizer) -> None:
    ids = [*encode(tok, "Hello"), tok.token_to_id("<|im_end|>"), *encode(tok, " world")]
    params = SamplingParams(stop=["<|im_end|>"], skip_special_tokens=False)
    detok, deltas, matched = stream(tok, [[i] for i in ids], params)
    assert (detok.output_text, matched, "".join(deltas)) == ("Hello", "<|im_end|>", "Hello")


def test_leading_space_after_prompt(tok: Tokenizer) -> None:
    prompt = encode(tok, "The quick brown fox jumps over")
    output = encode(tok, " the lazy dog")
    assert tok.id_to_token(output[0]).startswith("Ġ")
    rng = random.Random(0)
    for _ in range(20):
        detok, deltas, _ = stream(tok, random_steps(output, rng), SamplingParams(), prompt)
        assert "".join(deltas) == detok.output_text == " the lazy dog"


def test_prompt_ending_in_multibyte_text_is_not_repeated(tok: Tokenizer) -> None:
    prompt = encode(tok, "日本語")
    detok, deltas, _ = stream(tok, [[i] for i in encode(tok, "のテキスト")], SamplingParams(),
                              prompt)
    assert "".join(deltas) == detok.output_text == "のテキスト"


class CountingTokenizer:
    """Records how many ids each decode call sees."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.sizes = tok, []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_only_a_small_window(tok: Tokenizer) -> None:
    text = ("日本語 🎉 café, the lazy dog. " * 60).strip()
    ids = encode(tok, text)
    counter = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counter, encode(tok, "prompt " * 50), SamplingParams())
    for i in ids:
        detok.add_tokens([i])
    assert len(ids) > 500 and detok.output_text == text
    # Prefix plus unread ids: a few tokens of context and one split-up word, whatever the length.
    assert max(counter.sizes) <= 12


def test_invalid_bytes_do_not_stall_or_grow_the_window(tok: Tokenizer) -> None:
    # The second half of 🎉 alone is continuation bytes only: never a valid character.
    tail = encode(tok, "🎉")[-1]
    counter = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counter, [], SamplingParams())
    deltas = []
    for _ in range(200):
        detok.add_tokens([tail])
        deltas.append(detok.take_delta(finished=False))
    deltas.append(detok.take_delta(finished=True))
    assert "".join(deltas) == detok.output_text and "\ufffd" in detok.output_text
    assert max(counter.sizes) <= 2 * MAX_PENDING_TOKENS
