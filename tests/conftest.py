"""Shared test setup: 8 simulated CPU devices, float32 matmuls, fixture paths."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import pathlib
import shutil
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
VERSIONS = ("minicpm-llama3-v-2_5", "minicpm-v-2_6", "minicpm-v-4_5")


def case_dirs(version: str) -> list[pathlib.Path]:
    """All golden cases of one fixture folder, sorted by name."""
    return sorted(p for p in (FIXTURES / version / "cases").iterdir() if p.is_dir())


def all_cases(versions=VERSIONS) -> list[tuple[str, pathlib.Path]]:
    return [(v, c) for v in versions for c in case_dirs(v)]


def case_id(param) -> str:
    v, c = param
    return f"{v}/{c.name}"


def load_case(case: pathlib.Path) -> dict:
    """case.json plus every .npz of the case (missing files are absent keys)."""
    out = {"case": json.loads((case / "case.json").read_text()), "dir": case}
    for name in ("processor", "vision", "resampler", "llm"):
        f = case / f"{name}.npz"
        if f.exists():
            with np.load(f) as z:
                out[name] = {k: z[k] for k in z.files}
    return out


def case_tgt_sizes(case: pathlib.Path) -> np.ndarray:
    """The processor fixture's slice grids [n, 2] of a case (n = 0 without images)."""
    tgt = load_case(case).get("processor", {}).get("tgt_sizes")
    return np.zeros((0, 2), np.int64) if tgt is None else tgt.reshape(-1, 2)


def case_pil_messages(case_dir, case_json) -> list[dict]:
    """msgs as the MANIFEST says: {"image": f} -> PIL RGB image, {"text": s} -> s."""
    msgs = []
    for m in case_json["messages"]:
        content = []
        for item in m["content"]:
            if "image" in item:
                with Image.open(case_dir / item["image"]) as im:
                    content.append(im.convert("RGB"))
            else:
                content.append(item["text"])
        msgs.append({"role": m["role"], "content": content})
    return msgs


# One persistent compilation cache per test run, made by the first pytest process and inherited
# by the xdist workers, notebook kernels and CLI subprocesses: a program that another process of
# the same run has compiled is loaded instead of compiled again (most tests share the tiny fixture
# models). Created empty for each run and removed at its end, so every run compiles from scratch.
_RUN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _RUN_CACHE = tempfile.mkdtemp(prefix="minicpmv-jax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_configure(config):
    if "jax" in sys.modules:  # imported before this file (a plugin): the environment came late
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update(
            "jax_persistent_cache_min_compile_time_secs",
            float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")),
        )


def pytest_unconfigure(config):
    if _RUN_CACHE is not None:
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)


# Test files, most expensive first (seconds of each file in a full run on the 2-core machine:
# CPU seconds, or wall seconds where the work runs in subprocesses; the files not named here
# cost less and run after these in collection order).
# pyproject.toml turns off xdist's reordering by test count, so the workers take files in this
# order as they become free: no expensive file starts last while the other worker idles.
EXPENSIVE_FIRST = (
    "test_train_loss.py",  # ~110 s
    "test_generate.py",  # ~95 s
    "test_model.py",  # ~90 s
    "test_train_lora_paths.py",  # ~55 s
    "test_generate_parity.py",  # ~55 s
    "test_quant.py",  # ~40 s
    "test_sampling.py",  # ~40 s
    "test_train_dpo.py",  # ~40 s
    "test_cli.py",  # ~35 s
    "test_model_static.py",  # ~35 s
    "test_v46_model.py",  # ~30 s
    "test_kernels.py",  # ~30 s
    "test_train_cli.py",  # ~30 s
    "test_serve_engine.py",  # ~30 s
    "test_train_memory.py",  # ~25 s
    "test_checkpoint.py",  # ~25 s
    "test_convert.py",  # ~20 s
    "test_bench.py",  # ~20 s
    "test_sharding.py",  # ~20 s
    "test_v46_scale.py",  # ~15 s
    "test_chat.py",  # ~15 s
    "test_vision_memory.py",  # ~12 s
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(EXPENSIVE_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, at most 4 (each worker holds its own compiled models)."""
    return max(1, min(os.cpu_count() or 1, 4))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES
