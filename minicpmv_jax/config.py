"""Frozen configuration dataclasses, released presets and `from_hf` readers of config.json.

One dataclass per component (vision tower, resampler, LLM) nested in `MiniCPMVConfig`. The model
code never looks at a fixture's sizes: every dimension comes from these values.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax.numpy as jnp

from minicpmv_jax import versions


def _dtype(d: Any) -> jnp.dtype:
    """'float32' / 'bfloat16' / jnp.float32 / np.dtype -> jnp.dtype."""
    return jnp.dtype(d)


REMAT = ("none", "full", "dots")  # the policies of layers.REMAT_POLICIES
# the decoder layer's linear projections (`LlmConfig.out_in` names some of them)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_batch_size(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"vision_batch_size must be a positive integer, got {n!r}")


def _check_remat(remat: str) -> None:
    if remat not in REMAT:
        raise ValueError(f"unknown remat policy {remat!r}; expected one of {REMAT}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """navit SigLIP tower (`vpm`): Idefics2 (2.5) / `modeling_navit_siglip.py` (2.6, 4.5)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    batch_size: int = 16  # slices per chunk of the tower (official `vision_batch_size`)
    remat: str = "none"  # per-layer rematerialisation: "none" | "full" | "dots" (layers.py)
    param_dtype: jnp.dtype = jnp.bfloat16
    dtype: jnp.dtype = jnp.bfloat16

    def __post_init__(self):
        _check_remat(self.remat)
        _check_batch_size(self.batch_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} % heads {self.num_heads} != 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        """Side of the learned position table (980 / 14 = 70)."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch vector, inner order (c, kh, kw): 3 * 14 * 14 = 588."""
        return self.num_channels * self.patch_size * self.patch_size

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> VisionConfig:
        vc = hf.get("vision_config", {}) or {}
        layers = vc.get("num_hidden_layers", 27)
        # Official: `if config.drop_vision_last_layer: vpm.encoder.layers = layers[:-1]`
        # (the class default is True; 2.5 / 2.6 / 4.5 config.json set False).
        if hf.get("drop_vision_last_layer", True):
            layers -= 1
        kw = {
            "hidden_size": vc.get("hidden_size", 1152),
            "intermediate_size": vc.get("intermediate_size", 4304),
            "num_layers": layers,
            "num_heads": vc.get("num_attention_heads", 16),
            "patch_size": vc.get("patch_size", 14),
            "image_size": vc.get("image_size", 980),
            "num_channels": vc.get("num_channels", 3),
            "layer_norm_eps": vc.get("layer_norm_eps", 1e-6),
            "batch_size": hf.get("vision_batch_size", 16),
        }
        kw.update(overrides)
        return cls(**kw)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResamplerConfig:
    """Perceiver resampler: Q learned queries cross-attend once to a slice's (or group's) patches."""

    num_queries: int
    embed_dim: int  # = LLM hidden size D
    kv_dim: int  # = vision hidden size Dv
    num_heads: int  # official: embed_dim // 128
    temporal: bool = False  # 4.5 3D resampler: temporal sin-cos term on keys + frame groups
    layer_norm_eps: float = 1e-6
    batch_size: int = 16  # slices per chunk (the vision tower's `vision_batch_size`)
    param_dtype: jnp.dtype = jnp.bfloat16
    dtype: jnp.dtype = jnp.bfloat16

    def __post_init__(self):
        _check_batch_size(self.batch_size)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"resampler embed_dim {self.embed_dim} % heads {self.num_heads} != 0")
        if self.embed_dim % 4:
            raise ValueError("resampler embed_dim must be a multiple of 4 (2D sin-cos table)")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict, version: str, **overrides) -> ResamplerConfig:
        d = hf["hidden_size"]
        kw = {
            "num_queries": hf.get("query_num", 64),
            "embed_dim": d,
            "kv_dim": (hf.get("vision_config", {}) or {}).get("hidden_size", 1152),
            "num_heads": d // 128,  # official: `num_heads=embed_dim // 128`
            "temporal": versions.spec(version).temporal,
            "batch_size": hf.get("vision_batch_size", 16),
        }
        kw.update(overrides)
        return cls(**kw)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlmConfig:
    """Decoder-only LLM: Llama-3 (2.5), Qwen2 (2.6, q/k/v bias), Qwen3 (4.5, q/k RMSNorm)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True  # Qwen2 yes; Qwen3, Llama3 no
    qk_norm: bool = False  # Qwen3 yes
    attn_impl: str = "xla"  # "xla" | "cudnn" | "splash" | "reference" (kernels.py)
    remat: str = "none"  # per-layer rematerialisation: "none" | "full" | "dots" (layers.py)
    param_dtype: jnp.dtype = jnp.bfloat16
    dtype: jnp.dtype = jnp.bfloat16  # compute dtype; norms, rope and softmax run in float32
    # decoder projections stored in torch's layout, `weight` [L, out, in] (layers.OutInDense);
    # the others are nnx.Linear `kernel` [L, in, out]. Empty: every projection [in, out].
    # `model.decoder_layout` picks it per backend and dtype when a checkpoint is loaded.
    out_in: tuple[str, ...] = ()

    def __post_init__(self):
        _check_remat(self.remat)
        unknown = [p for p in self.out_in if p not in PROJECTIONS]
        if unknown or isinstance(self.out_in, str):
            raise ValueError(
                f"out_in {self.out_in!r}: expected a tuple of names from {PROJECTIONS}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} % num_kv_heads {self.num_kv_heads} != 0")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (rotate-half RoPE)")
        if self.attn_impl not in ("xla", "cudnn", "splash", "reference"):
            raise ValueError(f"unknown attn_impl {self.attn_impl!r}")

    @classmethod
    def from_hf(cls, hf: dict, version: str, **overrides) -> LlmConfig:
        d, n, spec = hf["hidden_size"], hf["num_attention_heads"], versions.spec(version)
        kw = {
            "vocab_size": hf["vocab_size"],
            "hidden_size": d,
            "intermediate_size": hf["intermediate_size"],
            "num_layers": hf["num_hidden_layers"],
            "num_heads": n,
            "num_kv_heads": hf.get("num_key_value_heads") or n,
            # Qwen3 (4.5) states head_dim explicitly (it may differ from hidden / heads).
            "head_dim": hf.get("head_dim") or d // n,
            "rope_theta": float(hf.get("rope_theta", 1e6)),
            "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            # Qwen2 always has q/k/v biases; Llama / Qwen3 follow `attention_bias` (default off).
            "qkv_bias": bool(hf.get("attention_bias", False))
            if spec.qkv_bias is None
            else spec.qkv_bias,
            "qk_norm": spec.qk_norm,
        }
        if hf.get("rope_scaling"):
            raise ValueError(f"rope_scaling {hf['rope_scaling']} is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
        kw.update(overrides)
        return cls(**kw)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MiniCPMVConfig:
    """Whole model: version string plus the three component configs."""

    version: str
    vision: VisionConfig
    resampler: ResamplerConfig
    llm: LlmConfig

    def __post_init__(self):
        versions.spec(self.version)  # raises for an unregistered version
        if self.resampler.embed_dim != self.llm.hidden_size:
            raise ValueError("resampler.embed_dim must equal llm.hidden_size")
        if self.resampler.kv_dim != self.vision.hidden_size:
            raise ValueError("resampler.kv_dim must equal vision.hidden_size")

    @property
    def query_num(self) -> int:
        return self.resampler.num_queries

    def with_dtype(self, dtype: Any, param_dtype: Any = None) -> MiniCPMVConfig:
        """Same config with compute dtype `dtype` and parameter dtype `param_dtype` (default same)."""
        dt = _dtype(dtype)
        pdt = _dtype(param_dtype) if param_dtype is not None else dt
        rep = {"dtype": dt, "param_dtype": pdt}
        return dataclasses.replace(
            self,
            vision=dataclasses.replace(self.vision, **rep),
            resampler=dataclasses.replace(self.resampler, **rep),
            llm=dataclasses.replace(self.llm, **rep),
        )

    def with_remat(self, policy: str) -> MiniCPMVConfig:
        """Same config with per-layer rematerialisation `policy` ("none" | "full" | "dots") in the
        decoder and vision layer stacks (training: less activation memory, more compute)."""
        return dataclasses.replace(
            self,
            vision=dataclasses.replace(self.vision, remat=policy),
            llm=dataclasses.replace(self.llm, remat=policy),
        )

    def with_out_in(self, projections: tuple[str, ...]) -> MiniCPMVConfig:
        """Same config with the decoder projections `projections` (names from `PROJECTIONS`)
        stored in torch's layout [out, in] (`LlmConfig.out_in`); () for [in, out] everywhere."""
        return dataclasses.replace(
            self, llm=dataclasses.replace(self.llm, out_in=tuple(projections))
        )

    def with_vision_batch_size(self, n: int) -> MiniCPMVConfig:
        """Same config with `n` slices per chunk of the vision tower and resampler (the official
        `vision_batch_size`; peak vision memory grows with it, speed too, up to a point)."""
        return dataclasses.replace(
            self,
            vision=dataclasses.replace(self.vision, batch_size=n),
            resampler=dataclasses.replace(self.resampler, batch_size=n),
        )

    @classmethod
    def from_hf(cls, hf: dict, dtype: Any = "bfloat16", **llm_overrides) -> MiniCPMVConfig:
        """Build from a checkpoint's parsed config.json; raises UnsupportedVersionError for a
        missing or unsupported version."""
        version = versions.parse(hf.get("version"))
        cfg = cls(
            version=version,
            vision=VisionConfig.from_hf(hf),
            resampler=ResamplerConfig.from_hf(hf, version),
            llm=LlmConfig.from_hf(hf, version, **llm_overrides),
        )
        return cfg.with_dtype(dtype)

    @classmethod
    def from_pretrained(cls, folder: str | pathlib.Path, dtype: Any = "bfloat16") -> MiniCPMVConfig:
        return cls.from_hf(json.loads((pathlib.Path(folder) / "config.json").read_text()), dtype)


def _preset(version: str, llm: LlmConfig, query_num: int) -> MiniCPMVConfig:
    vision = VisionConfig()  # 1152 / 4304 / 16 heads / 27 layers for 2.5, 2.6 and 4.5
    return MiniCPMVConfig(
        version=version,
        vision=vision,
        resampler=ResamplerConfig(
            num_queries=query_num,
            embed_dim=llm.hidden_size,
            kv_dim=vision.hidden_size,
            num_heads=llm.hidden_size // 128,
            temporal=versions.spec(version).temporal,
        ),
        llm=llm,
    )


# Released configurations (spec §2, §3.1, §4; bf16 compute and parameters).
MINICPM_LLAMA3_V_2_5 = _preset(
    "2.5",
    LlmConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        qkv_bias=False,
    ),
    query_num=96,
)
MINICPM_V_2_6 = _preset(
    "2.6",
    LlmConfig(
        vocab_size=151666,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        qkv_bias=True,
    ),
    query_num=64,
)
MINICPM_V_4_5 = _preset(
    "4.5",
    LlmConfig(
        vocab_size=151748,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        qkv_bias=False,
        qk_norm=True,
    ),
    query_num=64,
)
PRESETS = {"2.5": MINICPM_LLAMA3_V_2_5, "2.6": MINICPM_V_2_6, "4.5": MINICPM_V_4_5}
