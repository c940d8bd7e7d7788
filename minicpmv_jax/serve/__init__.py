"""Serving: continuous batching over a fixed set of decode slots (``engine``), an
OpenAI-compatible HTTP front end (``server``, optional ``serve`` extra)."""

from minicpmv_jax.serve.types import (
    Delta,
    EngineStats,
    EngineStopped,
    Finished,
    QueueFull,
    Request,
    RequestError,
)

__all__ = [
    "Delta",
    "EngineStats",
    "EngineStopped",
    "Finished",
    "QueueFull",
    "Request",
    "RequestError",
]
