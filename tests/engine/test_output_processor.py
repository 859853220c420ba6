"""The one rule that turns engine updates into text, logprobs and finish reasons."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from surge.engine.output_processor import OutputProcessor
from surge.engine.protocol import EngineCoreOutput
from surge.engine.request import FinishReason
from surge.outputs import TokenLogprobs
from surge.sampling_params import SamplingParams
from tests.engine.test_detokenize import SPECIALS, encode, train_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer()


def _updates(ids: list[int], finish: FinishReason | None = None,
             stop_reason: int | str | None = None) -> list[EngineCoreOutput]:
    """One update per id, the last one carrying the finish reason."""
    outputs = [EngineCoreOutput("r", [i]) for i in ids]
    outputs[-1].finish_reason, outputs[-1].stop_reason = finish, stop_reason
    return outputs


def test_a_stop_token_ends_the_output_without_its_text(tok: Tokenizer) -> None:
    eot = tok.token_to_id(SPECIALS[0])
    params = SamplingParams(skip_special_tokens=False)
    processor = OutputProcessor(tok, encode(tok, "prompt"), params)
    ids = [*encode(tok, "hello world"), eot]
    deltas = [processor.process(u) for u in _updates(ids, FinishReason.STOP, eot)]
    assert "".join(d.text for d in deltas) == processor.text == "hello world"
    assert processor.token_ids == ids
    assert [d.finished for d in deltas] == [False] * (len(ids) - 1) + [True]
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", eot)
    assert not any(d.needs_abort for d in deltas)


def test_include_stop_str_in_output_keeps_the_stop_token_text(tok: Tokenizer) -> None:
    eot = tok.token_to_id(SPECIALS[0])
    params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True)
    processor = OutputProcessor(tok, [], params)
    for update in _updates([*encode(tok, "hello"), eot], FinishReason.STOP, eot):
        processor.process(update)
    assert processor.text == "hello" + SPECIALS[0]


def test_a_stop_string_while_running_asks_the_caller_to_abort(tok: Tokenizer) -> None:
    processor = OutputProcessor(tok, [], SamplingParams(stop=["lazy"]))
    deltas = []
    for update in _updates(encode(tok, "the lazy dog")):
        deltas.append(processor.process(update))
        if deltas[-1].finished:
            break
    last = deltas[-1]
    assert (last.finish_reason, last.stop_reason, last.needs_abort) == ("stop", "lazy", True)
    assert "".join(d.text for d in deltas) == processor.text == "the "


def test_a_stop_string_on_the_last_token_beats_length(tok: Tokenizer) -> None:
    processor = OutputProcessor(tok, [], SamplingParams(stop=["dog"]))
    deltas = [processor.process(u) for u in _updates(encode(tok, "the lazy dog"),
                                                    FinishReason.LENGTH)]
    last = deltas[-1]
    assert (last.finish_reason, last.stop_reason, last.needs_abort) == ("stop", "dog", False)
    assert processor.text == "the lazy "


def test_logprobs_accumulate_only_when_asked(tok: Tokenizer) -> None:
    ids = encode(tok, "hello world")
    updates = _updates(ids, FinishReason.LENGTH)
    for update in updates:
        update.new_logprobs = [TokenLogprobs(update.new_token_ids[0], -0.5)]
    wanted = OutputProcessor(tok, [], SamplingParams(logprobs=0))
    deltas = [wanted.process(u) for u in updates]
    assert wanted.logprobs is not None
    assert [e.token_id for e in wanted.logprobs] == ids
    assert all(d.logprobs is not None and len(d.logprobs) == 1 for d in deltas)
    unwanted = OutputProcessor(tok, [], SamplingParams())
    for update in _updates(ids, FinishReason.LENGTH):
        unwanted.process(update)
    assert unwanted.logprobs is None


def test_completion_is_cumulative_with_the_delta_as_increment(tok: Tokenizer) -> None:
    processor = OutputProcessor(tok, [], SamplingParams())
    ids = encode(tok, "hello world")
    for update in _updates(ids, FinishReason.LENGTH):
        delta = processor.process(update)
    completion = processor.completion(delta, index=2)
    assert (completion.index, completion.text, completion.token_ids) == (2, "hello world", ids)
    assert (completion.finish_reason, completion.delta_token_ids) == ("length", [ids[-1]])
    assert completion.delta_text == delta.text
