"""MiniCPM-V 4.6 benchmark: TTFT of a 1344x896 image in 16x and 4x mode, prefill time against
prompt length (the chunked DeltaNet prefill should grow linearly), and decode tokens/s at several
batch sizes; optionally the transformers 4.6 model in PyTorch on the same weights in the same run.

The model is the tiny test checkpoint or a release-size one (random weights in the released
shapes, written once as a native-transformers folder; speed does not depend on the values). With
`--peer` each side runs in its own worker process that loads that same folder (ours through the
package's loader, the peer through `from_pretrained`), the sections alternate between the two
sides, their first-token logits are compared (same weights, same inputs), and each worker's peak
resident memory (VmHWM) is its memory figure (also recorded after every section: the peak of a
chat-like run, load + TTFT, reads apart from the decode batches'). Every timing records the
machine's load average: on a shared machine the timings are only comparable within one run.

What each side times:
  ttft     processor output (input ids, packed pixels, slice grids) -> first token, vision tower
           and projector included (ours: `prefill`; peer: `generate(max_new_tokens=1)`).
  vision   the vision tower + projector alone on the same request (where the TTFT goes).
  prefill  a text prompt of N tokens -> first token (the LLM alone; N are bucket sizes).
  decode   seconds per generated token after a 32-token prompt, no stop token (ours: the jitted
           on-device loop over a static cache, prefill untimed; peer: generate(N) - generate(1)
           over its cache, medians of the repeats).

    python -m benchmarks.bench_v46 --preset release --peer --out v46.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "minicpm-v-4_6" / "checkpoint"
RELEASED = (
    ROOT / "tests" / "fixtures" / "minicpm-v-4_6-real-tokenizer" / "processor" / "config.json"
)
MODES = ("16x", "4x")
PREFIX = "@@bench "  # worker result lines on stdout start with this


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def process_memory() -> dict[str, int]:
    """Resident bytes of this process now (VmRSS) and at its peak so far (VmHWM)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def timed(fn, repeats: int, warmup: int = 1) -> tuple[dict[str, Any], Any]:
    """`warmup` calls (the first compiles on our side), then `repeats` timed blocking calls."""
    first = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        out = fn()
        first = time.perf_counter() - t0 if first is None else first
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
    stats = {
        "median": statistics.median(seconds),
        "min": min(seconds),
        "max": max(seconds),
        "n": len(seconds),
        "first_call_s": first,
        "load": load_average(),
    }
    return stats, out


def image_request(image_token_id: int, mode: str) -> dict:
    """Processor output for a 1344x896 photo-sized image: packed patches, slice grids and a
    prompt of 8 text tokens, the image's placeholder tokens and 16 more text tokens."""
    from minicpmv_jax.v46 import processor as p46

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (896, 1344, 3), dtype=np.uint8)
    s = {"scale_resolution": 448, "patch_size": 14, "max_slice_nums": 9, "mode": mode}
    units, _ = p46.units_of(img, s)
    pv, sizes = p46.pack(units, 14)
    div = 16 if mode == "16x" else 4
    n = int(sum(h * w // div for h, w in sizes))
    ids = np.concatenate([np.full(8, 1), np.full(n, image_token_id), np.full(16, 2)])
    return {"input_ids": ids, "pixel_values": pv, "target_sizes": sizes, "downsample_mode": mode}


def text_request(tokens: int) -> dict:
    return {"input_ids": (np.arange(tokens) % 97 + 3).astype(np.int64)}


def _save(path: str | None, logits) -> None:
    if path:
        np.save(path, np.asarray(logits, np.float32).reshape(-1))


class Ours:
    """minicpmv-jax: `MiniCPMV46.from_pretrained` of the folder."""

    name = "minicpmv-jax"

    def __init__(self, folder: pathlib.Path, dtype: str):
        import jax

        from minicpmv_jax.v46 import model as m46

        self.jax, self.m46 = jax, m46
        t0 = time.perf_counter()
        self.model = m46.MiniCPMV46.from_pretrained(
            folder, dtype=dtype, progress=False, load_processor=False
        )
        self.load_s = time.perf_counter() - t0
        self.image_token_id = self.model.config.image_token_id
        # the parameters as the programs take them (earlier checkouts: a packed state, or none)
        self.state = getattr(self.model, "program_state", self.model.state)
        bits = getattr(self.model, "table_bits", None)
        self.bits = {} if bits is None else {"bits": bits}
        self.info = {"package": str(pathlib.Path(m46.__file__).parents[1]), "jax": jax.__version__}

    def first_logits(self, req):
        logits, _, _ = self.model.prefill([req], 1)
        self.jax.numpy.argmax(logits, -1).block_until_ready()  # the first token
        return logits[0]

    def vision(self, req):
        _, _, feats = self.model._embed_inputs(req)
        return self.jax.block_until_ready(feats)

    def decode(self, batch: int, steps: int, repeats: int) -> dict[str, Any]:
        """The on-device loop alone: each repeat prefills (untimed; the loop consumes the cache),
        then times `steps` tokens per row (the first comes from the prefill: steps - 1 steps)."""
        m46, jax, model = self.m46, self.jax, self.model
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
                toks = m46._sample_jit(
                    model.graphdef, self.state, logits, lengths, cache, params,
                    jax.random.key(0), steps, mode=mode, terminators=(-1,), steps=bucket,
                    **self.bits,
                )[0]  # fmt: skip
            toks.block_until_ready()
            seconds.append(time.perf_counter() - t0)
        return {"seconds": statistics.median(seconds[1:]), "first_call_s": seconds[0]}


class Peer:
    """transformers' `MiniCPMV4_6ForConditionalGeneration.from_pretrained` of the folder."""

    name = "transformers"

    def __init__(self, folder: pathlib.Path, dtype: str):
        import torch
        import transformers

        self.torch = torch
        t0 = time.perf_counter()
        self.model = transformers.MiniCPMV4_6ForConditionalGeneration.from_pretrained(
            folder, dtype=getattr(torch, dtype)
        ).eval()
        self.load_s = time.perf_counter() - t0
        self.image_token_id = self.model.config.image_token_id
        self.info = {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "attn_implementation": self.model.config._attn_implementation,
        }

    def _kw(self, req) -> dict:
        t = self.torch
        kw = {"input_ids": t.from_numpy(np.asarray(req["input_ids"], np.int64)[None])}
        if "pixel_values" in req:
            kw["pixel_values"] = t.from_numpy(np.asarray(req["pixel_values"], np.float32))
            kw["target_sizes"] = t.from_numpy(np.asarray(req["target_sizes"]))
            kw["downsample_mode"] = req["downsample_mode"]
        return kw

    def first_logits(self, req):
        with self.torch.inference_mode():
            out = self.model.generate(
                **self._kw(req), max_new_tokens=1, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        return out.logits[0][0].float().numpy()

    def vision(self, req):
        kw = self._kw(req)
        with self.torch.inference_mode():
            out = self.model.model.get_image_features(
                kw["pixel_values"], kw["target_sizes"], downsample_mode=kw["downsample_mode"]
            )
        return out.pooler_output

    def decode(self, batch: int, steps: int, repeats: int) -> dict[str, Any]:
        """(prefill + `steps` tokens) - (prefill + 1 token), medians of the repeats."""
        ids = self.torch.from_numpy(np.stack([text_request(32)["input_ids"]] * batch))

        def gen(n):
            with self.torch.inference_mode():
                t0 = time.perf_counter()
                self.model.generate(
                    input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False
                )
                return time.perf_counter() - t0

        first = gen(2)  # warm-up
        one = statistics.median([gen(1) for _ in range(repeats)])
        whole = statistics.median([gen(steps) for _ in range(repeats)])
        return {"seconds": whole - one, "first_call_s": first, "prefill_and_one_s": one}


def run_op(side, op: str, kw: dict) -> dict[str, Any]:
    """One benchmark section on one side."""
    if op == "info":
        return {"name": side.name, "load_s": side.load_s, **getattr(side, "info", {})}
    if op == "memory":
        return process_memory()
    if op in ("ttft", "prefill"):
        req = (
            image_request(side.image_token_id, kw["mode"])
            if op == "ttft"
            else text_request(kw["tokens"])
        )
        stats, logits = timed(lambda: side.first_logits(req), kw["repeats"], kw.get("warmup", 1))
        _save(kw.get("logits"), logits)
        return {"tokens": len(req["input_ids"]), "seconds": stats}
    if op == "vision":
        req = image_request(side.image_token_id, kw["mode"])
        # compiled by the TTFT section when it ran before (warmup 0)
        stats, _ = timed(lambda: side.vision(req), kw["repeats"], kw.get("warmup", 1))
        return {"seconds": stats}
    if op == "decode":
        r = side.decode(kw["batch"], kw["steps"], kw["repeats"])
        per_token = r["seconds"] / (kw["steps"] - 1)
        rate = kw["batch"] / per_token if per_token > 0 else float("nan")
        return {**r, "s_per_step": per_token, "tokens_per_s": rate, "load": load_average()}
    raise ValueError(f"unknown op {op!r}")


def worker(kind: str, folder: pathlib.Path, dtype: str) -> int:
    """Load one side, then answer JSON commands from stdin, one result line each on stdout."""
    side = (Ours if kind == "ours" else Peer)(folder, dtype)
    print(PREFIX + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        res = run_op(side, cmd["op"], cmd)
        if cmd["op"] not in ("info", "memory"):
            res["process_memory"] = process_memory()  # VmHWM so far: the peak up to this section
        print(PREFIX + json.dumps(res, default=float), flush=True)
    return 0


class Local:
    """Our side in this process (no peer: the smoke test's mode)."""

    def __init__(self, folder, dtype):
        self.side = Ours(folder, dtype)

    def call(self, op: str, **kw) -> dict[str, Any]:
        return run_op(self.side, op, kw)

    def close(self):
        pass


class Remote:
    """One side in a fresh worker process (its own peak memory; no shared allocator)."""

    def __init__(self, kind: str, folder: pathlib.Path, dtype: str, package: str | None = None):
        cmd = [sys.executable, "-m", "benchmarks.bench_v46", "--worker", kind]
        cmd += ["--checkpoint", str(folder), "--dtype", dtype]
        env = dict(os.environ)
        if package:  # minicpmv_jax imported from `package` (e.g. another revision's checkout);
            # -P: the working directory (this checkout) does not go ahead of it on sys.path
            env["PYTHONPATH"] = os.pathsep.join([package, str(ROOT)])
            cmd.insert(1, "-P")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )
        self._read()

    def _read(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])
        raise RuntimeError(f"benchmark worker exited with {self.proc.wait()}")

    def call(self, op: str, **kw) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait()


def truncated_config(text_layers: int | None, vision_layers: int | None) -> dict:
    """The released config.json with the first `text_layers` Qwen3.5 layers (their
    `layer_types` with them) and the first `vision_layers` SigLIP2 layers (None: all)."""
    hf = json.loads(RELEASED.read_text())
    text, vision = hf["text_config"], hf["vision_config"]
    if text_layers is not None:
        if not 0 < text_layers <= text["num_hidden_layers"]:
            raise SystemExit(f"--layers must lie in [1, {text['num_hidden_layers']}]")
        text["num_hidden_layers"] = text_layers
        text["layer_types"] = text["layer_types"][:text_layers]
    if vision_layers is not None:
        if not hf["insert_layer_id"] < vision_layers <= vision["num_hidden_layers"]:
            raise SystemExit(f"--vision-layers must lie in ({hf['insert_layer_id']}, full depth]")
        vision["num_hidden_layers"] = vision_layers
    return hf


def write_checkpoint(folder: pathlib.Path, hf: dict | None = None) -> None:
    """Random weights (seed 0, float32) in the shapes of `hf` (default: the released config.json)
    as a native-transformers folder."""
    from safetensors.numpy import save_file

    from minicpmv_jax.v46 import model as m46
    from minicpmv_jax.v46.config import MiniCPMV46Config
    from minicpmv_jax.weights import to_hf_state_dict

    hf = json.loads(RELEASED.read_text()) if hf is None else hf
    model = m46.MiniCPMV46.from_config(MiniCPMV46Config.from_hf(hf, dtype="float32"), seed=0)
    state = {
        k: np.ascontiguousarray(v, np.float32) for k, v in to_hf_state_dict(model.state).items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors.tmp"))
    (folder / "config.json").write_text(json.dumps(hf, indent=1))
    os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")


def checkpoint_folder(args) -> pathlib.Path:
    full = TINY
    if args.preset == "release" and args.layers is not None:
        # a truncated text model: its own random weights, written once (the embedding table and
        # the vision layers kept have the released shapes; speed does not depend on the values)
        name = f"minicpmv46-release-text{args.layers}-vision{args.vision_layers or 'all'}"
        folder = args.checkpoint or pathlib.Path(tempfile.gettempdir()) / name
        if not (folder / "model.safetensors").exists():
            cmd = [sys.executable, "-m", "benchmarks.bench_v46", "--write-checkpoint", str(folder)]
            cmd += ["--layers", str(args.layers)]
            if args.vision_layers is not None:
                cmd += ["--vision-layers", str(args.vision_layers)]
            subprocess.run(cmd, check=True, cwd=ROOT)
        return folder
    if args.layers is not None:
        raise SystemExit("--layers needs --preset release")
    if args.preset == "release":
        full = args.checkpoint or pathlib.Path(tempfile.gettempdir()) / "minicpmv46-release-random"
        if not (full / "model.safetensors").exists():
            # in a child process: the writer's copy of the weights is gone before the sides load
            cmd = [sys.executable, "-m", "benchmarks.bench_v46", "--write-checkpoint", str(full)]
            subprocess.run(cmd, check=True, cwd=ROOT)
    if args.vision_layers is None:
        return full
    # the first `vision_layers` SigLIP2 layers: the same tensors minus the deeper layers',
    # copied in 1 GB shards (the loaders reject tensors the config does not name)
    from safetensors import safe_open
    from safetensors.flax import save_file  # bfloat16-safe (numpy has no bfloat16)

    hf = json.loads((full / "config.json").read_text())
    if not hf["insert_layer_id"] < args.vision_layers <= hf["vision_config"]["num_hidden_layers"]:
        raise SystemExit(f"--vision-layers must lie in ({hf['insert_layer_id']}, full depth]")
    hf["vision_config"]["num_hidden_layers"] = args.vision_layers
    folder = (
        pathlib.Path(tempfile.gettempdir()) / f"minicpmv46-{args.preset}-vision{args.vision_layers}"
    )
    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(exist_ok=True)
    prefix = "model.vision_tower.encoder.layers."
    weight_map, shard, size = {}, {}, 0

    def flush():
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    with safe_open(str(full / "model.safetensors"), framework="flax") as f:
        names = f.keys()
        for key in names:
            if (
                key.startswith(prefix)
                and int(key[len(prefix) :].split(".")[0]) >= args.vision_layers
            ):
                continue
            shard[key] = f.get_tensor(key)
            size += shard[key].nbytes
            if size >= 1 << 30:
                flush()
                size = 0
    if shard:
        flush()
    (folder / "config.json").write_text(json.dumps(hf, indent=1))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return folder


def agreement(a_path: str, b_path: str) -> dict[str, Any]:
    """Our first-token logits against the peer's (same weights, same input)."""
    a, b = np.load(a_path), np.load(b_path)
    return {
        "max_abs_diff": float(np.max(np.abs(a - b))),
        "max_abs_logit": float(np.max(np.abs(b))),
        "argmax_equal": bool(np.argmax(a) == np.argmax(b)),
        "top5_overlap": len(set(np.argsort(a)[-5:]) & set(np.argsort(b)[-5:])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("tiny", "release"), default="release")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--sections", default="ttft,vision,prefill,decode")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--modes", default=",".join(MODES), help="downsample modes of the TTFT image")
    p.add_argument("--prefill-tokens", default="256,512,1024,2048")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ttft-repeats", type=int, default=None, help="default: --repeats")
    p.add_argument("--peer", action="store_true", help="also time transformers' 4.6 in PyTorch")
    p.add_argument(
        "--baseline",
        type=pathlib.Path,
        default=None,
        help="our side again, minicpmv_jax imported from this folder (e.g. `git archive` of an "
        "earlier commit): before / after in one run; with --peer, three sides",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="keep both sides loaded and alternate them section by section (default: one side "
        "after the other, so that their memory never adds up)",
    )
    p.add_argument(
        "--peer-warmup",
        type=int,
        default=None,
        help="warm-up calls of the peer before timed TTFT / prefill calls (default 1; eager "
        "PyTorch compiles nothing)",
    )
    p.add_argument(
        "--vision-layers",
        type=int,
        default=None,
        help="run only the first N SigLIP2 layers (memory; default: all)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="release preset: only the first N Qwen3.5 text layers (their layer kinds with them), "
        "random weights of their own written once to a folder of that depth (default: all 24)",
    )
    p.add_argument("--checkpoint", type=pathlib.Path, default=None, help="release weights folder")
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument("--worker", choices=("ours", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--write-checkpoint", type=pathlib.Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_checkpoint:
        hf = None
        if args.layers is not None or args.vision_layers is not None:
            hf = truncated_config(args.layers, args.vision_layers)
        write_checkpoint(args.write_checkpoint, hf)
        return 0
    if args.worker:
        return worker(args.worker, args.checkpoint, args.dtype)
    sections = set(args.sections.split(","))
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    ttft_repeats = args.repeats if args.ttft_repeats is None else args.ttft_repeats
    modes = args.modes.split(",")
    folder = checkpoint_folder(args)
    from benchmarks.measure import machine_info

    rep: dict[str, Any] = {
        "preset": args.preset,
        "dtype": args.dtype,
        "command": "python -m benchmarks.bench_v46 " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "load_start": load_average(),
    }
    # the other sides: our side again from another checkout (before / after), and / or the peer
    others = (["baseline"] if args.baseline else []) + (["peer"] if args.peer else [])
    names = ["ours", *others]
    res: dict[str, dict[str, Any]] = {n: {} for n in names}
    tmp = tempfile.mkdtemp(prefix="bench_v46_")
    plan = []  # (key, op, kwargs) in order
    if "ttft" in sections:
        plan += [(f"ttft_{m}", "ttft", {"mode": m, "repeats": ttft_repeats}) for m in modes]
    if "vision" in sections:
        warm = 0 if "ttft" in sections else 1  # compiled by the TTFT section when it ran
        plan += [
            (f"vision_{m}", "vision", {"mode": m, "repeats": ttft_repeats, "warmup": warm})
            for m in modes
        ]
    prefill_tokens = (
        [int(x) for x in args.prefill_tokens.split(",")] if "prefill" in sections else []
    )
    plan += [
        (f"prefill_{n}", "prefill", {"tokens": n, "repeats": args.repeats}) for n in prefill_tokens
    ]
    if "decode" in sections:
        plan += [
            (f"decode_b{b}", "decode", {"batch": b, "steps": args.decode_steps,
                                        "repeats": args.repeats})
            for b in batch_sizes
        ]  # fmt: skip

    def start(n: str):
        if not others:
            return Local(folder, args.dtype)
        kind = "peer" if n == "peer" else "ours"
        package = str(args.baseline) if n == "baseline" else None
        return Remote(kind, folder, args.dtype, package=package)

    def run(n: str, side, key: str, op: str, kw: dict):
        path = os.path.join(tmp, f"{n}-{key}.npy")
        if n == "peer" and op in ("ttft", "prefill") and args.peer_warmup is not None:
            kw = {**kw, "warmup": args.peer_warmup}
        res[n][key] = side.call(op, logits=path, **kw)
        print(f"{n} {key}: {json.dumps(res[n][key], default=float)}", file=sys.stderr)
        if args.out:  # a partial report after every section
            args.out.write_text(json.dumps({**rep, "sides": res}, indent=1, default=str))

    if args.interleave:  # both sides resident, sections alternate (twice the memory)
        sides = {n: start(n) for n in names}
        for n in names:
            res[n]["info"] = sides[n].call("info")
        for key, op, kw in plan:
            for n in names:
                run(n, sides[n], key, op, kw)
        for n in names:
            res[n]["memory"] = sides[n].call("memory")
            sides[n].close()
    else:  # one side at a time: each worker's peak memory is its own, and they never add up
        for n in names:
            side = start(n)
            res[n]["info"] = side.call("info")
            for key, op, kw in plan:
                run(n, side, key, op, kw)
            res[n]["memory"] = side.call("memory")
            side.close()
    rep["load_end"] = load_average()

    ours = res["ours"]
    # the flat layout the smoke test and earlier reports read
    if "ttft" in sections:
        rep["ttft"] = {m: ours[f"ttft_{m}"] for m in modes}
    rep["prefill_vs_length"] = [
        {
            **ours[f"prefill_{n}"],
            "ms_per_token": 1e3 * ours[f"prefill_{n}"]["seconds"]["median"] / n,
        }
        for n in prefill_tokens
    ]
    rep["decode"] = [
        {"batch": b, "steps": args.decode_steps, **ours[f"decode_b{b}"]}
        for b in batch_sizes
        if "decode" in sections
    ]
    rep["sides"] = res
    rows, agree = [], {}
    for other in others:  # one row per (section, other side)
        for key in ours:
            if key in ("info", "memory"):
                continue
            a, b = ours[key], res[other][key]
            if key.startswith("decode"):
                rows.append({"row": f"{key} tokens/s", "vs": other, "ours": a["tokens_per_s"],
                             other: b["tokens_per_s"],
                             "ratio": a["tokens_per_s"] / b["tokens_per_s"]})  # fmt: skip
            else:
                ta, tb = a["seconds"]["median"], b["seconds"]["median"]
                rows.append({"row": f"{key} s", "vs": other, "ours": ta, other: tb,
                             "ratio": tb / ta})  # fmt: skip
            pa, pb = (os.path.join(tmp, f"{n}-{key}.npy") for n in ("ours", other))
            if os.path.exists(pa) and os.path.exists(pb):
                agree[f"{key} vs {other}"] = agreement(pa, pb)
        ma, mb = ours["memory"]["VmHWM"], res[other]["memory"]["VmHWM"]
        rows.append({"row": "peak RSS GB", "vs": other, "ours": ma / 1e9, other: mb / 1e9,
                     "ratio": ma / mb})  # fmt: skip
    if others:  # ratio: the other side's time / ours (> 1: ours faster); memory: ours / other
        rep["rows"] = rows
        rep["agreement"] = agree
    text = json.dumps(rep, indent=1, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
