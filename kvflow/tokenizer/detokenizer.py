"""Incremental detokenization and stop-string matching.

tokenizers' DecodeStream holds back bytes until they form whole UTF-8 characters, so a
character split across tokens comes out once, complete. The stream is primed with the
prompt's last tokens so that the first generated token decodes in context (for
example the leading-space rules of SentencePiece-style decoders). Bytes that never
complete a character (a generation cut mid-character) are not emitted.
"""
from __future__ import annotations

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

PROMPT_CONTEXT_TOKENS = 6


def stop_holdback(stop: tuple[str, ...]) -> int:
    """Characters a stream should hold back: they may be the start of a stop string."""
    return max((len(s) for s in stop), default=1) - 1


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int],
                 skip_special_tokens: bool, stop: tuple[str, ...],
                 include_stop_str_in_output: bool) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for token_id in prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]:
            self._stream.step(self._backend, token_id)
        self._stop = stop
        self._include_stop = include_stop_str_in_output
        self.text = ""

    def update(self, token_ids: list[int], check_stop: bool) -> str | None:
        """Append the text of new tokens; returns the stop string matched, if any, and
        then cuts the text at it."""
        previous_len = len(self.text)
        for token_id in token_ids:
            piece = self._stream.step(self._backend, token_id)
            if piece:
                self.text += piece
        if not check_stop or not self._stop:
            return None
        return self._find_stop(previous_len)

    def _find_stop(self, previous_len: int) -> str | None:
        best: tuple[int, str] | None = None
        for stop in self._stop:
            # A match may start in text already seen but must end in the new text.
            index = self.text.find(stop, max(0, previous_len - len(stop) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.text = self.text[:index + len(stop) if self._include_stop else index]
        return stop
