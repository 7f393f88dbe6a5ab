"""Token ids to text, incrementally: deltas for streaming whose concatenation is exactly the final text.

The final text is what offline generation reports (:class:`repedit.model.generation.Generated`):
``tokenizer.decode(ids, skip_special_tokens=True).strip()``, cut before the first stop string when
the request gave any. While tokens arrive, only text that can no longer change is released: an
incomplete UTF-8 character (decoded as U+FFFD) waits for its next byte, trailing whitespace waits for
the next visible character (it is stripped at the end), and the last ``len(stop) - 1`` characters
wait until they cannot be the start of a stop string.
"""

from __future__ import annotations

from typing import Sequence


class TextAssembler:
    """Accumulates one response's token ids and hands out text deltas.

    Args:
        tokenizer: the model's tokenizer (``decode``).
        stop: stop strings; the text ends before the first occurrence of any of them.
        incremental: hand out deltas as tokens arrive (streaming). Without it and without stop
            strings, :meth:`add` only collects ids and the text is decoded once at the end.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), incremental: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.incremental = incremental or bool(self.stop)
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False  # a stop string was found: the caller should cancel generation

    def _decoded(self) -> tuple[str, bool]:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def _release(self, ready: str) -> str:
        if not ready.startswith(self.emitted):  # decoding a longer prefix rewrote earlier text: wait
            return ""
        delta = ready[len(self.emitted):]
        self.emitted = ready
        return delta

    def add(self, ids: Sequence[int]) -> str:
        """Add new token ids; return the text that became final (possibly ``""``)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        if not self.incremental:
            return ""
        text, self.stopped = self._decoded()
        if self.stopped:
            return self._release(text.strip())
        if self.stop:
            hold = max(len(s) for s in self.stop) - 1
            text = text[: len(text) - hold] if hold else text
        return self._release(text.rstrip("\ufffd").strip())

    def finish(self) -> str:
        """The rest of the text once no more tokens will come."""
        return self._release(self.text) if self.incremental else ""

    @property
    def text(self) -> str:
        """The final text of the ids seen so far."""
        return self._decoded()[0].strip()
