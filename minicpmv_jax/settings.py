"""Generation settings: one frozen dataclass, built and validated once at the API edge.

``generate()``, ``chat()``, the CLI and ``RequestShape`` all build a ``GenerationSettings``;
its ``__post_init__`` is the only place a request's decoding settings are checked (the numeric
ranges by ``sampling.check_sampling_values``, which ``sampling.filtered_logprobs`` shares). The
compiled programs get what it derives: ``mode`` (``sampling.DecodeMode``, static), ``params()``
(``sampling.SamplingParams``, traced) and ``key()``, none of which checks again.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from minicpmv_jax import sampling
from minicpmv_jax.errors import MiniCPMVError
from minicpmv_jax.sampling import DecodeMode, SamplingParams
from minicpmv_jax.versions import VersionSpec


class GenerationError(MiniCPMVError):
    """Invalid generation settings (sampling values, lengths, beam settings)."""


# generation keywords chat() / generate() accept (transformers' names, plus the PRNG seed)
GENERATION_KEYS = (
    "num_beams",
    "repetition_penalty",
    "temperature",
    "top_k",
    "top_p",
    "min_new_tokens",
    "length_penalty",
    "early_stopping",
    "min_p",
    "seed",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """Validated decoding settings of one request (transformers' names).

    Greedy search: do_sample False, num_beams 1; sampling: do_sample True (temperature, top_k,
    top_p apply); beam search: num_beams > 1 (length_penalty, early_stopping apply).
    repetition_penalty and min_new_tokens apply to every mode.
    """

    max_new_tokens: int
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    min_p: float = 0.0
    seed: int | None = None  # None: fresh randomness for every call; an int: reproducible

    def __post_init__(self):
        for name in ("max_new_tokens", "num_beams", "top_k", "min_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise GenerationError(f"{name} must be an integer, got {value!r}")
        seed = self.seed
        if seed is not None and (
            isinstance(seed, bool)
            or not isinstance(seed, (int, np.integer))
            or not 0 <= seed < 2**32
        ):
            raise GenerationError(f"seed must be an integer in [0, 2**32) or None, got {seed!r}")
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise GenerationError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.num_beams > 1:
            raise GenerationError("sampling with num_beams > 1 (beam sampling) is not supported")
        try:
            sampling.check_sampling_values(
                temperature=self.temperature if self.do_sample else 1.0,
                top_k=self.top_k,
                top_p=self.top_p,
                repetition_penalty=self.repetition_penalty,
                min_new_tokens=self.min_new_tokens,
                min_p=self.min_p,
            )
        except ValueError as e:
            raise GenerationError(str(e)) from None
        if self.early_stopping not in (False, True, "never"):
            raise GenerationError("early_stopping must be True, False or 'never'")

    @classmethod
    def create(
        cls,
        version: VersionSpec,
        max_new_tokens: int | None,
        defaults: Mapping[str, Any],
        kwargs: Mapping[str, Any],
    ) -> GenerationSettings:
        """``defaults`` overridden by the caller's ``kwargs`` (``GENERATION_KEYS`` only; an
        unknown keyword raises); ``max_new_tokens`` None = the version's chat() default."""
        unknown = sorted(set(kwargs) - set(GENERATION_KEYS))
        if unknown:
            raise GenerationError(
                f"unknown generation argument(s) {unknown}; supported: {list(GENERATION_KEYS)}"
            )
        if max_new_tokens is None:
            max_new_tokens = version.max_new_tokens
        return cls(max_new_tokens=max_new_tokens, **{**defaults, **kwargs})

    @classmethod
    def for_chat(
        cls,
        version: VersionSpec,
        max_new_tokens: int | None,
        sampling: bool,
        enable_thinking: bool,
        kwargs: Mapping[str, Any],
    ) -> GenerationSettings:
        """The official chat() defaults of ``version`` overridden by the caller's keywords."""
        defaults = version.generation_defaults(sampling, enable_thinking)
        return cls.create(version, max_new_tokens, defaults, kwargs)

    @property
    def mode(self) -> DecodeMode:
        return DecodeMode(
            do_sample=self.do_sample, num_beams=self.num_beams, early_stopping=self.early_stopping
        )

    def params(self) -> SamplingParams:
        return SamplingParams.create(
            temperature=self.temperature if self.do_sample else 1.0,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            min_new_tokens=self.min_new_tokens,
            length_penalty=self.length_penalty,
            min_p=self.min_p,
        )

    def key(self) -> jax.Array:
        """The sampling PRNG key: the seed's, or one from fresh OS randomness when seed is None
        (as an unseeded transformers ``generate(do_sample=True)`` differs from call to call)."""
        return jax.random.key(secrets.randbits(32) if self.seed is None else self.seed)
