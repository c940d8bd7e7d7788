"""Command line: ``minicpmv-jax chat`` (answer / interactive session), ``serve`` (HTTP server),
``layout`` and ``bench``.

    minicpmv-jax chat --model openbmb/MiniCPM-V-4_5 --image cat.jpg "What is this?"
    minicpmv-jax chat --model ./MiniCPM-V-2_6 --video clip.mp4 --stream "Describe the video."
    minicpmv-jax chat --model ./MiniCPM-V-2_6          # interactive: one user turn per line
    minicpmv-jax chat --model ./MiniCPM-V-2_6 --mesh 1,2,4 --quant int8 "Hi"  # 8 devices, int8
    minicpmv-jax serve --model ./MiniCPM-V-2_6 --slots 8 --port 8000   # OpenAI-compatible server
    minicpmv-jax layout ...                             # processor layout (processor_cli.py)
    minicpmv-jax bench --preset tiny --quick            # benchmarks/run.py (source checkout)

Answers go to stdout; progress and timings (loading, compiling, prefill, decoding, tokens/s) to
stderr.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time
from collections.abc import Sequence

from minicpmv_jax.errors import MiniCPMVError


def _chat_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("chat", help="answer a question (or start an interactive session)")
    p.add_argument("question", nargs="?", help="the question; omit it for an interactive session")
    p.add_argument("--model", required=True, help="checkpoint folder or Hugging Face hub id")
    p.add_argument(
        "--image", action="append", default=[], metavar="FILE", help="image (repeatable)"
    )
    p.add_argument("--video", metavar="FILE", help="video file (2.6 / 4.5 official frame sampling)")
    p.add_argument("--max-slice-nums", type=int, default=None, metavar="N")
    p.add_argument("--stream", action="store_true", help="print the answer while it is generated")
    p.add_argument("--thinking", action="store_true", help="4.5: enable thinking mode")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--cache-dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument(
        "--mesh",
        default=None,
        metavar="D,F,T",
        help="device mesh (data, fsdp, tensor), e.g. 1,2,4 or tensor=8; default: one device",
    )
    p.add_argument(
        "--quant",
        default=None,
        choices=("int8", "int8+vision"),
        help="int8 weight-only LLM layers (int8+vision: the vision tower too)",
    )
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N")
    g = p.add_argument_group("decoding (default: the official chat() sampling settings)")
    g.add_argument(
        "--no-sampling",
        action="store_true",
        help="official non-sampling decoding: beam search, 3 beams, repetition penalty 1.2",
    )
    g.add_argument("--num-beams", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="reproducible sampling (default: fresh)")
    return p


def _serve_parser(sub) -> argparse.ArgumentParser:
    from minicpmv_jax.serve.api import Limits

    d = Limits()
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with continuous batching (needs the serve extra)",
        description="POST /v1/chat/completions (streaming or not), GET /v1/models, /health, "
        "/metrics. SIGTERM / Ctrl-C: stop accepting, finish the requests in flight, exit.",
    )
    p.add_argument("--model", required=True, help="checkpoint folder or Hugging Face hub id")
    p.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model id clients send (default: the --model folder's name)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--cache-dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument(
        "--mesh",
        default=None,
        metavar="D,F,T",
        help="device mesh (data, fsdp, tensor), e.g. 1,2,4; default: one device",
    )
    p.add_argument("--quant", default=None, choices=("int8", "int8+vision"))
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument(
        "--decode-buckets",
        default=None,
        metavar="N,N,...",
        help="row counts the decode step is compiled for; each step runs the smallest that holds "
        "the busy slots (default: 1, 2, 4, ... below --slots, and --slots)",
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=2048,
        metavar="L",
        help="KV cache length per slot: prompt + answer tokens (default 2048)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--allow-local-files",
        default=None,
        metavar="DIR",
        help="accept file: URLs / paths of media under DIR (default: refused)",
    )
    p.add_argument(
        "--allow-remote-urls",
        action="store_true",
        help="fetch http(s) media URLs (default: refused)",
    )
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests waiting for a slot; beyond, 429 + Retry-After (default 64)",
    )
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=d.max_body_bytes,
        metavar="N",
        help=f"request body size, base64 media included (default {d.max_body_bytes})",
    )
    g.add_argument(
        "--max-image-pixels",
        type=int,
        default=d.max_image_pixels,
        metavar="N",
        help=f"pixels per image / video frame (default {d.max_image_pixels})",
    )
    g.add_argument(
        "--max-images",
        type=int,
        default=d.max_images,
        metavar="N",
        help=f"images per request (default {d.max_images})",
    )
    g.add_argument(
        "--max-tokens",
        type=int,
        default=d.max_tokens,
        metavar="N",
        help=f"largest max_tokens, also the default (default {d.max_tokens})",
    )
    g.add_argument(
        "--max-video-frames",
        type=int,
        default=d.max_video_frames,
        metavar="N",
        help=f"frames (2.6) / frame groups (4.5) per video (default {d.max_video_frames})",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds to let requests in flight finish (default 30)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=4,
        help="threads decoding media and preparing prompts (default 4)",
    )
    p.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    return p  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minicpmv-jax", description="MiniCPM-V (2.5, 2.6, 4.5) in JAX"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _chat_parser(sub)
    _serve_parser(sub)
    sub.add_parser(
        "layout",
        help="show how the processor lays out a prompt (see `layout --help`)",
        add_help=False,
    )
    sub.add_parser(
        "finetune",
        help="fine-tune on an official-format JSON file (see `finetune --help`)",
        add_help=False,
    )
    sub.add_parser(
        "dpo",
        help="DPO on RLAIF-V preference pairs (see `dpo --help`)",
        add_help=False,
    )
    sub.add_parser(
        "bench",
        help="run the benchmark suite, benchmarks/run.py (see `bench --help`)",
        add_help=False,
    )
    return parser


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _generation_kwargs(args) -> dict:
    kw = {}
    for name in ("num_beams", "temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    return kw


def _mesh(spec: str | None):
    """``--mesh`` -> a ("data", "fsdp", "tensor") Mesh, or None (one device)."""
    if spec is None:
        return None
    from minicpmv_jax.sharding import make_mesh

    try:
        return make_mesh(spec)
    except MiniCPMVError as e:  # wrong number of entries, too few devices, unknown axis name
        raise MiniCPMVError(f"--mesh {spec}: {e}") from None
    except ValueError:  # a non-integer entry
        raise MiniCPMVError(
            f"--mesh {spec}: expected three integers D,F,T (data, fsdp, tensor), e.g. 1,2,4, "
            f"or named sizes such as tensor=4"
        ) from None


def _check_generation_args(args) -> None:
    """The decoding options' values, checked as chat() will check them (no model needed)."""
    from minicpmv_jax.processor import MiniCPMVProcessor
    from minicpmv_jax.settings import GenerationSettings

    if args.stream and args.no_sampling and (args.num_beams or 3) > 1:
        raise MiniCPMVError("--stream needs --num-beams 1 with --no-sampling (beam search)")
    if args.max_slice_nums is not None:
        MiniCPMVProcessor._check_max_slice_nums(args.max_slice_nums)
    max_new = 1 if args.max_new_tokens is None else args.max_new_tokens
    GenerationSettings(
        max_new_tokens=max_new, do_sample=not args.no_sampling, **_generation_kwargs(args)
    )


def _checkpoint_version(folder: pathlib.Path) -> str:
    """The MiniCPM-V version of a checkpoint folder, read from its config.json."""
    from minicpmv_jax import versions
    from minicpmv_jax.errors import CheckpointError, UnsupportedVersionError

    try:
        return versions.of_config(json.loads((folder / "config.json").read_text()))
    except UnsupportedVersionError:
        raise
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: not a readable config ({e})") from None


class ChatSession:
    """One loaded model and a growing conversation (images / video attach to the first turn).

    Every argument and input file (mesh, decoding values, images, video) is checked before the
    model loads, so a typo fails in a second instead of after the loading.
    """

    def __init__(self, args):
        self.args = args
        import jax

        from minicpmv_jax.image import load_image
        from minicpmv_jax.model import MiniCPMV, resolve_checkpoint

        mesh = _mesh(args.mesh)
        _check_generation_args(args)
        folder = resolve_checkpoint(args.model)
        version = _checkpoint_version(folder)
        self.media: list = [load_image(f, what=f"--image {f}") for f in args.image]
        self.processor_kwargs: dict = {}
        if args.video:
            from minicpmv_jax.video import load_video

            _log(f"sampling frames of {args.video} ...")
            sample = load_video(args.video, version)
            self.processor_kwargs.update(sample.processor_kwargs)
            if sample.temporal_ids is not None and self.media:
                # 4.5: each still image is a temporal group of its own ([-1]), before the video's
                still = [[-1]] * len(self.media)
                self.processor_kwargs["temporal_ids"] = still + sample.temporal_ids
            self.media += list(sample.frames)
            _log(f"{len(sample.frames)} frames")
        if args.max_slice_nums is not None:
            self.processor_kwargs["max_slice_nums"] = args.max_slice_nums
        where = "" if mesh is None else f", mesh {dict(mesh.shape)}"
        quant = "" if args.quant is None else f", {args.quant}"
        _log(f"loading {args.model} ({args.dtype}{quant}{where}) ...")
        if args.dtype != "float32" and jax.default_backend() == "cpu":
            _log(
                f"note: on CPU, XLA converts {args.dtype} weights to float32 for every matmul; "
                "--dtype float32 decodes several times faster where memory allows (BENCHMARKS.md)"
            )
        t0 = time.perf_counter()
        self.model = MiniCPMV.from_pretrained(folder, dtype=args.dtype, mesh=mesh, quant=args.quant)
        if args.cache_dtype:
            self.model.configure_generation(cache_dtype=args.cache_dtype)
        self.load_s = time.perf_counter() - t0
        _log(f"loaded MiniCPM-V {version} in {self.load_s:.1f} s")
        self.history: list[dict] = []
        self.first = True

    def _chat_kwargs(self) -> dict:
        a = self.args
        kwargs = dict(
            max_new_tokens=a.max_new_tokens,
            sampling=not a.no_sampling,
            enable_thinking=a.thinking,
            **self.processor_kwargs,
            **_generation_kwargs(a),
        )
        if a.system_prompt is not None:
            kwargs["system_prompt"] = a.system_prompt
        return kwargs

    def _warmup(self, msgs: list[dict]) -> float:
        """Compile the programs this request runs (``RequestShape.of`` its processed prompt and
        settings), so that the prefill and decoding times printed after it exclude compilation.
        Returns the seconds spent."""
        from minicpmv_jax import versions
        from minicpmv_jax.generate import RequestShape
        from minicpmv_jax.settings import GenerationSettings

        a, model = self.args, self.model
        if not hasattr(model, "warmup"):  # 4.6: its programs compile inside the first request
            return 0.0
        _log("compiling (first request of this shape) ...")
        settings = GenerationSettings.for_chat(
            versions.spec(model.config.version), a.max_new_tokens, not a.no_sampling, a.thinking,
            _generation_kwargs(a),
        )  # fmt: skip
        batch = model.processor(
            msgs, system_prompt=a.system_prompt, enable_thinking=a.thinking, **self.processor_kwargs
        )
        return model.warmup([RequestShape.of([batch], settings, stream=a.stream)])["seconds"]

    def ask(self, question: str, out=None) -> str:
        out = out or sys.stdout
        content = ([*self.media] if not self.history else []) + [question]
        msgs = [*self.history, {"role": "user", "content": content}]
        kwargs = self._chat_kwargs()
        warm_s = self._warmup(msgs) if self.first else 0.0
        t0 = time.perf_counter()
        if self.args.stream:
            pieces = []
            for piece in self.model.chat(msgs, stream=True, **kwargs):
                pieces.append(piece)
                print(piece, end="", file=out, flush=True)
            print(file=out, flush=True)
            answer = "".join(pieces)
        else:
            answer = self.model.chat(msgs, **kwargs)
            print(answer, file=out, flush=True)
        s = getattr(self.model, "last_stats", None)
        if (
            s is None
        ):  # 4.6 keeps no per-call statistics: report the whole call, compilation included
            _log(
                f"loading {self.load_s:.1f} s, " * self.first
                + f"answer in {time.perf_counter() - t0:.2f} s (compilation included)"
            )
            self.first = False
            self.history = [*msgs, {"role": "assistant", "content": answer}]
            return answer
        timing = (
            f"prompt {s.prompt_tokens} tokens, prefill {s.prefill_s:.2f} s; "
            f"{s.new_tokens} new tokens in {s.decode_s:.2f} s ({s.tokens_per_s:.1f} tokens/s)"
        )
        if self.first:
            timing = f"loading {self.load_s:.1f} s, compiling {warm_s:.1f} s, " + timing
        if s.compiled:
            timing += f" (compiled {s.compiled} new programs)"
        _log(timing)
        self.first = False
        self.history = [*msgs, {"role": "assistant", "content": answer}]
        return answer


def _interactive(session: ChatSession) -> None:
    _log("interactive session: one question per line; 'exit', end of input or Ctrl-C quits")
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            break
        if line.strip():
            session.ask(line.strip())


def _benchmarks_run():
    """The ``benchmarks.run`` module of a source checkout, or None when it cannot be found.

    The benchmarks live next to the package in the repository and are not installed: they are
    found on sys.path (run from the checkout's root) or next to this package (editable install).
    """
    import importlib

    root = pathlib.Path(__file__).resolve().parent.parent
    if (root / "benchmarks" / "run.py").is_file() and str(root) not in sys.path:
        sys.path.append(str(root))
    try:
        return importlib.import_module("benchmarks.run")
    except ModuleNotFoundError as e:
        if e.name in ("benchmarks", "benchmarks.run"):
            return None
        raise  # a dependency of the benchmarks is missing: show which


def _bench(argv: list[str]) -> int:
    run = _benchmarks_run()
    if run is None:
        print(
            "error: the benchmark suite (benchmarks/run.py) is not installed with the package; "
            "run `minicpmv-jax bench` (or `python -m benchmarks.run`) from a source checkout "
            "of minicpmv-jax, in its root folder",
            file=sys.stderr,
        )
        return 2
    return int(run.main(argv) or 0)


def _serve(args) -> int:
    """``minicpmv-jax serve``: load, compile, serve until SIGTERM / Ctrl-C, drain, exit."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"error: `serve` needs the serve extra ({e.name} is missing): "
              "pip install 'minicpmv-jax[serve]'", file=sys.stderr)  # fmt: skip
        return 2
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        state = _serve_state(args)
    except MiniCPMVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from minicpmv_jax.serve import server

    _log(f"serving {state.model_name!r} on http://{args.host}:{args.port}")
    try:
        server.run(server.create_app(state), host=args.host, port=args.port,
                   log_level=args.log_level)  # fmt: skip
    except KeyboardInterrupt:  # a second Ctrl-C: stop without draining
        print("interrupted", file=sys.stderr)
        return 130
    _log("stopped")
    return 0


def _serve_state(args):
    """Check the flags, load the model, start (compile) the engine: a ``server.ServerState``."""
    from minicpmv_jax.model import MiniCPMV, resolve_checkpoint
    from minicpmv_jax.serve import api

    for flag in ("slots", "max_len", "max_queue", "port", "workers"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            raise MiniCPMVError(f"--{flag.replace('_', '-')} must be positive, got "
                                f"{getattr(args, flag)}")  # fmt: skip
    buckets = None
    if args.decode_buckets is not None:
        try:
            buckets = [int(b) for b in args.decode_buckets.split(",")]
        except ValueError:
            raise MiniCPMVError(f"--decode-buckets: {args.decode_buckets!r} is not a "
                                "comma-separated list of row counts, e.g. 1,4,8") from None  # fmt: skip
        if not all(1 <= b <= args.slots for b in buckets):
            raise MiniCPMVError(f"--decode-buckets: {args.decode_buckets} has a row count "
                                f"outside [1, --slots={args.slots}]")  # fmt: skip
    try:
        limits = api.Limits(
            max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels,
            max_images=args.max_images, max_tokens=args.max_tokens,
            max_video_frames=args.max_video_frames,
        )  # fmt: skip
        root = None if args.allow_local_files is None else pathlib.Path(args.allow_local_files)
        media = api.Media(local_root=root, allow_remote_urls=args.allow_remote_urls)
    except ValueError as e:
        raise MiniCPMVError(str(e).replace("Limits.max_", "--max-").replace("_", "-")) from None
    import jax

    if jax.process_count() > 1:
        # the scheduler decides each step from the requests this process received; the other
        # processes of a multi-host mesh would have to run the same programs on the same inputs
        raise MiniCPMVError(
            f"serve runs in one process; this is process {jax.process_index()} of "
            f"{jax.process_count()}: serve one model per host (or per device group) and put a load "
            "balancer in front (README: Serving)"
        )
    mesh = _mesh(args.mesh)
    folder = resolve_checkpoint(args.model)
    version = _checkpoint_version(folder)
    try:
        from minicpmv_jax.serve.engine import Engine
    except ImportError as e:
        raise MiniCPMVError(f"the serving engine cannot be imported ({e})") from None
    quant = "" if args.quant is None else f", {args.quant}"
    _log(f"loading {args.model} ({args.dtype}{quant}) ...")
    t0 = time.perf_counter()
    model = MiniCPMV.from_pretrained(folder, dtype=args.dtype, mesh=mesh, quant=args.quant)
    if args.cache_dtype:
        model.configure_generation(cache_dtype=args.cache_dtype)
    _log(f"loaded MiniCPM-V {version} in {time.perf_counter() - t0:.1f} s; compiling "
         f"{args.slots} slots x {args.max_len} tokens ...")  # fmt: skip
    t0 = time.perf_counter()
    engine = Engine(model, slots=args.slots, max_len=args.max_len, max_queue=args.max_queue,
                    max_images=args.max_images, decode_buckets=buckets)  # fmt: skip
    engine.start()
    _log(f"compiled in {time.perf_counter() - t0:.1f} s")
    from minicpmv_jax.serve.server import ServerState

    name = args.served_model_name or pathlib.Path(str(args.model).rstrip("/")).name
    return ServerState(engine, model_name=name, version=version, limits=limits, media=media,
                       workers=args.workers, drain_timeout=args.drain_timeout)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "layout":
        from minicpmv_jax import processor_cli

        return int(processor_cli.main(argv[1:]) or 0)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    if argv and argv[0] in ("finetune", "dpo"):
        from minicpmv_jax.train import cli as train_cli

        return train_cli.main(_mesh_value_joined(argv[1:]), command=argv[0])
    args = build_parser().parse_args(_mesh_value_joined(argv))
    if args.command == "serve":
        return _serve(args)
    try:
        session = ChatSession(args)
        if args.question is None:
            _interactive(session)
        else:
            session.ask(args.question)
    except MiniCPMVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _mesh_value_joined(argv: list[str]) -> list[str]:
    """``--mesh -1,2,4`` -> ``--mesh=-1,2,4``: argparse takes a value that starts with '-' (and
    is not a plain negative number) for an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--mesh" and i + 1 < len(argv) and re.match(r"-\d", argv[i + 1]):
            out.append(f"--mesh={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


if __name__ == "__main__":
    sys.exit(main())
