"""Shared helpers of the fine-tuning tests: the fixture checkpoints with their training tokenizer.

The training fixtures (`<version>/train/`, see its MANIFEST.md) load `checkpoint/` with the
tokenizer files of `train/tokenizer/` (the tiny BPE gains single tokens 'assistant' / '\\n\\n' so
that the official trained-span search works); `train_checkpoint` builds that folder from links.
"""

import functools
import json
import pathlib
import tempfile

import numpy as np
from conftest import FIXTURES, VERSIONS

TRAIN_VERSIONS = VERSIONS

# Compile options of the tests that compile a program only to compare it with a variant of
# itself (remat policies) or to read its memory_analysis(): LLVM's optimisation level changes the
# machine code, not XLA's buffer assignment (the same memory_analysis), and halves the compile
# time of these small programs.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def train_dir(version: str) -> pathlib.Path:
    return FIXTURES / version / "train"


@functools.cache
def train_checkpoint(version: str) -> pathlib.Path:
    """A folder = checkpoint/ with train/tokenizer/'s files in place of its tokenizer files."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix=f"train-{version}-"))
    tokenizer = {f.name: f for f in (train_dir(version) / "tokenizer").iterdir()}
    for f in (FIXTURES / version / "checkpoint").iterdir():
        (folder / f.name).symlink_to(tokenizer.pop(f.name, f).resolve())
    for name, f in tokenizer.items():
        (folder / name).symlink_to(f.resolve())
    return folder


@functools.cache
def load_train_model(version: str):
    """The tiny float32 model with the training tokenizer, loaded once per session."""
    from minicpmv_jax import MiniCPMV

    return MiniCPMV.from_pretrained(train_checkpoint(version), dtype="float32", progress=False)


@functools.cache
def processor(version: str):
    from minicpmv_jax import MiniCPMVProcessor

    return MiniCPMVProcessor.from_pretrained(train_checkpoint(version))


def sft_samples(version: str) -> list[tuple[dict, dict]]:
    """(official sample, samples.json entry) pairs of the fixture's sft/ folder."""
    sft = train_dir(version) / "sft"
    samples = json.loads((sft / "data.json").read_text())
    meta = json.loads((sft / "samples.json").read_text())["samples"]
    return list(zip(samples, meta, strict=True))


def sample_arrays(version: str, npz: str) -> dict[str, np.ndarray]:
    with np.load(train_dir(version) / "sft" / npz) as z:
        return {k: z[k] for k in z.files}


def fixture_batch(version: str):
    """(collated official batch arrays, batch.json, the batch rows' sample files)."""
    d = train_dir(version) / "batch"
    meta = json.loads((d / "batch.json").read_text())
    with np.load(d / "batch.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, meta


@functools.cache
def adapter_model(version: str):
    """The training model with the fixture's PEFT adapter (batch/lora/adapter) merged in."""
    from minicpmv_jax import MiniCPMV

    return MiniCPMV.from_pretrained(
        train_checkpoint(version),
        dtype="float32",
        progress=False,
        adapter=train_dir(version) / "batch" / "lora" / "adapter",
    )


def batch_rows(version: str, model) -> list[dict]:
    """Training examples of the fixture batch's rows (batch.json "samples"), in order."""
    from minicpmv_jax import train

    _, meta = fixture_batch(version)
    names = [m["name"] for _, m in sft_samples(version)]
    sft = train_dir(version) / "sft"
    return [
        train.training_example(model, sft_samples(version)[names.index(n)][0], image_root=sft)
        for n in meta["samples"]
    ]


def fixture_logits(version: str, name: str) -> np.ndarray:
    with np.load(train_dir(version) / "batch" / name) as z:
        return z[z.files[0]]


def dpo_dir(version: str) -> pathlib.Path:
    return train_dir(version) / "dpo"


@functools.cache
def reference_checkpoint(version: str) -> pathlib.Path:
    """train_checkpoint(version) with dpo/reference_checkpoint's weights (the DPO reference)."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix=f"reference-{version}-"))
    weights = dpo_dir(version) / "reference_checkpoint" / "model.safetensors"
    for f in train_checkpoint(version).iterdir():
        (folder / f.name).symlink_to(weights.resolve() if f.name == weights.name else f.resolve())
    return folder


@functools.cache
def load_reference_model(version: str):
    from minicpmv_jax import MiniCPMV

    return MiniCPMV.from_pretrained(reference_checkpoint(version), dtype="float32", progress=False)


class Killed(Exception):
    pass


def stop_after_step(monkeypatch, step):
    """Training runs raise Killed after `step`'s save and metrics row (a killed process)."""
    from minicpmv_jax import train

    run = train.Trainer.run

    def kill(row):
        if row["step"] == step:
            raise Killed

    monkeypatch.setattr(train.Trainer, "run", lambda self, **kw: run(self, **kw, on_step=kill))
