"""Time to first token and batch-1 decode of a chat turn: ours vs a PyTorch peer (issue 16).

The checkpoint and the peer are those of `benchmarks.chat_memory` (a random checkpoint in the
official 2.6 layout: the real SigLIP-400M tower, the 2.6 resampler, a Qwen2-0.5B-geometry LLM
with the real 151,666-token vocabulary, 1.05 B parameters stored bf16; the peer composed from
transformers' `Idefics2VisionTransformer`, the official resampler forward and
`Qwen2ForCausalLM`, loaded from the same safetensors). Each side runs in a fresh process per
dtype, one after the other, and measures on the same processor output (the parent writes it):

  ttft    time to first token of a 448x448 (1 slice) and a 1024x768 (5 slices) image with a
          short question: vision tower, resampler, embedding merge, LLM prefill into a KV cache
          and the first token's argmax, host read included. Ours: `Sampler.run` with one new
          token (its host-side batching included); peer: the slices of one size as one batch
          through the tower (no padding: a conservative peer), the resampler per slice, then
          the prefill into a `StaticCache`. The processor is outside on both sides (ours is
          reported apart as `processor_s`). The first call (ours: compilation) is reported
          apart; then the median of `--repeats` calls.
  decode  batch-1 greedy decode after the 448x448 prompt: seconds per token over
          `--new-tokens` - 1 forwards (the first token comes from the prefill). Ours: the
          compiled decode loop of `Sampler.run`; peer: single-token forwards over the static
          cache with an argmax per step (static-cache `generate` minus its logits processors).

The generated token ids of both sides are recorded (`same_ids` per dtype). Run on an otherwise
idle machine, e.g.

    python -m benchmarks.chat_speed --out /tmp/chatmem/ckpt --keep --dtypes bfloat16 \
        --json benchmarks/results/chat-speed-2.6-cpu-bf16.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

from benchmarks.chat_memory import (
    PEER_LOAD,
    PRELUDE,
    QUESTION,
    ROOT,
    TOKENIZER,
    config_658m,
    finish_report,
    loadavg,
)
from benchmarks.load_memory import write_checkpoint

IMAGES = {"448x448": (448, 448), "1024x768": (1024, 768)}  # name: (width, height)


def write_inputs(folder: pathlib.Path, out_dir: pathlib.Path) -> dict:
    """Processor output of each benchmark image -> <name>.npz (+ .png); both sides read them."""
    from PIL import Image

    from minicpmv_jax.processor import MiniCPMVProcessor

    proc = MiniCPMVProcessor.from_pretrained(folder)
    info = {}
    for name, (w, h) in IMAGES.items():
        rng = np.random.default_rng(w * h)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(out_dir / f"{name}.png")
        o = proc([{"role": "user", "content": [img, QUESTION]}])
        arrays = {"input_ids": o["input_ids"], "image_bound": o["image_bound"],
                  "tgt_sizes": o["tgt_sizes"]}  # fmt: skip
        for i, (ph, pw) in enumerate(o["tgt_sizes"]):
            ph, pw = int(ph), int(pw)
            # patch vectors (c, kh, kw) in row-major patch order -> the [3, 14h, 14w] slice
            pix = o["pixel_patches"][i, : ph * pw].reshape(ph, pw, 3, 14, 14)
            arrays[f"pixel_values_{i}"] = pix.transpose(2, 0, 3, 1, 4).reshape(3, 14 * ph, 14 * pw)
        np.savez(out_dir / f"{name}.npz", **arrays)
        info[name] = {"slices": len(o["tgt_sizes"]), "prompt_tokens": len(o["input_ids"]),
                      "patches": [int(a) * int(b) for a, b in o["tgt_sizes"]]}  # fmt: skip
    return info


WORKER_ARGS = r"""
images = json.loads(sys.argv[4])
new_tokens, repeats = int(sys.argv[5]), int(sys.argv[6])
def med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
"""

OURS = (
    PRELUDE
    + WORKER_ARGS
    + r"""
import jax, numpy as np
from PIL import Image
from minicpmv_jax import MiniCPMV
from minicpmv_jax.settings import GenerationSettings
t0 = time.perf_counter()
model = MiniCPMV.from_pretrained(folder, dtype=dtype, progress=False)
jax.block_until_ready(model.state)
res["load_s"] = time.perf_counter() - t0
res["implementation"] = f"minicpmv_jax, jax {jax.__version__}, {jax.default_backend()}"
sampler = model.sampler
one = GenerationSettings(max_new_tokens=1, min_new_tokens=1)
res["ttft"] = {}
outputs = {}
for name in images:
    img = Image.open(os.path.join(inputs, name + ".png"))
    msgs = [{"role": "user", "content": [img, sys.argv[7]]}]
    proc_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        po = model.processor(msgs)
        proc_s.append(time.perf_counter() - t0)
    outputs[name] = po
    t0 = time.perf_counter()
    first = sampler.run([po], one)
    first_s = time.perf_counter() - t0
    times, prefill = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = sampler.run([po], one)
        times.append(time.perf_counter() - t0)
        prefill.append(out.timings["prefill"])
    res["ttft"][name] = {"median_s": med(times), "all_s": times, "first_call_s": first_s,
                         "prefill_median_s": med(prefill), "processor_s": med(proc_s),
                         "first_id": int(out.sequences[0][0])}
many = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
po = outputs[images[0]]
out = sampler.run([po], many)  # compiles the decode program of this length
steps = []
for _ in range(repeats):
    out = sampler.run([po], many)
    steps.append(out.timings["decode"] / (out.num_steps - 1))
res["decode"] = {"image": images[0], "median_step_s": med(steps), "all_step_s": steps,
                 "forwards": out.num_steps - 1, "ids": [int(i) for i in out.sequences[0]]}
done = True
res["end"] = status()
print(json.dumps(res))
"""
)

PEER = (
    PRELUDE
    + WORKER_ARGS
    + PEER_LOAD
    + r"""
from transformers import StaticCache
res["load_s"] = time.perf_counter() - t0


def prefill(z, steps):
    # -> (first token [1, 1], cache, prompt length); vision + resampler + merge + prefill
    ids = torch.from_numpy(z["input_ids"][None].astype(np.int64))
    sizes = [tuple(int(v) for v in s) for s in z["tgt_sizes"]]
    feats = [None] * len(sizes)
    for size in dict.fromkeys(sizes):  # slices of one size: one batch, no padding
        idx = [i for i, s in enumerate(sizes) if s == size]
        pix = torch.from_numpy(np.stack([z[f"pixel_values_{i}"] for i in idx])).to(tdtype)
        out = vpm(pix).last_hidden_state  # [n, h*w, Dv]
        for j, i in enumerate(idx):
            feats[i] = resampler(out[j : j + 1], *size)[0]  # [Q, D]
    emb = llm.get_input_embeddings()(ids)
    for (s, e), f in zip(z["image_bound"], feats):
        emb[0, int(s):int(e)] = f.to(emb.dtype)
    t = ids.shape[1]
    cache = StaticCache(config=llm.config, max_cache_len=t + steps)
    out = llm(inputs_embeds=emb, past_key_values=cache, use_cache=True,
              cache_position=torch.arange(t), logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True), cache, t


res["ttft"] = {}
zs = {name: dict(np.load(os.path.join(inputs, name + ".npz"))) for name in images}
with torch.inference_mode():
    for name in images:
        t0 = time.perf_counter()
        tok, _, _ = prefill(zs[name], 1)
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            tok, _, _ = prefill(zs[name], 1)
            int(tok)  # host read
            times.append(time.perf_counter() - t0)
        res["ttft"][name] = {"median_s": med(times), "all_s": times, "first_call_s": first_s,
                             "first_id": int(tok)}

    def decode():
        tok, cache, t = prefill(zs[images[0]], new_tokens)
        ids = [int(tok)]
        t0 = time.perf_counter()
        for i in range(new_tokens - 1):
            out = llm(input_ids=tok, past_key_values=cache, use_cache=True,
                      cache_position=torch.arange(t + i, t + i + 1))
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            ids.append(int(tok))
        return (time.perf_counter() - t0) / (new_tokens - 1), ids

    decode()
    steps = []
    for _ in range(repeats):
        s, ids = decode()
        steps.append(s)
res["decode"] = {"image": images[0], "median_step_s": med(steps), "all_step_s": steps,
                 "forwards": new_tokens - 1, "ids": ids}
done = True
res["end"] = status()
print(json.dumps(res))
"""
)


def measure(side, folder, dtype, inputs, images, new_tokens, repeats, baseline=None) -> dict:
    """One side, one dtype, in a fresh interpreter; returns its JSON line plus wall seconds."""
    tree = baseline if side == "base" else ROOT
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(tree))
    env.pop("XLA_FLAGS", None)
    code = PEER if side == "peer" else OURS
    # -P: import the tree named by PYTHONPATH, not the working directory (`-c` puts it first)
    argv = [sys.executable, "-P", "-c", code, str(folder), dtype, str(inputs), json.dumps(images),
            str(new_tokens), str(repeats), QUESTION]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(argv, check=False, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{side} {dtype} failed:\n{res.stderr[-6000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def summarize(runs: list[dict]) -> list[dict]:
    """Per dtype: ours / peer speed ratios (> 1: ours faster) and whether the ids agree."""
    rows = []
    for dtype in dict.fromkeys(r["dtype"] for r in runs):
        by = {r["side"]: r for r in runs if r["dtype"] == dtype}
        row: dict = {"dtype": dtype}
        for side, r in by.items():
            row[side] = {f"ttft_{k}_s": v["median_s"] for k, v in r["ttft"].items()}
            row[side]["decode_step_s"] = r["decode"]["median_step_s"]
            row[side]["peak_gb"] = r["end"]["VmHWM"] / 1e9
        for side in ("ours", "base"):
            if side in by and "peer" in by:
                mine, peer = row[side], row["peer"]
                row[f"{side}_speedup"] = {k: peer[k] / mine[k] for k in mine if k != "peak_gb"}
        if "ours" in by and "peer" in by:
            row["same_decode_ids"] = by["ours"]["decode"]["ids"] == by["peer"]["decode"]["ids"]
            row["same_first_ids"] = all(
                by["ours"]["ttft"][k]["first_id"] == by["peer"]["ttft"][k]["first_id"]
                for k in by["ours"]["ttft"]
            )
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/minicpmv26_658m", type=pathlib.Path)
    ap.add_argument("--layers", type=int, default=24, help="LLM layers (Qwen2-0.5B: 24)")
    ap.add_argument("--vision-layers", type=int, default=27, help="vision layers (SigLIP: 27)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--sides", default="ours,peer")
    ap.add_argument("--images", default=",".join(IMAGES), help=f"of {list(IMAGES)}")
    ap.add_argument("--new-tokens", type=int, default=16, help="decode length (batch 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after a warm-up one")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--baseline", type=pathlib.Path, default=None,
                    help="source tree of an earlier version, measured as side 'base'")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = ap.parse_args(argv)
    images = args.images.split(",")
    if unknown := [i for i in images if i not in IMAGES]:
        raise SystemExit(f"--images: unknown {unknown}; choose from {list(IMAGES)}")
    if args.new_tokens < 2:
        raise SystemExit(f"--new-tokens must be at least 2, got {args.new_tokens}")

    hf = config_658m(args.layers, args.vision_layers)
    if not (args.out / "config.json").exists() or json.loads(
        (args.out / "config.json").read_text()) != hf:  # fmt: skip
        shutil.rmtree(args.out, ignore_errors=True)
        write_checkpoint(args.out, hf)
        for f in TOKENIZER.iterdir():
            if f.name != "config.json":
                shutil.copy(f, args.out / f.name)
    inputs = args.out / "speed_inputs"
    inputs.mkdir(exist_ok=True)
    request = write_inputs(args.out, inputs)
    total = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    report = {
        "command": "python -m benchmarks.chat_speed " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "checkpoint": {"bytes": total, "parameters": total // 2, "llm_layers": args.layers,
                       "vision_layers": args.vision_layers, "stored": "bfloat16"},
        "request": {"images": {k: request[k] for k in images}, "question": QUESTION,
                    "new_tokens": args.new_tokens, "decoding": "greedy"},
        "repeats": args.repeats,
        "ours_commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                      check=False, capture_output=True,
                                      text=True).stdout.strip(),
        "baseline": str(args.baseline) if args.baseline else None,
        "load_average_start": loadavg(),
        "runs": [],
    }  # fmt: skip
    for dtype in args.dtypes.split(","):
        for side in args.sides.split(","):
            t0 = time.perf_counter()
            m = measure(side, args.out, dtype, inputs, images, args.new_tokens, args.repeats,
                        args.baseline)  # fmt: skip
            m.update(side=side, dtype=dtype, load_average=loadavg())
            report["runs"].append(m)
            ttft = "  ".join(f"ttft {k} {v['median_s']:6.2f} s" for k, v in m["ttft"].items())
            print(f"{side:5s} {dtype:9s} {ttft}  decode {m['decode']['median_step_s'] * 1e3:6.1f}"
                  f" ms/token  peak {m['end']['VmHWM'] / 1e9:5.2f} GB  "
                  f"({time.perf_counter() - t0:.0f} s, load avg {m['load_average']})",
                  flush=True)  # fmt: skip
    return finish_report(report, args, summarize)


if __name__ == "__main__":
    main()
