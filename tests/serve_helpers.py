"""Test helpers for the HTTP front end: a stand-in engine with the ``Engine`` contract of
``minicpmv_jax.serve`` (no model: its answers are computed from the prompt), and a server run in
a background thread on 127.0.0.1.

The stand-in's answer to a conversation is ``"echo:"`` followed by the words of the last user
text, one token per word (``" w"``), then the end of the answer; images count 10 prompt tokens
each. It runs ``slots`` requests at a time (one token per slot per step, ``step_s`` apart), queues
up to ``max_queue`` more beyond the free slots (``QueueFull`` beyond, as the engine), honours stop
strings and ``max_tokens``, refuses prompts longer than ``max_len`` (``RequestError``) and records
every cancelled request.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import socket
import threading
import time

from minicpmv_jax.serve.types import (
    Delta,
    EngineStats,
    EngineStopped,
    Finished,
    QueueFull,
    Request,
    RequestError,
)


def expected_answer(request: Request) -> list[str]:
    """The stand-in's answer tokens for a request (before stop strings and max_tokens)."""
    last = request.messages[-1]["content"]
    text = last if isinstance(last, str) else " ".join(c for c in last if isinstance(c, str))
    return ["echo:"] + [f" {w}" for w in text.split()]


def prompt_tokens(request: Request) -> int:
    n = len((request.system_prompt or "").split())
    for m in request.messages:
        items = [m["content"]] if isinstance(m["content"], str) else m["content"]
        for c in items:
            n += len(c.split()) if isinstance(c, str) else 10
    return n + 3 * len(request.messages)


class FakeHandle:
    def __init__(self, engine: FakeEngine, request: Request):
        self.request = request
        self.request_id = request.request_id or f"fake-{next(engine._ids)}"
        self.prompt_tokens = prompt_tokens(request)
        self.tokens = expected_answer(request)
        self.sent = 0
        self.text = ""
        self.queue: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.engine = engine

    def events(self, timeout=None):
        while True:
            ev = self.queue.get(timeout=timeout)
            yield ev
            if isinstance(ev, Finished):
                return

    def cancel(self) -> None:
        self.cancelled.set()
        self.engine._wake.set()

    def result(self, timeout=None) -> Finished:
        for ev in self.events(timeout):
            if isinstance(ev, Finished):
                return ev
        raise AssertionError("no Finished event")


class FakeEngine:
    def __init__(self, *, slots=2, max_queue=4, max_len=512, step_s=0.002, max_images=8):
        self.slots, self.max_queue, self.max_len = slots, max_queue, max_len
        self.max_images, self.step_s = max_images, step_s
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: collections.deque[FakeHandle] = collections.deque()
        self._active: list[FakeHandle] = []
        self._accepting = False
        self._stop = False
        self.paused = threading.Event()  # set: no step runs (tests fill the queue)
        self.cancelled: list[str] = []
        self.submitted: list[Request] = []
        self.finished = 0
        self.generated = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> FakeHandle:
        if not self._accepting:
            raise EngineStopped("the engine is not accepting requests")
        n_images = sum(
            not isinstance(c, str)
            for m in request.messages
            for c in (m["content"] if isinstance(m["content"], list) else [])
        )
        if n_images > self.max_images:
            raise RequestError(f"{n_images} images, more than max_images={self.max_images}")
        handle = FakeHandle(self, request)
        if handle.prompt_tokens + 1 > self.max_len:
            raise RequestError(
                f"the prompt has {handle.prompt_tokens} tokens; the cache holds {self.max_len}"
            )
        with self._lock:
            # as the engine: queued requests that free slots will take are not waiting for one,
            # so what is refused does not depend on when the loop thread last ran
            waiting = len(self._waiting) - (self.slots - len(self._active))
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting for a slot", retry_after=1.5)
            self._waiting.append(handle)
            self.submitted.append(request)
        self._wake.set()
        return handle

    def _finish(self, h: FakeHandle, reason: str) -> None:
        h.queue.put(Finished(reason, h.text, h.prompt_tokens, h.sent))
        if reason == "cancelled":
            self.cancelled.append(h.request_id)
        self.finished += 1

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stop and not self._active and not self._waiting:
                    return
                for h in [h for h in self._active + list(self._waiting) if h.cancelled.is_set()]:
                    (self._active if h in self._active else self._waiting).remove(h)
                    self._finish(h, "cancelled")
                while self._waiting and len(self._active) < self.slots:
                    self._active.append(self._waiting.popleft())
                active = list(self._active)
            if not active or self.paused.is_set():
                self._wake.wait(0.01)
                self._wake.clear()
                continue
            time.sleep(self.step_s)
            for h in active:
                self._step(h)

    def _step(self, h: FakeHandle) -> None:
        r = h.request
        if h.sent >= len(h.tokens):
            return self._done(h, "stop")
        piece = h.tokens[h.sent]
        h.sent += 1
        self.generated += 1
        text = h.text + piece
        for s in r.stop:
            if s in text:
                cut = max(text.index(s), len(h.text))  # the stand-in never holds text back
                h.queue.put(Delta(text[len(h.text) : cut], (h.sent,)))
                h.text = text[:cut]
                return self._done(h, "stop")
        h.queue.put(Delta(piece, (h.sent,)))
        h.text = text
        if h.sent >= r.max_tokens:
            self._done(h, "length")

    def _done(self, h: FakeHandle, reason: str) -> None:
        with self._lock:
            if h in self._active:
                self._active.remove(h)
        self._finish(h, reason)

    def shutdown(self, drain: bool = True, timeout=None) -> None:
        self._accepting = False
        if not drain:
            with self._lock:
                for h in self._active + list(self._waiting):
                    h.cancelled.set()
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                slots=self.slots,
                active_slots=len(self._active),
                queue_length=len(self._waiting),
                requests_finished=self.finished,
                tokens_generated=self.generated,
                compilations_after_start=0,
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, timeout: float = 60.0):
    """Run the app with uvicorn on 127.0.0.1 in a thread; yields the base URL."""
    from minicpmv_jax.serve.server import make_server

    port = free_port()
    server = make_server(app, host="127.0.0.1", port=port, log_level="warning")
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
