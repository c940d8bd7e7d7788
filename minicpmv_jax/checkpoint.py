"""Orbax checkpoints of MiniCPM-V parameters (the only module that imports orbax).

Folder layout (one conversion or one `save`)::

    out/
      minicpmv_jax.json        format marker + summary; written last (its presence = complete)
      config.json, tokenizer*, preprocessor_config.json, ...   copied from the source folder
      params/<group>/          one orbax StandardCheckpointer checkpoint per parameter group

A *group* is one module of a layer stack with its stacked parameters (`llm.model.layers.mlp.
up_proj`: kernel [L, D, F] of every decoder layer), one LLM top-level tensor
(`llm.model.embed_tokens`, `llm.lm_head`, ...) or one small module (`vpm`, `resampler`). Groups
let a conversion stream: host memory is a small multiple of the largest group (the 2.6 stacked
MLP projections, 3.8 GB in bfloat16) instead of the whole model, and restoring still targets
every array's
final sharding (`StandardCheckpointer.restore(path, abstract)` with NamedSharding leaves reads
each device's shard directly, across meshes and hosts).

Atomicity: writes go to a sibling `.<name>.partial/` folder with a `progress.json` listing the
finished groups; the folder is renamed to its final name only after `minicpmv_jax.json` is
written. An interrupted run leaves no folder that loads; running it again resumes after the last
finished group.

`minicpmv_jax.json` also records the official name, shape and dtype of every source tensor, so
`convert.to_safetensors` writes the original layout back bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from minicpmv_jax.errors import CheckpointError
from minicpmv_jax.weights import path_name, stack_of

log = logging.getLogger(__name__)

FORMAT = "minicpmv-jax-orbax"
FORMAT_VERSION = 2  # 2: stacked layer parameters (1: one group per layer, no longer read)
META_FILE = "minicpmv_jax.json"
PARAMS_DIR = "params"
PROGRESS_FILE = "progress.json"
# Weight files of the official layout; everything else at the top of a folder is copied along.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


# ------------------------------------------------------------------------------------------------
# Detection and metadata
# ------------------------------------------------------------------------------------------------


def is_orbax_checkpoint(folder: str | os.PathLike) -> bool:
    """True for a complete folder written by this module (the marker file exists)."""
    f = pathlib.Path(folder) / META_FILE
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text()).get("format") == FORMAT
    except ValueError:
        return False


def read_metadata(folder: str | os.PathLike) -> dict:
    """The `minicpmv_jax.json` summary of a complete checkpoint folder."""
    folder = pathlib.Path(folder)
    if not is_orbax_checkpoint(folder):
        partial = partial_dir(folder)
        hint = f" (an unfinished conversion is at {partial}; re-run it)" if partial.exists() else ""
        raise CheckpointError(f"{folder}: not a complete {FORMAT} checkpoint{hint}")
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder}: format version {meta['format_version']} is newer than this library "
            f"supports ({FORMAT_VERSION}); upgrade minicpmv_jax"
        )
    if meta.get("format_version", 0) < FORMAT_VERSION:
        raise CheckpointError(
            f"{folder}: format version {meta.get('format_version')} stores one group per layer; "
            f"this library stacks the layers (version {FORMAT_VERSION}): convert the official "
            "checkpoint again (minicpmv-to-orbax)"
        )
    return meta


def absolute(folder: str | os.PathLike) -> pathlib.Path:
    """`folder` as an absolute path (`~` expanded): orbax refuses relative paths, and every
    public entry point here takes them."""
    return pathlib.Path(folder).expanduser().absolute()


def partial_dir(final: str | os.PathLike) -> pathlib.Path:
    final = pathlib.Path(final)
    return final.parent / f".{final.name}.partial"


# ------------------------------------------------------------------------------------------------
# Groups
# ------------------------------------------------------------------------------------------------


def group_key(path: Iterable[Any]) -> str:
    """Parameter path -> group name (see module docstring)."""
    parts = [str(getattr(p, "key", p)) for p in path]
    if stack_of(path) is not None:
        return ".".join(parts[:-1])  # llm.model.layers.mlp.up_proj: kernel (+ bias, scale)
    if parts[0] == "llm":
        return ".".join(parts[:-1])  # llm.model.embed_tokens, llm.model.norm, llm.lm_head
    return parts[0]  # vpm (embeddings, post_layernorm), resampler


def grouped(flat: Iterable[tuple[tuple, Any]]) -> dict[str, list[tuple[tuple, Any]]]:
    """Flat (path, leaf) pairs -> {group: [(path, leaf), ...]} in first-seen order."""
    out: dict[str, list] = {}
    for path, leaf in flat:
        out.setdefault(group_key(path), []).append((path, leaf))
    return out


def _nest(items: Iterable[tuple[tuple, Any]]) -> dict:
    """[(path, leaf)] -> nested dict with str keys (orbax-friendly; layer indices become "3")."""
    tree: dict = {}
    for path, leaf in items:
        node = tree
        keys = [str(getattr(p, "key", p)) for p in path]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return tree


def _get(tree: dict, path: tuple) -> Any:
    for p in path:
        tree = tree[str(getattr(p, "key", p))]
    return tree


def _value(leaf):
    return leaf.get_value() if hasattr(leaf, "get_value") else leaf


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def _primary() -> bool:
    """Process 0 does the folder bookkeeping; every process writes its own array shards."""
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(f"minicpmv_jax_{name}")


def _atomic_write_json(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False))
    os.replace(tmp, path)


class CheckpointWriter:
    """Group-by-group writer into `.<name>.partial/`, resumable, renamed at `finish()`.

    Args:
      final: the folder the finished checkpoint will have.
      signature: what is being written (source, dtype, ...): a partial folder with a different
        signature is discarded instead of resumed.
      overwrite: replace an existing complete checkpoint at `final` (only at `finish()`).
    """

    def __init__(self, final: str | os.PathLike, signature: dict, *, overwrite: bool = False):
        self.final = absolute(final)
        if self.final.exists() and not overwrite:
            raise CheckpointError(f"{self.final} exists; pass overwrite=True (--overwrite)")
        self.tmp = partial_dir(self.final)
        self.signature = signature
        self.done: list[str] = []
        self.resumed = False
        prog = self.tmp / PROGRESS_FILE
        if prog.exists():
            try:
                state = json.loads(prog.read_text())
            except ValueError:
                state = {}
            if state.get("signature") == signature:
                self.done = list(state.get("groups", []))
                self.resumed = bool(self.done)
        if _primary():
            if prog.exists() and not self.resumed and self.tmp.exists():
                log.warning("%s: discarding a partial checkpoint of a different source", self.tmp)
            if not self.resumed and self.tmp.exists():
                shutil.rmtree(self.tmp)
            (self.tmp / PARAMS_DIR).mkdir(parents=True, exist_ok=True)
            # Orbax leaves half-written groups in temporary folders; drop anything unfinished.
            for d in (self.tmp / PARAMS_DIR).iterdir():
                if d.name not in self.done:
                    shutil.rmtree(d) if d.is_dir() else d.unlink()
            self._save_progress()
        _barrier("writer_init")
        self._ckptr = ocp.StandardCheckpointer()

    def _save_progress(self) -> None:
        _atomic_write_json(
            self.tmp / PROGRESS_FILE, {"signature": self.signature, "groups": self.done}
        )

    def has(self, group: str) -> bool:
        return group in self.done

    def write_group(self, group: str, items: list[tuple[tuple, jax.Array]]) -> None:
        """Save one group's (path, array) pairs and record it as finished."""
        target = self.tmp / PARAMS_DIR / group
        # collective: every process writes the shards of its own devices
        self._ckptr.save(target, _nest(items))
        # Finish each group before the next one: bounds host memory to about one group.
        self._ckptr.wait_until_finished()
        self.done.append(group)
        if _primary():
            self._save_progress()

    @contextlib.contextmanager
    def failing_names_partial(self, group: str):
        """Re-raise an error while writing `group` as one that names the hidden
        `.<name>.partial/` folder the failed run leaves behind."""
        try:
            yield
        except Exception as e:
            raise CheckpointError(
                f"writing {self.final} stopped at parameter group {group} "
                f"({type(e).__name__}: {e}); the "
                f"unfinished checkpoint is kept in the hidden folder {self.tmp} (the same "
                "conversion resumes from it; delete it to start over)"
            ) from e

    def copy_files(self, src: str | os.PathLike) -> list[str]:
        """Copy the non-weight top-level files (config, tokenizer, processor, code) of `src`."""
        return copy_side_files(src, self.tmp)

    def finish(self, meta: dict) -> pathlib.Path:
        """Write the marker, then rename into place (the only step that makes it loadable)."""
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "groups": self.done}
        _barrier("writer_groups_done")
        if _primary():
            _atomic_write_json(self.tmp / META_FILE, meta)
            (self.tmp / PROGRESS_FILE).unlink()
            if self.final.exists():
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
        _barrier("writer_finish")
        return self.final


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy every top-level non-weight file of `src` to `dst`; returns the names copied."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        if f.suffix in WEIGHT_SUFFIXES or f.name in WEIGHT_INDEX_FILES or f.name == META_FILE:
            continue
        shutil.copyfile(f, dst / f.name)
        copied.append(f.name)
    return copied


def save(
    folder: str | os.PathLike,
    model_or_state: Any,
    *,
    side_files_from: str | os.PathLike | None = None,
    tensors: dict[str, dict] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    extra: dict | None = None,
) -> pathlib.Path:
    """Save a model's parameters (e.g. after fine-tuning) as an orbax checkpoint folder.

    Args:
      folder: output folder (created atomically).
      model_or_state: a `MiniCPMV`, an nnx module or an `nnx.State` of parameters. Sharded
        arrays are written shard by shard by their owning processes (multi-host safe).
      side_files_from: folder whose config / tokenizer files are copied along (default: none;
        `MiniCPMV.from_pretrained` needs config.json and the processor files in the folder).
      tensors: official {name: {"dtype", "shape"}} table for the safetensors export (default:
        derived from the parameters, in their own dtype).
    """
    state = _param_state(model_or_state)
    flat = list(nnx.to_flat_state(state))
    groups = grouped(flat)
    dtypes = sorted({str(_value(v).dtype) for _, v in flat})
    # a fresh signature per call: an interrupted save() is redone, not resumed (the values may
    # have changed since)
    writer = CheckpointWriter(folder, {"kind": "save", "time": time.time()}, overwrite=overwrite)
    for g, items in tqdm(groups.items(), desc="saving", unit="group", disable=not progress):
        with writer.failing_names_partial(g):
            writer.write_group(g, [(p, _value(v)) for p, v in items])
    if side_files_from is not None and _primary():
        writer.copy_files(side_files_from)
    if tensors is None:
        tensors = official_tensor_table(state)
        if side_files_from is not None:
            # keep the source checkpoint's dtypes (e.g. bfloat16) for the safetensors export
            src_table = source_tensor_table(side_files_from)
            if src_table and all(
                n in src_table and src_table[n]["shape"] == t["shape"] for n, t in tensors.items()
            ):
                tensors = {n: src_table[n] for n in tensors}
    meta = {
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "num_params": int(sum(_value(v).size for _, v in flat)),
        "bytes": int(sum(_value(v).size * _value(v).dtype.itemsize for _, v in flat)),
        "tensors": tensors,
        **(extra or {}),
    }
    return writer.finish(meta)


# safetensors header dtype -> numpy / jax dtype name
ST_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def safetensors_table(src: dict[str, Any]) -> dict[str, dict]:
    """{official name: {"dtype", "shape"}} from open safetensors headers (no tensor data read).

    Args: src: {name: (reader, file)} as yielded by `weights.open_checkpoint`.
    """
    table = {}
    for name, (reader, _) in sorted(src.items()):
        sl = reader.get_slice(name)
        dt = sl.get_dtype()
        table[name] = {"dtype": ST_DTYPES.get(dt, dt.lower()), "shape": list(sl.get_shape())}
    return table


def source_tensor_table(folder: str | os.PathLike) -> dict[str, dict]:
    """The official tensor table of an orbax folder (its metadata) or a safetensors folder."""
    from minicpmv_jax.weights import checkpoint_files, open_checkpoint

    if is_orbax_checkpoint(folder):
        return read_metadata(folder).get("tensors") or {}
    try:
        files, _ = checkpoint_files(folder)
    except CheckpointError:
        return {}
    with open_checkpoint(files) as src:
        return safetensors_table(src)


def official_tensor_table(state) -> dict[str, dict]:
    """{official tensor name: {"dtype", "shape"}} implied by a parameter state (no values read)."""
    from minicpmv_jax.weights import hf_source, unstack

    table: dict[str, dict] = {}
    for path, var in nnx.to_flat_state(state):
        v = _value(var)
        shape = tuple(v.shape)
        for i, layer_name in unstack(path, shape[0] if stack_of(path) else 0):
            # fused q/k/v (resampler.attn.in_proj_*): the rule already gives the fused shape
            name, _, src_shape = hf_source(layer_name)
            one = shape if i is None else shape[1:]
            table[name] = {"dtype": str(v.dtype), "shape": list(src_shape(one))}
    return table


def _param_state(obj: Any) -> nnx.State:
    if isinstance(obj, nnx.State):
        return obj
    module = getattr(obj, "module", obj)
    if isinstance(module, nnx.Module):
        return nnx.state(module, nnx.Param)
    raise TypeError(f"cannot save {type(obj).__name__}: expected MiniCPMV, nnx.Module or State")


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


# The two layouts of a linear layer's leaves: an nnx.Linear's `kernel` [(L,) in, out] (and an
# int8 `kernel_scale`) and a torch-layout layers.OutInDense's `weight` [(L,) out, in] (and
# `weight_scale`). A checkpoint written with one restores into a model built with the other
# (transposed on restore): the lm_head of checkpoints written before it was an OutInDense, the
# decoder projections of a model saved with another `LlmConfig.out_in` (names, not shapes, tell
# the layouts apart: q_proj and o_proj may be square).
OTHER_LAYOUT = {
    "weight": "kernel",
    "weight_scale": "kernel_scale",
    "kernel": "weight",
    "kernel_scale": "weight_scale",
}
MATRICES = ("weight", "kernel")  # the leaves whose last two axes are exchanged


def _other_layout(stored: dict, path: tuple, want: tuple) -> tuple[tuple | None, str]:
    """(the stored path of `path` in the other layout (OTHER_LAYOUT) or None, the problem to
    report when None): the checkpoint must hold it with the matching shape."""
    name, leaf = path_name(path), str(getattr(path[-1], "key", path[-1]))
    if leaf not in OTHER_LAYOUT or len(want) < 2 and leaf in MATRICES:
        return None, f"{name}: missing"
    old = tuple(path[:-1]) + (OTHER_LAYOUT[leaf],)
    try:
        have = tuple(_get(stored, old).shape)
    except KeyError:
        return None, f"{name}: missing"
    expect = _swap_last(want) if leaf in MATRICES else want
    if have != expect:
        return None, (
            f"{name}: missing, and the other layout's {path_name(old)} has shape {have}, "
            f"not {expect}"
        )
    return old, ""


def _swap_last(shape: tuple) -> tuple:
    return tuple(shape[:-2]) + (shape[-1], shape[-2])


def _swapped(target: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """`target` with its last two axes (and their shardings) exchanged."""
    sharding = target.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (target.ndim - len(sharding.spec))
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.P(*_swap_last(spec)))
    return jax.ShapeDtypeStruct(_swap_last(target.shape), target.dtype, sharding=sharding)


def restore_state(
    folder: str | os.PathLike, abstract: nnx.State, *, progress: bool = True
) -> nnx.State:
    """Restore into `abstract` (ShapeDtypeStruct leaves with shardings and dtypes).

    Each array is read straight into its target sharding (any mesh, any host count) and cast to
    the target dtype. A linear layer's matrix that the checkpoint holds in the other layout
    (`OTHER_LAYOUT`: e.g. `llm.lm_head.kernel` [D, V] for `weight` [V, D], a decoder projection's
    `weight` [L, out, in] for `kernel` [L, in, out]) is read and transposed into place. Raises
    CheckpointError naming missing / mis-shaped parameters.
    """
    folder = absolute(folder)
    meta = read_metadata(folder)
    flat = list(nnx.to_flat_state(abstract))
    groups = grouped(flat)
    missing = [g for g in groups if g not in meta["groups"]]
    if missing:
        raise CheckpointError(f"{folder}: parameter groups missing from the checkpoint: {missing}")
    ckptr = ocp.StandardCheckpointer()
    leaves = []
    for g, items in tqdm(groups.items(), desc="restoring", unit="group", disable=not progress):
        gdir = folder / PARAMS_DIR / g
        stored = ckptr.metadata(gdir).item_metadata.tree
        problems, other = [], {}  # other: {path: its stored path in the other layout}
        for path, var in items:
            want = tuple(_value(var).shape)
            try:
                have = _get(stored, path)
            except KeyError:
                old, problem = _other_layout(stored, path, want)
                if old is None:
                    problems.append(problem)
                else:
                    other[tuple(path)] = old
                continue
            if tuple(have.shape) != want:
                problems.append(f"{path_name(path)}: checkpoint {tuple(have.shape)} != {want}")
        if problems:
            raise CheckpointError(
                f"{folder}: checkpoint does not match the model config:\n  " + "\n  ".join(problems)
            )
        target = []
        for p, v in items:
            old = other.get(tuple(p))
            if old is None:
                target.append((p, _value(v)))
            else:  # the other layout's leaf, in its own shape (a matrix: transposed)
                swap = str(getattr(p[-1], "key", p[-1])) in MATRICES
                target.append((old, _swapped(_value(v)) if swap else _value(v)))
        restored = ckptr.restore(gdir, _nest(target))
        for p, v in items:
            old = other.get(tuple(p))
            if old is None:
                leaves.append((p, v.replace(_get(restored, p))))
                continue
            arr = _get(restored, old)
            if str(getattr(p[-1], "key", p[-1])) in MATRICES:
                log.info("%s: read from %s (other layout), transposed", path_name(p),
                         path_name(old))  # fmt: skip
                arr = _transpose_last(arr, _value(v).sharding)
            leaves.append((p, v.replace(arr)))
    return nnx.from_flat_state(leaves)


def _transpose_last(a: jax.Array, sharding) -> jax.Array:
    """`a` with its last two axes exchanged, placed with `sharding` (any mesh, any host count)."""
    return jax.jit(lambda x: jnp.swapaxes(x, -1, -2), out_shardings=sharding)(a)


def restore_module(
    folder: str | os.PathLike, graphdef: nnx.GraphDef, abstract: nnx.State, *, progress=True
) -> nnx.Module:
    """`restore_state` then merge into the module (the abstract model from get_abstract_model)."""
    return nnx.merge(graphdef, restore_state(folder, abstract, progress=progress))


def iter_group_arrays(
    folder: str | os.PathLike, *, progress: bool = False
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Yield (group, {parameter path: host numpy array}) for every group, one group in memory.

    Reads on this host only (single-device CPU target), independent of any model config.
    """
    folder = absolute(folder)
    meta = read_metadata(folder)
    ckptr = ocp.StandardCheckpointer()
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    for g in tqdm(meta["groups"], desc="reading", unit="group", disable=not progress):
        gdir = folder / PARAMS_DIR / g
        stored = ckptr.metadata(gdir).item_metadata.tree
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu), stored
        )
        restored = ckptr.restore(gdir, target)
        out = {}
        for keypath, arr in jax.tree_util.tree_leaves_with_path(restored):
            name = ".".join(str(getattr(k, "key", k)) for k in keypath)
            out[name] = np.asarray(arr)
        del restored
        yield g, out


def param_path(name: str) -> tuple:
    """'llm.model.layers.mlp.up_proj.kernel' -> ('llm', 'model', 'layers', 'mlp', ...)."""
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


# ------------------------------------------------------------------------------------------------
# Training state (minicpmv_jax.train.loop)
# ------------------------------------------------------------------------------------------------

TRAIN_STATE_FILE = "train_state.json"


def save_train_state(folder: str | os.PathLike, arrays: dict[str, Any], meta: dict) -> pathlib.Path:
    """Save {name: array} (parameters or adapters, optimizer state, RNG) and JSON `meta` (step,
    data position) atomically: written into `.<name>.partial/`, renamed when complete, so a run
    killed mid-save leaves the previous save intact."""
    final = pathlib.Path(folder).absolute()  # orbax needs absolute paths
    tmp = partial_dir(final)
    if _primary() and tmp.exists():
        shutil.rmtree(tmp)
    _barrier("train_state_init")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / PARAMS_DIR, arrays)
    ckptr.wait_until_finished()
    _barrier("train_state_arrays")
    if _primary():
        _atomic_write_json(tmp / TRAIN_STATE_FILE, meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier("train_state_finish")
    return final


def restore_train_state(folder: str | os.PathLike, abstract: dict[str, Any]) -> tuple[dict, dict]:
    """({name: array} restored into `abstract`'s shapes / shardings, meta) of save_train_state."""
    folder = pathlib.Path(folder).absolute()
    meta_file = folder / TRAIN_STATE_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{folder}: not a training-state folder ({TRAIN_STATE_FILE} missing)")
    arrays = ocp.StandardCheckpointer().restore(folder / PARAMS_DIR, abstract)
    return arrays, json.loads(meta_file.read_text())
