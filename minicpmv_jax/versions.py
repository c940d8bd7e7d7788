"""One record per MiniCPM-V version: everything that differs between releases, as data.

Code asks the record (``spec(config.version).image_ids``) instead of testing the version string,
so a new release is one more ``VersionSpec`` passed to ``register`` plus the modules it adds.
This file imports nothing heavier than the standard library (the processor stays numpy-only).

Fields, grouped as the official code differs:

* template / placeholders: how one image expands (``placeholder``), whether images get
  ``<image_id>k</image_id>`` prefixes, which tokens open and close an ``image_bound`` row, the
  stop tokens, the tokenizer family, ``chat()``'s ``max_inp_length``;
* vision mask and positions: the 2.5 tower is called without ``tgt_sizes`` and an all-True mask
  row, so every slice attends the longest slice's keys and reads position row 0 as a strip;
* position rule: 2.6 / 4.5 pass ``attention_mask = input_ids != 0`` (a genuine id-0 token is
  masked and shifts the RoPE positions after it); 2.5 passes no mask;
* defaults: ``chat()``'s ``max_new_tokens`` and its sampling / beam-search settings;
* quirks: 4.5's temporal resampler and thinking prefill, 2.6's always-on q/k/v bias, 4.5's q/k
  RMSNorm, the video sampling recipe of the official example.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

from minicpmv_jax.errors import UnsupportedVersionError

# chat()'s sampling=False settings, shared by every released version
BEAM_DEFAULTS = types.MappingProxyType(
    {"do_sample": False, "num_beams": 3, "repetition_penalty": 1.2}
)


def _sampling_defaults(repetition_penalty: float) -> Mapping[str, Any]:
    return types.MappingProxyType(
        {
            "do_sample": True,
            "top_p": 0.8,
            "top_k": 100,
            "temperature": 0.7,
            "repetition_penalty": repetition_penalty,
        }
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class VersionSpec:
    """What one MiniCPM-V release does differently (see the module docstring)."""

    name: str  # "2.6": config.json's `version`, normalised
    model_type: str | None = None  # config.json's `model_type` when it names the release alone
    # -- template and placeholders
    placeholder: str  # "slice_grid": <slice>-wrapped slices; "image_grid": 2.5's layout
    image_ids: bool  # <image_id>k</image_id> before each image (default of use_image_id)
    bound_start: tuple[str, ...]  # token keys after which an image_bound row starts
    bound_end: tuple[str, ...]  # token keys at which it ends
    terminators: tuple[str, ...]  # stop token strings ("{eos}" = the tokenizer's eos token)
    qwen_tokenizer: bool  # vocab.json + merges.txt is an acceptable tokenizer source
    max_inp_length: int  # chat()'s default prompt truncation
    # -- vision mask and position ids
    vision_strip: bool  # 2.5: mask and positions of the longest slice, as one 1 x maxL strip
    # -- prompt position rule
    mask_id0: bool  # attention_mask = input_ids != 0 (positions = cumsum(mask) - 1)
    # -- generation defaults (chat())
    max_new_tokens: int
    sampling_defaults: Mapping[str, Any]
    beam_defaults: Mapping[str, Any] = dataclasses.field(default_factory=lambda: BEAM_DEFAULTS)
    thinking_defaults: Mapping[str, Any] | None = None  # None: no thinking mode
    thinking_prefix: str = ""  # prepended to the answer when thinking (the generation prefill)
    # -- architecture quirks
    temporal: bool = False  # 3D resampler with temporal_ids (video frame groups)
    qkv_bias: bool | None = None  # None: config.json's `attention_bias`
    qk_norm: bool = False
    video: str | None = None  # sampling recipe of the official video example (video.py)

    @property
    def thinking(self) -> bool:
        return self.thinking_defaults is not None

    def generation_defaults(self, sampling: bool, enable_thinking: bool = False) -> dict:
        """The decoding settings the official chat() passes to generate() (spec §7.3)."""
        if not sampling:
            return dict(self.beam_defaults)
        if enable_thinking and self.thinking:
            return dict(self.thinking_defaults)
        return dict(self.sampling_defaults)


_REGISTRY: dict[str, VersionSpec] = {}


def register(version: VersionSpec) -> VersionSpec:
    """Add a release (raises when its name is taken); returns it."""
    if version.name in _REGISTRY:
        raise ValueError(f"MiniCPM-V version {version.name!r} is already registered")
    _REGISTRY[version.name] = version
    return version


def supported() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def parse(raw: Any, where: str = "config.json") -> str:
    """config.json's `version` (string "2.5", float 2.6 / 4.5) -> a registered name.

    Raises ``UnsupportedVersionError`` naming ``where`` for a missing or unknown version.
    """
    if raw is None:
        raise UnsupportedVersionError(
            f"{where} has no 'version' (MiniCPM-V 2.0 and other checkpoints without one are not "
            f"supported); supported versions: {', '.join(supported())}"
        )
    # config.json stores 2.5 as a string and 2.6 / 4.5 as floats
    name = repr(float(raw)) if isinstance(raw, (int, float)) else str(raw).strip()
    if name not in _REGISTRY:
        raise UnsupportedVersionError(
            f"{where}: MiniCPM-V version {raw!r} is not supported; "
            f"supported versions: {', '.join(supported())}"
        )
    return name


def of_config(hf: Mapping[str, Any], where: str = "config.json") -> str:
    """The registered name of a checkpoint's parsed config.json: its `model_type` when a record
    claims it (4.6 folders carry no `version`), else its `version` (``parse``)."""
    for version in _REGISTRY.values():
        if version.model_type is not None and hf.get("model_type") == version.model_type:
            return version.name
    return parse(hf.get("version"), where)


def spec(version: str) -> VersionSpec:
    """The record of a registered version name ("2.6"); raises UnsupportedVersionError."""
    try:
        return _REGISTRY[version]
    except KeyError:
        raise UnsupportedVersionError(
            f"MiniCPM-V version {version!r} is not supported; "
            f"supported versions: {', '.join(supported())}"
        ) from None


V2_5 = register(
    VersionSpec(
        name="2.5",
        placeholder="image_grid",
        image_ids=False,
        bound_start=("im_start",),  # slices sit in <image>...</image> inside one <slice>
        bound_end=("im_end",),
        terminators=("{eos}", "<|eot_id|>"),
        qwen_tokenizer=False,
        max_inp_length=2048,
        vision_strip=True,
        mask_id0=False,
        max_new_tokens=1024,
        sampling_defaults=_sampling_defaults(1.05),
    )
)
V2_6 = register(
    VersionSpec(
        name="2.6",
        placeholder="slice_grid",
        image_ids=True,
        bound_start=("im_start", "slice_start"),
        bound_end=("im_end", "slice_end"),
        terminators=("<|im_end|>", "<|endoftext|>"),
        qwen_tokenizer=True,
        max_inp_length=8192,
        vision_strip=False,
        mask_id0=True,
        max_new_tokens=2048,
        sampling_defaults=_sampling_defaults(1.05),
        qkv_bias=True,  # Qwen2: q/k/v biases whatever config.json says
        video="2.6",
    )
)
V4_5 = register(
    VersionSpec(
        name="4.5",
        placeholder="slice_grid",
        image_ids=True,
        bound_start=("im_start", "slice_start"),
        bound_end=("im_end", "slice_end"),
        terminators=("<|im_end|>", "<|endoftext|>"),
        qwen_tokenizer=True,
        max_inp_length=16384,
        vision_strip=False,
        mask_id0=True,
        max_new_tokens=2048,
        sampling_defaults=_sampling_defaults(1.03),
        # chat() passes temperature only; top_k / top_p come from the inner LLM's generation
        # config (transformers defaults top_k 50, top_p 1.0)
        thinking_defaults=types.MappingProxyType(
            {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 1.0}
        ),
        thinking_prefix="<think>\n",
        temporal=True,
        qk_norm=True,
        video="4.5",
    )
)
# 4.6: its own processor and network (minicpmv_jax/v46); the record carries what shared code
# reads (tokenizer family, defaults) and how its config.json is recognised
V4_6 = register(
    VersionSpec(
        name="4.6",
        model_type="minicpmv4_6",
        placeholder="v46",
        image_ids=True,  # the released processor's use_image_id
        bound_start=(),
        bound_end=(),
        terminators=("<|im_end|>", "<|endoftext|>"),
        qwen_tokenizer=True,
        max_inp_length=16384,
        vision_strip=False,
        mask_id0=False,
        max_new_tokens=2048,
        sampling_defaults=types.MappingProxyType({"do_sample": True, "temperature": 0.7}),
    )
)
