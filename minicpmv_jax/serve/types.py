"""The contract between the serving engine (``engine.py``) and its front ends (HTTP, tests).

A front end turns a client's request into a ``Request`` (chat() messages, decoding settings,
processor options), hands it to ``Engine.submit`` and reads the ``Handle``'s events: ``Delta``
pieces of text as tokens are produced, then exactly one ``Finished``. Everything here is plain
data; nothing imports jax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from minicpmv_jax.errors import MiniCPMVError

__all__ = [
    "Delta",
    "EngineStats",
    "EngineStopped",
    "Finished",
    "QueueFull",
    "Request",
    "RequestError",
]


class RequestError(MiniCPMVError):
    """A request the engine refuses (too long for the cache, too many images, bad settings).
    Front ends answer it with a 4xx; the message names the offending field."""


class QueueFull(MiniCPMVError):
    """The wait queue is full; retry after ``retry_after`` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(MiniCPMVError):
    """The engine is draining or stopped and accepts no new request (HTTP 503)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """One conversation to answer.

    ``messages`` is what ``chat()`` takes: ``[{"role": "user" | "assistant", "content": str |
    list of str / PIL.Image.Image / {"image": ...} / {"video": ...}}]``. A system message is
    passed as ``system_prompt``. ``temperature == 0`` is greedy search (OpenAI convention);
    otherwise the answer is sampled with ``temperature``, ``top_p``, ``top_k`` (0 = off).
    """

    messages: list[dict[str, Any]]
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: fresh randomness; an int: reproducible per request
    stop: tuple[str, ...] = ()  # stop strings; the answer ends before the first one
    stop_token_ids: tuple[int, ...] = ()  # besides the model's own end-of-turn tokens
    max_slice_nums: int | None = None
    use_image_id: bool | None = None
    enable_thinking: bool = False
    system_prompt: str | None = None
    # 4.5 video: groups of frame time ids covering every image in order, as chat(temporal_ids=)
    # (``video.load_video(...).temporal_ids``, a still image before the frames is ``[-1]``)
    temporal_ids: tuple[tuple[int, ...], ...] | None = None
    request_id: str | None = None  # the engine assigns one when None


@dataclasses.dataclass(frozen=True)
class Delta:
    """New answer text (may be empty while a multi-byte character or a possible stop string is
    held back) and the token ids that produced it."""

    text: str
    token_ids: tuple[int, ...]


FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclasses.dataclass(frozen=True)
class Finished:
    """Last event of a request. ``text`` is the whole answer (stop string excluded)."""

    reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class EngineStats:
    slots: int
    active_slots: int
    queue_length: int
    requests_finished: int
    tokens_generated: int
    compilations_after_start: int
    decode_buckets: tuple[int, ...] = ()  # row counts the decode step is compiled for
    decode_rows: int = 0  # rows the last decode step ran (its bucket)
    decode_steps: dict[int, int] = dataclasses.field(default_factory=dict)  # steps by rows
    rows_moved: int = 0  # busy rows moved down to shrink the decode bucket
    # wall time of the scheduler thread in each kind of program call (dispatch to result)
    prefill_s: float = 0.0  # prefills and their inserts into a slot
    decode_s: float = 0.0  # decode steps
    move_s: float = 0.0  # row moves
