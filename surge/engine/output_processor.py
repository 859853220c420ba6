"""`OutputProcessor`: one request's engine updates turned into what a user sees.

The engine core speaks token ids; the offline ``LLM`` and the HTTP server both need, per
update, the text it added, the logprobs it carried and how the request ends. That rule lives
here once, so the two front-ends cannot drift apart:

- an EOS or stop token id ends the output without being part of its text (unless
  ``include_stop_str_in_output``), as in vLLM;
- a stop string cuts the text and makes the finish reason "stop", even when the same token
  also reached ``max_tokens``; if the engine still runs the request, the update says so
  (``needs_abort``) and the front-end ends it there, freeing its KV blocks at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tokenizers

from surge.engine.detokenize import IncrementalDetokenizer
from surge.engine.protocol import EngineCoreOutput
from surge.engine.request import FinishReason
from surge.outputs import CompletionOutput, TokenLogprobs
from surge.sampling_params import SamplingParams

__all__ = ["OutputDelta", "OutputProcessor"]


@dataclass
class OutputDelta:
    """What one engine update added to one request's output."""

    text: str  # new visible text (may be "" while a stop string or a character is pending)
    token_ids: list[int]  # the ids the engine generated in this update
    logprobs: list[TokenLogprobs] | None  # theirs, when the request asked for logprobs
    finish_reason: str | None  # "stop", "length" or "abort"; None while running
    stop_reason: int | str | None  # the stop string or stop token id that ended it
    # A stop string ended the text while the engine still runs the request: the caller must
    # end it there (the server leaves the engine stream, the offline engine finishes it).
    needs_abort: bool

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class OutputProcessor:
    """Accumulates one request's output across engine updates: ids, logprobs and text.

    Call ``process`` with every ``EngineCoreOutput`` of the request, in order; the text of
    all deltas joined equals ``text``. Nothing after the finishing update may be passed.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, prompt_token_ids: Sequence[int],
                 params: SamplingParams) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params)
        self._include_stop = params.include_stop_str_in_output
        self.token_ids: list[int] = []
        # The same list grows for the whole request; None when logprobs were not asked for.
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None

    @property
    def text(self) -> str:
        """The output text so far; cut at the stop string once one matched."""
        return self.detokenizer.output_text

    def process(self, output: EngineCoreOutput) -> OutputDelta:
        """One engine update in, what it added out, by the rule in the module docstring."""
        new_ids = output.new_token_ids
        self.token_ids.extend(new_ids)
        if self.logprobs is not None and output.new_logprobs:
            self.logprobs.extend(output.new_logprobs)
        finish, stop_reason = output.finish_reason, output.stop_reason
        text_ids = new_ids
        if finish is FinishReason.STOP and not self._include_stop:
            text_ids = text_ids[:-1]  # the EOS or stop token id that ended it
        matched = self.detokenizer.add_tokens(text_ids) if text_ids else None
        needs_abort = matched is not None and finish is None
        if matched is not None:
            finish, stop_reason = FinishReason.STOP, matched
        text = self.detokenizer.take_delta(finished=finish is not None)
        return OutputDelta(text, list(new_ids), output.new_logprobs,
                           finish.value if finish is not None else None, stop_reason,
                           needs_abort)

    def completion(self, delta: OutputDelta, index: int = 0) -> CompletionOutput:
        """The whole output so far, with ``delta`` (the latest ``process`` result) as the
        increment, shaped as the offline API returns it."""
        return CompletionOutput(index, self.text, list(self.token_ids), delta.finish_reason,
                                delta.stop_reason, self.logprobs, delta_text=delta.text,
                                delta_token_ids=delta.token_ids)
