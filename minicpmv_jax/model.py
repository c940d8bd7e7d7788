"""MiniCPM-V network: vision tower (vpm) -> resampler -> merged token embeddings -> LLM.

`MiniCPMVModule` is the nnx tree (attribute paths = checkpoint keys: `vpm.*`, `resampler.*`,
`llm.model.*`, `llm.lm_head`). `encode_images` and `merge_embeds` are traceable building blocks
with static shapes; `abstract_module`, `init_module` and `load_module` build the tree (shapes
only, random, or from a checkpoint folder).

This module knows nothing of prompts, buckets or decoding: `generate.Sampler` holds a model and
runs it, `chat.ChatSampler` adds the official chat() behaviour, and `pipeline.MiniCPMV` is the
user-facing object that loads a checkpoint and composes the two (still importable from here as
`minicpmv_jax.model.MiniCPMV`).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from minicpmv_jax import quant as quantization
from minicpmv_jax.config import MiniCPMVConfig
from minicpmv_jax.errors import CheckpointError
from minicpmv_jax.llm import Llm
from minicpmv_jax.resampler import Resampler
from minicpmv_jax.sharding import check_divisible, make_mesh, rules_for
from minicpmv_jax.vision import VisionTower
from minicpmv_jax.weights import checkpoint_files, load_safetensors

log = logging.getLogger(__name__)


class AbstractRngs:
    """Key source for shape-only construction (`abstract_module`): every stream returns one fixed
    key, so no RNG counter is threaded through the eval_shape trace (flax 0.12 inspects the
    counter's sharding on every update, which is quadratic in the number of parameters there)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self):
        return jax.random.key(0)


class MiniCPMVModule(nnx.Module):
    """The whole network; attribute paths are the checkpoint's top-level prefixes."""

    def __init__(self, cfg: MiniCPMVConfig, *, rngs: nnx.Rngs):
        self.vpm = VisionTower(cfg.vision, rngs=rngs)
        self.resampler = Resampler(cfg.resampler, rngs=rngs)
        self.llm = Llm(cfg.llm, rngs=rngs)


def encode_images(
    module: MiniCPMVModule,
    pixel_patches: jax.Array,
    position_ids: jax.Array,
    vision_mask: jax.Array,
    patch_valid: jax.Array,
    tgt_sizes: jax.Array,
    temporal_ids: jax.Array,
    group_index: jax.Array,
    num_groups: int,
) -> jax.Array:
    """Vision tower + resampler (traceable, static shapes).

    Args:
      pixel_patches: float [I, P, 588]; position_ids: int [I, P]; vision_mask: bool [I, P]
        (tower keys); patch_valid: bool [I, P] (resampler keys); tgt_sizes: int [I, 2];
      temporal_ids: int [I] (-1 = image); group_index: int [I] output group per slice, -1 = pad.
      num_groups: static G.
    Returns: [G, Q, D] in the compute dtype.
    """
    feats = module.vpm(pixel_patches, position_ids, vision_mask, group_index >= 0)  # [I, P, Dv]
    return module.resampler(feats, tgt_sizes, patch_valid, group_index, num_groups, temporal_ids)


def merge_embeds(
    module: MiniCPMVModule, input_ids: jax.Array, image_slot: jax.Array, feats: jax.Array
) -> jax.Array:
    """Token embeddings with resampler rows scattered in (replace, no scaling).

    Args:
      input_ids: int [B, T]; image_slot: int32 [B, T] row of `feats` per token, -1 = text.
      feats: [G*Q, D] flattened resampler output.
    Returns: [B, T, D] in the compute dtype.
    """
    text = module.llm.embed(input_ids)  # [B, T, D]
    rows = feats[jnp.clip(image_slot, 0, feats.shape[0] - 1)].astype(text.dtype)  # [B, T, D]
    return jnp.where((image_slot >= 0)[..., None], rows, text)


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> pathlib.Path:
    """Local folder, or a hub id fetched with huggingface_hub (clear error when offline)."""
    from minicpmv_jax.checkpoint import absolute, partial_dir

    p = absolute(path_or_hub_id)  # orbax needs absolute paths; errors name the full path
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file; expected a checkpoint folder")
    if partial_dir(p).is_dir():
        raise CheckpointError(
            f"{p}: no such checkpoint folder, but an unfinished conversion / save to it is in "
            f"the hidden folder {partial_dir(p)}: run it again to finish it"
        )
    s = str(path_or_hub_id)
    if s.count("/") != 1 or s.startswith((".", "/", "~")):
        raise CheckpointError(f"{s}: no such checkpoint folder (and not a hub id 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            s,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"],
        )
    except Exception as e:  # offline, unknown repo, no access: one clear message
        raise CheckpointError(
            f"{s}: not a local folder and could not be downloaded from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Offline? Download it first or pass a local folder."
        ) from e
    return pathlib.Path(folder)


def abstract_module(config: MiniCPMVConfig, mesh=None, quant=None):
    """(graphdef, abstract state) with shardings, no memory (nnx.get_abstract_model).

    quant: None, "int8", "int8+vision" or a quant.QuantConfig (int8 weight-only layers).
    """
    mesh = mesh if mesh is not None else make_mesh()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for(config, mesh)):
        graphdef, abstract = nnx.get_abstract_model(
            lambda: quantization.quantize_module(
                MiniCPMVModule(config, rngs=AbstractRngs()), quant
            ),
            mesh,
        )
    check_divisible(abstract)  # a clear error naming the parameter, before any placement
    return graphdef, abstract


def init_module(config: MiniCPMVConfig, *, seed: int = 0, mesh=None, quant=None):
    """Randomly initialised module (tests, benchmarks), sharded over `mesh`."""
    mesh = mesh if mesh is not None else make_mesh()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for(config, mesh)):
        module = MiniCPMVModule(config, rngs=nnx.Rngs(seed))
        return quantization.quantize_module(module, quant)


def read_hf_config(folder: pathlib.Path) -> dict:
    """A checkpoint folder's parsed config.json (clear errors when missing or invalid)."""
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{folder}: config.json is missing")
    try:
        return json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from e


# The decoder projections a bf16 model stores in torch's layout [out, in] on the CPU backend
# (`LlmConfig.out_in`, `decoder_layout`): XLA:CPU's batch-1 bf16 decode dot of down_proj is
# 1.3x faster with it, gate / up about 1.05x, q/k/v/o no faster; float32 at 8 to 128 rows and
# the GPU / TPU dots keep [in, out] (BENCHMARKS.md, "The decoder's MLP in torch's layout").
CPU_BF16_OUT_IN = ("gate_proj", "up_proj", "down_proj")


def decoder_layout(param_dtype: Any, mesh: jax.sharding.Mesh, quant=None) -> tuple[str, ...]:
    """The decoder projections to store [out, in] for a model of `param_dtype` on `mesh`:
    `CPU_BF16_OUT_IN` for a float (not int8) bf16 model whose devices are all CPUs, else ()."""
    cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    if cpu and quant is None and jnp.dtype(param_dtype) == jnp.bfloat16:
        return CPU_BF16_OUT_IN
    return ()


def load_module(
    folder: pathlib.Path,
    dtype: Any,
    mesh: jax.sharding.Mesh,
    *,
    progress: bool = True,
    quant: str | quantization.QuantConfig | None = None,
    attn_impl: str = "xla",
    out_in: tuple[str, ...] | None = None,
) -> tuple[MiniCPMVConfig, MiniCPMVModule]:
    """(config, module) of a checkpoint folder: config.json + safetensors, or an orbax folder.

    Stored tensors of any dtype are converted to `dtype` one at a time; `quant` as in
    `MiniCPMV.from_pretrained` (an orbax folder written quantized loads quantized by itself);
    `attn_impl` selects the LLM's attention kernel (`kernels.IMPLS`); `out_in` the decoder
    projections stored [out, in] (`LlmConfig.out_in`; None: `decoder_layout`'s choice).
    """
    hf = read_hf_config(folder)
    config = MiniCPMVConfig.from_hf(hf, dtype=jnp.dtype(dtype), attn_impl=attn_impl)
    from minicpmv_jax import checkpoint  # lazy: orbax is only needed for orbax folders

    orbax = checkpoint.is_orbax_checkpoint(folder)  # written by convert.to_orbax / save()
    files = None if orbax else checkpoint_files(folder)[0]
    quant = quantization.parse(quant)
    stored = quantization.stored_quant(checkpoint.read_metadata(folder)) if orbax else None
    if out_in is None:
        out_in = decoder_layout(config.llm.param_dtype, mesh, quant or stored)
    config = config.with_out_in(out_in)
    if out_in:
        log.info("decoder projections stored [out, in]: %s", ", ".join(out_in))
    # a float orbax folder restores float, then quantizes; a quantized one restores as stored
    graphdef, abstract = abstract_module(config, mesh, stored if orbax else quant)
    if orbax:  # each array is read straight into its target sharding
        module = checkpoint.restore_module(folder, graphdef, abstract, progress=progress)
        if quant is not None and stored is None:
            module = quantization.quantize_module(module, quant)
    else:
        module = load_safetensors(graphdef, abstract, files, progress=progress)
    return config, module


def __getattr__(name: str):
    # `from minicpmv_jax.model import MiniCPMV`, the historical import path: resolved on first
    # use, so that importing the network never imports generation or chat
    if name == "MiniCPMV":
        from minicpmv_jax.pipeline import MiniCPMV

        return MiniCPMV
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
