"""Memory plan of a fine-tuning run: which models fit a chip for LoRA and for full training.

Per device, as `Trainer` holds them: the model's weights as loaded (frozen and trainable alike,
in `param_dtype`; int8 LLM projections with `quant="int8"`), float32 master copies of the
trainable weights, their float32 gradients and AdamW's two float32 moments (plus the accumulated
gradients with `grad_accum > 1`), and the activations the backward pass keeps, per decoder /
vision layer as the rematerialisation policy says (`TrainConfig.remat` / `vision_remat`):
"none" keeps every layer's activations, "full" only each layer's input plus one layer's
activations while it is recomputed, "dots" each layer's projection outputs plus one layer's
rest. The vision tower keeps activations only when its weights train (full, or LoRA with vpm in
modules_to_save). Estimates: XLA fuses some of these and adds temporaries. On the tiny
checkpoint's text-only train step the total is within 25% of XLA's compiled memory (weights +
train state + the step's temporaries) for full and LoRA, with and without remat
(tests/test_train_memory.py); the vision part is not checked that way (the tiny tower's
attention over padded 256-patch slices, chunked by `vision.batch_size`, needs up to ~3x what
the per-layer count gives, so the vision terms are a lower bound).

    python -m minicpmv_jax.train.memory      # the README table
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from minicpmv_jax.config import MiniCPMVConfig
from minicpmv_jax.memory import GiB, _shard_elems, param_inventory
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
        if qcfg is not None and name.endswith(".kernel") and qcfg.selects(module):
            weights += shard + shard // pshape[-2] * F32  # int8 kernel + its scale
        else:
            weights += shard * pdt.itemsize
        if _trainable(name, mode, lora):
            trainable += shard
            elements += math.prod(pshape)
        elif mode == "lora" and name.endswith(".kernel") and name not in EXCEPTIONS:
            # a layer stack [L, in, out]: LoRA targets are matched per official layer name
            one = pshape[1:] if stack_of(name) else pshape
            for _, layer_name in unstack(name, pshape[0] if stack_of(name) else 0):
                if lora.targets(layer_name.rpartition(".")[0]):
                    n = lora.r * (one[0] + one[1])  # A [r, in] + B [out, r], replicated
                    trainable += n
                    elements += n
    master = grads = trainable * F32
    optimizer = trainable * F32 * (2 + (grad_accum > 1))

    llm, vis, cdt = config.llm, config.vision, jnp.dtype(config.llm.dtype)
    b = -(-batch // shape.get("data", 1))
    t, d, h, f = seq_len, llm.hidden_size, llm.head_dim, llm.intermediate_size
    n, k = llm.num_heads, llm.num_kv_heads
    # kept per decoder layer: 4 [B, T, D] (inputs, norms), q / k / v, attention output, 4 MLP
    # [B, T, F] (gate, up, activation, product) in the compute dtype; float32 probabilities.
    # "dots" keeps the projection outputs (q, k, v, o, gate, up, down), "full" the input only.
    cs = cdt.itemsize
    per_layer = b * t * (4 * d + (2 * n + 2 * k) * h + 4 * f) * cs + b * n * t * t * F32
    kept = {
        "none": per_layer,
        "dots": b * t * (3 * d + (n + 2 * k) * h + 2 * f) * cs,
        "full": b * t * d * cs,
    }
    act = _stack_activations(llm.num_layers, per_layer, kept[remat])
    act += 2 * b * t * llm.vocab_size * F32  # float32 logits + their gradient
    if num_slices and _trainable("vpm.", mode, lora):  # a frozen tower keeps nothing
        i, p, dv, fv = num_slices, patch_bucket, vis.hidden_size, vis.intermediate_size
        vis_layer = i * p * (8 * dv + 2 * fv) * cs + i * vis.num_heads * p * p * F32
        vis_kept = {
            "none": vis_layer,
            "dots": i * p * (6 * dv + fv) * cs,  # q, k, v, out, fc1, fc2, input
            "full": i * p * dv * cs,
        }
        act += _stack_activations(vis.num_layers, vis_layer, vis_kept[vision_remat])
    return TrainingPlan(weights, master, grads, optimizer, act, elements)


def _stack_activations(layers: int, per_layer: int, kept: int) -> int:
    """Peak bytes of a scanned stack's backward pass: `kept` per layer, one layer's full
    activations while it is recomputed (when remat keeps less than everything), and that
    layer's activation gradients (about its activations again)."""
    return layers * kept + (per_layer if kept < per_layer else 0) + per_layer


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
        "| model | setup | trainable | weights | master + grads + AdamW | activations "
        "| total | fits 16 GiB (90%) |",
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
