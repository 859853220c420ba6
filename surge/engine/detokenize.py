"""Incremental detokenization: stream the text of a growing list of generated ids.

Decoding the whole output after every step costs O(length) per token, and decoding each new
token alone is wrong: byte-level BPE tokens (GPT-2 / Llama-3 / Qwen) may hold part of a UTF-8
character, and some decoders change a token's text depending on its neighbours (leading space).
So, as vLLM and HF TGI do, we decode a short window of recent ids twice, with and without the
tokens not yet read, and take the difference:

    ids:   ... | prefix_offset ... read_offset | new ids ... |
                 \\__ already turned into text __/

When the window ends in U+FFFD the last bytes may be an incomplete character: the offsets stay
put until more ids complete it, and only the text before it is visible. Stop strings are
searched in the visible text only around the newly added part, so each step is O(window).
"""

from __future__ import annotations

from collections.abc import Sequence

import tokenizers

from surge.sampling_params import SamplingParams

__all__ = ["IncrementalDetokenizer", "decode_tokens"]

# Prompt ids that seed the window, so the first output id decodes in context (leading space,
# a character the prompt left unfinished) without any prompt text reaching the output.
PROMPT_CONTEXT_TOKENS = 5
# A partial UTF-8 character needs at most 3 more bytes, so it can only hold a few ids back.
# Past this many the model is emitting invalid bytes; accept the U+FFFD rather than let the
# window (and the cost of every step) grow without bound.
MAX_PENDING_TOKENS = 32
REPLACEMENT_CHAR = "\ufffd"


def decode_tokens(
    tokenizer: tokenizers.Tokenizer, ids: Sequence[int], skip_special_tokens: bool = True
) -> str:
    """Decode ids in one go (the non-streaming path, and the reference for the streaming one)."""
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns one request's generated ids into text, step by step, and applies stop strings.

    ``add_tokens`` after every engine step, ``take_delta`` to get the text to stream. The
    concatenation of all deltas (the last taken with ``finished=True``) equals ``output_text``.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stops = list(params.stop)
        self._include_stop = params.include_stop_str_in_output
        # As in vLLM, stop strings are not looked for until min_tokens ids were generated.
        self._min_tokens = params.min_tokens
        self._num_output_ids = 0
        # Any text this close to the end may be the start of a stop string still to complete.
        self._holdback = max((len(s) for s in self._stops), default=1) - 1

        # Only the prompt's tail is kept: the window never reaches further back.
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_len = len(self._decode(0, self._read_offset))

        self._text = ""  # visible output text: never contains a partial character
        self._pending_len = 0  # chars of _text decoded from ids at or after read_offset
        self._emitted = 0  # chars of _text already handed out by take_delta
        self._matched_stop: str | None = None

    @property
    def output_text(self) -> str:
        """The output decoded so far; cut at the stop string once one matched."""
        return self._text

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the output, if any."""
        return self._matched_stop

    def add_tokens(self, token_ids: Sequence[int]) -> str | None:
        """Append newly generated ids; return the stop string that matched, else None.

        Ids after a match (in this call or a later one) are ignored: the output is final.
        """
        if self._matched_stop is not None:
            return None
        for token_id in token_ids:
            old_len = len(self._text)
            self._ids.append(token_id)
            self._num_output_ids += 1
            self._text += self._read_new_text()
            if (self._stops and len(self._text) > old_len
                    and self._num_output_ids >= self._min_tokens
                    and self._check_stop(old_len)):
                return self._matched_stop
        return None

    def take_delta(self, finished: bool) -> str:
        """Text not handed out yet.

        While running, the last ``len(longest stop) - 1`` chars are held back (they may begin a
        stop string); an incomplete character is never part of the text. Once finished, or
        once a stop string matched (nothing can follow it), everything left is released.
        """
        end = len(self._text)
        if not finished and self._matched_stop is None:
            end -= self._holdback
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted:end]
        self._emitted = end
        return delta

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tokenizer.decode(
            self._ids[start:stop], skip_special_tokens=self._skip_special_tokens
        )

    def _read_new_text(self) -> str:
        """Decode the window after one id was appended; return the text that became visible."""
        window = self._decode(self._prefix_offset)
        new = window[self._prefix_len:]
        waiting = len(self._ids) - self._read_offset < MAX_PENDING_TOKENS
        if waiting and (not new or new.endswith(REPLACEMENT_CHAR)):
            # The tail may be a character still missing bytes: show what precedes it (a prefix
            # of what the completed bytes will decode to) and keep its ids unread.
            visible = new.rstrip(REPLACEMENT_CHAR)
            added = visible[self._pending_len:]
            self._pending_len = max(self._pending_len, len(visible))
            return added
        added = new[self._pending_len:]
        # Slide the window: what was new is now the prefix the next ids are decoded after.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_len = len(self._decode(self._prefix_offset, self._read_offset))
        self._pending_len = 0
        return added

    def _check_stop(self, old_len: int) -> bool:
        """Cut the text at a stop string that ends after ``old_len``; True if one did.

        The match that completes first wins (ties: the one starting first). Earlier ends were
        checked in earlier steps, so the result does not depend on how ids were batched.
        """
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            # Only matches that end in the new text are new; they may start in older text.
            start = self._text.find(stop, max(0, old_len - len(stop) + 1))
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is None:
            return False
        end, start, stop = best
        cut = end if self._include_stop else start
        # Held-back text covers every possible match start, so nothing emitted is ever cut.
        assert cut >= self._emitted, "stop string matched inside text already handed out"
        self._text = self._text[:cut]
        self._matched_stop = stop
        return True
