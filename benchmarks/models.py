"""Models and inputs for the benchmarks: presets with random weights, checkpoints, synthetic data.

Random-weight presets are built with the model's own nnx initialisers, directly on the default
device in the requested dtype (nothing is downloaded). `--layers` / `--vision-layers` truncate the
LLM / vision tower depth so a real-width model fits a small machine; every report says so.
The presets' processor uses the released MiniCPM-V 4.5 tokenizer that ships with the tests
(2.6 and 4.5 share the slicing scheme, 64 queries per slice and the image-id tokens).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np
from flax import nnx
from PIL import Image

from minicpmv_jax.config import PRESETS, MiniCPMVConfig
from minicpmv_jax.model import MiniCPMV, MiniCPMVModule
from minicpmv_jax.processor import MiniCPMVProcessor
from minicpmv_jax.sharding import RULES, make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
REAL_TOKENIZER = FIXTURES / "minicpm-v-4_5-real-tokenizer" / "processor"
TINY_CHECKPOINT = FIXTURES / "minicpm-v-2_6" / "checkpoint"
BENCH_PRESETS = ("2.6", "4.5", "tiny")


@dataclasses.dataclass
class Bench:
    """A model under test plus what the report must say about it."""

    model: MiniCPMV
    source: str  # "random weights (preset 2.6)" / "checkpoint PATH"
    truncated: dict[str, Any]  # {"llm_layers": (used, full), "vision_layers": (used, full)}
    clamp_ids: int | None  # token ids >= this are clamped (tokenizer vocab > model vocab)

    @property
    def config(self) -> MiniCPMVConfig:
        return self.model.config

    def process(self, msgs, **kwargs):
        """Processor call; ids the model's vocabulary lacks are clamped (random weights only)."""
        out = self.model.processor(msgs, **kwargs)
        if self.clamp_ids is not None:
            out["input_ids"] = np.minimum(out["input_ids"], self.clamp_ids - 1)
        return out


def preset_processor(version: str, query_num: int) -> MiniCPMVProcessor:
    """Processor with the real tokenizer and the released slicing settings of `version`."""
    base = MiniCPMVProcessor.from_pretrained(REAL_TOKENIZER)
    if version == base.version and query_num == base.query_num:
        return base
    return MiniCPMVProcessor(
        base.tokenizer,
        version=version,
        chat_template=base.chat_template,
        query_num=query_num,
        max_slice_nums=base.max_slice_nums,
        tokens=base.tokens,
    )


def _truncate_config(cfg: MiniCPMVConfig, layers: int | None, vision_layers: int | None):
    llm, vision = cfg.llm, cfg.vision
    if layers is not None:
        llm = dataclasses.replace(llm, num_layers=min(layers, llm.num_layers))
    if vision_layers is not None:
        vision = dataclasses.replace(vision, num_layers=min(vision_layers, vision.num_layers))
    return dataclasses.replace(cfg, llm=llm, vision=vision)


def _truncate_module(model: MiniCPMV, cfg: MiniCPMVConfig) -> MiniCPMV:
    """Drop trailing decoder / vision layers of a loaded model (checkpoint + --layers)."""
    module = model.module
    for layers, n in (
        (module.llm.model.layers, cfg.llm.num_layers),
        (module.vpm.encoder.layers, cfg.vision.num_layers),
    ):
        for _, var in nnx.iter_graph(layers):  # stacked [L, ...] parameters: keep the first n
            if isinstance(var, nnx.Variable):
                var.set_value(var.get_value()[:n])
    module.llm.cfg = cfg.llm
    return MiniCPMV(cfg, module, model.processor, mesh=model.mesh)


# Above this many parameter bytes the model is initialised eagerly, one parameter at a time: the
# one-program init keeps every RNG temporary of the whole model alive at once (a 2-layer 4.5
# model needed > 24 GB on the CPU that way).
JIT_INIT_MAX_BYTES = 256 << 20


def init_random(cfg: MiniCPMVConfig, seed: int, processor) -> MiniCPMV:
    """Random weights from the model's own nnx initialisers, created in their dtype on device.

    Small models run the initialisers as ONE jitted program (one compilation instead of one per
    parameter shape: seconds instead of tens of seconds for the test model); larger ones use
    `MiniCPMV.from_config` (eager, bounded memory). Both give the same values.
    """
    mesh = make_mesh()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        abstract = nnx.eval_shape(lambda: MiniCPMVModule(cfg, rngs=nnx.Rngs(seed)))
        graphdef, shapes = nnx.split(abstract)
        if _bytes(shapes) > JIT_INIT_MAX_BYTES:
            return MiniCPMV.from_config(cfg, seed=seed, mesh=mesh, processor=processor)
        state = jax.jit(lambda: nnx.state(MiniCPMVModule(cfg, rngs=nnx.Rngs(seed))))()
    return MiniCPMV(cfg, nnx.merge(graphdef, state), processor, mesh=mesh)


def build(
    preset: str | None = "2.6",
    *,
    checkpoint: str | None = None,
    dtype: str = "bfloat16",
    layers: int | None = None,
    vision_layers: int | None = None,
    seed: int = 0,
) -> Bench:
    """A preset with random weights (or a checkpoint), optionally truncated in depth."""
    if checkpoint is not None:
        model = MiniCPMV.from_pretrained(checkpoint, dtype=dtype, progress=False)
        full = model.config
        cfg = _truncate_config(full, layers, vision_layers)
        if cfg != full:
            model = _truncate_module(model, cfg)
        source, clamp = f"checkpoint {checkpoint}", None
    else:
        if preset == "tiny":
            full = MiniCPMVConfig.from_pretrained(TINY_CHECKPOINT, dtype=dtype)
            processor = MiniCPMVProcessor.from_pretrained(TINY_CHECKPOINT)
        elif preset in PRESETS and preset in BENCH_PRESETS:
            full = PRESETS[preset].with_dtype(dtype)
            processor = preset_processor(full.version, full.query_num)
        else:
            raise ValueError(f"unknown preset {preset!r}; choose one of {BENCH_PRESETS}")
        cfg = _truncate_config(full, layers, vision_layers)
        model = init_random(cfg, seed, processor)
        vocab = len(processor.tokenizer)
        clamp = cfg.llm.vocab_size if vocab > cfg.llm.vocab_size else None
        source = f"random weights (preset {preset})"
    jax.block_until_ready(model.state)
    truncated = {
        "llm_layers": [cfg.llm.num_layers, full.llm.num_layers],
        "vision_layers": [cfg.vision.num_layers, full.vision.num_layers],
    }
    return Bench(model, source, truncated, clamp)


# ------------------------------------------------------------------------------------------------
# Parameter accounting (for the roofline)
# ------------------------------------------------------------------------------------------------


def _bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def param_stats(model: MiniCPMV) -> dict[str, int]:
    """Parameter counts and bytes per component; `llm_decode_read_bytes` excludes the embedding
    table (a decode step gathers B rows of it) and counts everything else once."""
    m = model.module
    llm = nnx.state(m.llm, nnx.Param)
    emb = nnx.state(m.llm.model.embed_tokens, nnx.Param)
    return {
        "vision_params": _count(nnx.state(m.vpm, nnx.Param)),
        "resampler_params": _count(nnx.state(m.resampler, nnx.Param)),
        "llm_params": _count(llm),
        "llm_bytes": _bytes(llm),
        "llm_embed_bytes": _bytes(emb),
        "llm_decode_read_bytes": _bytes(llm) - _bytes(emb),
        "llm_matmul_params": _count(llm) - _count(emb),
    }


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """RGB gradient + noise (no shortcut for the resize / normalise code)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    img = 0.5 * (x + y) + rng.normal(0, 25, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def question(tokenizer, n_tokens: int) -> str:
    """An English question of exactly `n_tokens` tokens under `tokenizer` (no special tokens)."""
    words = ("Describe", " the", " colours", " shapes", " and", " objects", " in", " this")
    text = ""
    i = 0
    while len(tokenizer.encode(text, add_special_tokens=False)) < n_tokens - 1:
        text += words[i % len(words)]
        i += 1
    text += "?"
    while len(tokenizer.encode(text, add_special_tokens=False)) > n_tokens:
        text = text[:-2] + "?"
    return text


def text_prompt(length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A text-only conversation of `length` random ids (the keys generate.prepare_batch reads)."""
    ids = np.random.default_rng(seed).integers(
        min(1000, vocab // 2), min(vocab, 100_000), (length,)
    )
    return {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((length,), bool),
        "tgt_sizes": np.zeros((0, 2), np.int64),
        "image_bound": np.zeros((0, 2), np.int64),
    }
