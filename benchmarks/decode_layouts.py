"""bf16 batch-1 decode step of one checkpoint in several decoder layouts (`LlmConfig.out_in`).

Loads the checkpoint once per layout with `MiniCPMV.from_pretrained(..., out_in=...)`, all in
one process, runs one greedy chat turn on the 448x448 image of `benchmarks.chat_speed` (its
`speed_inputs`, written by that benchmark) to compile, then `--rounds` rounds of the same turn
over every layout, in alternating order, and reports the median seconds per decode step (the
decode loop of `Sampler.run`, `--new-tokens` - 1 forwards). Layouts:

  none  every projection [in, out] (float32's and GPU / TPU's layout)
  down  down_proj [out, in]
  mlp   gate / up / down_proj [out, in] (`model.CPU_BF16_OUT_IN`, the bf16 CPU choice)
  all   the seven projections [out, in]

    python -m benchmarks.decode_layouts --model /tmp/chatmem/ckpt --layouts none,down,mlp,all
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

LAYOUTS = {
    "none": (),
    "down": ("down_proj",),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
QUESTION = "What is in this image? Describe it."  # benchmarks.chat_memory.QUESTION


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/tmp/chatmem/ckpt", help="checkpoint folder")
    ap.add_argument("--layouts", default="none,mlp", help=f"comma-separated, of {list(LAYOUTS)}")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    names = args.layouts.split(",")
    if unknown := [n for n in names if n not in LAYOUTS]:
        raise SystemExit(f"--layouts: unknown {unknown}; choose from {list(LAYOUTS)}")

    import jax
    from PIL import Image

    from minicpmv_jax import MiniCPMV
    from minicpmv_jax.settings import GenerationSettings

    print("load average", os.getloadavg(), flush=True)
    image = Image.open(os.path.join(args.model, "speed_inputs", "448x448.png"))
    messages = [{"role": "user", "content": [image, QUESTION]}]
    turn = GenerationSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    models, request = {}, None
    for n in names:
        t0 = time.perf_counter()
        model = MiniCPMV.from_pretrained(
            args.model, dtype=args.dtype, progress=False, out_in=LAYOUTS[n]
        )
        jax.block_until_ready(model.state)
        load = time.perf_counter() - t0
        request = request or model.processor(messages)
        t0 = time.perf_counter()
        out = model.sampler.run([request], turn)
        first = time.perf_counter() - t0
        print(f"{n}: load {load:.2f} s, first turn {first:.1f} s, ids {out.sequences[0][:6]}")
        models[n] = model
    steps = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            out = models[n].sampler.run([request], turn)
            steps[n].append(out.timings["decode"] / (out.num_steps - 1))
        print(r, {n: round(v[-1] * 1e3, 2) for n, v in steps.items()}, flush=True)
    median = {n: float(np.median(v)) * 1e3 for n, v in steps.items()}
    print("median ms/step", {n: round(v, 2) for n, v in median.items()})
    print(f"{names[0]} / layout", {n: round(median[names[0]] / v, 3) for n, v in median.items()})
    print("load average", os.getloadavg(), flush=True)


if __name__ == "__main__":
    main()
