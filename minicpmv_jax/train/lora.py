"""LoRA as the official fine-tuning sets it up with PEFT, and PEFT's names and files.

Official setup (finetune.py + peft): LoRA A [r, in] / B [out, r] on every torch Linear whose
module name matches `target_modules` (a regex, fully matched; or a list of name suffixes), output
`x W^T + (alpha / r) * x A^T B^T`; full trainable copies of the `modules_to_save` modules
(embed_tokens, resampler, and vpm when the vision tower is tuned); everything else frozen.

The train step applies LoRA on the input path, as PEFT does: each target Linear becomes a
`LoraLinear` (`base(x) + s * dropout(x) A^T B^T`) in a training copy of the module graph
(`lora_graph`), with one dropout mask per target and layer drawn from the train state's RNG
(LoRA dropout, official default 0.05, acts on the layer input). Its backward needs only the
rank-r products for A and B and the input gradient through the frozen kernel.

LoRA as a weight delta (`apply_lora`: the kernel (in, out) the model sees is `W + s * (B A)^T`;
a torch-layout weight (out, in) (layers.OutInDense) is `W + s * B A`,
the same function of x, A and B) needs no change to the model's modules and serves evaluation,
`loss_and_grads` (what the fixtures were checked with) and `TrainConfig(lora_path="delta")`;
differentiated, it forms each target kernel's full weight gradient [in, out] and contracts it to
A and B: more work than the input path (compiled 2.6-width step: about 5% more FLOPs, 16% more
bytes). It needs a float base and no dropout: an int8 kernel (QLoRA-style training, quant.py)
cannot take a float delta. The model's own weights already hold an adapter loaded with
`MiniCPMV.from_pretrained(..., adapter=...)` merged in (so inference sees it); the step
subtracts that loaded delta (`W + s * (B A - B0 A0)^T`; on the input path from the base
kernel). With dropout 0 and a float base both paths are the same function (tested).
Evaluation never drops.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpmv_jax.errors import CheckpointError, MiniCPMVError
from minicpmv_jax.layers import LayerParts
from minicpmv_jax.quant import OUT_AXIS  # leaf of a Linear's weight -> axis of its outputs
from minicpmv_jax.weights import EXCEPTIONS, stack_of, unstack

# finetune.py LoraArguments: the target regex and modules_to_save of the official scripts
DEFAULT_TARGET = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)"
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA settings; defaults are the official LoraArguments (r 64, alpha 64).

    target_modules: a regex fully matched against official module names
      (`llm.model.layers.3.self_attn.q_proj`), or a tuple of module-name suffixes (PEFT's list
      form). modules_to_save: modules trained in full (PEFT keeps trainable copies).
    """

    r: int = 64
    alpha: float = 64.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = DEFAULT_TARGET
    modules_to_save: tuple[str, ...] = ("embed_tokens", "resampler", "vpm")

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise MiniCPMVError(f"LoRA rank r must be an integer >= 1, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise MiniCPMVError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def targets(self, module_name: str) -> bool:
        """PEFT's rule: a str is re.fullmatch-ed, a list matches exact names or '.'-suffixes."""
        t = self.target_modules
        if isinstance(t, str):
            return re.fullmatch(t, module_name) is not None
        return any(module_name == s or module_name.endswith("." + s) for s in t)

    def saved_module(self, name: str) -> str | None:
        """The modules_to_save prefix of an official tensor name ('resampler'), or None."""
        parts = name.split(".")
        for i in range(1, len(parts)):
            if parts[i - 1] in self.modules_to_save:
                return ".".join(parts[:i])
        return None

    def to_peft(self) -> dict[str, Any]:
        """adapter_config.json as peft writes it (the fields PeftModel.from_pretrained reads)."""
        target = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": None,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": target if isinstance(target, str) else list(target),
            "modules_to_save": list(self.modules_to_save),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "base_model_name_or_path": None,
            "revision": None,
        }

    @classmethod
    def from_peft(cls, cfg: Mapping[str, Any]) -> LoraConfig:
        extras = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform")
        unsupported = [k for k in extras if cfg.get(k)]
        plain = cfg.get("peft_type", "LORA") == "LORA" and cfg.get("bias", "none") == "none"
        if not plain or unsupported:
            raise CheckpointError(
                f"adapter_config.json: only plain LoRA (bias none) is supported, got "
                f"peft_type={cfg.get('peft_type')!r}, bias={cfg.get('bias')!r}, {unsupported}"
            )
        target = cfg["target_modules"]
        return cls(
            r=int(cfg["r"]),
            alpha=float(cfg["lora_alpha"]),
            target_modules=target if isinstance(target, str) else tuple(target),
            dropout=float(cfg.get("lora_dropout") or 0.0),
            modules_to_save=tuple(cfg.get("modules_to_save") or ()),
        )


@dataclasses.dataclass(frozen=True)
class Target:
    """One LoRA'd Linear: its official module name and where its kernel lives in the state."""

    name: str  # official module name, e.g. llm.model.layers.0.self_attn.q_proj
    path: tuple  # nnx state path of the kernel [in, out] (or torch-layout weight [out, in]),
    # or of its layer stack [L, ...]
    layer: int | None = None  # index in the layer stack; None: not stacked

    @property
    def out_axis(self) -> int:
        """-1 for a kernel [(L,) in, out], -2 for a torch-layout weight [(L,) out, in]."""
        return OUT_AXIS[self.path[-1]]


def _in_out(shape: tuple, out_axis: int) -> tuple[int, int]:
    """(in, out) sizes of a kernel / weight of `shape` ([(L,) in, out] or [(L,) out, in])."""
    return (shape[-2], shape[-1]) if out_axis == -1 else (shape[-1], shape[-2])


def lora_targets(state: nnx.State, config: LoraConfig) -> tuple[Target, ...]:
    """Every torch Linear (a kernel under the plain name rule, or a torch-layout 2-D weight)
    that config targets."""
    out = []
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        for layer, name in unstack(path, shape[0] if stack_of(path) else 0):
            module, _, leaf = name.rpartition(".")
            per_layer = len(shape) - (layer is not None)
            if leaf not in OUT_AXIS or per_layer != 2 or name in EXCEPTIONS:
                continue  # norms, embeddings, biases, convs; fused exceptions are no torch Linear
            if config.saved_module(module + ".weight") is None and config.targets(module):
                out.append(Target(module, tuple(path), layer))
    if not out:
        raise MiniCPMVError(f"LoRA target_modules {config.target_modules!r} match no Linear layer")
    return tuple(out)


def init_lora(
    state: nnx.State, config: LoraConfig, seed: int = 0
) -> dict[str, dict[str, jax.Array]]:
    """PEFT's default initialisation: A ~ kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(in)), B = 0.

    Returns {module name: {"A": float32 [r, in], "B": float32 [out, r]}}.
    """
    flat = dict(nnx.to_flat_state(state))
    key = jax.random.key(seed)
    out = {}
    for i, t in enumerate(lora_targets(state, config)):
        d_in, d_out = _in_out(flat[t.path].get_value().shape, t.out_axis)
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(
            jax.random.fold_in(key, i), (config.r, d_in), jnp.float32, -bound, bound
        )
        out[t.name] = {"A": a, "B": jnp.zeros((d_out, config.r), jnp.float32)}
    return out


def apply_lora(
    state: nnx.State,
    targets: Sequence[Target],
    lora: Mapping[str, Mapping[str, jax.Array]],
    scaling: float,
    loaded: Mapping[str, Mapping[str, jax.Array]] | None = None,
) -> nnx.State:
    """state with `s * (B A - B0 A0)^T` added to each target kernel, `s * (B A - B0 A0)` to
    each torch-layout weight (traceable).

    `loaded` (A0, B0) is the adapter already merged into the state's weights, if any.
    An int8 kernel (quant.Int8Dense) is dequantized, updated and quantized again with a new
    per-channel scale (PEFT's merge on a quantized base does the same; it rounds).
    """
    from minicpmv_jax.quant import quantize_kernel, scale_path

    flat = dict(nnx.to_flat_state(state))
    for t in targets:
        var = flat[t.path]
        w = var.get_value()
        delta = lora[t.name]["B"] @ lora[t.name]["A"]  # [out, in]
        if loaded is not None and t.name in loaded:
            delta = delta - loaded[t.name]["B"] @ loaded[t.name]["A"]
        delta = scaling * (delta.T if t.out_axis == -1 else delta)  # in the weight's layout
        if isinstance(w, LayerParts):  # a float stack given as its layers (train step, CPU)
            parts = list(w.parts)
            parts[t.layer] = (parts[t.layer] + delta).astype(parts[t.layer].dtype)
            w = LayerParts(parts)
        elif w.dtype == jnp.int8:
            svar = flat[scale_path(t.path)]
            scale = svar.get_value()
            sl = slice(None) if t.layer is None else t.layer
            in_axis = -3 - t.out_axis
            merged = w[sl].astype(jnp.float32) * jnp.expand_dims(scale[sl], in_axis) + delta
            q, new_scale = quantize_kernel(merged, t.out_axis)
            flat[scale_path(t.path)] = svar.replace(scale.at[sl].set(new_scale))
            w = w.at[sl].set(q)
        elif t.layer is None:
            w = (w + delta).astype(w.dtype)
        else:  # one layer of a stacked kernel [L, in, out] (weight [L, out, in])
            w = w.at[t.layer].set((w[t.layer] + delta).astype(w.dtype))
        flat[t.path] = var.replace(w)
    return nnx.from_flat_state(list(flat.items()))


# ---------------------------------------------------------------------------------------------
# The input path: LoraLinear modules in a training copy of the graph (dropout, int8 base)
# ---------------------------------------------------------------------------------------------


class LoraWeight(nnx.Variable):
    """A LoRA tensor (or mask / key) inside the training graph; built per step, never saved."""


class LoraLinear(nnx.Module):
    """PEFT's LoRA Linear: `base(x) + s * on * (dropout(x) @ A^T @ B^T)`.

    `base` is the model's own layer (nnx.Linear or quant.Int8Dense, weights untouched). In a
    layer stack every variable has the leading L axis and the scan hands each layer its slice:
    A [(L,) r, in], B [(L,) out, r], on [(L,)] (1: this layer is a target, 0: not), key
    [(L,) k] (raw PRNG key data of this layer's dropout mask). The branch runs in float32 (PEFT
    casts x to the adapter's dtype) and is added to the base output in its dtype.
    """

    def __init__(self, base, a, b, on, key, *, rate: float, scaling: float):
        self.base = base
        self.lora_a, self.lora_b = LoraWeight(a), LoraWeight(b)
        self.lora_on, self.lora_key = LoraWeight(on), LoraWeight(key)
        self.rate, self.scaling = rate, scaling

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        h = x.astype(jnp.float32)
        if self.rate > 0:  # inverted dropout, as torch.nn.Dropout in training
            key = jax.random.wrap_key_data(self.lora_key[...])
            keep = jax.random.bernoulli(key, 1.0 - self.rate, h.shape)
            h = jnp.where(keep, h / (1.0 - self.rate), 0.0)
        h = (h @ self.lora_a[...].T) @ self.lora_b[...].T  # [..., r] -> [..., out]
        return (y.astype(jnp.float32) + (self.scaling * self.lora_on[...]) * h).astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class LoraGroup:
    """The targets sharing one kernel: a plain Linear, or the targeted layers of one stack."""

    module: tuple  # nnx state path of the Linear (its kernel path without "kernel")
    names: tuple  # official module name per layer (None: that layer is not a target)
    stacked: bool  # a layer stack (variables with the leading L axis)
    leaf: str = "kernel"  # "kernel" [(L,) in, out] or a torch-layout "weight" [(L,) out, in]


def lora_groups(targets: Sequence[Target], state: nnx.State) -> tuple[LoraGroup, ...]:
    """targets grouped by kernel (one LoraLinear each), in target order."""
    flat = dict(nnx.to_flat_state(state))
    groups: dict[tuple, list] = {}
    for t in targets:
        if t.path not in groups:
            shape = flat[t.path].get_value().shape
            groups[t.path] = [None] * shape[0] if t.layer is not None else [None]
        groups[t.path][t.layer or 0] = t.name
    stacked = {t.path: t.layer is not None for t in targets}
    return tuple(LoraGroup(p[:-1], tuple(n), stacked[p], p[-1]) for p, n in groups.items())


def _key_shape() -> tuple[int, ...]:
    return jax.random.key_data(jax.random.key(0)).shape


def lora_graph(
    graphdef,
    states: Sequence[nnx.State],
    groups: Sequence[LoraGroup],
    r: int,
    *,
    rate: float,
    scaling: float,
):
    """The graphdef of the module (graphdef + states) with every group's Linear wrapped in a
    LoraLinear of rank r, dropout `rate` and `scaling` (static: one graphdef per setting)."""
    module = nnx.merge(graphdef, *states)  # shares the arrays: only the graph is new
    flat = {p: v for state in states for p, v in nnx.to_flat_state(state)}
    for g in groups:
        parent = module
        for p in g.module[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        base = getattr(parent, g.module[-1])
        kshape = flat[g.module + (g.leaf,)].get_value().shape
        lead = kshape[:-2]  # (L,) in a stack
        d_in, d_out = _in_out(kshape, OUT_AXIS[g.leaf])
        wrapped = LoraLinear(
            base,
            jnp.zeros(lead + (r, d_in), jnp.float32),
            jnp.zeros(lead + (d_out, r), jnp.float32),
            jnp.zeros(lead, jnp.float32),
            jnp.zeros(lead + _key_shape(), jnp.uint32),
            rate=rate,
            scaling=scaling,
        )
        setattr(parent, g.module[-1], wrapped)
    return nnx.graphdef(module)


def lora_module(
    lora_graphdef,
    states: Sequence[nnx.State],
    groups: Sequence[LoraGroup],
    lora: Mapping[str, Mapping[str, jax.Array]],
    key: jax.Array | None = None,
):
    """The LoraLinear-wrapped module of `lora_graph` (traceable).

    states: the model's states in its own layout (trainable, frozen), re-keyed under each
    wrapper's `base`; lora: {module name: {"A", "B"}}; key: the step's dropout key (None:
    no dropout needed, e.g. rate 0 or evaluation). Each group and layer gets its own mask key.
    """
    prefixes = {g.module: g for g in groups}
    flat = []
    for state in states:
        for path, var in nnx.to_flat_state(state):
            for n in range(len(path) - 1, 0, -1):
                if path[:n] in prefixes:
                    path = path[:n] + ("base",) + path[n:]
                    break
            flat.append((path, var))
    for i, g in enumerate(groups):
        any_name = next(n for n in g.names if n is not None)
        r, d_in = lora[any_name]["A"].shape
        d_out = lora[any_name]["B"].shape[0]
        a = [lora[n]["A"] if n else jnp.zeros((r, d_in), jnp.float32) for n in g.names]
        b = [lora[n]["B"] if n else jnp.zeros((d_out, r), jnp.float32) for n in g.names]
        on = jnp.asarray([n is not None for n in g.names], jnp.float32)
        if key is None:
            keys = jnp.zeros((len(g.names),) + _key_shape(), jnp.uint32)
        else:
            keys = jax.random.key_data(jax.random.split(jax.random.fold_in(key, i), len(g.names)))
        stacked = (jnp.stack(a), jnp.stack(b), on, keys)
        if not g.stacked:
            stacked = tuple(x[0] for x in stacked)
        for field, x in zip(("lora_a", "lora_b", "lora_on", "lora_key"), stacked, strict=True):
            flat.append((g.module + (field,), LoraWeight(x)))
    return nnx.merge(lora_graphdef, nnx.from_flat_state(flat))


# ---------------------------------------------------------------------------------------------
# PEFT names and files
# ---------------------------------------------------------------------------------------------


def peft_name(name: str, config: LoraConfig, *, saved: bool = False) -> str:
    """Official tensor name -> PEFT's parameter name (`saved`: its adapter-file name).

    'llm.model.layers.0.self_attn.q_proj.lora_A' -> 'base_model.model.llm...q_proj.lora_A.
    default.weight'; 'resampler.query' -> 'base_model.model.resampler.modules_to_save.default.
    query' (file: 'base_model.model.resampler.query').
    """
    adapter = "" if saved else ".default"
    for kind in (".lora_A", ".lora_B"):
        if name.endswith(kind):
            return f"{PEFT_PREFIX}{name}{adapter}.weight"
    module = config.saved_module(name)
    if module is None:
        raise ValueError(f"{name} is neither a LoRA tensor nor in modules_to_save")
    if saved:
        return PEFT_PREFIX + name
    return f"{PEFT_PREFIX}{module}.modules_to_save.default{name[len(module) :]}"


def save_adapter(
    folder: str | os.PathLike,
    config: LoraConfig,
    lora: Mapping[str, Mapping[str, Any]],
    saved_tensors: Mapping[str, np.ndarray],
    base_model_name_or_path: str | None = None,
) -> pathlib.Path:
    """Write adapter_model.safetensors + adapter_config.json in PEFT's layout.

    saved_tensors: {official name: array} of the modules_to_save tensors (official layout).
    """
    from safetensors.numpy import save_file

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, ab in lora.items():
        for kind in ("A", "B"):
            name = peft_name(f"{module}.lora_{kind}", config, saved=True)
            tensors[name] = np.ascontiguousarray(np.asarray(ab[kind], np.float32))
    for name, a in saved_tensors.items():
        tensors[peft_name(name, config, saved=True)] = np.ascontiguousarray(np.asarray(a))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_peft()
    cfg["base_model_name_or_path"] = base_model_name_or_path
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return folder


def read_adapter(folder: str | os.PathLike):
    """(LoraConfig, {module: {"A", "B"}} float32 numpy, {official name: array} saved tensors)."""
    from safetensors.numpy import load_file

    folder = pathlib.Path(folder)
    cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{folder}: not a PEFT adapter folder (needs adapter_config.json and "
            "adapter_model.safetensors)"
        )
    try:
        config = LoraConfig.from_peft(json.loads(cfg_file.read_text()))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{cfg_file}: unusable adapter config ({e})") from None
    lora: dict[str, dict[str, np.ndarray]] = {}
    saved: dict[str, np.ndarray] = {}
    for name, a in load_file(str(weights)).items():
        if not name.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{weights}: unexpected tensor name {name!r}")
        name = name[len(PEFT_PREFIX) :]
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = a.astype(np.float32)
        else:
            saved[name] = a
    for module, ab in lora.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != config.r or ab["B"].shape[1] != config.r:
            raise CheckpointError(f"{weights}: {module}: LoRA A/B missing or not rank {config.r}")
    return config, lora, saved


# ---------------------------------------------------------------------------------------------
# Adapters on a loaded model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A LoRA adapter merged into a model's weights: its config and A/B tensors (float32)."""

    config: LoraConfig
    lora: dict[str, dict[str, jax.Array]]


def _replace(model, module) -> Any:
    """A new MiniCPMV around `module` with the same config, processor and mesh."""
    return type(model)(model.config, module, model.processor, mesh=model.mesh)


def merge_lora(model, adapter: Adapter, saved: Mapping[str, np.ndarray] | None = None):
    """A model whose weights are `model`'s with the adapter merged in (PEFT merge_and_unload):
    target kernels += s * (B A - B0 A0)^T, torch-layout weights += s * (B A - B0 A0) (B0 A0: an adapter already merged into `model`),
    modules_to_save tensors replaced by `saved` ({official name: array}, official layout).

    The returned model keeps `adapter` (to train it further, or export it with save_adapter).
    """
    from minicpmv_jax.weights import hf_source

    state = nnx.state(model.module)
    targets = lora_targets(state, adapter.config)
    missing = sorted({t.name for t in targets} ^ set(adapter.lora))
    if missing:
        raise CheckpointError(f"adapter and model disagree on the LoRA modules: {missing[:4]}")
    loaded = model.adapter.lora if getattr(model, "adapter", None) is not None else None
    with model._precision():
        state = apply_lora(state, targets, adapter.lora, adapter.config.scaling, loaded)
    flat = []
    saved = dict(saved or {})
    for path, var in nnx.to_flat_state(state):
        old = var.get_value()
        new = None
        for layer, name in unstack(path, old.shape[0] if stack_of(path) else 0):
            src, transform, _ = hf_source(name)
            if src not in saved:
                continue
            a = transform(np.asarray(saved[src], np.float32))
            if a.shape != (old.shape if layer is None else old.shape[1:]):
                raise CheckpointError(f"adapter tensor {src}: shape {a.shape} != model's")
            if layer is None:
                new = a.astype(old.dtype)
            else:  # one layer of a stack: the other layers keep their weights
                new = np.array(old) if new is None else new
                new[layer] = a.astype(old.dtype)
        if new is not None:
            var = var.replace(jax.device_put(new, old.sharding))
        flat.append((path, var))
    graphdef = nnx.graphdef(model.module)
    new = _replace(model, nnx.merge(graphdef, nnx.from_flat_state(flat)))
    new.adapter = Adapter(adapter.config, {k: dict(v) for k, v in adapter.lora.items()})
    return new


def load_adapter(model, folder: str | os.PathLike):
    """`model` with the PEFT adapter of `folder` merged in (see merge_lora)."""
    config, lora, saved = read_adapter(folder)
    lora = {m: {k: jnp.asarray(a) for k, a in ab.items()} for m, ab in lora.items()}
    return merge_lora(model, Adapter(config, lora), saved)


def export_adapter(model, folder: str | os.PathLike) -> pathlib.Path:
    """Write `model.adapter` in PEFT's layout: its A/B, and the modules_to_save tensors taken
    from the model's weights (official names and layout), loadable by PeftModel.from_pretrained
    onto the official model and by MiniCPMV.from_pretrained(base, adapter=folder)."""
    from minicpmv_jax.weights import to_hf_state_dict

    adapter = getattr(model, "adapter", None)
    if adapter is None:
        raise MiniCPMVError("the model has no LoRA adapter to export (train with mode='lora')")
    saved = {
        n: a
        for n, a in to_hf_state_dict(nnx.state(model.module, nnx.Param)).items()
        if adapter.config.saved_module(n) is not None
    }
    base = getattr(model.processor, "folder", None)
    return save_adapter(folder, adapter.config, adapter.lora, saved, str(base) if base else None)


def save_merged(model, folder: str | os.PathLike, **kwargs) -> pathlib.Path:
    """Save the model (adapter merged into its weights, or fully fine-tuned) as an orbax folder
    with the base's config and tokenizer files; convert.to_safetensors turns it into the
    official safetensors layout. kwargs go to checkpoint.save (overwrite, progress)."""
    from minicpmv_jax import checkpoint

    base = getattr(model.processor, "folder", None)
    return checkpoint.save(folder, model, side_files_from=base, **kwargs)
