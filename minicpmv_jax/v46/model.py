"""MiniCPM-V 4.6: vision tower -> projector -> pad-token scatter -> Qwen3.5 hybrid LLM.

`MiniCPMV46Module` is the nnx tree; its attribute paths are the native transformers checkpoint
keys (`model.vision_tower.*`, `model.merger.*`, `model.language_model.*`, tied LM head), so the
package's streaming safetensors loader reads it unchanged. `MiniCPMV46` wraps a loaded module
with its processor and jitted stage functions (numpy in, numpy out) behind the same surface as
the other versions: `processor(messages, **kw)`, `prompt_logits(batch)`, `generate(batch, ...)`,
`chat(msgs, ...)`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpmv_jax import generate, versions
from minicpmv_jax import quant as quantization
from minicpmv_jax import sampling as smp
from minicpmv_jax.chat import _TextStream
from minicpmv_jax.errors import CheckpointError, MiniCPMVError
from minicpmv_jax.layers import PACKED_BF16
from minicpmv_jax.model import AbstractRngs
from minicpmv_jax.settings import GenerationSettings
from minicpmv_jax.sharding import RULES, _fit, make_mesh, mesh_shape, path_name
from minicpmv_jax.v46 import vision_inputs
from minicpmv_jax.v46.config import MiniCPMV46Config, check_downsample_mode
from minicpmv_jax.v46.projector import Projector
from minicpmv_jax.v46.qwen35 import HybridCache, Qwen35TextModel
from minicpmv_jax.v46.siglip2 import Siglip2Tower

# DeltaNet projections shard their heads over `tensor` like the attention heads.
RULES_46 = (*RULES, ("lin_heads", "tensor"), ("lin_v_heads", "tensor"))


def logical_sizes_46(cfg: MiniCPMV46Config) -> dict[str, set[int]]:
    """Per logical axis, the sizes its mesh axes must divide (as sharding.logical_sizes)."""
    llm, vis = cfg.llm, cfg.vision
    return {
        "embed": {llm.hidden_size},
        "mlp": {llm.intermediate_size},
        "vocab": {llm.vocab_size},
        "q_heads": {llm.num_heads},
        "kv_heads": {llm.num_kv_heads},
        "lin_heads": {llm.lin_num_key_heads, llm.lin_num_value_heads},
        "lin_v_heads": {llm.lin_num_value_heads},
        "vis_embed": {vis.hidden_size},
        "vis_mlp": {vis.intermediate_size},
        "vis_heads": {vis.num_heads},
        "head_dim": {llm.head_dim, llm.lin_value_head_dim},
        "positions": {vis.patches_per_side**2},
    }


def rules_46(cfg: MiniCPMV46Config, mesh) -> tuple:
    """RULES_46 on one mesh: an axis whose sizes the mesh axes do not divide is sharded over the
    longest dividing prefix, or replicated (the fallback of sharding.rules_for)."""
    shape = mesh_shape(mesh)
    sizes = logical_sizes_46(cfg)
    return tuple(
        (name, _fit(target, sizes[name], shape) if name in sizes and target else target)
        for name, target in RULES_46
    )


class Quant46(quantization.QuantConfig):
    """int8 weight-only layers of 4.6: the text model's projections (the LM head is the tied
    embedding and stays float); with vision=True also the SigLIP2 encoder layers."""

    def selects(self, name: str) -> bool:
        if name.startswith("model.language_model.layers."):
            return self.llm
        if name.startswith("model.vision_tower.encoder.layers."):
            return self.vision
        return False


def parse_quant(quant) -> Quant46 | None:
    q = quantization.parse(quant)
    return None if q is None else Quant46(llm=q.llm, lm_head=False, vision=q.vision)


TRACE_COUNTS: collections.Counter = collections.Counter()
GENERATION_KEYS = (
    "temperature",
    "top_k",
    "top_p",
    "min_new_tokens",
    "length_penalty",
    "min_p",
    "early_stopping",
    "seed",
)
TOKEN_BUCKETS = (128, 256, 512, 1024, 2048, 4096)
# the weights the CPU programs take as packed bf16 (`generate.pack_weights`): the tied table
PACKED_TABLES = ("model.language_model.embed_tokens.embedding",)
# Read when a model is built; False gives the programs no packed table (A/B measurements: the
# programs then hold float32 copies of the bf16 table, BENCHMARKS.md).
PACK_BF16 = True


def table_bits(state: nnx.State) -> jax.Array | None:
    """The tied embedding table as uint16 bit patterns (a view, no copy) where
    `generate.pack_weights` packs it (CPU, bf16, one device); else None."""
    packed, _ = generate.pack_weights(state, stacks=(), tables=PACKED_TABLES)
    flat = {path_name(p): v.get_value() for p, v in nnx.to_flat_state(packed)}
    bits = flat[PACKED_TABLES[0]]
    return bits if bits.dtype == PACKED_BF16 else None


class Inner(nnx.Module):
    """`model`: vision_tower, merger (projector), language_model."""

    def __init__(self, cfg: MiniCPMV46Config, *, rngs: nnx.Rngs):
        self.vision_tower = Siglip2Tower(cfg.vision, rngs=rngs)
        self.merger = Projector(cfg, rngs=rngs)
        self.language_model = Qwen35TextModel(cfg.llm, rngs=rngs)


class MiniCPMV46Module(nnx.Module):
    def __init__(self, cfg: MiniCPMV46Config, *, rngs: nnx.Rngs):
        self.model = Inner(cfg, rngs=rngs)


def encode_units(module: MiniCPMV46Module, v: dict, mode: str, intermediates: bool = False):
    """Vision tower + projector for packed units (traceable). Returns [M/4, D], each unit's
    tokens back to back (and the tower's intermediates)."""
    m = module.model
    feats, inter = m.vision_tower(v, mode == "16x", intermediates=True)
    out = m.merger(feats[None], v["merge_perm"][None])[0]  # groups never straddle units
    if intermediates:
        return out, {**inter, "last_hidden_state": feats}
    return out


def merge_embeds(module: MiniCPMV46Module, ids, slot, feats, bits=None):
    """ids int [B, T]; slot int32 [B, T] row of feats [R, D] per pad token (-1 = text);
    bits: the packed embedding table or None (`MiniCPMV46.table_bits`)."""
    text = module.model.language_model.embed(ids, bits)
    rows = feats[jnp.clip(slot, 0, feats.shape[0] - 1)].astype(text.dtype)
    return jnp.where((slot >= 0)[..., None], rows, text)


@functools.partial(jax.jit, static_argnames=("mode",))
def _encode_jit(graphdef, state, v, mode):
    TRACE_COUNTS["encode"] += 1
    module = nnx.merge(graphdef, state)
    return encode_units(module, v, mode, intermediates=True)


# `bits` (every program that embeds tokens): `MiniCPMV46.table_bits`, the bf16 embedding table
# as uint16 for the token gathers on CPU (None: gather from the table itself).


@jax.jit
def _embeds_jit(graphdef, state, ids, slot, feats, bits=None):
    TRACE_COUNTS["embeds"] += 1
    return merge_embeds(nnx.merge(graphdef, state), ids, slot, feats, bits)


@jax.jit
def _forward_jit(graphdef, state, ids, slot, feats, valid, positions, bits=None):
    """Full prompt (no cache): (logits [B, T, V], embeds [B, T, D])."""
    TRACE_COUNTS["forward"] += 1
    module = nnx.merge(graphdef, state)
    lm = module.model.language_model
    x = merge_embeds(module, ids, slot, feats, bits)
    h, _ = lm.hidden(x, positions, None, valid)
    return lm.logits(h), x


@functools.partial(jax.jit, donate_argnames=("cache",))
def _prefill_jit(graphdef, state, ids, slot, feats, valid, positions, cache, bits=None):
    """Prompt into the cache: (last-position logits [B, V], cache)."""
    TRACE_COUNTS["prefill"] += 1
    module = nnx.merge(graphdef, state)
    lm = module.model.language_model
    x = merge_embeds(module, ids, slot, feats, bits)
    h, cache = lm.hidden(x, positions, cache, valid)
    return lm.logits(h[:, -1:])[:, 0], cache


@functools.partial(jax.jit, donate_argnames=("cache",))
def _step_jit(graphdef, state, tokens, positions, cache, bits=None):
    """One cached decode step: tokens, positions int32 [B] -> (logits [B, V], cache)."""
    TRACE_COUNTS["step"] += 1
    return _lm_step(nnx.merge(graphdef, state).model.language_model, tokens, positions, cache, bits)


def _lm_step(lm, tokens, positions, cache, bits=None):
    """One cached step of the text model: tokens, positions int [R] -> (logits [R, V], cache)."""
    r = tokens.shape[0]
    h, cache = lm.hidden(
        lm.embed(tokens[:, None], bits), positions[:, None], cache, jnp.ones((r, 1), bool)
    )
    return lm.logits(h)[:, 0], cache


@functools.partial(
    jax.jit, static_argnames=("mode", "terminators", "steps"), donate_argnames=("cache",)
)
def _sample_jit(
    graphdef,
    state,
    first,
    positions,
    cache,
    params,
    key,
    limit,
    mode,
    terminators,
    steps,
    bits=None,
):
    """Greedy / sampling loop on device (transformers `_sample`): the prefill's last logits
    `first` [B, V] give token 0; at most `limit` (traced) of `steps` (static buffer) tokens.
    Returns (tokens int32 [B, steps], lengths int32 [B], the final cache). The cache is returned
    so that the donated input buffers alias it: the loop then updates them in place (without an
    output to alias, XLA copies the whole cache into the loop carry: 0.7 GB at batch 32)."""
    TRACE_COUNTS["decode"] += 1
    lm = nnx.merge(graphdef, state).model.language_model
    b, v = first.shape
    st = smp.sample_step(smp.SampleState.init(b, steps, v, key), first, mode, params, terminators)

    def cond(c):
        return (c[0].step < limit) & jnp.any(c[0].alive)

    def body(c):
        st, cache, pos = c
        logits, cache = _lm_step(lm, st.last_tokens(), pos, cache, bits)
        return smp.sample_step(st, logits, mode, params, terminators), cache, pos + 1

    st, cache, _ = jax.lax.while_loop(cond, body, (st, cache, positions))
    return st.tokens, st.length, cache


@functools.partial(jax.jit, static_argnames=("num_beams", "terminators", "steps", "early_stopping"))
def _beam_jit(
    graphdef,
    state,
    first,
    positions,
    cache,
    params,
    limit,
    num_beams,
    terminators,
    steps,
    early_stopping,
    bits=None,
):
    """Beam search on device; the hybrid cache (K/V and the DeltaNet conv / recurrent states)
    is reordered with the beams every step. Returns (tokens [B, steps], lengths [B])."""
    TRACE_COUNTS["beam"] += 1
    lm = nnx.merge(graphdef, state).model.language_model
    b, n = first.shape[0], num_beams
    cache = cache.reorder(jnp.repeat(jnp.arange(b), n))  # B rows -> B * N beams
    positions = jnp.repeat(positions, n)

    def forward(carry, tokens, parent, step):
        cache, pos = carry
        cache = cache.reorder((jnp.arange(b)[:, None] * n + parent).reshape(-1))
        logits, cache = _lm_step(lm, tokens.reshape(-1), pos, cache, bits)
        return (cache, pos + 1), logits.reshape(b, n, -1)

    st, _ = smp.beam_search(
        forward,
        (cache, positions),
        first,
        num_beams=n,
        max_new=limit,
        params=params,
        terminators=terminators,
        early_stopping=early_stopping,
        buffer=steps,
    )
    tokens, length, _, _ = smp.beam_result(st)
    return tokens, length


@functools.partial(jax.jit, static_argnames=("mode", "terminators"))
def _stream_select(st, logits, params, mode, terminators):
    st = smp.sample_step(st, logits, mode, params, terminators)
    return st, st.last_tokens()


def _bucket(n: int) -> int:
    for b in TOKEN_BUCKETS:
        if b >= n:
            return b
    return -(-n // TOKEN_BUCKETS[-1]) * TOKEN_BUCKETS[-1]


class MiniCPMV46:
    """A loaded MiniCPM-V 4.6: config, processor, nnx module and jitted stages."""

    def __init__(self, config: MiniCPMV46Config, module, processor=None, *, mesh=None):
        self.config = config
        self.module = module
        self.processor = processor
        self.mesh = mesh
        self.graphdef, self.state = nnx.split(module)
        # CPU, bf16: the tied embedding table also as its uint16 bit patterns (a view of the
        # same memory), which every program gathers token rows from (`bits`), while the LM head
        # reads the bf16 table in place (`Qwen35TextModel.logits`). XLA:CPU widens a bf16 table
        # that a gather reads to float32, ahead of the decode loop or per call: 1 GB at the
        # released size, 3 GB with the head's copies. The decoder layers are separate arrays
        # (`nnx.List`) whose dots read them in place already (`layers.cpu_aware_dot`): nothing
        # to split. None elsewhere.
        self.table_bits = table_bits(self.state) if PACK_BF16 else None
        self.record = versions.spec(config.version)  # the per-version record (defaults)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def abstract_module(config: MiniCPMV46Config, mesh=None, quant=None):
        """(graphdef, abstract state) with shardings and no memory; quant: None / "int8" /
        "int8+vision" (the layers Quant46 selects become int8 with per-channel scales)."""
        mesh = mesh if mesh is not None else make_mesh()
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_46(config, mesh)):
            return nnx.get_abstract_model(
                lambda: quantization.quantize_module(
                    MiniCPMV46Module(config, rngs=AbstractRngs()), parse_quant(quant)
                ),
                mesh,
            )

    @classmethod
    def from_config(
        cls, config: MiniCPMV46Config, *, seed: int = 0, mesh=None, processor=None, quant=None
    ):
        """Randomly initialised model (tests, benchmarks)."""
        mesh = mesh if mesh is not None else make_mesh()
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_46(config, mesh)):
            module = MiniCPMV46Module(config, rngs=nnx.Rngs(seed))
            module = quantization.quantize_module(module, parse_quant(quant))
        return cls(config, module, processor, mesh=mesh)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        dtype: Any = "float32",
        mesh=None,
        *,
        progress: bool = True,
        load_processor: bool = True,
        quant=None,
        hf: dict | None = None,
    ) -> MiniCPMV46:
        """Load a native-transformers 4.6 folder (config.json + safetensors, tied embeddings,
        streamed one tensor at a time) or an orbax folder written by `checkpoint.save`.

        quant: None, "int8" or "int8+vision" (quantized on the host while loading)."""
        import pathlib

        from minicpmv_jax import checkpoint
        from minicpmv_jax.weights import checkpoint_files, load_safetensors

        folder = pathlib.Path(folder)
        if hf is None:
            try:
                hf = json.loads((folder / "config.json").read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{folder}/config.json: unreadable ({e})") from e
        gen_file = folder / "generation_config.json"
        generation = json.loads(gen_file.read_text()) if gen_file.exists() else None
        config = MiniCPMV46Config.from_hf(hf, dtype=dtype, generation=generation)
        mesh = mesh if mesh is not None else make_mesh()
        if checkpoint.is_orbax_checkpoint(folder):
            stored = quantization.stored_quant(checkpoint.read_metadata(folder))
            graphdef, abstract = cls.abstract_module(config, mesh, stored)
            module = checkpoint.restore_module(folder, graphdef, abstract, progress=progress)
            if quant is not None and stored is None:
                module = quantization.quantize_module(module, parse_quant(quant))
        else:
            graphdef, abstract = cls.abstract_module(config, mesh, quant)
            files = checkpoint_files(folder)[0]
            module = load_safetensors(graphdef, abstract, files, progress=progress)
        processor = None
        if load_processor:
            from minicpmv_jax.v46.processor import MiniCPMV46Processor

            processor = MiniCPMV46Processor.from_pretrained(folder, config)
        return cls(config, module, processor, mesh=mesh)

    # ------------------------------------------------------------------ helpers
    def _precision(self):
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh if self.mesh is not None else make_mesh()))
        if self.config.llm.dtype == jnp.float32:
            stack.enter_context(jax.default_matmul_precision("highest"))
        return stack

    def _mode(self, batch) -> str:
        return check_downsample_mode(batch.get("downsample_mode", self.config.downsample_mode))

    def _units(self, batch) -> tuple[list[np.ndarray], np.ndarray]:
        """Per-unit patch vectors and grids: images first, then videos (placeholder order)."""
        units, sizes = [], []
        for pv, ts in (
            ("pixel_values", "target_sizes"),
            ("pixel_values_videos", "target_sizes_videos"),
        ):
            if batch.get(pv) is not None and len(np.asarray(batch[ts]).reshape(-1, 2)):
                units += vision_inputs.unit_patches(batch[pv], batch[ts])
                sizes.append(np.asarray(batch[ts]).reshape(-1, 2))
        sizes = np.concatenate(sizes) if sizes else np.zeros((0, 2), np.int64)
        return units, sizes

    def _vision(self, batch):
        """Run the vision stages of one request on device: (projector output [M/4, D], units
        back to back, tower intermediates, tokens per real unit, grids [U, 2], mode), or None
        without media."""
        mode = self._mode(batch)
        units, sizes = self._units(batch)
        if not units:
            return None
        v = vision_inputs.layout(units, sizes, mode, self.config.vision.patches_per_side)
        keys = ("patches", "position_ids", "rows", "slots", "valid", "unit_count", "merge_perm")
        keys += ("window_perm", "rows2", "slots2", "valid2")
        with self._precision():
            feats, inter = _encode_jit(
                self.graphdef, self.state, {k: v[k] for k in keys if k in v}, mode
            )
        return feats, inter, v["tokens"][: v["num_units"]], sizes, mode

    def encode(self, batch) -> dict[str, np.ndarray]:
        """Vision stages of one processed request (numpy, real rows only):
        embeddings / layer_insert_output [N, Dv], vit_merger_output (16x) and last_hidden_state
        [N/4 or N, Dv], projector output [n_tokens, D] in unit order, tokens_per_unit."""
        run = self._vision(batch)
        if run is None:
            return {"output": np.zeros((0, self.config.llm.hidden_size), np.float32)}
        feats, inter, tokens, sizes, mode = run
        n = int((sizes[:, 0] * sizes[:, 1]).sum())  # the packed rows are the real ones first

        def rows(a, count):
            return np.asarray(a[:count], np.float32)

        out = {k: rows(inter[k], n) for k in ("embeddings", "layer_insert_output")}
        if mode == "16x":
            out["vit_merger_output"] = rows(inter["vit_merger_output"], n // 4)
        out["last_hidden_state"] = rows(inter["last_hidden_state"], n // 4 if mode == "16x" else n)
        out["output"] = rows(feats, int(tokens.sum()))
        out["tokens_per_unit"] = tokens
        return out

    def _feature_rows(self, ids: np.ndarray, tokens: np.ndarray, n_images: int):
        """int [n_pads]: row of the features (each unit's `tokens` rows back to back) for each
        pad token in prompt order (image pads take the image units, video pads the video units)."""
        cfg = self.config
        rows = np.zeros(ids.shape, np.int64)
        starts = np.cumsum(tokens) - tokens
        kinds = (
            (cfg.image_token_id, range(n_images)),
            (cfg.video_token_id, range(n_images, len(tokens))),
        )
        for token_id, units in kinds:
            pos = np.flatnonzero(ids == token_id)
            want = [starts[u] + np.arange(tokens[u]) for u in units]
            want = np.concatenate(want) if want else np.zeros(0, np.int64)
            if len(pos) != len(want):
                kind = "image" if token_id == cfg.image_token_id else "video"
                raise MiniCPMVError(
                    f"the prompt holds {len(pos)} {kind} placeholder tokens but the {kind} inputs "
                    f"give {len(want)} features (was downsample_mode the same for the processor "
                    "and the model?)"
                )
            rows[pos] = want
        pads = np.isin(ids, [cfg.image_token_id, cfg.video_token_id])
        return rows[pads], pads

    def _embed_inputs(self, batch):
        """(ids [T], slot [T], feats [n, D]) for one request: feats holds the projector rows of the
        n pad tokens in prompt order, slot[t] = j for the j-th pad token, -1 for text."""
        ids = np.asarray(batch["input_ids"], np.int64).reshape(-1)
        n_img = 0
        if batch.get("pixel_values") is not None:
            n_img = len(np.asarray(batch["target_sizes"]).reshape(-1, 2))
        # placeholder counts first, from the grids alone: a mismatch fails before the tower runs
        grids = [
            np.asarray(batch[ts]).reshape(-1, 2)
            for pv, ts in (
                ("pixel_values", "target_sizes"),
                ("pixel_values_videos", "target_sizes_videos"),
            )
            if batch.get(pv) is not None
        ]
        hw = np.concatenate(grids).prod(-1) if grids else np.zeros(0, np.int64)
        self._feature_rows(ids, hw // (16 if self._mode(batch) == "16x" else 4), n_img)
        run = self._vision(batch)
        d = self.config.llm.hidden_size
        if run is not None:
            f, _, tokens, _, _ = run
            rows, pads = self._feature_rows(ids, tokens, n_img)
            feats = f[jnp.asarray(rows)]
        else:
            rows, pads = self._feature_rows(ids, np.zeros(0, np.int32), 0)
            feats = np.zeros((0, d), np.float32)
        slot = np.full(ids.shape, -1, np.int32)
        slot[pads] = np.arange(pads.sum())
        return ids, slot, feats

    def _pack(self, requests) -> tuple:
        """Left-padded ids, slot, valid, positions [B, Tb] and feats [B * Tb, D] (fixed size per
        token bucket, so text-only and image prompts share one compilation)."""
        rows, feats, offset = [], [], 0
        for r in requests:
            ids, slot, f = self._embed_inputs(r)
            rows.append((ids, np.where(slot >= 0, slot + offset, -1)))
            feats.append(f)
            offset += f.shape[0]
        t = _bucket(max(len(r[0]) for r in rows))
        ids, slot, valid, pos = self._left_pad(rows, t)
        # host numpy either way: text-only and image requests hit the same compiled program
        feats = np.concatenate([np.asarray(f, np.float32) for f in feats])
        feats = np.pad(feats, ((0, len(requests) * t - feats.shape[0]), (0, 0)))
        return ids, slot, valid, pos, feats, np.asarray([len(r[0]) for r in rows], np.int32)

    def _left_pad(self, rows: list[tuple[np.ndarray, np.ndarray]], t: int):
        """Left-pad (ids, slot) rows to t: ids, slot, valid, positions [B, t]."""
        b = len(rows)
        ids = np.zeros((b, t), np.int32)
        slot = np.full((b, t), -1, np.int32)
        valid = np.zeros((b, t), bool)
        pos = np.zeros((b, t), np.int32)
        for i, (r_ids, r_slot) in enumerate(rows):
            n = len(r_ids)
            ids[i, t - n :] = r_ids
            slot[i, t - n :] = r_slot
            valid[i, t - n :] = True
            pos[i, t - n :] = np.arange(n)
        return ids, slot, valid, pos

    # ------------------------------------------------------------------ public surface
    def prompt_logits(self, batch, return_intermediates: bool = False):
        """float32 [T, V]: logits at every prompt position (no cache)."""
        p_ids, p_slot, valid, pos, feats, lengths = self._pack([batch])
        t = int(lengths[0])
        with self._precision():
            logits, embeds = _forward_jit(
                self.graphdef, self.state, p_ids, p_slot, feats, valid, pos, self.table_bits
            )
        logits = np.asarray(logits[0, -t:], np.float32)
        if return_intermediates:
            return logits, {"embeds": np.asarray(embeds[0, -t:], np.float32)}
        return logits

    def input_embeds(self, batch) -> np.ndarray:
        """float32 [T, D]: token embeddings with the projector rows scattered into the pads."""
        ids, slot, _, _, feats, lengths = self._pack([batch])
        with self._precision():
            x = _embeds_jit(self.graphdef, self.state, ids, slot, feats, self.table_bits)
        return np.asarray(x[0, -int(lengths[0]) :], np.float32)

    def init_cache(self, batch: int, max_len: int) -> HybridCache:
        return HybridCache.init(self.config.llm, batch, max_len)

    def prefill(self, requests: list, max_new_tokens: int):
        """Run the prompts of `requests` (left-padded to a token bucket) into a fresh cache with
        room for `max_new_tokens` more. Returns (last-position logits [B, V], cache, lengths [B])."""
        ids, slot, valid, pos, feats, lengths = self._pack(requests)
        cache = self.init_cache(len(requests), ids.shape[1] + _bucket(max(max_new_tokens, 1)))
        with self._precision():
            logits, cache = _prefill_jit(
                self.graphdef, self.state, ids, slot, feats, valid, pos, cache, self.table_bits
            )
        return logits, cache, lengths

    def decode_step(self, cache: HybridCache, tokens, positions):
        """One cached step: tokens, positions int [B] -> (logits [B, V], cache)."""
        with self._precision():
            return _step_jit(
                self.graphdef,
                self.state,
                jnp.asarray(tokens, jnp.int32),
                jnp.asarray(positions, jnp.int32),
                cache,
                self.table_bits,
            )

    def generate(
        self,
        batch,
        max_new_tokens: int | None = None,
        sampling: bool = False,
        num_beams: int = 1,
        repetition_penalty: float = 1.0,
        **kwargs,
    ):
        """New token ids (transformers `generate` semantics: the stop token last when hit).

        Args:
          batch: one processed request (`processor(...)` output) or a list of them (one batch).
          max_new_tokens: default from the version record (2048).
          sampling: multinomial sampling; defaults from generation_config.json (released:
            temperature 0.7, top_k 0, top_p 1.0) unless given in kwargs.
          num_beams: beam search when > 1 (the hybrid cache is reordered with the beams).
          kwargs: temperature, top_k, top_p, min_new_tokens, length_penalty, early_stopping, seed.
        Returns: int64 ids [n] or a list of them.
        """
        unknown = sorted(set(kwargs) - set(GENERATION_KEYS))
        if unknown:
            raise MiniCPMVError(
                f"unknown generation argument(s) {unknown}; supported: {GENERATION_KEYS}"
            )
        max_new = self.record.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if max_new < 1:
            raise MiniCPMVError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not isinstance(num_beams, int) or num_beams < 1:
            raise MiniCPMVError(f"num_beams must be a positive int, got {num_beams!r}")
        defaults = dict(self.config.sampling_defaults) if sampling else {}
        knobs = {
            **defaults,
            **{k: kwargs[k] for k in kwargs if k not in ("early_stopping", "seed")},
        }
        early_stopping = kwargs.get("early_stopping", False)
        GenerationSettings(  # the one check of decoding values (raises GenerationError)
            max_new_tokens=max_new,
            do_sample=bool(sampling),
            num_beams=num_beams,
            repetition_penalty=repetition_penalty,
            early_stopping=early_stopping,
            **knobs,
        )
        mode = smp.DecodeMode(
            do_sample=bool(sampling), num_beams=num_beams, early_stopping=early_stopping
        )
        params = smp.SamplingParams.create(repetition_penalty=repetition_penalty, **knobs)
        single = not isinstance(batch, (list, tuple))
        reqs = [batch] if single else list(batch)
        if not reqs:
            raise MiniCPMVError("generate() got an empty batch")
        steps = _bucket(max_new)
        logits, cache, lengths = self.prefill(reqs, steps)
        terminators = tuple(self.eos_ids())
        seed = kwargs.get("seed")
        key = jax.random.key(np.random.randint(2**31) if seed is None else int(seed))
        with self._precision():
            if num_beams > 1:
                tokens, length = _beam_jit(
                    self.graphdef,
                    self.state,
                    logits,
                    lengths,
                    cache,
                    params,
                    max_new,
                    num_beams=num_beams,
                    terminators=terminators,
                    steps=steps,
                    early_stopping=mode.early_stopping,
                    bits=self.table_bits,
                )
            else:
                tokens, length, _ = _sample_jit(
                    self.graphdef,
                    self.state,
                    logits,
                    lengths,
                    cache,
                    params,
                    key,
                    max_new,
                    mode=mode,
                    terminators=terminators,
                    steps=steps,
                    bits=self.table_bits,
                )
        tokens, length = np.asarray(tokens, np.int64), np.asarray(length)
        res = [tokens[i, : length[i]] for i in range(len(reqs))]
        return res[0] if single else res

    def chat(
        self,
        msgs,
        max_new_tokens: int | None = None,
        sampling: bool = True,
        stream: bool = False,
        downsample_mode: str | None = None,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        enable_thinking: bool = False,
        stack_frames: int | None = None,
        max_num_frames: int | None = None,
        **generation_kwargs,
    ):
        """Answer one conversation (or a list of them, as one batch) with the 4.6 defaults.

        msgs: transformers' chat format or the official one (`content: [PIL.Image, "text"]`).
        downsample_mode ("16x" default, or "4x") travels to both the processor and the vision
        path. sampling=True uses generation_config.json's values (released: temperature 0.7);
        sampling=False is greedy unless `num_beams` is given. stream=True yields text pieces.
        """
        if self.processor is None:
            raise MiniCPMVError("this model was loaded without a processor; chat() needs one")
        batched = bool(msgs) and isinstance(msgs[0], (list, tuple))
        convs = list(msgs) if batched else [msgs]
        kw = {
            "downsample_mode": downsample_mode,
            "max_slice_nums": max_slice_nums,
            "use_image_id": use_image_id,
            "enable_thinking": enable_thinking,
            "stack_frames": stack_frames,
            "max_num_frames": max_num_frames,
        }
        kw = {k: v for k, v in kw.items() if v is not None}
        batch = [self.processor(c, **kw) for c in convs]
        if stream:
            if len(batch) != 1 or generation_kwargs.get("num_beams", 1) != 1:
                raise MiniCPMVError("stream=True takes one conversation and no beam search")
            return self._stream(batch[0], max_new_tokens, sampling, generation_kwargs)
        ids = self.generate(batch, max_new_tokens, sampling, **generation_kwargs)
        texts = [self._decode(x) for x in ids]
        return (
            texts if len(convs) > 1 or (msgs and isinstance(msgs[0], (list, tuple))) else texts[0]
        )

    def _decode(self, ids) -> str:
        ids = [int(t) for t in ids if int(t) not in self.config.eos_ids]
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _stream(self, batch, max_new_tokens, sampling, kwargs):
        """Text pieces as tokens arrive: the prefill, then one jitted cached step per token."""
        max_new = self.record.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        knobs = dict(self.config.sampling_defaults) if sampling else {}
        knobs.update({k: v for k, v in kwargs.items() if k not in ("seed", "early_stopping")})
        params = smp.SamplingParams.create(**knobs)
        mode = smp.DecodeMode(do_sample=bool(sampling))
        seed = kwargs.get("seed")
        key = jax.random.key(np.random.randint(2**31) if seed is None else int(seed))
        logits, cache, lengths = self.prefill([batch], _bucket(max_new))
        terms = tuple(self.eos_ids())
        st = smp.SampleState.init(1, max_new, logits.shape[-1], key)
        pos = jnp.asarray(lengths)
        # linear in the answer: each token decodes a short window (chat._TextStream), with
        # _decode's rules (end-of-turn ids dropped, special tokens skipped, stripped)
        tokenizer = self.processor.tokenizer
        text = _TextStream.with_rules(
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True), terms
        )
        for _ in range(max_new):
            with self._precision():
                st, last = _stream_select(st, logits, params, mode, terms)
            tok = int(last[0])  # the one host read per token
            if tok in terms:
                break
            piece = text.push(tok)
            if piece:
                yield piece
            logits, cache = self.decode_step(cache, [tok], pos)
            pos = pos + 1
        tail = text.flush()
        if tail:
            yield tail

    def eos_ids(self) -> list[int]:
        return list(self.config.eos_ids)
