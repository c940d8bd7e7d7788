"""Peak memory and load time of one chat turn: ours vs a PyTorch peer on the same checkpoint.

Writes a random checkpoint in the official MiniCPM-V 2.6 safetensors layout (bf16, official
tensor names, the real 2.6 tokenizer files): the real SigLIP-400M tower (27 layers), the 2.6
resampler, and an LLM of Qwen2-0.5B geometry (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864) with the real 151,666-token vocabulary. Then, in a FRESH subprocess per side
and dtype, measures

  load   seconds from the load call to the weights and the tokenizer being ready (ours:
         `from_pretrained`, which loads both; peer: the modules' weights, then the tokenizer,
         as the official README does with AutoModel + AutoTokenizer). Imports (jax, torch,
         transformers) are outside it on both sides (`import_s`). Nothing is compiled while
         loading: ours compiles on the first chat, whose seconds (compilation included) are
         reported apart as `first_chat_s`, next to a second, compiled chat (`second_chat_s`);
  peak   the process's peak resident memory (VmHWM, kernel-kept) over imports, loading and one
         chat turn (one 448x448 image, a short question, 16 new tokens, greedy);

for
  ours   `MiniCPMV.from_pretrained(dir, dtype=...)` then `model.chat(...)`;
  peer   PyTorch, composed from transformers modules (the official remote code is not
         installable here): `Idefics2VisionTransformer` (the navit SigLIP the official 2.6
         `vpm` is a copy of), a small torch resampler written below (the official 2.6 forward:
         kv_proj, ln_kv, 2D sin-cos keys, nn.MultiheadAttention, ln_post, proj) and
         `Qwen2ForCausalLM`; modules built on the meta device and filled with
         `load_state_dict(assign=True)` from the same safetensors (transformers' own loading
         scheme), then vision -> resampler -> embeddings -> `generate` with a static cache.

With `--baseline DIR` a third side, "base", runs our code from another source tree (e.g.
`git archive <commit>` unpacked in DIR) in the same interleaved run. The parameter count of the
default configuration is 1.05 B (the tower alone is 0.4 B; the LLM 0.63 B with its untied
151,666 x 896 embedding and lm_head).

Both sides read the same processor output (input ids, image bound, pixels), written by the
parent process to an .npz; the peer does not import jax. Run, on an otherwise idle machine:

    python -m benchmarks.chat_memory \
        --json benchmarks/results/chat-memory-2.6-cpu.json
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

from benchmarks.load_memory import released_26_config, write_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "minicpm-v-2_6-real-tokenizer" / "processor"
QUESTION = "What is in this image? Describe it."
NEW_TOKENS = 16


def config_658m(layers: int, vision_layers: int) -> dict:
    """2.6 config.json with a Qwen2-0.5B-geometry LLM and the real vocabulary and tower."""
    hf = released_26_config(layers)
    hf.update(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
              num_key_value_heads=2)  # fmt: skip
    hf["vision_config"]["num_hidden_layers"] = vision_layers
    return hf


def write_inputs(folder: pathlib.Path, out: pathlib.Path) -> dict:
    """Processor output of the benchmark conversation -> .npz (both sides read it)."""
    from PIL import Image

    from minicpmv_jax.processor import MiniCPMVProcessor

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))
    img.save(out.with_suffix(".png"))
    proc = MiniCPMVProcessor.from_pretrained(folder)
    o = proc([{"role": "user", "content": [img, QUESTION]}])
    if len(o["tgt_sizes"]) != 1:
        raise SystemExit(f"expected one slice for 448x448, got {len(o['tgt_sizes'])}")
    h, w = (int(v) for v in o["tgt_sizes"][0])
    # patch vectors (c, kh, kw) in row-major patch order -> the [3, 14h, 14w] image
    pix = o["pixel_patches"][0, : h * w].reshape(h, w, 3, 14, 14)
    pix = pix.transpose(2, 0, 3, 1, 4).reshape(3, 14 * h, 14 * w)
    np.savez(out, input_ids=o["input_ids"], image_bound=o["image_bound"],
             tgt_sizes=o["tgt_sizes"], pixel_values=pix)  # fmt: skip
    return {"prompt_tokens": len(o["input_ids"]), "patches": h * w}


PRELUDE = r"""
import json, os, resource, sys, threading, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out
peak = {"RssAnon": 0, "RssFile": 0}
done = False
def poll():  # VmHWM is exact; the anon / file split of the peak is sampled every 5 ms
    while not done:
        s = status()
        for k in peak:
            peak[k] = max(peak[k], s[k])
        time.sleep(0.005)
threading.Thread(target=poll, daemon=True).start()
folder, dtype, inputs = sys.argv[1], sys.argv[2], sys.argv[3]
res = {}
"""

OURS = (
    PRELUDE
    + r"""
t0 = time.perf_counter()
import jax, numpy as np, transformers
from PIL import Image
from minicpmv_jax import MiniCPMV
res["import_s"] = time.perf_counter() - t0
res["after_import"] = status()
t0 = time.perf_counter()
model = MiniCPMV.from_pretrained(folder, dtype=dtype, progress=False)
jax.block_until_ready(model.state)
res["load_s"] = time.perf_counter() - t0
res["after_load"] = status()
res["param_bytes"] = sum(x.nbytes for x in jax.tree.leaves(model.state))
img = Image.open(inputs[:-4] + ".png")
msgs = [{"role": "user", "content": [img, sys.argv[4]]}]
kw = dict(max_new_tokens=int(sys.argv[5]), min_new_tokens=int(sys.argv[5]), sampling=False,
          num_beams=1, repetition_penalty=1.0)
t0 = time.perf_counter()
answer = model.chat(msgs, **kw)
res["first_chat_s"] = time.perf_counter() - t0
res["after_chat"] = status()
t0 = time.perf_counter()
ids = model.generate(model.processor(msgs), **kw)  # the same turn, compiled, as token ids
res["second_chat_s"] = time.perf_counter() - t0
res["answer_ids"] = [int(i) for i in ids]
res["answer_matches_ids"] = answer == model.processor.tokenizer.decode(ids, skip_special_tokens=True)
done = True
res["end"] = status()
res["peak_sampled"] = peak
print(json.dumps(res))
"""
)

# the peer's modules, loaded from `folder` in `dtype` (chat_speed reuses it)
PEER_LOAD = r"""
t0 = time.perf_counter()
import numpy as np, torch, transformers
from safetensors import safe_open
from transformers import Qwen2Config, Qwen2ForCausalLM, Idefics2VisionConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer
res["import_s"] = time.perf_counter() - t0
res["after_import"] = status()
res["implementation"] = (f"transformers {transformers.__version__} Idefics2VisionTransformer + "
                         f"Qwen2ForCausalLM, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads, eager")


def sincos_2d(dim, h, w):  # the official 2.6 get_2d_sincos_pos_embed, [h*w, dim]
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum("hw,d->hwd", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)
    gw, gh = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return np.concatenate([one(dim // 2, gh), one(dim // 2, gw)], axis=-1).reshape(h * w, dim)


class Resampler(torch.nn.Module):
    def __init__(self, q, d, kv_dim):
        super().__init__()
        self.query = torch.nn.Parameter(torch.zeros(q, d))
        self.kv_proj = torch.nn.Linear(kv_dim, d, bias=False)
        self.attn = torch.nn.MultiheadAttention(d, d // 128)
        self.ln_q, self.ln_kv, self.ln_post = (torch.nn.LayerNorm(d, eps=1e-6) for _ in range(3))
        self.proj = torch.nn.Parameter(torch.zeros(d, d))

    def forward(self, x, h, w):  # x [1, h*w, kv_dim] -> [1, Q, D]
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # [L, 1, D]
        pos = torch.from_numpy(sincos_2d(x.shape[-1], h, w)).to(x.dtype)[:, None]
        q = self.ln_q(self.query)[:, None]  # [Q, 1, D]
        out = self.attn(q, x + pos, x, need_weights=False)[0].permute(1, 0, 2)
        return self.ln_post(out) @ self.proj


hf = json.load(open(os.path.join(folder, "config.json")))
tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
v = hf["vision_config"]
t0 = time.perf_counter()
vcfg = Idefics2VisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                            num_hidden_layers=v["num_hidden_layers"],
                            num_attention_heads=v["num_attention_heads"],
                            image_size=v["image_size"], patch_size=v["patch_size"],
                            layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
lcfg = Qwen2Config(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   intermediate_size=hf["intermediate_size"],
                   num_hidden_layers=hf["num_hidden_layers"],
                   num_attention_heads=hf["num_attention_heads"],
                   num_key_value_heads=hf["num_key_value_heads"], rope_theta=hf["rope_theta"],
                   rms_norm_eps=hf["rms_norm_eps"], max_position_embeddings=32768,
                   tie_word_embeddings=False)
vcfg._attn_implementation = lcfg._attn_implementation = "sdpa"
with torch.device("meta"):
    vpm = Idefics2VisionTransformer(vcfg)
    resampler = Resampler(hf["query_num"], hf["hidden_size"], v["hidden_size"])
    llm = Qwen2ForCausalLM(lcfg)
parts = {"vpm.": vpm, "resampler.": resampler, "llm.": llm}
sds = {p: {} for p in parts}
files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
for f in files:
    with safe_open(os.path.join(folder, f), framework="pt") as r:
        for name in r.keys():
            p = next(p for p in parts if name.startswith(p))
            sds[p][name[len(p):]] = r.get_tensor(name).to(tdtype)
for p, m in parts.items():
    m.load_state_dict(sds[p], assign=True, strict=True)
    sds[p] = None
# non-persistent buffers (rotary inv_freq) are not in the checkpoint: rebuild them for real
llm.model.rotary_emb = type(llm.model.rotary_emb)(config=lcfg)
for m in parts.values():
    m.eval()
res["weights_s"] = time.perf_counter() - t0
# the official chat() needs the tokenizer; its remote class subclasses this one
tokenizer = transformers.Qwen2Tokenizer.from_pretrained(folder)
res["load_s"] = time.perf_counter() - t0
res["after_load"] = status()
res["param_bytes"] = sum(t.numel() * t.element_size()
                         for m in parts.values() for t in m.parameters())
"""

PEER = (
    PRELUDE
    + PEER_LOAD
    + r"""
z = np.load(inputs)
ids = torch.from_numpy(z["input_ids"][None])
(h, w), (s, e) = z["tgt_sizes"][0], z["image_bound"][0]
n = int(sys.argv[5])
t0 = time.perf_counter()
with torch.inference_mode():
    pix = torch.from_numpy(z["pixel_values"][None]).to(tdtype)
    feats = vpm(pix).last_hidden_state  # [1, h*w, Dv]
    img = resampler(feats, int(h), int(w))[0]  # [Q, D]
    emb = llm.get_input_embeddings()(ids)
    emb[0, int(s):int(e)] = img.to(emb.dtype)
    out = llm.generate(inputs_embeds=emb, attention_mask=torch.ones_like(ids),
                       max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       cache_implementation="static", pad_token_id=0)
res["first_chat_s"] = time.perf_counter() - t0
res["after_chat"] = status()
res["answer_ids"] = out[0].tolist()
done = True
res["end"] = status()
res["peak_sampled"] = peak
print(json.dumps(res))
"""
)


def measure(
    side: str, folder: pathlib.Path, dtype: str, inputs: pathlib.Path, baseline=None
) -> dict:
    """One side, one dtype, in a fresh interpreter; returns its JSON line plus wall seconds.

    side "base" runs our code from the `baseline` source tree (e.g. `git archive` of an earlier
    commit) instead of this one.
    """
    tree = baseline if side == "base" else ROOT
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(tree))
    env.pop("XLA_FLAGS", None)
    code = PEER if side == "peer" else OURS
    # -P: import the tree named by PYTHONPATH, not the working directory (`-c` puts it first)
    argv = [
        sys.executable,
        "-P",
        "-c",
        code,
        str(folder),
        dtype,
        str(inputs),
        QUESTION,
        str(NEW_TOKENS),
    ]
    t0 = time.perf_counter()
    res = subprocess.run(argv, check=False, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{side} {dtype} failed:\n{res.stderr[-6000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/minicpmv26_658m", type=pathlib.Path)
    ap.add_argument("--layers", type=int, default=24, help="LLM layers (Qwen2-0.5B: 24)")
    ap.add_argument("--vision-layers", type=int, default=27, help="vision layers (SigLIP: 27)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--sides", default="ours,peer")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--baseline", type=pathlib.Path, default=None,
                    help="source tree of an earlier version, measured as side 'base'")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = ap.parse_args(argv)

    hf = config_658m(args.layers, args.vision_layers)
    if not (args.out / "config.json").exists() or json.loads(
        (args.out / "config.json").read_text()) != hf:  # fmt: skip
        shutil.rmtree(args.out, ignore_errors=True)
        write_checkpoint(args.out, hf)
        for f in TOKENIZER.iterdir():
            if f.name != "config.json":
                shutil.copy(f, args.out / f.name)
    total = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    inputs = args.out / "inputs.npz"
    prompt = write_inputs(args.out, inputs)
    report = {
        "command": "python -m benchmarks.chat_memory " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "checkpoint": {"bytes": total, "parameters": total // 2, "llm_layers": args.layers,
                       "vision_layers": args.vision_layers, "stored": "bfloat16"},
        "request": {"image": "448x448", "question": QUESTION, "new_tokens": NEW_TOKENS,
                    "decoding": "greedy", **prompt},
        "ours_commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                      check=False, capture_output=True,
                                      text=True).stdout.strip(),
        "baseline": str(args.baseline) if args.baseline else None,
        "load_average_start": loadavg(),
        "runs": [],
    }  # fmt: skip
    for r in range(args.repeats):
        for dtype in args.dtypes.split(","):
            for side in args.sides.split(","):
                m = measure(side, args.out, dtype, inputs, args.baseline)
                m.update(side=side, dtype=dtype, round=r, load_average=loadavg())
                report["runs"].append(m)
                print(
                    f"{side:5s} {dtype:9s} load {m['load_s']:6.2f} s  first chat "
                    f"{m['first_chat_s']:6.2f} s  peak {m['end']['VmHWM'] / 1e9:5.2f} GB  "
                    f"(after load {m['after_load']['VmRSS'] / 1e9:5.2f} GB, imports "
                    f"{m['after_import']['VmRSS'] / 1e9:4.2f} GB)  load avg {m['load_average']}",
                    flush=True,
                )
    return finish_report(report, args, summarize)


def finish_report(report: dict, args: argparse.Namespace, summarize) -> dict:
    """The end of a run: the load average, the per-dtype summary (printed, one JSON line per
    row), the report written to `--json`, the checkpoint folder removed unless `--keep`."""
    report["load_average_end"] = loadavg()
    report["summary"] = summarize(report["runs"])
    for row in report["summary"]:
        print(json.dumps(row))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(args.out)
    return report


def summarize(runs: list[dict]) -> list[dict]:
    """Per dtype: medians over rounds of each side, and ours / peer ratios."""
    rows = []
    for dtype in dict.fromkeys(r["dtype"] for r in runs):
        med = {}
        for side in ("base", "ours", "peer"):
            rs = [r for r in runs if r["dtype"] == dtype and r["side"] == side]
            if rs:
                med[side] = {
                    k: float(np.median([f(r) for r in rs]))
                    for k, f in {
                        "peak_gb": lambda r: r["end"]["VmHWM"] / 1e9,
                        "load_s": lambda r: r["load_s"],
                        "first_chat_s": lambda r: r["first_chat_s"],
                    }.items()
                }
        row = {"dtype": dtype, **med}
        answers = {r["side"]: r["answer_ids"] for r in runs if r["dtype"] == dtype}
        if "ours" in answers and "peer" in answers:
            row["same_answer_ids"] = answers["ours"] == answers["peer"]
        for side in ("base", "ours"):
            if side in med and "peer" in med:
                for k in ("peak_gb", "load_s", "first_chat_s"):
                    row[f"{side}_{k.rsplit('_', 1)[0]}_ratio"] = med[side][k] / med["peer"][k]
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
