"""The OpenAI-compatible HTTP front end: a Starlette app over an ``Engine``, run by uvicorn.

Routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``"stream": true``, ending
in ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (200 while serving, 503 while
draining), ``GET /metrics`` (Prometheus text).

A request's way through: the body is read up to ``Limits.max_body_bytes`` (413 beyond), parsed
and checked (``api.ChatParser.parse``, 4xx with the field's name), then its media are decoded and
it is submitted to the engine on a worker thread (the processor runs there too, so the event
loop never blocks on images). The engine's events (``Delta`` / ``Finished``) are carried from
its threads into the event loop; a client that disconnects has its request cancelled, which
frees the engine slot. ``QueueFull`` answers 429 with ``Retry-After``; ``EngineStopped`` 503.

On SIGTERM / SIGINT (``run``), /health turns 503 and uvicorn stops accepting connections, lets
the requests in flight finish (up to ``drain_timeout`` seconds), then the engine is shut down
and the process exits.

Needs the ``serve`` extra (``pip install minicpmv-jax[serve]``: starlette, uvicorn); the rest of
the package never imports this module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from minicpmv_jax.serve import api
from minicpmv_jax.serve.metrics import Metrics
from minicpmv_jax.serve.types import Delta, EngineStopped, Finished, QueueFull, RequestError

__all__ = ["ServerState", "create_app", "make_server", "run"]

log = logging.getLogger(__name__)

try:
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "the HTTP server needs the 'serve' extra: pip install 'minicpmv-jax[serve]' "
        f"(starlette and uvicorn); missing: {e.name}"
    ) from e

_DISCONNECT_POLL_S = 0.5


class ServerState:
    """What the routes share: the engine, the parser, the metrics and the worker threads."""

    def __init__(
        self,
        engine,
        *,
        model_name: str,
        version: str,
        limits: api.Limits | None = None,
        media: api.Media | None = None,
        workers: int = 4,
        max_pending: int | None = None,
        owns_engine: bool = True,
        drain_timeout: float | None = 30.0,
    ):
        self.engine = engine
        self.model_name = model_name
        self.limits = limits or api.Limits()
        self.parser = api.ChatParser(model_name, version, self.limits, media or api.Media())
        self.metrics = Metrics(getattr(engine, "stats", None))
        self.workers = concurrent.futures.ThreadPoolExecutor(workers, "serve-preprocess")
        # requests whose media are being decoded / submitted: refused beyond this (429), so that
        # a flood cannot queue unbounded work in front of the engine's own bounded queue
        self.max_pending = max_pending if max_pending is not None else 4 * workers + 64
        self.pending = 0
        self.owns_engine = owns_engine
        self.drain_timeout = drain_timeout
        self.draining = False
        self.created = int(time.time())

    def close(self) -> None:
        self.draining = True
        if self.owns_engine:
            self.engine.shutdown(drain=True, timeout=self.drain_timeout)
        self.workers.shutdown(wait=False, cancel_futures=True)


def _error(e: api.ApiError, state: ServerState) -> JSONResponse:
    state.metrics.rejected_with(e.status)
    if e.status >= 500:
        log.warning("%d: %s", e.status, e.message)
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise api.ApiError(
            413, f"request body of {length} bytes is larger than the limit of {limit} bytes "
            "(--max-body-bytes)",
        )  # fmt: skip
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise api.ApiError(
                413, f"request body is larger than the limit of {limit} bytes (--max-body-bytes)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


class _Events:
    """A handle's events, delivered into the event loop.

    Uses the handle's own ``aevents()`` when it has one; otherwise one daemon thread reads the
    blocking ``events()`` and hands each event to the loop.
    """

    def __init__(self, handle, loop: asyncio.AbstractEventLoop):
        self.handle = handle
        aevents = getattr(handle, "aevents", None)
        if aevents is not None:
            self._aiter = aevents()
            return
        self._aiter = None
        self.queue: asyncio.Queue = asyncio.Queue()

        def put(ev) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                loop.call_soon_threadsafe(self.queue.put_nowait, ev)

        def pump():
            try:
                for ev in handle.events():
                    put(ev)
                    if isinstance(ev, Finished):
                        return
            except Exception as e:  # the engine broke: answer with an error
                log.exception("%s: reading the engine's events failed", handle.request_id)
                put(Finished("error", "", handle.prompt_tokens, 0, error=f"engine failure: {e}"))
                return
            put(StopAsyncIteration())

        threading.Thread(target=pump, name=f"events-{handle.request_id}", daemon=True).start()

    async def next(self) -> Delta | Finished:
        if self._aiter is not None:
            return await self._aiter.__anext__()
        ev = await self.queue.get()
        if isinstance(ev, StopAsyncIteration):
            raise ev
        return ev


def _engine_error(e: Exception) -> api.ApiError:
    if isinstance(e, QueueFull):
        retry = max(1, math.ceil(e.retry_after))
        return api.ApiError(
            429, f"the server is busy: {e}; retry after {retry} s",
            headers={"Retry-After": str(retry)},
        )  # fmt: skip
    if isinstance(e, EngineStopped):
        return api.ApiError(503, f"the server is shutting down: {e}")
    return api.ApiError(400, str(e))  # RequestError: the engine refused this request


async def _submit(state: ServerState, body: dict) -> tuple[api.ChatCall, Any]:
    """Parse, decode media and submit on a worker thread; returns (call, handle)."""
    call = state.parser.parse(body)  # cheap: fails fast, before any queueing

    def work():
        request = state.parser.load_media(call)
        return state.engine.submit(request)

    if state.pending >= state.max_pending:
        raise api.ApiError(
            429, f"the server is busy: {state.pending} requests are being prepared; retry after 1 s",
            headers={"Retry-After": "1"},
        )  # fmt: skip
    state.pending += 1
    try:
        handle = await asyncio.get_running_loop().run_in_executor(state.workers, work)
    except (RequestError, QueueFull, EngineStopped) as e:
        raise _engine_error(e) from None
    except RuntimeError as e:  # the worker pool was shut down: the server is stopping
        raise api.ApiError(503, f"the server is shutting down ({e})") from None
    finally:
        state.pending -= 1
    return call, handle


async def _watch_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Progress:
    """Per-request timing for the metrics."""

    def __init__(self, metrics: Metrics, arrived: float):
        self.metrics, self.arrived, self.last = metrics, arrived, None

    def delta(self, ev: Delta) -> None:
        now = time.monotonic()
        n = len(ev.token_ids)
        if n == 0:
            return
        if self.last is None:
            self.metrics.tokens(n, first_after=now - self.arrived, gap=None)
        else:
            self.metrics.tokens(n, first_after=None, gap=now - self.last)
        self.last = now

    def finished(self, fin: Finished) -> None:
        self.metrics.request_finished(
            fin.reason, fin.prompt_tokens, time.monotonic() - self.arrived
        )


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    arrived = time.monotonic()
    if state.draining:
        return _error(api.ApiError(503, "the server is shutting down"), state)
    try:
        raw = await _read_body(request, state.limits.max_body_bytes)
        body = api.parse_json(raw)
        state.metrics.request_started()
        try:
            call, handle = await _submit(state, body)
        except BaseException:
            state.metrics.request_dropped()
            raise
    except api.ApiError as e:
        return _error(e, state)
    except ClientDisconnect:
        return Response(status_code=499)
    progress = _Progress(state.metrics, arrived)
    events = _Events(handle, asyncio.get_running_loop())
    if call.stream:
        return StreamingResponse(
            _stream(state, call, handle, events, progress),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _complete(state, request, call, handle, events, progress)


async def _complete(state, request, call, handle, events, progress) -> Response:
    watcher = asyncio.ensure_future(_watch_disconnect(request))
    fin = None
    try:
        while fin is None:
            nxt = asyncio.ensure_future(events.next())
            await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():  # the client went away: free its slot
                nxt.cancel()
                handle.cancel()
                log.info("%s: client disconnected, cancelled", call.id)
                break
            ev = nxt.result()
            if isinstance(ev, Delta):
                progress.delta(ev)
            else:
                fin = ev
    except StopAsyncIteration:
        fin = Finished("error", "", 0, 0, error="the engine ended the request without an answer")
    finally:
        watcher.cancel()
        if fin is None:
            handle.cancel()
    if fin is None:  # disconnected: nobody reads the answer; wait for the engine's Finished
        with contextlib.suppress(Exception):
            while not isinstance(ev := await asyncio.wait_for(events.next(), 30), Finished):
                pass
            progress.finished(ev)
        return Response(status_code=499)
    progress.finished(fin)
    if fin.reason == "error":
        return _error(api.ApiError(500, f"generation failed: {fin.error}"), state)
    return JSONResponse(api.completion_body(call, state.model_name, fin))


async def _stream(state, call, handle, events, progress) -> AsyncIterator[bytes]:
    """The SSE body. Starlette cancels this generator when the client disconnects; the
    ``finally`` then cancels the request in the engine."""
    model, fin = state.model_name, None
    try:
        yield api.sse(api.chunk_body(call, model, {"role": "assistant", "content": ""}))
        while True:
            try:
                ev = await events.next()
            except StopAsyncIteration:
                fin = Finished("error", "", 0, 0, error="the engine ended the request early")
                ev = fin
            if isinstance(ev, Delta):
                progress.delta(ev)
                if ev.text:
                    yield api.sse(api.chunk_body(call, model, {"content": ev.text}))
                continue
            fin = ev
            progress.finished(fin)
            if fin.reason == "error":
                err = api.error_body(f"generation failed: {fin.error}", "internal_error", None, 500)
                yield api.sse(err)
            else:
                yield api.sse(api.chunk_body(call, model, {}, fin.reason))
                if call.include_usage:
                    u = api.usage(fin.prompt_tokens, fin.completion_tokens)
                    yield api.sse(api.chunk_body(call, model, None, usage_=u))
            yield api.sse("[DONE]")
            return
    finally:
        if fin is None:
            handle.cancel()
            log.info("%s: client disconnected mid-stream, cancelled", call.id)
            state.metrics.request_finished("cancelled", handle.prompt_tokens, 0.0)


async def models(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    entry = {"id": state.model_name, "object": "model", "created": state.created,
             "owned_by": "minicpmv-jax"}  # fmt: skip
    return JSONResponse({"object": "list", "data": [entry]})


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    stats = state.engine.stats()
    body = {
        "status": "draining" if state.draining else "ok",
        "model": state.model_name,
        "slots": stats.slots,
        "active_slots": stats.active_slots,
        "queue_length": stats.queue_length,
    }
    return JSONResponse(body, status_code=503 if state.draining else 200)


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    return PlainTextResponse(
        state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )


def create_app(state: ServerState) -> Starlette:
    """The Starlette app; its lifespan shuts the engine down (draining) when the server stops."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.close)

    async def not_found(request, exc):
        e = api.ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(e.body(), status_code=exc.status_code)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: not_found},
    )
    app.state.serve = state
    return app


def make_server(app: Starlette, *, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "info"):  # fmt: skip
    """A ``uvicorn.Server`` for the app; a SIGTERM / SIGINT marks the app as draining."""
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover
        raise ImportError(
            "the HTTP server needs the 'serve' extra: pip install 'minicpmv-jax[serve]'"
        ) from e
    state: ServerState = app.state.serve

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its graceful shutdown; a drained SIGTERM is a
            # normal end here (run() returns, the process exits 0), SIGINT stays an interrupt
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=state.drain_timeout,
        lifespan="on",
        access_log=False,
    )
    return _Server(config)


def run(app: Starlette, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """Serve until SIGTERM / SIGINT, then drain and return (call from the main thread)."""
    make_server(app, host=host, port=port, log_level=log_level).run()
