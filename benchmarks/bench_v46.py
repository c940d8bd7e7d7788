"""MiniCPM-V 4.6 benchmark: TTFT of a 1344x896 image in 16x and 4x mode, prefill time against
prompt length (the chunked DeltaNet prefill should grow linearly), and decode tokens/s at several
batch sizes; optionally the transformers 4.6 model in PyTorch on the same weights in the same run.

The model is the tiny test configuration or the release-size one (random weights in the released
shapes; speed does not depend on the values). Every section records the machine's load average:
on a shared machine the timings are only comparable within one run.

    python -m benchmarks.bench_v46 --preset release --peer --out v46.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from benchmarks.measure import load_average, machine_info, time_repeats
from minicpmv_jax.v46 import model as m46
from minicpmv_jax.v46.config import MiniCPMV46Config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "minicpm-v-4_6" / "checkpoint"
RELEASED = (
    ROOT / "tests" / "fixtures" / "minicpm-v-4_6-real-tokenizer" / "processor" / "config.json"
)


def build(preset: str, dtype: str) -> m46.MiniCPMV46:
    """The tiny fixture model (with its processor) or the release-size one (random weights,
    the tiny folder's processor settings with the released token ids)."""
    if preset == "tiny":
        return m46.MiniCPMV46.from_pretrained(TINY, dtype=dtype, progress=False)
    cfg = MiniCPMV46Config.from_hf(json.loads(RELEASED.read_text()), dtype=dtype)
    return m46.MiniCPMV46.from_config(cfg, seed=0)


def image_request(model: m46.MiniCPMV46, mode: str) -> dict:
    """Processor output of a 1344x896 photo-like image for the model's token ids."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (896, 1344, 3), dtype=np.uint8))
    from minicpmv_jax.v46 import processor as p46

    s = {"scale_resolution": 448, "patch_size": 14, "max_slice_nums": 9, "mode": mode}
    units, _ = p46.units_of(np.asarray(img), s)
    pv, sizes = p46.pack(units, 14)
    div = 16 if mode == "16x" else 4
    n = int(sum(h * w // div for h, w in sizes))
    cfg = model.config
    ids = np.concatenate([np.full(8, 1), np.full(n, cfg.image_token_id), np.full(16, 2)])
    return {"input_ids": ids, "pixel_values": pv, "target_sizes": sizes, "downsample_mode": mode}


def text_request(tokens: int) -> dict:
    return {"input_ids": (np.arange(tokens) % 97 + 3).astype(np.int64)}


def jax_ttft(model, req, repeats: int) -> dict[str, Any]:
    def run():
        logits, _, _ = model.prefill([req], 1)
        return jnp.argmax(logits, -1).block_until_ready()

    t, first = time_repeats(run, repeats)
    return {"tokens": len(req["input_ids"]), "seconds": t.as_dict(), "first_call_s": first}


def jax_decode(model, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    """Tokens/s of the on-device decode loop alone: each repeat prefills (untimed; the loop
    consumes the cache) and then times `steps` tokens per row."""
    import time

    req = text_request(32)
    params = m46.smp.SamplingParams.create()
    mode = m46.smp.DecodeMode()
    bucket = m46._bucket(steps)
    seconds = []
    for _ in range(repeats + 1):  # the first run compiles
        logits, cache, lengths = model.prefill([req] * batch, bucket)
        logits.block_until_ready()
        t0 = time.perf_counter()
        with model._precision():
            # no stop token (-1): exactly `steps` tokens per row
            toks, _ = m46._sample_jit(
                model.graphdef, model.state, logits, lengths, cache, params,
                jax.random.key(0), steps, mode=mode, terminators=(-1,), steps=bucket,
            )  # fmt: skip
        toks.block_until_ready()
        seconds.append(time.perf_counter() - t0)
    t = float(np.median(seconds[1:]))
    return {
        "batch": batch,
        "steps": steps,
        "seconds": t,
        "tokens_per_s": batch * (steps - 1) / t,
        "load": load_average(),
    }


def torch_peer(model, args) -> dict[str, Any]:
    """transformers' MiniCPMV4_6ForConditionalGeneration on the same weights (float32, CPU)."""
    import time

    import torch
    import transformers
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    from minicpmv_jax.weights import to_hf_state_dict

    hf = json.loads(
        (TINY if args.preset == "tiny" else RELEASED.parent).joinpath("config.json").read_text()
    )
    peer = MiniCPMV4_6ForConditionalGeneration(MiniCPMV4_6Config(**hf)).eval().float()
    state = {
        k: torch.from_numpy(np.asarray(v, np.float32))
        for k, v in to_hf_state_dict(model.state).items()
    }
    missing, unexpected = peer.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    peer.tie_weights()
    out: dict[str, Any] = {"transformers": transformers.__version__, "torch": torch.__version__}
    for mode in ("16x", "4x"):
        req = image_request(model, mode)
        kw = {
            "input_ids": torch.from_numpy(req["input_ids"][None]),
            "pixel_values": torch.from_numpy(req["pixel_values"]),
            "target_sizes": torch.from_numpy(req["target_sizes"]),
            "downsample_mode": mode,
        }
        times = []
        with torch.inference_mode():
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                peer.generate(**kw, max_new_tokens=1, do_sample=False)
                times.append(time.perf_counter() - t0)
        out[f"ttft_{mode}_s"] = float(np.median(times[1:]))
    for b in args.batch_sizes:
        ids = torch.from_numpy(np.stack([text_request(32)["input_ids"]] * b))

        def gen(n, ids=ids):
            with torch.inference_mode():
                t0 = time.perf_counter()
                peer.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                return time.perf_counter() - t0

        gen(2)  # warm-up
        # decode alone: (prefill + `steps` tokens) - (prefill + 1 token), medians of the repeats
        first = float(np.median([gen(1) for _ in range(args.repeats)]))
        whole = float(np.median([gen(args.decode_steps) for _ in range(args.repeats)]))
        rate = b * (args.decode_steps - 1) / (whole - first) if whole > first else float("nan")
        out[f"decode_b{b}_tokens_per_s"] = rate
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("tiny", "release"), default="release")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--sections", default="ttft,prefill,decode")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prefill-tokens", default="256,512,1024,2048")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peer", action="store_true", help="also time transformers' 4.6 in PyTorch")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    sections = set(args.sections.split(","))
    model = build(args.preset, args.dtype)
    rep: dict[str, Any] = {"preset": args.preset, "dtype": args.dtype, "machine": machine_info()}
    rep["load_start"] = load_average()
    if "ttft" in sections:
        rep["ttft"] = {
            mode: jax_ttft(model, image_request(model, mode), args.repeats)
            for mode in ("16x", "4x")
        }
    if "prefill" in sections:
        rows = []
        for n in (int(x) for x in args.prefill_tokens.split(",")):
            r = jax_ttft(model, text_request(n), args.repeats)
            r["ms_per_token"] = 1e3 * r["seconds"]["median"] / n
            rows.append(r)
        rep["prefill_vs_length"] = rows
    if "decode" in sections:
        rep["decode"] = [
            jax_decode(model, b, args.decode_steps, args.repeats) for b in args.batch_sizes
        ]
    if args.peer:
        rep["peer"] = torch_peer(model, args)
    rep["load_end"] = load_average()
    text = json.dumps(rep, indent=1, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
