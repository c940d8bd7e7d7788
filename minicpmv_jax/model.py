"""MiniCPM-V: vision tower (vpm) -> resampler -> merged token embeddings -> LLM.

`MiniCPMVModule` is the nnx tree (attribute paths = checkpoint keys: `vpm.*`, `resampler.*`,
`llm.model.*`, `llm.lm_head`). `encode_images` and `merge_embeds` are traceable building blocks
with static shapes; `MiniCPMV` wraps a loaded module, its processor and jitted stage functions that
take one processed conversation (numpy in, numpy out).

Static shapes: the processor pads patches to a patch bucket P; here the slice count I is padded to
a slice bucket (1, 2, 4, 8, ...) with all-invalid slices, and the resampler always returns one row
per slice slot (G = I bucket), so vision tower + resampler compile once per (I bucket, P bucket).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as PS

from minicpmv_jax import quant as quantization
from minicpmv_jax.chat import GenerationMixin
from minicpmv_jax.config import MiniCPMVConfig
from minicpmv_jax.errors import CheckpointError, MiniCPMVError
from minicpmv_jax.kernels import IMPLS
from minicpmv_jax.kv_cache import KVCache
from minicpmv_jax.llm import Llm
from minicpmv_jax.resampler import Resampler
from minicpmv_jax.sharding import check_divisible, make_mesh, rules_for
from minicpmv_jax.vision import VisionTower
from minicpmv_jax.weights import checkpoint_files, load_safetensors

log = logging.getLogger(__name__)

# How many times each jitted stage function was traced (i.e. compiled), by name. Tests use it to
# check that differently sized images in one bucket share one compilation.
TRACE_COUNTS: collections.Counter = collections.Counter()

DEFAULT_SLICE_BUCKETS = (1, 2, 4, 8, 10, 16, 32, 64)  # as generate.Buckets.slices
TOKEN_BUCKET = 128  # prompt_logits pads the prompt to a multiple of this (right padding, masked)


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
    feats = module.vpm(pixel_patches, position_ids, vision_mask)  # [I, P, Dv]
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


def prompt_positions(attention_mask: np.ndarray) -> np.ndarray:
    """RoPE positions transformers derives from the attention mask during generate().

    ``position_ids = cumsum(mask) - 1`` with masked positions set to 1 (``prepare_inputs_for_
    generation``). Quirk (2.6 / 4.5 official): the mask is ``input_ids != 0``, so a genuine id-0
    token in the prompt (``!``) is masked and the tokens after it are shifted down by one position;
    new tokens continue at ``mask.sum()``, ``mask.sum() + 1``, ...
    """
    m = np.asarray(attention_mask).astype(np.int64)
    pos = np.cumsum(m, axis=-1) - 1
    return np.where(m > 0, pos, 1).astype(np.int32)


def image_slot_from_bounds(image_bound: np.ndarray, t: int, q: int) -> np.ndarray:
    """int32 [T]: feature row g*Q + j for token s_g + j of bound g = [s_g, e_g); -1 elsewhere."""
    slot = np.full((t,), -1, np.int32)
    for g, (s, e) in enumerate(np.asarray(image_bound, np.int64).reshape(-1, 2)):
        if e - s != q:
            raise ValueError(f"image_bound row {g} = [{s}, {e}) does not hold {q} tokens")
        slot[s:e] = np.arange(g * q, (g + 1) * q, dtype=np.int32)
    return slot


def _bucket(n: int, buckets) -> int:
    for b in buckets:
        if b >= n:
            return b
    top = buckets[-1]
    return -(-n // top) * top


def group_index_from_sizes(group_sizes: np.ndarray, num_slices: int) -> np.ndarray:
    """int32 [num_slices]: group of each slice (consecutive runs of group_sizes), -1 past the end."""
    gi = np.repeat(np.arange(len(group_sizes), dtype=np.int32), np.asarray(group_sizes, np.int64))
    out = np.full((num_slices,), -1, np.int32)
    out[: len(gi)] = gi
    return out


def pad_image_inputs(batch, slice_buckets=DEFAULT_SLICE_BUCKETS) -> dict[str, np.ndarray]:
    """Pad the processor's per-slice arrays from I to the slice bucket (host side, numpy).

    Padding slices are all-invalid (patch_valid False, group -1); their vision_mask keeps the first
    key True so the tower's softmax stays finite.
    """
    patches = np.asarray(batch["pixel_patches"], np.float32)
    i, p = patches.shape[:2]
    ib = _bucket(max(i, 1), slice_buckets)

    def pad(a, value, dtype):
        a = np.asarray(a, dtype)
        out = np.full((ib,) + a.shape[1:], value, dtype)
        out[:i] = a
        return out

    vision_mask = pad(batch["vision_mask"], False, bool)
    vision_mask[i:, 0] = True
    group_sizes = np.asarray(batch.get("group_sizes", np.ones((i,), np.int64)), np.int64)
    temporal = batch.get("temporal_ids")
    temporal = np.full((i,), -1, np.int64) if temporal is None else temporal
    return {
        "pixel_patches": pad(patches, 0.0, np.float32),
        "position_ids": pad(batch["position_ids"], 0, np.int32),
        "vision_mask": vision_mask,
        "patch_valid": pad(batch["patch_valid"], False, bool),
        "tgt_sizes": pad(batch["tgt_sizes"], 0, np.int32),
        "temporal_ids": pad(temporal, -1, np.int32),
        "group_index": group_index_from_sizes(group_sizes, ib),
        "num_groups": ib,
        "real_groups": len(group_sizes),
        "real_slices": i,
        "patch_bucket": p,
    }


# Outputs are fetched to the host: replicate them (PartitionSpec() against the context mesh that
# MiniCPMV._precision sets), so every process of a multi-host run can read them.
@functools.partial(jax.jit, static_argnames=("graphdef", "num_groups"), out_shardings=PS())
def _encode_jit(graphdef, state, pixel_patches, position_ids, vision_mask, patch_valid,
                tgt_sizes, temporal_ids, group_index, num_groups):  # fmt: skip
    """(vision features float32 [I, P, Dv], resampler output [G, Q, D]) in one compilation."""
    TRACE_COUNTS["encode"] += 1
    module = nnx.merge(graphdef, state)
    feats = module.vpm(pixel_patches, position_ids, vision_mask)  # [I, P, Dv]
    out = module.resampler(feats, tgt_sizes, patch_valid, group_index, num_groups, temporal_ids)
    return feats.astype(jnp.float32), out


@functools.partial(jax.jit, static_argnames=("graphdef",), out_shardings=PS())
def _prompt_jit(graphdef, state, input_ids, image_slot, feats, token_valid, positions):
    """(float32 logits [1, T, V], float32 merged embeddings [1, T, D]) in one compilation."""
    TRACE_COUNTS["prompt"] += 1
    module = nnx.merge(graphdef, state)
    x = merge_embeds(module, input_ids, image_slot, feats)  # [1, T, D]
    logits, _ = module.llm(x, positions, None, token_valid)
    return logits, x.astype(jnp.float32)


def _as_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(dtype)


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


class MiniCPMV(GenerationMixin):  # generate(), chat(): chat.py
    """A loaded model: config, processor, nnx module and jitted stage functions."""

    def __init__(
        self,
        config: MiniCPMVConfig,
        module: MiniCPMVModule,
        processor: Any = None,
        *,
        mesh: jax.sharding.Mesh | None = None,
        slice_buckets=DEFAULT_SLICE_BUCKETS,
        token_bucket: int = TOKEN_BUCKET,
    ):
        self.config = config
        self.token_bucket = token_bucket  # prompt_logits pads T to a multiple (fewer compiles)
        self.module = module
        self.processor = processor
        self.mesh = mesh
        self.slice_buckets = tuple(slice_buckets)
        self.graphdef, self.state = nnx.split(module)
        self.adapter = None  # a PEFT LoRA adapter merged into the weights (train.lora.Adapter)

    # ------------------------------------------------------------------ construction
    @staticmethod
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

    @classmethod
    def from_config(
        cls, config: MiniCPMVConfig, *, seed: int = 0, mesh=None, processor=None, quant=None
    ):
        """Randomly initialised model (tests, benchmarks); `quant` as in from_pretrained."""
        mesh = mesh if mesh is not None else make_mesh()
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for(config, mesh)):
            module = MiniCPMVModule(config, rngs=nnx.Rngs(seed))
            module = quantization.quantize_module(module, quant)
        return cls(config, module, processor, mesh=mesh)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        dtype: Any = "float32",
        mesh: jax.sharding.Mesh | None = None,
        *,
        progress: bool = True,
        load_processor: bool = True,
        quant: str | quantization.QuantConfig | None = None,
        adapter: str | os.PathLike | None = None,
        attn_impl: str = "xla",
    ) -> MiniCPMV:
        """Load an official checkpoint folder (or hub id): config.json + safetensors (+ processor).

        Args:
          path_or_hub_id: local folder or "org/name" (downloaded with huggingface_hub).
          dtype: compute and parameter dtype ("float32", "bfloat16", ...); stored tensors of any
            dtype (bf16, fp16, fp32) are converted one at a time.
          mesh: ("data", "fsdp", "tensor") mesh; default: one device.
          quant: "int8" stores the LLM's dense layers (and lm_head) as int8 with per-channel
            scales, quantized on the host while loading; "int8+vision" also the vision tower
            (see quant.py). An orbax folder written quantized loads quantized by itself.
          adapter: a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors),
            merged into the weights as PEFT's merge_and_unload does; `model.adapter` keeps it for
            further training (minicpmv_jax.train).
          attn_impl: the LLM's attention kernel (`kernels.IMPLS`): "xla" (any backend), "cudnn"
            (GPU flash attention, bf16 / fp16), "splash" (TPU Pallas prefill kernel, under
            `shard_map` on a mesh) or "reference" (plain jnp).
        """
        if attn_impl not in IMPLS:
            raise MiniCPMVError(f"attn_impl {attn_impl!r} is not one of {IMPLS}")
        folder = resolve_checkpoint(path_or_hub_id)
        cfg_file = folder / "config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{folder}: config.json is missing")
        try:
            hf = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from e
        if hf.get("model_type") == "minicpmv4_6":  # native-transformers 4.6: minicpmv_jax/v46
            from minicpmv_jax.v46.model import MiniCPMV46

            if attn_impl != "xla":
                raise CheckpointError("attn_impl is not supported for MiniCPM-V 4.6 yet")
            return MiniCPMV46.from_pretrained(
                folder,
                _as_dtype(dtype),
                mesh,
                progress=progress,
                load_processor=load_processor,
                quant=quant,
                hf=hf,
            )
        config = MiniCPMVConfig.from_hf(hf, dtype=_as_dtype(dtype), attn_impl=attn_impl)
        mesh = mesh if mesh is not None else make_mesh()
        from minicpmv_jax import checkpoint  # lazy: orbax is only needed for orbax folders

        orbax = checkpoint.is_orbax_checkpoint(folder)  # written by convert.to_orbax / save()
        files = None if orbax else checkpoint_files(folder)[0]
        quant = quantization.parse(quant)
        stored = quantization.stored_quant(checkpoint.read_metadata(folder)) if orbax else None
        # a float orbax folder restores float, then quantizes; a quantized one restores as stored
        graphdef, abstract = cls.abstract_module(config, mesh, stored if orbax else quant)
        if orbax:  # each array is read straight into its target sharding
            module = checkpoint.restore_module(folder, graphdef, abstract, progress=progress)
            if quant is not None and stored is None:
                module = quantization.quantize_module(module, quant)
        else:
            module = load_safetensors(graphdef, abstract, files, progress=progress)
        processor = None
        if load_processor:
            from minicpmv_jax.processor import MiniCPMVProcessor  # lazy: numpy/tokenizer side

            processor = MiniCPMVProcessor.from_pretrained(folder)
        model = cls(config, module, processor, mesh=mesh)
        if adapter is not None:
            from minicpmv_jax.train.lora import load_adapter  # lazy: training code

            model = load_adapter(model, adapter)
        return model

    # ------------------------------------------------------------------ helpers
    def _precision(self):
        stack = contextlib.ExitStack()
        # the context mesh: block-boundary activations follow sharding.RULES, outputs replicate
        stack.enter_context(jax.set_mesh(self.mesh if self.mesh is not None else make_mesh()))
        # float32 parity needs true float32 matmuls (TPU/GPU default to bf16/tf32 passes).
        if self.config.llm.dtype == jnp.float32:
            stack.enter_context(jax.default_matmul_precision("highest"))
        return stack

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        return KVCache.init(self.config.llm, batch, max_len, dtype)

    def _encode(self, batch) -> tuple[jax.Array, jax.Array, dict]:
        """(vision features [Ib, P, Dv], resampler output [Ib, Q, D], padded inputs)."""
        pad = pad_image_inputs(batch, self.slice_buckets)
        with self._precision():
            vis, feats = _encode_jit(
                self.graphdef,
                self.state,
                pad["pixel_patches"],
                pad["position_ids"],
                pad["vision_mask"],
                pad["patch_valid"],
                pad["tgt_sizes"],
                pad["temporal_ids"],
                pad["group_index"],
                num_groups=pad["num_groups"],
            )
        return vis, feats, pad

    def _has_images(self, batch) -> bool:
        return np.asarray(batch["tgt_sizes"]).reshape(-1, 2).shape[0] > 0

    # ------------------------------------------------------------------ stage functions
    def vision_features(self, batch) -> np.ndarray:
        """float32 [I, P, Dv]: vision tower last_hidden_state (incl. post layernorm)."""
        vis, _, pad = self._encode(batch)
        return np.asarray(vis)[: pad["real_slices"]]

    def resample(self, batch) -> np.ndarray:
        """float32 [G, Q, D]: resampler output, one row-group per image_bound row."""
        _, feats, pad = self._encode(batch)
        return np.asarray(feats.astype(jnp.float32))[: pad["real_groups"]]

    def _prompt(self, batch) -> dict[str, np.ndarray]:
        """Run every stage once; dict of float32 numpy arrays (vision/resampler when images)."""
        ids = np.asarray(batch["input_ids"], np.int64).reshape(-1)
        t = ids.shape[0]
        tb = -(-t // self.token_bucket) * self.token_bucket
        q, d = self.config.query_num, self.config.llm.hidden_size
        out: dict[str, np.ndarray] = {}
        if self._has_images(batch):
            vis, feats, pad = self._encode(batch)
            out["vision"] = np.asarray(vis)[: pad["real_slices"]]
            out["resampler"] = np.asarray(feats.astype(jnp.float32))[: pad["real_groups"]]
            feats = feats.reshape(-1, d)[:tb]  # [G*Q, D]; rows past T are never referenced
        else:
            feats = jnp.zeros((0, d), self.config.llm.dtype)
        # Pad to T rows so the LLM compiles once per token bucket, whatever the slice bucket.
        feats = jnp.pad(feats, ((0, tb - feats.shape[0]), (0, 0)))
        slot = np.full((1, tb), -1, np.int32)
        slot[0, :t] = image_slot_from_bounds(batch["image_bound"], t, q)
        ids_p = np.zeros((1, tb), np.int32)
        ids_p[0, :t] = ids
        mask = batch.get("attention_mask")
        valid = np.zeros((1, tb), bool)
        valid[0, :t] = True if mask is None else np.asarray(mask, bool).reshape(-1)
        positions = np.zeros((1, tb), np.int32)  # pad slots: never attended, any position
        positions[0, :t] = prompt_positions(valid[0, :t])
        with self._precision():
            logits, embeds = _prompt_jit(
                self.graphdef, self.state, ids_p, slot, feats, valid, positions
            )
        out["embeds"] = np.asarray(embeds[0, :t], np.float32)
        out["logits"] = np.asarray(logits[0, :t], np.float32)
        return out

    def input_embeds(self, batch) -> np.ndarray:
        """float32 [T, D]: token embeddings with resampler rows scattered at image_bound."""
        return self._prompt(batch)["embeds"]

    def prompt_logits(self, batch, return_intermediates: bool = False):
        """float32 [T, V]: logits at every prompt position (no cache).

        The official attention mask and the positions generate() derives from it
        (`prompt_positions`): keys where `attention_mask` is False (2.6/4.5 quirk: input_ids == 0,
        the token `!`) are not attended and shift every later position down by one; 2.5 attends
        everything at positions 0..T-1.
        With return_intermediates=True returns (logits, {"vision", "resampler", "embeds"}) so that
        a parity failure can name its stage.
        """
        out = self._prompt(batch)
        logits = out.pop("logits")
        return (logits, out) if return_intermediates else logits
