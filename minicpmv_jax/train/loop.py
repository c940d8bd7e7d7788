"""The training loop: optax AdamW, warm-up + cosine, clipping, accumulation, orbax train state.

One jitted, donated train step per static batch shape: micro-batches are padded to the token /
slice / patch buckets (and to `batch_size` rows with empty rows), so a run compiles at most one
program per bucket combination and then none (`TRACE_COUNTS["train_step"]`). Gradient
accumulation is `optax.MultiSteps` (the mean of the micro-batch gradients, as the Hugging Face
Trainer's scaled sum), clipping runs on that mean, then AdamW with decay on matrices only.

Trainable weights and the optimizer state are float32 whatever the model dtype; frozen weights
stay as loaded (bf16 / int8), or are stored in `frozen_dtype` (bfloat16: half the bytes of a
float32 model, computed in the model's dtype). LoRA trains on the layer input path (lora.py;
also on an int8 base, `quant="int8"`, QLoRA-style, and with dropout); `lora_path="delta"`
trains it as a weight delta (float base, no dropout). Decoder and vision layers are
rematerialised per layer as `remat` / `vision_remat` say. Parameters are sharded by the model's
rule table and the batch over the mesh's data axis. On the CPU backend the frozen float32
decoder-stack weights reach the step as per-layer arrays (`SPLIT_FROZEN_LAYERS`), so XLA:CPU
does not copy each scanned layer's weights before its matmuls.

State saved every `save_every` steps and at the end (`<output>/checkpoints/step_XXXXXXXX/`,
atomic): trainable weights or LoRA tensors, optimizer state, step, data position and seed. The
data order is a pure function of (seed, epoch), so a resumed run sees the same batches and gives
the same losses as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from minicpmv_jax.batching import Buckets
from minicpmv_jax.errors import MiniCPMVError
from minicpmv_jax.generate import SPLIT_STACKS, split_layers
from minicpmv_jax.layers import REMAT_POLICIES, LayerParts, _is_parts
from minicpmv_jax.sharding import batch_sharding, path_name
from minicpmv_jax.train.data import DEFAULT_MAX_LENGTH, IGNORE_INDEX, collate
from minicpmv_jax.train.lora import (
    Adapter,
    LoraConfig,
    apply_lora,
    init_lora,
    lora_graph,
    lora_groups,
    lora_module,
    lora_targets,
    merge_lora,
)
from minicpmv_jax.train.loss import (
    TRACE_COUNTS,
    device_arrays,
    masked_xent,
    prepare_batch,
    train_logits,
    trainable_filter,
)
from minicpmv_jax.weights import STACKS

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Settings of a fine-tuning run (defaults follow the official finetune_lora.sh where set).

    mode: "full" | "freeze_vision" | "lora". steps: optimizer steps (each of `grad_accum`
    micro-batches of `batch_size` samples). warmup_steps then cosine decay to 0 (HF "cosine").
    """

    mode: str = "lora"
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    steps: int = 100
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int = DEFAULT_MAX_LENGTH
    seed: int = 0
    eval_every: int = 0  # 0: evaluate only at the end (when eval data is given)
    save_every: int = 0  # 0: save only at the end (when an output folder is given)
    keep_saves: int = 2
    token_buckets: tuple[int, ...] = Buckets.tokens  # inference's buckets by default
    slice_buckets: tuple[int, ...] = Buckets.slices
    remat: str = "none"  # decoder layers: "none" | "full" | "dots" (layers.REMAT_POLICIES)
    vision_remat: str | None = None  # vision tower layers; None: as `remat`
    frozen_dtype: str | None = None  # store frozen float weights in it ("bfloat16"); None: as is
    # LoRA in the train step: "input" = PEFT's x A^T B^T beside the frozen layer (LoraLinear);
    # "delta" = W + s (B A)^T (float base, no dropout only; the same function, more work: the
    # backward forms each target kernel's full weight gradient, then contracts it to A and B)
    lora_path: str = "input"

    def __post_init__(self):
        trainable_filter(self.mode, self.lora)  # validates the mode
        for name in ("steps", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MiniCPMVError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise MiniCPMVError(f"warmup_steps must be in [0, steps], got {self.warmup_steps}")
        if self.learning_rate <= 0 or self.max_grad_norm <= 0:
            raise MiniCPMVError("learning_rate and max_grad_norm must be > 0")
        for name in ("remat", "vision_remat"):
            value = getattr(self, name)
            if value not in REMAT_POLICIES and not (name == "vision_remat" and value is None):
                raise MiniCPMVError(
                    f"{name} must be one of {sorted(REMAT_POLICIES)}, got {value!r}"
                )
        if self.lora_path not in ("input", "delta"):
            raise MiniCPMVError(f"lora_path must be 'input' or 'delta', got {self.lora_path!r}")
        if self.frozen_dtype not in (None, "float32", "bfloat16", "float16"):
            raise MiniCPMVError(
                f"frozen_dtype must be float32, bfloat16 or float16, got {self.frozen_dtype!r}"
            )

    def schedule(self) -> optax.Schedule:
        """Linear warm-up from 0 to learning_rate, then cosine to 0 at `steps`."""
        return optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, self.warmup_steps, self.steps, 0.0
        )

    def optimizer(self) -> optax.GradientTransformation:
        """clip -> AdamW (decay on matrices only) [-> MultiSteps]; one object per equal config,
        so runs with the same settings share compiled steps."""
        return _optimizer(self, SCALAR_CLIP)


# Read when an optimizer is built: gradient clipping as one scalar factor (`clip_by_global_norm`);
# False: optax's clip_by_global_norm (A/B measurements).
SCALAR_CLIP = True


@functools.cache
def _optimizer(config: TrainConfig, scalar_clip: bool) -> optax.GradientTransformation:
    tx = optax.chain(
        (clip_by_global_norm if scalar_clip else optax.clip_by_global_norm)(config.max_grad_norm),
        optax.adamw(config.schedule(), weight_decay=config.weight_decay, mask=_decay_mask),
    )
    return optax.MultiSteps(tx, config.grad_accum) if config.grad_accum > 1 else tx


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` with the clip as one scalar factor: g x where(norm < max_norm,
    1, max_norm / norm). optax selects between g and (g / norm) x max_norm per element; XLA:CPU
    then writes the divided gradients as a temporary array (a division is not repeated in each
    consumer) that AdamW's moment updates read beside the raw gradients, one more write and two
    more reads of every gradient (the full step at 2.6 widths: a 2.1 GB temporary, BENCHMARKS.md).
    A multiply by a scalar fuses into the moment updates. Rounding: one multiply instead of a
    divide and a multiply (1 ulp)."""

    def update_fn(updates, state, params=None):
        del params
        g_norm = optax.tree.norm(updates)
        scale = jnp.where(g_norm < max_norm, 1.0, max_norm / g_norm)
        return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _decay_mask(tree):
    """True where AdamW decays: tensors of 2 or more dimensions per layer. The official trainer
    (transformers' `Trainer.get_decay_parameter_names`) decays every parameter but biases and
    norm weights, which in these models are exactly the vectors; a scanned stack's leading layer
    axis does not count (a stacked bias [L, D] is a vector), and a stack kept as per-layer
    arrays (`LayerParts`) is judged by its parts, so a run decays the same tensors whether its
    decoder stack is split or stacked."""

    def leaf(path, x):
        if isinstance(x, LayerParts):
            return LayerParts([p.ndim >= 2 for p in x.parts])
        return layer_ndim(path, x) >= 2

    return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=_is_parts)


def layer_ndim(path, x) -> int:
    """The number of dimensions of one layer's tensor: `x.ndim` less the leading layer axis of
    a scanned stack (`weights.STACKS`, wherever it sits in `path`)."""
    name = f".{path_name(path)}."
    return x.ndim - any(f".{stack}." in name for stack in STACKS)


# Read when a Trainer is built. On the CPU backend the frozen float32 decoder-stack weights (LoRA:
# the base kernels, biases and norms of `llm.model.layers`) go to the train and eval steps as
# their L per-layer arrays (`generate.split_layers`): XLA:CPU copies a scanned layer's weight
# slice before each dot, forward and backward, and the step then runs the layers unrolled,
# reading them in place. Trainable stacked weights (optimizer state, checkpoints, PEFT export)
# keep their layout; int8 and bfloat16 stacks stay scanned; other backends scan. False: the
# stacked, scanned step everywhere (A/B measurements).
SPLIT_FROZEN_LAYERS = True
# Read when a Trainer is built. On the CPU backend the trainable float32 decoder-stack weights
# (modes "full" and "freeze_vision") are kept in the train state as L per-layer arrays, and so
# are their gradients and AdamW moments: the step reads each layer's weights in place and
# writes each layer's gradient into its own buffer, where a scanned stack copies every layer's
# weight slices out of the stacks (forward and backward), zero-fills stacked gradient buffers
# and writes the layer gradients into them (the 2-layer, 512-token full step of 2.6 widths:
# BENCHMARKS.md "Full fine-tuning: the trainable decoder stack as per-layer arrays"). Saves,
# `trained_model` and `memory.plan` see the stacked layout; single-device states only (a
# sharded stack stays stacked). False: the stacked state everywhere (A/B measurements).
SPLIT_TRAINABLE_LAYERS = True

STATICS = ("graphdef", "targets", "scaling", "lora_path", "num_groups")


def step_module(graphdef, params, frozen, lora, loaded, *, targets, scaling, lora_path, key):
    """The module one step runs (traceable): LoRA as a weight delta on the frozen kernels, or
    with `lora_path` = (LoraLinear graphdef, groups) on the layer input path (dropout masks from
    `key`; an adapter merged into the weights is taken out first: float kernels only)."""
    if lora_path is None:
        rest = apply_lora(frozen, targets, lora, scaling, loaded) if targets else frozen
        return nnx.merge(graphdef, params, rest)
    if loaded is not None:
        zero = jax.tree.map(jnp.zeros_like, loaded)
        frozen = apply_lora(frozen, targets, zero, scaling, loaded)
    return lora_module(lora_path[0], (params, frozen), lora_path[1], lora, key)


@dataclasses.dataclass(frozen=True)
class TokenXent:
    """The fine-tuning objective (official CPMTrainer.compute_loss): the mean cross-entropy over
    the batch's label tokens.

    An objective is a hashable callable `(module, arrays, num_groups) -> (loss, metrics)`, traced
    inside the train step: `metrics` is a dict of scalars (its `tokens` entry is the micro-batch's
    label count; any other entry is averaged over the step's micro-batches into the metrics row).
    """

    def __call__(self, module, arrays, num_groups):
        logits = train_logits(module, arrays, num_groups)
        total, count = masked_xent(logits, arrays["labels"])
        return total / jnp.maximum(count, 1), {"tokens": count}


def _train_step(
    state,
    frozen,
    loaded,
    arrays,
    *,
    graphdef,
    targets,
    scaling,
    lora_path,
    tx,
    objective,
    num_groups,
):
    """One micro-batch: loss, gradients, optimizer update (the state is donated)."""
    TRACE_COUNTS["train_step"] += 1
    key, dropout_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))

    def loss_fn(trainable):
        params, lora = trainable
        module = step_module(
            graphdef,
            params,
            frozen,
            lora,
            loaded,
            targets=targets,
            scaling=scaling,
            lora_path=lora_path,
            key=dropout_key,
        )
        return objective(module, arrays, num_groups)

    trainable = (state["params"], state["lora"])
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt = tx.update(grads, state["opt"], trainable)
    params, lora = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    rng = jax.random.key_data(key)
    return {"params": params, "lora": lora, "opt": opt, "rng": rng}, metrics


@functools.partial(jax.jit, static_argnames=STATICS)
def _eval_step(state, frozen, loaded, arrays, *, graphdef, targets, scaling, lora_path, num_groups):
    """(sum of token losses, label count) of one batch (no dropout)."""
    TRACE_COUNTS["eval_step"] += 1
    module = step_module(
        graphdef,
        state["params"],
        frozen,
        state["lora"],
        loaded,
        targets=targets,
        scaling=scaling,
        lora_path=lora_path,
        key=None,
    )
    return masked_xent(train_logits(module, arrays, num_groups), arrays["labels"])


@functools.cache
def _step_program(
    tx, graphdef, targets, scaling, lora_path, treedef, shardings, objective
) -> Callable:
    """The jitted train step of one run's settings and objective, its state kept in its own
    shardings (the optimizer moments follow the parameters' FSDP / tensor sharding). Cached:
    runs with equal settings (a resumed run) share its compiled programs."""
    state_shardings = jax.tree.unflatten(treedef, shardings)
    step = functools.partial(
        _train_step,
        tx=tx,
        graphdef=graphdef,
        targets=targets,
        scaling=scaling,
        lora_path=lora_path,
        objective=objective,
    )
    return jax.jit(
        step,
        static_argnames=("num_groups",),
        donate_argnums=(0,),
        out_shardings=(state_shardings, None),
    )


def _with_remat(graphdef, params, frozen, remat: str, vision_remat: str | None):
    """graphdef of the same module with the decoder / vision layer stacks rematerialised."""
    vision_remat = remat if vision_remat is None else vision_remat
    module = nnx.merge(graphdef, params, frozen)  # shares the arrays: only the graph changes
    module.llm.cfg = dataclasses.replace(module.llm.cfg, remat=remat)
    module.vpm.cfg = dataclasses.replace(module.vpm.cfg, remat=vision_remat)
    return nnx.graphdef(module)


_EMPTY_ROW = {
    "input_ids": np.zeros((1,), np.int32),
    "labels": np.full((1,), IGNORE_INDEX, np.int32),
    "position_ids": np.zeros((1,), np.int64),
    "attention_mask": np.zeros((1,), bool),
    "image_bound": np.zeros((0, 2), np.int64),
    "tgt_sizes": np.zeros((0, 2), np.int32),
    "pixel_values": [],
}


class Trainer:
    """A fine-tuning run on one model: `run()` trains, saves, evaluates and returns the model.

    Args:
      model: a loaded MiniCPMV (its mesh shards the run).
      examples: training examples (`train.training_example` / `train.load_examples`).
      config: TrainConfig.
      eval_examples: held-out examples for the eval loss.
      output_dir: where metrics.jsonl and checkpoints/ go (None: nothing is written).
      skipped: bad samples skipped while loading (counted in the metrics).
      objective: the traced loss (default `TokenXent()`, the official fine-tuning loss); see
        TokenXent for the contract. Subclasses change what a batch holds (`_device_batch`).
    """

    empty_row: Mapping[str, Any] = _EMPTY_ROW  # pads a short last micro-batch
    desc = "finetune"  # progress bar label

    def __init__(
        self,
        model,
        examples: Sequence[Mapping[str, Any]],
        config: TrainConfig,
        *,
        eval_examples: Sequence[Mapping[str, Any]] = (),
        output_dir: str | os.PathLike | None = None,
        skipped: int = 0,
        objective: Callable | None = None,
    ):
        if not examples:
            raise MiniCPMVError("no training examples")
        self.model, self.config = model, config
        self.examples, self.eval_examples = list(examples), list(eval_examples)
        self.output_dir = pathlib.Path(output_dir) if output_dir is not None else None
        self.skipped = skipped
        lora_cfg = config.lora
        adapter = getattr(model, "adapter", None)
        if config.mode == "lora" and adapter is not None:
            lora_cfg = adapter.config  # continue training the loaded adapter
        self.lora_config = lora_cfg
        keep = trainable_filter(config.mode, lora_cfg)
        self.graphdef, params, self.frozen = nnx.split(model.module, keep, ...)
        int8 = [k for k, x in nnx.to_flat_state(params) if x.get_value().dtype == jnp.int8]
        if int8:
            raise MiniCPMVError(
                f"mode {config.mode!r} would train int8 weights ({'.'.join(map(str, int8[0]))}"
                "): an int8 model trains with mode='lora' and its quantized layers frozen"
            )
        self.param_dtypes = jax.tree.map(lambda x: x.dtype, params)
        # float32 master weights, always a copy: the train step donates (deletes) its inputs
        params = jax.tree.map(lambda x: jnp.copy(x).astype(jnp.float32), params)
        self.frozen_as_loaded = self.frozen
        if config.frozen_dtype is not None:  # frozen float matrices stored in frozen_dtype
            fdt = jnp.dtype(config.frozen_dtype)  # (vectors: norms, biases, int8 scales stay)
            floating = lambda p, x: jnp.issubdtype(x.dtype, jnp.floating) and layer_ndim(p, x) >= 2
            cast = lambda p, x: x.astype(fdt) if floating(p, x) else x
            self.frozen = jax.tree_util.tree_map_with_path(cast, self.frozen)
        self.graphdef = _with_remat(
            self.graphdef, params, self.frozen, config.remat, config.vision_remat
        )
        self.targets, lora, self.loaded = (), {}, None
        train_path = eval_path = None  # None: LoRA as a weight delta
        if config.mode == "lora":
            self.targets = lora_targets(self.frozen, lora_cfg)
            if adapter is not None:
                lora, self.loaded = jax.tree.map(jnp.copy, adapter.lora), adapter.lora
            else:
                lora = init_lora(model.state, lora_cfg, config.seed)
            flat = dict(nnx.to_flat_state(self.frozen))
            int8_base = any(flat[t.path].get_value().dtype == jnp.int8 for t in self.targets)
            if int8_base and self.loaded is not None:
                raise MiniCPMVError(
                    "LoRA training on an int8 base needs the base without a merged adapter "
                    "(load it with adapter=None; resume from the run's checkpoints instead)"
                )
            if config.lora_path == "delta" and (int8_base or lora_cfg.dropout > 0):
                raise MiniCPMVError(
                    "lora_path='delta' needs a float base and LoRA dropout 0 (got "
                    f"{'an int8 base' if int8_base else f'dropout {lora_cfg.dropout}'}): "
                    "use lora_path='input'"
                )
            if config.lora_path == "input":
                groups = lora_groups(self.targets, self.frozen)
                kw = {"scaling": lora_cfg.scaling}
                state = (params, self.frozen)
                graph = functools.partial(lora_graph, self.graphdef, state, groups, lora_cfg.r)
                train_path = (graph(rate=lora_cfg.dropout, **kw), groups)
                if int8_base:  # int8 kernels take no weight delta: eval on the input path too
                    eval_path = (graph(rate=0.0, **kw), groups)
        # LoRA tensors are small: replicated on the model's mesh (as the step's outputs are)
        replicated = jax.sharding.NamedSharding(model.mesh, jax.sharding.PartitionSpec())
        lora = jax.device_put(lora, replicated)
        rng = jax.device_put(jax.random.key_data(jax.random.key(config.seed)), replicated)
        if SPLIT_TRAINABLE_LAYERS:
            params = split_trainable(params)
        self.tx = config.optimizer()
        with model._precision():
            self.state = {
                "params": params,
                "lora": lora,
                "opt": self.tx.init((params, lora)),
                "rng": rng,  # dropout masks (split once per micro-batch)
            }
        self._statics = {
            "graphdef": self.graphdef,
            "targets": self.targets,
            "scaling": lora_cfg.scaling if config.mode == "lora" else 0.0,
        }
        self._eval_path = eval_path
        # CPU, float32 decoder stack: the steps read the frozen layer weights as per-layer views
        # (layers.LayerParts; the stacked arrays stay referenced, the views alias them)
        self._split_from: list[jax.Array] = []
        if SPLIT_FROZEN_LAYERS:
            self.frozen, self._split_from = split_layers(self.frozen)
        leaves, treedef = jax.tree.flatten(self.state)
        self.objective = objective if objective is not None else TokenXent()
        self._step = _step_program(
            self.tx,
            **self._statics,
            lora_path=train_path,
            treedef=treedef,
            shardings=tuple(x.sharding for x in leaves),
            objective=self.objective,
        )
        self.step, self.micro = 0, 0  # optimizer steps done, micro-batches consumed

    # -------------------------------------------------------------------- data
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.config.seed, epoch]).permutation(len(self.examples))

    def micro_batch(self, index: int) -> list[Mapping[str, Any]]:
        """Rows of micro-batch `index` (epochs of shuffled samples; a short last chunk is
        padded with empty rows, which carry no label)."""
        b = self.config.batch_size
        per_epoch = math.ceil(len(self.examples) / b)
        epoch, j = divmod(index, per_epoch)
        rows = [self.examples[i] for i in self._order(epoch)[j * b : (j + 1) * b]]
        return rows + [self.empty_row] * (b - len(rows))

    def _device_batch(self, rows) -> tuple[dict, int]:
        return device_batch(self.model, collate(rows, self.config.max_length), self.config)

    # -------------------------------------------------------------------- state files
    def _leaves(self) -> dict[str, Any]:
        """The state's arrays in the stacked layout (per-layer parts stacked), by index."""
        return {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(stack_parts(self.state)))}

    def save(self) -> pathlib.Path | None:
        """Atomic save of the train state into checkpoints/step_XXXXXXXX (keeps keep_saves)."""
        if self.output_dir is None:
            return None
        from minicpmv_jax import checkpoint

        root = self.output_dir / "checkpoints"
        meta = {"step": self.step, "micro_batches": self.micro, "seed": self.config.seed}
        path = checkpoint.save_train_state(root / f"step_{self.step:08d}", self._leaves(), meta)
        for old in sorted(root.glob("step_*"))[: -self.config.keep_saves]:
            shutil.rmtree(old)
        return path

    def restore_latest(self) -> bool:
        """Continue from the newest complete save under output_dir (False: none)."""
        if self.output_dir is None:
            return False
        from minicpmv_jax import checkpoint

        saves = sorted(p for p in (self.output_dir / "checkpoints").glob("step_*") if p.is_dir())
        saves = [p for p in saves if (p / checkpoint.TRAIN_STATE_FILE).is_file()]
        if not saves:
            return False
        leaves, treedef = jax.tree.flatten(stack_parts(self.state, abstract=True))
        abstract = {f"{i:05d}": x for i, x in enumerate(leaves)}
        arrays, meta = checkpoint.restore_train_state(saves[-1], abstract)
        if meta.get("seed") != self.config.seed:
            raise MiniCPMVError(
                f"{saves[-1]}: saved with seed {meta.get('seed')}, not {self.config.seed}"
            )
        state = jax.tree.unflatten(treedef, [arrays[k] for k in sorted(arrays)])
        self.state = split_like(state, self.state)
        self.step, self.micro = int(meta["step"]), int(meta["micro_batches"])
        log.info("resumed from %s (step %d)", saves[-1], self.step)
        return True

    # -------------------------------------------------------------------- loop
    def eval_loss(self) -> float:
        """Token-weighted mean loss over the eval examples."""
        total, count = 0.0, 0
        b = self.config.batch_size
        with self.model._precision():
            for i in range(0, len(self.eval_examples), b):
                rows = self.eval_examples[i : i + b]
                arrays, groups = self._device_batch(rows + [self.empty_row] * (b - len(rows)))
                s, c = _eval_step(
                    self.state,
                    self.frozen,
                    self.loaded,
                    arrays,
                    num_groups=groups,
                    lora_path=self._eval_path,
                    **self._statics,
                )
                total, count = total + float(s), count + int(c)
        return total / max(count, 1)

    def run(self, *, progress: bool = True, on_step: Callable[[dict], None] | None = None):
        """Train to `config.steps`, saving / evaluating on schedule; returns the metrics rows."""
        cfg = self.config
        metrics_file = None
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            metrics_file = open(self.output_dir / "metrics.jsonl", "a")  # noqa: SIM115
        history = []
        schedule = cfg.schedule()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, desc=self.desc)
        try:
            with self.model._precision():
                while self.step < cfg.steps:
                    start, losses, norms, tokens = time.perf_counter(), [], [], 0
                    extra: dict[str, list] = {}
                    for _ in range(cfg.grad_accum):
                        arrays, groups = self._device_batch(self.micro_batch(self.micro))
                        self.state, m = self._step(
                            self.state, self.frozen, self.loaded, arrays, num_groups=groups
                        )
                        self.micro += 1
                        losses.append(m["loss"])
                        norms.append(m["grad_norm"])
                        tokens += int(m["tokens"])
                        for k, v in m.items():
                            if k not in ("loss", "grad_norm", "tokens"):
                                extra.setdefault(k, []).append(v)
                    self.step += 1
                    row = {
                        "step": self.step,
                        "loss": float(np.mean([float(x) for x in losses])),
                        "learning_rate": float(schedule(self.step - 1)),
                        "grad_norm": float(np.mean([float(x) for x in norms])),
                        "tokens_per_s": tokens / (time.perf_counter() - start),
                        "skipped_samples": self.skipped,
                    }
                    for k, v in extra.items():
                        row[k] = float(np.mean([float(x) for x in v]))
                    last = self.step == cfg.steps
                    if self.eval_examples and (
                        last or (cfg.eval_every and self.step % cfg.eval_every == 0)
                    ):
                        row["eval_loss"] = self.eval_loss()
                    if cfg.save_every and self.step % cfg.save_every == 0 or last:
                        self.save()
                    history.append(row)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(row) + "\n")
                        metrics_file.flush()
                    bar.update(1)
                    bar.set_postfix(self.postfix(row))
                    if on_step is not None:
                        on_step(row)
        finally:
            bar.close()
            if metrics_file is not None:
                metrics_file.close()
        return history

    def postfix(self, row: Mapping[str, Any]) -> dict[str, str]:
        """What the progress bar shows of a metrics row."""
        return {"loss": f"{row['loss']:.4f}"}

    def trained_model(self):
        """A MiniCPMV with the trained weights (LoRA merged in; `.adapter` keeps it)."""
        from minicpmv_jax.train.lora import _replace

        params = stack_parts(self.state["params"])
        params = jax.tree.map(lambda x, d: x.astype(d), params, self.param_dtypes)
        graphdef = self.model.graphdef  # the model's own (no training remat)
        new = _replace(self.model, nnx.merge(graphdef, params, self.frozen_as_loaded))
        if self.config.mode != "lora":
            return new
        new.adapter = self.model.adapter  # merged already: merge_lora subtracts it
        return merge_lora(new, Adapter(self.lora_config, self.state["lora"]))


def split_trainable(params: nnx.State) -> nnx.State:
    """CPU backend: each float32 decoder-stack parameter [L, ...] of `params` as L separate
    per-layer arrays (`LayerParts`, copies: the stacked arrays are dropped by the caller); others
    unchanged. Single-device arrays only (see SPLIT_TRAINABLE_LAYERS)."""
    if jax.default_backend() != "cpu":
        return params
    flat = nnx.to_flat_state(params)

    def splittable(path, x) -> bool:
        return (
            path_name(path).startswith(SPLIT_STACKS)
            and isinstance(x, jax.Array)
            and x.ndim >= 1
            and x.dtype == jnp.float32
            and len(x.sharding.device_set) == 1
        )

    leaves = []
    for path, var in flat:
        x = var.get_value()
        if splittable(path, x):
            var = var.replace(LayerParts([x[i] for i in range(x.shape[0])]))
        leaves.append((path, var))
    return nnx.from_flat_state(leaves)


def stack_parts(tree, *, abstract: bool = False):
    """`tree` with every `LayerParts` stacked back into one [L, ...] array (abstract: shapes
    only, `jax.ShapeDtypeStruct`s with each array's sharding, for restoring into)."""

    def leaf(x):
        if isinstance(x, LayerParts):
            p = x.parts[0]
            if abstract:
                return jax.ShapeDtypeStruct((len(x),) + p.shape, p.dtype, sharding=p.sharding)
            return jnp.stack(x.parts)
        if abstract:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree, is_leaf=_is_parts)


def split_like(tree, like):
    """`tree` (stacked layout) with every array whose place in `like` holds `LayerParts` split
    into its layers the same way."""

    def leaf(x, ref):
        if isinstance(ref, LayerParts):
            return LayerParts([x[i] for i in range(x.shape[0])])
        return x

    return jax.tree.map(leaf, tree, like, is_leaf=_is_parts)


def device_batch(model, batch: Mapping[str, Any], config: TrainConfig) -> tuple[dict, int]:
    """A collated batch padded to the config's buckets and placed on the model's mesh (rows over
    the data axis, vision slices replicated): (device arrays, num_groups)."""
    prepared = prepare_batch(
        model,
        batch,
        token_buckets=config.token_buckets,
        slice_buckets=config.slice_buckets,
        patch_buckets=model.processor.patch_buckets,
    )
    mesh = model.mesh
    placed = {}
    for k, a in device_arrays(prepared).items():
        rows_first = k in ("input_ids", "labels", "positions", "image_slot")
        sharding = (
            batch_sharding(mesh, a.shape)
            if rows_first
            else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        )
        placed[k] = jax.device_put(a, sharding)
    return placed, prepared["num_groups"]


def finetune(
    model,
    examples: Sequence[Mapping[str, Any]],
    config: TrainConfig | None = None,
    *,
    eval_examples: Sequence[Mapping[str, Any]] = (),
    output_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    skipped: int = 0,
):
    """Fine-tune `model` on `examples`; returns (trained MiniCPMV, metrics rows).

    With `output_dir` and `resume`, a run continues from its newest save (same losses as an
    uninterrupted run).
    """
    trainer = Trainer(
        model,
        examples,
        config or TrainConfig(),
        eval_examples=eval_examples,
        output_dir=output_dir,
        skipped=skipped,
    )
    if resume:
        trainer.restore_latest()
    history = trainer.run(progress=progress)
    return trainer.trained_model(), history
