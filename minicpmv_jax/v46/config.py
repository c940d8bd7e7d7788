"""Frozen configs of MiniCPM-V 4.6 read from the native transformers config.json."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from minicpmv_jax.errors import CheckpointError, MiniCPMVError

DOWNSAMPLE_MODES = ("16x", "4x")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Siglip2Config:
    """SigLIP2 tower (`vision_config`) plus the ViT window merger inserted after one layer."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 980  # position table side = image_size // patch_size
    layer_norm_eps: float = 1e-6
    insert_layer_id: int = 6  # the ViT merger runs after this layer (16x mode)
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} % num_heads {self.num_heads} != 0")
        if not 0 <= self.insert_layer_id < self.num_layers:
            raise ValueError(
                f"insert_layer_id {self.insert_layer_id} not in [0, {self.num_layers})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2

    @classmethod
    def from_hf(cls, hf: dict, insert_layer_id: int, **overrides) -> Siglip2Config:
        v = hf.get("vision_config", {})
        kw = {
            "hidden_size": v.get("hidden_size", 1152),
            "intermediate_size": v.get("intermediate_size", 4304),
            "num_layers": v.get("num_hidden_layers", 27),
            "num_heads": v.get("num_attention_heads", 16),
            "patch_size": v.get("patch_size", 14),
            "image_size": v.get("image_size", 980),
            "layer_norm_eps": v.get("layer_norm_eps", 1e-6),
            "insert_layer_id": insert_layer_id,
        }
        return cls(**{**kw, **overrides})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen35Config:
    """Qwen3.5 text model: `layer_types` mixes "linear_attention" (Gated DeltaNet) and
    "full_attention" (gated softmax attention with partial rotary)."""

    vocab_size: int = 248094
    hidden_size: int = 1024
    intermediate_size: int = 3584
    layer_types: tuple[str, ...] = ("linear_attention",) * 3 + ("full_attention",)
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 256
    partial_rotary_factor: float = 0.25
    rope_theta: float = 1e7
    rms_norm_eps: float = 1e-6
    lin_num_key_heads: int = 16
    lin_num_value_heads: int = 16
    lin_key_head_dim: int = 128
    lin_value_head_dim: int = 128
    conv_kernel: int = 4
    chunk_size: int = 64  # delta-rule chunk length of the prefill
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32

    def __post_init__(self):
        bad = sorted(set(self.layer_types) - {"linear_attention", "full_attention"})
        if bad:
            raise ValueError(f"layer_types holds unknown kinds {bad}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} % num_kv_heads {self.num_kv_heads}")
        if self.lin_num_value_heads % self.lin_num_key_heads:
            raise ValueError(
                f"linear_num_value_heads {self.lin_num_value_heads} % linear_num_key_heads "
                f"{self.lin_num_key_heads} != 0"
            )

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def key_dim(self) -> int:
        return self.lin_num_key_heads * self.lin_key_head_dim

    @property
    def value_dim(self) -> int:
        return self.lin_num_value_heads * self.lin_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> Qwen35Config:
        t = hf.get("text_config", {})
        n = t.get("num_hidden_layers", 24)
        types = t.get("layer_types")
        if types is None:  # Qwen3_5TextConfig.__post_init__: every `interval`-th layer is full
            interval = t.get("full_attention_interval", 4)
            types = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention"
                for i in range(n)
            ]
        if len(types) != n:
            raise CheckpointError(f"config.json: {len(types)} layer_types for {n} layers")
        rope = t.get("rope_parameters") or {}
        kw = {
            "vocab_size": t.get("vocab_size", 248094),
            "hidden_size": t.get("hidden_size", 1024),
            "intermediate_size": t.get("intermediate_size", 3584),
            "layer_types": tuple(types),
            "num_heads": t.get("num_attention_heads", 8),
            "num_kv_heads": t.get("num_key_value_heads", 2),
            "head_dim": t.get("head_dim", 256),
            "partial_rotary_factor": rope.get(
                "partial_rotary_factor", t.get("partial_rotary_factor", 0.25)
            ),
            "rope_theta": rope.get("rope_theta", t.get("rope_theta", 1e7)),
            "rms_norm_eps": t.get("rms_norm_eps", 1e-6),
            "lin_num_key_heads": t.get("linear_num_key_heads", 16),
            "lin_num_value_heads": t.get("linear_num_value_heads", 16),
            "lin_key_head_dim": t.get("linear_key_head_dim", 128),
            "lin_value_head_dim": t.get("linear_value_head_dim", 128),
            "conv_kernel": t.get("linear_conv_kernel_dim", 4),
        }
        return cls(**{**kw, **overrides})


@dataclasses.dataclass(frozen=True, kw_only=True)
class MiniCPMV46Config:
    """The whole 4.6 model: vision tower, projector sizes, text model and token ids."""

    vision: Siglip2Config
    llm: Qwen35Config
    merge_kernel: int = 2  # projector window (2x2)
    downsample_mode: str = "16x"  # default; requests may pass their own
    image_token_id: int = 248056
    video_token_id: int = 248057
    eos_ids: tuple[int, ...] = (248044, 248046)  # generation_config.json: stop on any
    # generation_config.json's sampling values (used when sampling=True)
    sampling_defaults: tuple[tuple[str, Any], ...] = (
        ("temperature", 0.7),
        ("top_k", 0),
        ("top_p", 1.0),
    )
    version: str = "4.6"

    def __post_init__(self):
        check_downsample_mode(self.downsample_mode)

    def with_dtype(self, dtype: Any, param_dtype: Any = None) -> MiniCPMV46Config:
        kw = {"dtype": jnp.dtype(dtype), "param_dtype": jnp.dtype(param_dtype or dtype)}
        return dataclasses.replace(
            self,
            vision=dataclasses.replace(self.vision, **kw),
            llm=dataclasses.replace(self.llm, **kw),
        )

    @classmethod
    def from_hf(
        cls, hf: dict, dtype: Any = "float32", generation: dict | None = None
    ) -> MiniCPMV46Config:
        """From config.json (and generation_config.json, for the stop ids)."""
        if hf.get("merger_times", 1) != 1:
            raise CheckpointError(f"config.json: merger_times {hf['merger_times']} (only 1)")
        if tuple(hf.get("merge_kernel_size", (2, 2))) != (2, 2):
            raise CheckpointError(f"config.json: merge_kernel_size {hf['merge_kernel_size']}")
        insert = hf.get("insert_layer_id", hf.get("vision_config", {}).get("insert_layer_id", 6))
        cfg = cls(
            vision=Siglip2Config.from_hf(hf, insert),
            llm=Qwen35Config.from_hf(hf),
            downsample_mode=hf.get("downsample_mode", "16x"),
            image_token_id=hf.get("image_token_id", 248056),
            video_token_id=hf.get("video_token_id", 248057),
            eos_ids=_ids((generation or {}).get("eos_token_id", hf.get("eos_token_id"))),
            sampling_defaults=tuple(
                (k, (generation or {}).get(k, v))
                for k, v in (("temperature", 0.7), ("top_k", 0), ("top_p", 1.0))
            ),
        )
        return cfg.with_dtype(dtype)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return (248044, 248046)
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def check_downsample_mode(mode: Any) -> str:
    """The mode itself, or a clear error for anything but "16x" / "4x"."""
    if mode not in DOWNSAMPLE_MODES:
        raise MiniCPMVError(f"downsample_mode {mode!r} is not one of {DOWNSAMPLE_MODES}")
    return mode
