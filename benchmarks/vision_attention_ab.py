"""A/B of the 2.x vision tower's CPU attention: the encode program (tower + resampler) or the
prefill program (tower, resampler, LLM prompt into a fresh KV cache: time to first token) of
one image and a question, with `vision.CPU_HEADS_FIRST` off ("old": `layers.attend`) and on
("new": the heads-first attention), both compiled in one process and timed interleaved.

    python -m benchmarks.vision_attention_ab --ckpt /tmp/chatmem/ckpt --dtype bfloat16 --rounds 3
    python -m benchmarks.vision_attention_ab --ckpt /tmp/chatmem/ckpt --program prefill

Prints per-round seconds, the compiled temporaries (`memory_analysis()`) of each program and
the largest absolute difference of their outputs (prefill: the first token's logits and its
argmax) as one JSON line.
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
    ap.add_argument("--program", choices=("encode", "prefill"), default="encode")
    args = ap.parse_args()
    model = MiniCPMV.from_pretrained(args.ckpt, dtype=args.dtype, progress=False)
    sampler = model.sampler
    img = Image.open(os.path.join(args.ckpt, "speed_inputs", args.image + ".png"))
    question = "What is in this image? Describe it."  # benchmarks.chat_speed's
    po = model.processor([{"role": "user", "content": [img, question]}])
    n = G._num_slices(po)
    res = {"dtype": args.dtype, "program": args.program, "slices": n}
    if args.program == "encode":
        batch = G.VisionBatch.stack([po]).pad_to(sampler.buckets.slice_bucket(n))
        fn, jit_kw = G._encode, {}

        def inputs():
            return (batch,)

        def keep(out):  # (tower features [I, P, Dv], resampler rows [G, Q, D])
            return {"vision": np.asarray(out[0])[:n], "resampler": np.asarray(out[1])}
    else:
        prepared = sampler.prepare([po])
        batch = prepared.vision
        _, _, cache_len = sampler.cache_len(max(prepared.lengths), 1)
        fn, jit_kw = G._prefill, {"donate_argnums": 2}

        def inputs():  # a fresh cache per call (it is donated)
            return jax.block_until_ready(sampler._cache(1, cache_len)), prepared

        def keep(out):  # (first token's logits [1, V], cache)
            return {"logits": np.asarray(out[0])}

    res["patches"] = list(batch.pixel_patches.shape)
    programs, outs = {}, {}
    with sampler.context():
        for name in ("old", "new"):
            vision.CPU_HEADS_FIRST = name == "new"
            jax.clear_caches()  # the flag is read at trace time
            jitted = jax.jit(fn, static_argnums=0, **jit_kw)
            programs[name] = jitted.lower(sampler.graphdef, sampler.state, *inputs()).compile()
            temp = programs[name].memory_analysis().temp_size_in_bytes
            res[name] = {"temp_bytes": int(temp), "seconds": []}
        for r in range(args.rounds + 1):
            for name, program in programs.items():
                args_r = inputs()
                t0 = time.perf_counter()
                out = jax.block_until_ready(program(sampler.state, *args_r))
                if r:
                    res[name]["seconds"].append(round(time.perf_counter() - t0, 3))
                else:
                    outs[name] = keep(out)
    for stage, old in outs["old"].items():
        res[f"max_abs_diff_{stage}"] = float(np.abs(old - outs["new"][stage]).max())
        res[f"max_abs_{stage}"] = float(np.abs(old).max())
    if args.program == "prefill":
        res["argmax"] = [int(outs[name]["logits"].argmax()) for name in ("old", "new")]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
