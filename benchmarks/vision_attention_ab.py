"""A/B of the 2.x vision tower's CPU attention: the encode program (tower + resampler) of one
image, with `vision.CPU_HEADS_FIRST` off ("old": `layers.attend`) and on ("new": the
heads-first attention), both compiled in one process and timed interleaved.

    python -m benchmarks.vision_attention_ab --ckpt /tmp/chatmem/ckpt --dtype bfloat16 --rounds 3

Prints per-round seconds, the compiled temporaries (`memory_analysis()`) of each program and
the largest absolute difference of their outputs as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from PIL import Image

from minicpmv_jax import MiniCPMV, vision
from minicpmv_jax import generate as G


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--image", default="1024x768", help="speed_inputs/<name>.png of --ckpt")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    args = ap.parse_args()
    model = MiniCPMV.from_pretrained(args.ckpt, dtype=args.dtype, progress=False)
    sampler = model.sampler
    img = Image.open(os.path.join(args.ckpt, "speed_inputs", args.image + ".png"))
    po = model.processor([{"role": "user", "content": [img, "Describe the image."]}])
    n = G._num_slices(po)
    batch = G.VisionBatch.stack([po]).pad_to(sampler.buckets.slice_bucket(n))
    res = {"dtype": args.dtype, "slices": n, "patches": list(batch.pixel_patches.shape)}
    programs, outs = {}, {}
    with sampler.context():
        for name in ("old", "new"):
            vision.CPU_HEADS_FIRST = name == "new"
            jax.clear_caches()  # the flag is read at trace time
            lowered = jax.jit(G._encode, static_argnums=0).lower(
                sampler.graphdef, sampler.state, batch
            )
            programs[name] = lowered.compile()
            temp = programs[name].memory_analysis().temp_size_in_bytes
            res[name] = {"temp_bytes": int(temp), "seconds": []}
        for r in range(args.rounds + 1):
            for name, program in programs.items():
                t0 = time.perf_counter()
                feats, rows = jax.block_until_ready(program(sampler.state, batch))
                if r:
                    res[name]["seconds"].append(round(time.perf_counter() - t0, 3))
                else:
                    outs[name] = (np.asarray(feats)[:n], np.asarray(rows))
    for i, stage in enumerate(("vision", "resampler")):
        res[f"max_abs_diff_{stage}"] = float(np.abs(outs["old"][i] - outs["new"][i]).max())
        res[f"max_abs_{stage}"] = float(np.abs(outs["old"][i]).max())
    print(json.dumps(res))


if __name__ == "__main__":
    main()
