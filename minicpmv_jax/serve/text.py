"""A request's answer text as its tokens arrive: incremental detokenisation and stop strings.

``AnswerText`` feeds each token to ``chat._TextStream`` (the pieces of ``chat(stream=True)``: they
add up to ``chat()``'s answer, 4.5 thinking prefix included) and holds back the end of the text
while it could still be the start of a stop string. The answer ends before the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from minicpmv_jax.chat import _TextStream


class AnswerText:
    def __init__(self, processor, enable_thinking: bool, stop: Sequence[str] = ()):
        self.stream = _TextStream(processor, enable_thinking)
        self.stop = tuple(s for s in stop if s)
        self.sent = ""  # text handed out so far (a prefix of the answer)
        self.pending = ""  # text held back: it may begin a stop string
        self.stopped = False  # a stop string was found; nothing more is emitted

    def push(self, token: int) -> str:
        """New text after ``token`` (may be empty)."""
        return self._feed(self.stream.push(token))

    def finish(self) -> str:
        """The rest of the answer once no token follows."""
        out = self._feed(self.stream.flush())
        if not self.stopped:
            out += self.pending
            self.sent += self.pending
            self.pending = ""
        return out

    @property
    def text(self) -> str:
        return self.sent

    def _feed(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        self.pending += piece
        if not self.stop:
            out, self.pending = self.pending, ""
            self.sent += out
            return out
        full = self.sent + self.pending
        # only a match that touches the new text can be new
        longest = max(len(s) for s in self.stop)
        start = max(0, len(self.sent) - longest + 1)
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            out = full[len(self.sent) : cut] if cut >= len(self.sent) else ""
            self.sent, self.pending, self.stopped = full[: max(cut, len(self.sent))], "", True
            return out
        hold = 0  # longest tail of the text that is a proper prefix of a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if full.endswith(s[:k]):
                    hold = k
                    break
        keep = len(self.pending) - hold
        out, self.pending = self.pending[:keep], self.pending[keep:]
        self.sent += out
        return out
