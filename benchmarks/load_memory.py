"""Peak host memory while loading a full-size MiniCPM-V 2.6 bf16 checkpoint.

Writes a random checkpoint with the released 2.6 dimensions (sharded safetensors + index, bf16,
official tensor names), then loads it with `MiniCPMV.from_pretrained(dtype="bfloat16")` in a
fresh subprocess while a thread samples /proc/self/status every 5 ms. Reports the checkpoint size,
the largest tensor, the loaded parameter bytes and the peak resident memory (VmHWM and the peak of
anonymous memory, RssAnon). Target: peak < checkpoint size + one tensor (+ the Python/JAX runtime).

`--layers N` writes only N of the 28 LLM layers (a smaller machine; the per-layer figures are
printed so the full-size number can be extrapolated). Run:

    python -m benchmarks.load_memory --out /tmp/minicpmv26_random [--layers 28] [--keep]

Measured on the 2-core / 24 GB development machine (AMD EPYC, 2026-11-21):
  --layers 28 (full size): checkpoint 16.20 GB in 4 shards, largest tensor 1.09 GB, load 53.9 s;
    peak RSS 16.55 GB = runtime 0.20 GB + checkpoint + 0.14 GB (0.13 x the largest tensor)
  --layers 8: checkpoint 6.88 GB, peak RSS - runtime = checkpoint + 0.05 GB
  --layers 2: checkpoint 4.08 GB, peak RSS - runtime = checkpoint + 0.58 GB
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE_CONFIG = ROOT / "tests" / "fixtures" / "minicpm-v-2_6" / "checkpoint" / "config.json"
SHARD_BYTES = 4 * 1024**3  # ~4 GB per shard, as the released checkpoints


def released_26_config(layers: int) -> dict:
    """config.json of the fixture with the released 2.6 dimensions (spec §2, §3.1)."""
    hf = json.loads(FIXTURE_CONFIG.read_text())
    hf.update(
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        num_hidden_layers=layers,
        max_window_layers=layers,
        vocab_size=151666,
        query_num=64,
    )
    hf["vision_config"].update(
        hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27
    )
    return hf


def tensor_table(hf: dict) -> dict[str, tuple[int, ...]]:
    """Official tensor name -> shape, derived from the model's own parameter tree."""
    from minicpmv_jax.checkpoint import official_tensor_table
    from minicpmv_jax.config import MiniCPMVConfig
    from minicpmv_jax.model import MiniCPMV

    cfg = MiniCPMVConfig.from_hf(hf, dtype="bfloat16")
    _, abstract = MiniCPMV.abstract_module(cfg)
    return {name: tuple(t["shape"]) for name, t in official_tensor_table(abstract).items()}


def write_checkpoint(out: pathlib.Path, hf: dict) -> tuple[int, int]:
    """Stream random bf16 tensors into ~4 GB shards; returns (total bytes, largest tensor bytes)."""
    import ml_dtypes

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    table = tensor_table(hf)
    rng = np.random.default_rng(0)
    # One random 32M-element block, sliced/tiled into every tensor: writing is disk-bound.
    block = (rng.standard_normal(32 * 1024 * 1024, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    block_bytes = block.view(np.uint16).tobytes()
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(table):
        nbytes = 2 * math.prod(table[name])
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total, largest = {}, 0, 0
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for n in names:
            nbytes = 2 * math.prod(table[n])
            header[n] = {
                "dtype": "BF16",
                "shape": list(table[n]),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            largest = max(largest, nbytes)
            weight_map[n] = fname
        header["__metadata__"] = {"format": "pt"}
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for n in names:
                left = 2 * math.prod(table[n])
                while left:
                    chunk = block_bytes[: min(left, len(block_bytes))]
                    f.write(chunk)
                    left -= len(chunk)
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total, largest


MEASURE = r"""
import json, os, sys, threading, time, resource
peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
done = False
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in peak:
            out[k] = int(v.split()[0]) * 1024
    return out
def poll():
    while not done:
        for k, v in status().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.005)
import jax, numpy as np
from minicpmv_jax.model import MiniCPMV
base = status()
t = threading.Thread(target=poll, daemon=True); t.start()
t0 = time.time()
m = MiniCPMV.from_pretrained(sys.argv[1], dtype="bfloat16", load_processor=False, progress=False)
jax.block_until_ready(m.state)
secs = time.time() - t0
done = True; t.join()
params = sum(x.nbytes for x in jax.tree.leaves(m.state))
print(json.dumps(dict(base=base, peak=peak, vmhwm=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      param_bytes=params, seconds=secs)))
"""


def measure(folder: pathlib.Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    res = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    if res.returncode:
        raise SystemExit(res.stderr[-4000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/minicpmv26_random", type=pathlib.Path)
    ap.add_argument("--layers", type=int, default=28, help="LLM layers to write (released: 28)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = ap.parse_args(argv)
    free = shutil.disk_usage(args.out.parent).free
    hf = released_26_config(args.layers)
    t0 = time.time()
    total, largest = write_checkpoint(args.out, hf)
    gen = time.time() - t0
    print(
        f"checkpoint: {total / 1e9:.2f} GB in {len(list(args.out.glob('*.safetensors')))} shards "
        f"({args.layers} LLM layers; written in {gen:.0f} s; disk free before {free / 1e9:.0f} GB)"
    )
    r = measure(args.out)
    gb = 1e9
    over = r["peak"]["VmRSS"] - r["base"]["VmRSS"]
    print(
        f"largest tensor: {largest / gb:.2f} GB; loaded params: {r['param_bytes'] / gb:.2f} GB; "
        f"load time {r['seconds']:.1f} s"
    )
    print(f"runtime before loading (python+jax): RSS {r['base']['VmRSS'] / gb:.2f} GB")
    print(
        f"peak RSS {r['peak']['VmRSS'] / gb:.2f} GB (VmHWM {r['vmhwm'] / gb:.2f} GB), "
        f"peak anon {r['peak']['RssAnon'] / gb:.2f} GB, peak file-backed {r['peak']['RssFile'] / gb:.2f} GB"
    )
    print(
        f"peak RSS - runtime baseline = {over / gb:.2f} GB = checkpoint + "
        f"{(over - total) / gb:.2f} GB ({(over - total) / largest:.2f} x largest tensor)"
    )
    if not args.keep:
        shutil.rmtree(args.out)
    return r


if __name__ == "__main__":
    main()
