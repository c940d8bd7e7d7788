"""Peak memory of vision-heavy requests on a fixture checkpoint, each case in its own process.

Cases (issue 11's bounded-memory targets):

* ``video-10min``: MiniCPM-V 4.5's example sampling of a 10-minute 30 fps video (``choose_fps``
  5: 540 frames packed 3 per group into 180 groups, ``max_slice_nums`` 1), 640x360 frames.
* ``photos-8``: eight 4032x3024 photos in one MiniCPM-V 2.6 message (each: source + 9 slices).

Each case runs ``model.chat(...)`` in a fresh process and reports the process's peak resident
set (``ru_maxrss``: model, processor output, frames, compiled programs, everything), next to the
compiled vision program's memory (XLA ``memory_analysis()`` of tower + resampler: arguments
without weights, outputs, temporaries) and ``memory.plan``'s vision activations for the same
shapes. The vision tower and resampler run ``vision_batch_size`` slices at a time (config.json,
default 16), so that number, not the frame count, sets the activation memory.

    python -m benchmarks.vision_memory
    python -m benchmarks.vision_memory --case photos-8 --vision-batch-size 64
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

FIXTURES = pathlib.Path(__file__).parents[1] / "tests" / "fixtures"
CASES = ("video-10min", "photos-8")
GiB = 1024**3


def _frames(n: int, size: tuple[int, int], seed: int) -> list:
    """n distinct synthetic RGB frames (smooth gradients + noise: resizing does real work)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    out = []
    for i in range(n):
        noise = rng.integers(0, 32, (h, w, 3), dtype=np.uint8)
        img = (ramp * ((i % 7) + 1) / 7 + noise).astype(np.uint8)
        out.append(Image.fromarray(np.broadcast_to(img, (h, w, 3)).copy()))
    return out


def request(case: str) -> tuple[str, list[dict], dict]:
    """(fixture folder, chat messages, chat() keyword arguments) of one case."""
    if case == "video-10min":
        from minicpmv_jax.video import sample_frames_45, temporal_ids_45

        fps, seconds = 30.0, 600
        idx, packing = sample_frames_45(int(fps * seconds), fps, choose_fps=5)
        tids = temporal_ids_45(idx, fps, int(fps * seconds), packing)
        frames = _frames(len(idx), (640, 360), 0)
        msgs = [{"role": "user", "content": [*frames, "Describe the video."]}]
        kw = {"use_image_id": False, "max_slice_nums": 1, "temporal_ids": tids}
        return "minicpm-v-4_5", msgs, kw
    if case == "photos-8":
        photos = _frames(8, (4032, 3024), 1)
        return "minicpm-v-2_6", [{"role": "user", "content": [*photos, "Compare them."]}], {}
    raise ValueError(f"unknown case {case!r}; expected one of {CASES}")


def checkpoint_with_batch_size(folder: str, vision_batch_size: int | None, tmp: str) -> str:
    """The fixture checkpoint, or a copy whose config.json sets `vision_batch_size`."""
    src = FIXTURES / folder / "checkpoint"
    if vision_batch_size is None:
        return str(src)
    dst = pathlib.Path(tmp) / folder
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vision_batch_size"] = vision_batch_size
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def vision_program_bytes(model, num_slices: int, patch_bucket: int) -> dict[str, int]:
    """XLA's memory analysis of the vision tower + resampler program (compiled, not run)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minicpmv_jax.model import encode_images

    graphdef, state = nnx.split(model.module)
    sds = jax.ShapeDtypeStruct
    i, p = num_slices, patch_bucket
    args = (
        sds((i, p, model.config.vision.patch_dim), jnp.float32),  # pixel_patches
        sds((i, p), jnp.int32),  # position_ids
        sds((i, p), bool),  # vision_mask
        sds((i, p), bool),  # patch_valid
        sds((i, 2), jnp.int32),  # tgt_sizes
        sds((i,), jnp.int32),  # temporal_ids
        sds((i,), jnp.int32),  # group_index
    )

    def encode(state, *a):
        return encode_images(nnx.merge(graphdef, state), *a, num_groups=i)

    with model._precision():
        ma = jax.jit(encode).lower(state, *args).compile().memory_analysis()
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    return {
        "inputs": int(ma.argument_size_in_bytes - weights),
        "outputs": int(ma.output_size_in_bytes),
        "temp": int(ma.temp_size_in_bytes),
        "total": int(ma.argument_size_in_bytes - weights + ma.output_size_in_bytes)
        + int(ma.temp_size_in_bytes),
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM of its own address space.

    Not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries the hiwater mark of the address space
    a process replaced by exec into it, and a forked child's copy starts at the parent's RSS, so
    a child of a large process (a pytest worker after the training tests) reports the parent's
    peak instead of its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best effort


def run_case(case: str, vision_batch_size: int | None, max_new_tokens: int = 4) -> dict[str, Any]:
    """Run one case in this process; returns the measurements (peak RSS last)."""
    from minicpmv_jax import MiniCPMV, memory
    from minicpmv_jax.batching import Buckets

    folder, msgs, kw = request(case)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint_with_batch_size(folder, vision_batch_size, tmp)
        model = MiniCPMV.from_pretrained(ckpt, dtype="float32", progress=False)
    batch = model.processor(msgs, **kw)  # the shapes chat() will see
    i = Buckets().slice_bucket(len(batch["tgt_sizes"]))
    p = int(batch["pixel_patches"].shape[1])
    del batch
    program = vision_program_bytes(model, i, p)
    plan = memory.plan(model.config, num_slices=i, patch_bucket=p, prompt_len=1, cache_len=1)
    answer = model.chat(msgs, max_new_tokens=max_new_tokens, seed=0, **kw)
    return {
        "case": case,
        "vision_batch_size": model.config.vision.batch_size,
        "slices": int(sum(1 for m in msgs[0]["content"] if not isinstance(m, str))),
        "slice_bucket": int(i),
        "patch_bucket": int(p),
        "vision_program": program,
        "plan_vision_activations": int(plan.detail["vision_activations"]),
        "answer_chars": len(answer),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def measure(case: str, vision_batch_size: int | None = None) -> dict[str, Any]:
    """`run_case` in a fresh Python process (peak RSS of that process alone)."""
    cmd = [sys.executable, "-m", "benchmarks.vision_memory", "--case", case, "--child", "--json"]
    if vision_batch_size is not None:
        cmd += ["--vision-batch-size", str(vision_batch_size)]
    root = pathlib.Path(__file__).parents[1]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{case} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vision_memory", description=__doc__)
    ap.add_argument("--case", choices=CASES, action="append")
    ap.add_argument("--vision-batch-size", type=int, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print one JSON line per case")
    args = ap.parse_args(argv)
    for case in args.case or CASES:
        if args.child:
            r = run_case(case, args.vision_batch_size)
        else:
            r = measure(case, args.vision_batch_size)
        if args.json:
            print(json.dumps(r))
            continue
        v = r["vision_program"]
        print(
            f"{r['case']}: {r['slices']} images -> slice bucket {r['slice_bucket']} x "
            f"{r['patch_bucket']} patches, vision_batch_size {r['vision_batch_size']}: "
            f"peak RSS {r['peak_rss_bytes'] / GiB:.2f} GiB; vision program "
            f"{v['total'] / GiB:.3f} GiB (inputs {v['inputs'] / GiB:.3f}, outputs "
            f"{v['outputs'] / GiB:.3f}, temporaries {v['temp'] / GiB:.3f}); memory.plan "
            f"vision activations {r['plan_vision_activations'] / GiB:.3f} GiB",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
