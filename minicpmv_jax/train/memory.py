"""Memory plan of a fine-tuning run: which models fit a chip for LoRA and for full training.

Per device, as `Trainer` holds them: the model's weights as loaded (frozen and trainable alike,
in `param_dtype`; int8 LLM projections with `quant="int8"`), float32 master copies of the
trainable weights, their float32 gradients and AdamW's two float32 moments (plus the accumulated
gradients with `grad_accum > 1`), the batch, and the activations the backward pass keeps. Those
are counted per decoder / vision-tower layer from what the compiled train step keeps (the
stacked residuals of its scanned layers in the HLO) under the rematerialisation policy
(`TrainConfig.remat` / `vision_remat`): "none" keeps every layer's activations, "full" only
each layer's input, "dots" its projection outputs; the layer being differentiated adds its own
activations and score gradients. The vision tower and the resampler keep activations when
gradients flow through them (full, or LoRA with vpm / resampler in modules_to_save); a frozen
tower runs forward only, before the decoder (inference's peak, minicpmv_jax.memory). Tower and
resampler run `batch_size` slices at a time, as the step does (see `_with_vision`).

On the tiny checkpoint's float32 train step over a batch with an image (8 slices of 256
patches, 4 x 256 tokens) the total is within 25% of XLA's compiled memory (weights + train
state + batch + the step's temporaries) for full and LoRA, with and without remat
(tests/test_train_memory.py). Estimates: XLA fuses, reuses and adds temporaries. The plan models
the scanned decoder stack every backend but CPU runs; the CPU LoRA step reads its frozen decoder
layers as per-layer arrays, unrolled (train.loop.SPLIT_FROZEN_LAYERS): on that batch its
temporaries were 10% below the scanned step's without remat and 36% above with remat "full".

    python -m minicpmv_jax.train.memory      # the README table
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from minicpmv_jax.config import MiniCPMVConfig
from minicpmv_jax.memory import GiB, _shard_elems, param_inventory
from minicpmv_jax.quant import OUT_AXIS
from minicpmv_jax.sharding import mesh_shape, rules_for
from minicpmv_jax.train.lora import LoraConfig
from minicpmv_jax.weights import EXCEPTIONS, stack_of, unstack

F32 = 4


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """Bytes per device of one training configuration."""

    weights: int  # the model as loaded (param dtype)
    master: int  # float32 copies of the trainable weights
    grads: int
    optimizer: int
    activations: int
    trainable_elements: int  # whole model (not per device)

    @property
    def total(self) -> int:
        return self.weights + self.master + self.grads + self.optimizer + self.activations

    def fits(self, hbm_bytes: int, headroom: float = 0.9) -> bool:
        return self.total <= headroom * hbm_bytes


def _trainable(name: str, mode: str, lora: LoraConfig) -> bool:
    if mode == "full":
        return True
    if mode == "freeze_vision":
        return not name.startswith("vpm.")
    return lora.saved_module(name) is not None


def plan(
    config: MiniCPMVConfig,
    mesh: Any = (1, 1, 1),
    *,
    mode: str = "lora",
    lora: LoraConfig | None = None,
    batch: int = 1,
    seq_len: int = 2048,
    num_slices: int = 10,
    patch_bucket: int = 1024,
    param_dtype: Any = "bfloat16",
    grad_accum: int = 1,
    remat: str = "none",
    vision_remat: str | None = None,
    quant: str | None = None,
) -> TrainingPlan:
    """Per-device training memory of `config` on `mesh` ((data, fsdp, tensor) sizes).

    Args:
      mode: "full" | "freeze_vision" | "lora"; lora: its LoraConfig (default: official).
      batch, seq_len: rows and tokens per micro-batch; num_slices x patch_bucket: image slices.
      param_dtype: dtype of the loaded weights (frozen ones stay in it).
      remat / vision_remat: "none" | "full" | "dots" of the decoder / vision layers (vision:
        None = as remat).
      quant: "int8": the LLM's projections and lm_head stored int8 (1 byte + a float32 scale
        per output channel; LoRA mode only, they are frozen).
    """
    from minicpmv_jax.quant import parse

    qcfg = parse(quant)
    vision_remat = remat if vision_remat is None else vision_remat
    lora = lora or LoraConfig()
    shape = mesh_shape(mesh)
    rules = rules_for(config, shape)
    pdt = jnp.dtype(param_dtype)
    weights = trainable = elements = 0
    for name, pshape, _, names in param_inventory(config):
        shard = _shard_elems(pshape, names, shape, rules)
        module = name.rpartition(".")[0]
        leaf = name.rpartition(".")[2]
        if qcfg is not None and leaf in OUT_AXIS and qcfg.selects(module):
            # int8 kernel [(L,) in, out] (torch-layout weight [(L,) out, in]) + its scale
            weights += shard + shard // pshape[-3 - OUT_AXIS[leaf]] * F32
        else:
            weights += shard * pdt.itemsize
        if _trainable(name, mode, lora):
            trainable += shard
            elements += math.prod(pshape)
        elif mode == "lora" and leaf in OUT_AXIS and name not in EXCEPTIONS:
            # a layer stack [L, ...]: LoRA targets are matched per official layer name
            one = pshape[1:] if stack_of(name) else pshape
            for _, layer_name in unstack(name, pshape[0] if stack_of(name) else 0):
                if lora.targets(layer_name.rpartition(".")[0]):
                    n = lora.r * (one[0] + one[1])  # A [r, in] + B [out, r], replicated
                    trainable += n
                    elements += n
    master = grads = trainable * F32
    optimizer = trainable * F32 * (2 + (grad_accum > 1))

    llm, cdt = config.llm, jnp.dtype(config.llm.dtype)
    b = -(-batch // shape.get("data", 1))
    t, d, h, f = seq_len, llm.hidden_size, llm.head_dim, llm.intermediate_size
    n, k = llm.num_heads, llm.num_kv_heads
    # kept per decoder layer (the scanned stack's residuals in the compiled step's HLO): 7
    # [B, T, D] (input, norms, attention output, residual sums), q / k / v, 6 [B, T, F] (gate,
    # up, SiLU terms, product) in the compute dtype; the masked scores and probabilities
    # [B, N, T, T] in float32, and a float32 + a bool [B, K, T, T] (the grouped-query mask).
    # "dots" keeps the projection outputs (q, k, v, o, gate, up, down), "full" the input only.
    cs = cdt.itemsize
    scores = b * n * t * t * F32
    per_layer = b * t * (7 * d + (n + 2 * k) * h + 6 * f) * cs + 2 * scores
    per_layer += b * k * t * t * (F32 + 1)
    kept = {
        "none": per_layer,
        "dots": b * t * (3 * d + (n + 2 * k) * h + 2 * f) * cs,
        "full": b * t * d * cs,
    }
    act = _stack_activations(llm.num_layers, per_layer, kept[remat], 2 * scores)
    act += 2 * b * t * llm.vocab_size * F32  # float32 logits + their gradient
    act += b * t * 4 * 4  # the batch's int32 ids, labels, positions and image slots
    if num_slices:
        act = _with_vision(config, mesh, mode, lora, num_slices, patch_bucket, vision_remat, act)
    return TrainingPlan(weights, master, grads, optimizer, act, elements)


def _trains(config: MiniCPMVConfig, prefix: str, mode: str, lora: LoraConfig) -> bool:
    """Whether any weight under `prefix` ("vpm.") trains: in full, or as a LoRA target."""
    for name, pshape, _, _ in param_inventory(config):
        if not name.startswith(prefix):
            continue
        if _trainable(name, mode, lora):
            return True
        if mode == "lora" and name.rpartition(".")[2] in OUT_AXIS and name not in EXCEPTIONS:
            layers = unstack(name, pshape[0] if stack_of(name) else 0)
            if any(lora.targets(layer.rpartition(".")[0]) for _, layer in layers):
                return True
    return False


def _with_vision(
    config: MiniCPMVConfig,
    mesh: Any,
    mode: str,
    lora: LoraConfig,
    num_slices: int,
    patch_bucket: int,
    remat: str,
    decoder: int,
) -> int:
    """Peak activation bytes of a train step whose batch has `num_slices` image slices of
    `patch_bucket` patches, given the decoder's (`decoder`: its stack and logits).

    The step runs tower -> resampler -> decoder forward, then backward in reverse order, so
    the peak is the largest of: the decoder's backward (over what the tower and resampler
    keep for theirs), the resampler's backward (over the tower's kept activations) and the
    tower's backward. Tower and resampler keep activations only when gradients flow through
    them (their weights train, or the resampler sits above a training tower); a frozen tower
    runs forward only, before the decoder, and its peak is inference's (memory.plan).

    Both run `batch_size` slices at a time (layers.map_chunks, a lax.map). Reverse-mode AD of
    that map stacks every chunk's residuals: the kept activations are those of all slices (the
    last chunk padded), plus one chunk's stacked copy when there are several chunks; the
    backward working set is one chunk's. Per slice and tower layer XLA keeps (the scanned
    tower's compiled HLO): the masked scores and the probabilities [N, P, P] in float32, 12
    [P, Dv] (input, norms and their statistics, q / k / v, attention output, residual sums)
    and 6 [P, Fv] (fc1, GELU terms, fc2 input); remat "dots" keeps q, k, v, out_proj, fc2
    [P, Dv] and fc1 [P, Fv], "full" the layer input. The backward of one layer holds its
    residuals (recomputed under remat) and the two float32 score gradients. The resampler
    keeps 6 [P, D] per slice (kv, its norm, keys with position terms, k, v and v in float32)
    and needs 5 more per slice of a chunk in its backward.
    """
    vis, res = config.vision, config.resampler
    i, p, dv, fv = num_slices, patch_bucket, vis.hidden_size, vis.intermediate_size
    cs = jnp.dtype(vis.dtype).itemsize
    train_vpm = _trains(config, "vpm.", mode, lora)
    train_res = train_vpm or _trains(config, "resampler.", mode, lora)

    def chunks(size: int) -> tuple[int, int]:
        """(slices of one chunk, slices the stacked residuals hold: all, padded, + a copy)."""
        chunk = min(i, size)
        padded = -(-i // chunk) * chunk
        return chunk, padded + (chunk if padded > chunk else 0)

    # patches float32, position ids int32, key mask and patch_valid (bool), tgt_sizes
    inputs = i * p * (vis.patch_dim * F32 + 4 + 2) + i * 2 * 4
    res_kept = res_work = 0
    if train_res:
        chunk, held = chunks(res.batch_size)
        row = p * res.embed_dim * jnp.dtype(res.dtype).itemsize  # one slice's [P, D]
        res_kept, res_work = 6 * row * held, 5 * row * chunk
    upper = res_kept + max(res_work, decoder)  # resampler and decoder phases
    if not train_vpm:
        from minicpmv_jax.memory import plan as inference_plan

        forward = inference_plan(
            config,
            mesh,
            cache_len=1,
            num_slices=i,
            patch_bucket=p,
            dtype=vis.dtype,
        ).detail["vision_activations"]  # counts the inputs
        return max(inputs + upper, forward)
    chunk, held = chunks(vis.batch_size)
    scores = vis.num_heads * p * p * F32  # one slice's [N, P, P]
    per_layer = 2 * scores + p * (12 * dv + 6 * fv) * cs
    kept = {"none": per_layer, "dots": p * (5 * dv + fv) * cs, "full": p * dv * cs}[remat]
    tower_kept = held * vis.num_layers * kept
    tower_work = chunk * _stack_activations(0, per_layer, 0, 2 * scores)
    return inputs + tower_kept + max(tower_work, upper)


def _stack_activations(layers: int, per_layer: int, kept: int, score_grads: int) -> int:
    """Peak bytes of a scanned stack's backward pass: `kept` per layer, plus the layer being
    differentiated: its activations (recomputed under remat, read back from the stacked
    residuals without) and its float32 score gradients (`score_grads`: d probabilities and d
    scores, the largest gradient buffers of an attention layer)."""
    return layers * kept + per_layer + score_grads


# (label, plan arguments) of the README table's rows per model
SETUPS = (
    ("lora (official)", {"mode": "lora"}),
    ("lora (official), remat", {"mode": "lora", "remat": "full"}),
    (
        "lora q/k/v only, int8 base, remat",
        {"mode": "lora", "remat": "full", "quant": "int8", "lora": LoraConfig(modules_to_save=())},
    ),
    ("full", {"mode": "full"}),
    ("full, remat", {"mode": "full", "remat": "full"}),
)


def markdown_table(
    presets: dict[str, MiniCPMVConfig],
    setups: Sequence[tuple[str, dict]] = SETUPS,
    hbm: int = 16 * GiB,
    **request,
) -> str:
    """Markdown table of `plan` for every preset x setup on one device of `hbm` bytes."""
    rows = [
        (
            "| model | setup | trainable | weights | master + grads + AdamW | activations "
            "| total | fits 16 GiB (90%) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for pname, cfg in presets.items():
        for label, kwargs in setups:
            p = plan(cfg, **kwargs, **request)
            state = p.master + p.grads + p.optimizer
            rows.append(
                f"| {pname} | {label} | {p.trainable_elements / 1e6:.0f} M "
                f"| {p.weights / GiB:.2f} GiB | {state / GiB:.2f} GiB "
                f"| {p.activations / GiB:.2f} GiB | {p.total / GiB:.2f} GiB "
                f"| {'yes' if p.fits(hbm) else 'no'} |"
            )
    return "\n".join(rows)


def main() -> None:
    from minicpmv_jax.config import MINICPM_LLAMA3_V_2_5, MINICPM_V_2_6, MINICPM_V_4_5

    presets = {
        "MiniCPM-Llama3-V 2.5": MINICPM_LLAMA3_V_2_5,
        "MiniCPM-V 2.6": MINICPM_V_2_6,
        "MiniCPM-V 4.5": MINICPM_V_4_5,
    }
    print(markdown_table(presets, batch=1, seq_len=2048, num_slices=10))


if __name__ == "__main__":
    main()
