"""Generation settings: one frozen dataclass, built and validated once at the API edge.

``generate()``, ``chat()``, the CLI and ``RequestShape`` all build a ``GenerationSettings``;
its ``__post_init__`` is the only place decoding values are checked. The compiled programs get
what it derives: ``mode`` (``sampling.DecodeMode``, static) and ``params()``
(``sampling.SamplingParams``, traced), which do not check again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

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
    seed: int = 0

    def __post_init__(self):
        if int(self.max_new_tokens) < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if int(self.num_beams) < 1:
            raise GenerationError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.num_beams > 1:
            raise GenerationError("sampling with num_beams > 1 (beam sampling) is not supported")
        if self.do_sample and not float(self.temperature) > 0.0:
            raise GenerationError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if int(self.top_k) < 0 or int(self.top_k) != self.top_k:
            raise GenerationError(
                f"top_k must be an integer >= 0 (0 disables it), got {self.top_k}"
            )
        if not 0.0 < float(self.top_p) <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if not float(self.repetition_penalty) > 0.0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if int(self.min_new_tokens) < 0:
            raise GenerationError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
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
        return cls(max_new_tokens=int(max_new_tokens), **{**defaults, **kwargs})

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
        )
