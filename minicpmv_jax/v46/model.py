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

from minicpmv_jax.errors import CheckpointError, MiniCPMVError
from minicpmv_jax.sharding import RULES, make_mesh
from minicpmv_jax.v46 import vision_inputs
from minicpmv_jax.v46.config import MiniCPMV46Config, check_downsample_mode
from minicpmv_jax.v46.projector import Projector
from minicpmv_jax.v46.qwen35 import HybridCache, Qwen35TextModel
from minicpmv_jax.v46.siglip2 import Siglip2Tower

# DeltaNet projections shard their heads over `tensor` like the attention heads.
RULES_46 = (*RULES, ("lin_heads", "tensor"), ("lin_v_heads", "tensor"))

TRACE_COUNTS: collections.Counter = collections.Counter()
TOKEN_BUCKETS = (128, 256, 512, 1024, 2048, 4096)


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
    """Vision tower + projector for padded units (traceable). Returns [U, M/4, D] (and the
    tower's intermediates)."""
    m = module.model
    win = v["window_index"] if mode == "16x" else None
    feats, inter = m.vision_tower(
        v["patches"], v["position_ids"], v["valid"], win, intermediates=True
    )
    out = m.merger(feats, v["merge_index"])
    if intermediates:
        return out, {**inter, "last_hidden_state": feats}
    return out


def merge_embeds(module: MiniCPMV46Module, ids, slot, feats):
    """ids int [B, T]; slot int32 [B, T] row of feats [R, D] per pad token (-1 = text)."""
    text = module.model.language_model.embed(ids)
    rows = feats[jnp.clip(slot, 0, feats.shape[0] - 1)].astype(text.dtype)
    return jnp.where((slot >= 0)[..., None], rows, text)


@functools.partial(jax.jit, static_argnames=("mode",))
def _encode_jit(graphdef, state, v, mode):
    TRACE_COUNTS["encode"] += 1
    module = nnx.merge(graphdef, state)
    return encode_units(module, v, mode, intermediates=True)


@jax.jit
def _embeds_jit(graphdef, state, ids, slot, feats):
    TRACE_COUNTS["embeds"] += 1
    return merge_embeds(nnx.merge(graphdef, state), ids, slot, feats)


@jax.jit
def _forward_jit(graphdef, state, ids, slot, feats, valid, positions):
    """Full prompt (no cache): (logits [B, T, V], embeds [B, T, D])."""
    TRACE_COUNTS["forward"] += 1
    module = nnx.merge(graphdef, state)
    lm = module.model.language_model
    x = merge_embeds(module, ids, slot, feats)
    h, _ = lm.hidden(x, positions, None, valid)
    return lm.logits(h), x


@functools.partial(jax.jit, donate_argnames=("cache",))
def _prefill_jit(graphdef, state, ids, slot, feats, valid, positions, cache):
    """Prompt into the cache: (last-position logits [B, V], cache)."""
    TRACE_COUNTS["prefill"] += 1
    module = nnx.merge(graphdef, state)
    lm = module.model.language_model
    x = merge_embeds(module, ids, slot, feats)
    h, cache = lm.hidden(x, positions, cache, valid)
    return lm.logits(h[:, -1:])[:, 0], cache


@functools.partial(jax.jit, donate_argnames=("cache",))
def _step_jit(graphdef, state, tokens, positions, cache):
    """One cached decode step: tokens, positions int32 [B] -> (logits [B, V], cache)."""
    TRACE_COUNTS["step"] += 1
    module = nnx.merge(graphdef, state)
    lm = module.model.language_model
    b = tokens.shape[0]
    h, cache = lm.hidden(
        lm.embed(tokens[:, None]), positions[:, None], cache, jnp.ones((b, 1), bool)
    )
    return lm.logits(h)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("steps",), donate_argnames=("cache",))
def _decode_jit(graphdef, state, first, positions, cache, eos, limit, steps):
    """Greedy decode loop on device after the prefill's token `first` [B]: at most `limit`
    (runtime) of `steps` (static bucket) tokens in all, stopping once every row hit an eos.
    Returns int32 [B, steps] (0 after a row's eos)."""
    TRACE_COUNTS["decode"] += 1
    module = nnx.merge(graphdef, state)
    lm = module.model.language_model
    b = first.shape[0]
    out = jnp.zeros((b, steps), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)

    def cond(c):
        i, _, _, done, _ = c
        return (i + 1 < limit) & ~jnp.all(done)

    def body(c):
        i, out, cache, done, pos = c
        x = lm.embed(out[:, i][:, None])
        h, cache = lm.hidden(x, pos[:, None], cache, jnp.ones((b, 1), bool))
        nxt = jnp.argmax(lm.logits(h)[:, 0], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, 0, nxt)
        out = out.at[:, i + 1].set(nxt)
        return i + 1, out, cache, done | jnp.isin(nxt, eos), pos + 1

    _, out, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), out, cache, done, positions))
    return out


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

    # ------------------------------------------------------------------ construction
    @staticmethod
    def abstract_module(config: MiniCPMV46Config, mesh=None):
        mesh = mesh if mesh is not None else make_mesh()
        with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES_46):
            return nnx.get_abstract_model(lambda: MiniCPMV46Module(config, rngs=nnx.Rngs(0)), mesh)

    @classmethod
    def from_config(cls, config: MiniCPMV46Config, *, seed: int = 0, mesh=None, processor=None):
        mesh = mesh if mesh is not None else make_mesh()
        with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES_46):
            module = MiniCPMV46Module(config, rngs=nnx.Rngs(seed))
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
        hf: dict | None = None,
    ) -> MiniCPMV46:
        """Load a native-transformers 4.6 folder (config.json + safetensors, tied embeddings)."""
        import pathlib

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
        graphdef, abstract = cls.abstract_module(config, mesh)
        module = load_safetensors(
            graphdef, abstract, checkpoint_files(folder)[0], progress=progress
        )
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

    def encode(self, batch) -> dict[str, Any]:
        """Vision stages of one processed request (numpy, real rows only):
        embeddings / layer_insert_output [N, Dv], vit_merger_output (16x) and last_hidden_state
        [N/4 or N, Dv], projector output [n_tokens, D] in unit order, tokens_per_unit."""
        mode = self._mode(batch)
        units, sizes = self._units(batch)
        if not units:
            return {"output": np.zeros((0, self.config.llm.hidden_size), np.float32)}
        v = vision_inputs.layout(units, sizes, mode, self.config.vision.patches_per_side)
        arrays = {
            k: v[k]
            for k in ("patches", "position_ids", "valid", "window_index", "merge_index")
            if k in v
        }
        with self._precision():
            feats, inter = _encode_jit(self.graphdef, self.state, arrays, mode)
        hw = sizes[:, 0] * sizes[:, 1]
        down = hw // 4 if mode == "16x" else hw

        def rows(a, counts):
            a = np.asarray(a, np.float32)
            return np.concatenate([a[i, :n] for i, n in enumerate(counts)])

        out = {k: rows(inter[k], hw) for k in ("embeddings", "layer_insert_output")}
        if mode == "16x":
            out["vit_merger_output"] = rows(inter["vit_merger_output"], down)
        out["last_hidden_state"] = rows(inter["last_hidden_state"], down)
        tokens = v["tokens"][: v["num_units"]]
        out["output"] = rows(feats, tokens)
        out["tokens_per_unit"] = tokens
        out["_feats"] = feats
        return out

    def _feature_rows(self, ids: np.ndarray, tokens: np.ndarray, rows_per_unit: int, n_images: int):
        """int [n_pads]: row of the flattened [U * rows_per_unit, D] features for each pad token
        in prompt order (image pads take the image units, video pads the video units)."""
        cfg = self.config
        rows = np.zeros(ids.shape, np.int64)
        kinds = (
            (cfg.image_token_id, range(n_images)),
            (cfg.video_token_id, range(n_images, len(tokens))),
        )
        for token_id, units in kinds:
            pos = np.flatnonzero(ids == token_id)
            want = [u * rows_per_unit + np.arange(tokens[u]) for u in units]
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
        enc = self.encode(batch)
        d = self.config.llm.hidden_size
        if "_feats" in enc:
            f = enc["_feats"]
            n_img = 0
            if batch.get("pixel_values") is not None:
                n_img = len(np.asarray(batch["target_sizes"]).reshape(-1, 2))
            rows, pads = self._feature_rows(ids, enc["tokens_per_unit"], f.shape[1], n_img)
            feats = f.reshape(-1, d)[jnp.asarray(rows)]
        else:
            rows, pads = self._feature_rows(ids, np.zeros(0, np.int32), 0, 0)
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
                self.graphdef, self.state, p_ids, p_slot, feats, valid, pos
            )
        logits = np.asarray(logits[0, -t:], np.float32)
        if return_intermediates:
            return logits, {"embeds": np.asarray(embeds[0, -t:], np.float32)}
        return logits

    def input_embeds(self, batch) -> np.ndarray:
        """float32 [T, D]: token embeddings with the projector rows scattered into the pads."""
        ids, slot, _, _, feats, lengths = self._pack([batch])
        with self._precision():
            x = _embeds_jit(self.graphdef, self.state, ids, slot, feats)
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
                self.graphdef, self.state, ids, slot, feats, valid, pos, cache
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
            )

    def generate(
        self,
        batch,
        max_new_tokens: int = 64,
        sampling: bool = False,
        num_beams: int = 1,
        **kwargs,
    ):
        """New token ids (eos included when hit) for one processed request or a list of them."""
        if sampling or num_beams != 1 or kwargs:
            raise MiniCPMVError(
                "MiniCPM-V 4.6 generate() supports greedy decoding only (sampling=False, "
                f"num_beams=1); got sampling={sampling}, num_beams={num_beams}, {sorted(kwargs)}"
            )
        single = not isinstance(batch, (list, tuple))
        reqs = [batch] if single else list(batch)
        steps = _bucket(max(int(max_new_tokens), 1))
        logits, cache, lengths = self.prefill(reqs, steps)
        eos = jnp.asarray(self.eos_ids(), jnp.int32)
        with self._precision():
            first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            out = _decode_jit(
                self.graphdef,
                self.state,
                first,
                lengths,
                cache,
                eos,
                int(max_new_tokens),
                steps=steps,
            )
        out = np.asarray(out, np.int64)[:, : int(max_new_tokens)]
        eos_np = set(self.eos_ids())
        res = []
        for row in out:
            hit = [i for i, x in enumerate(row) if int(x) in eos_np]
            res.append(row[: hit[0] + 1] if hit else row)
        return res[0] if single else res

    def eos_ids(self) -> list[int]:
        return list(self.config.eos_ids)
