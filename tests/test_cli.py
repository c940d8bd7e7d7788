"""The `minicpmv-jax` command line on the tiny 2.6 checkpoint (in-process `main(argv)`)."""

import io
import json
import re
import sys

import pytest
from conftest import FIXTURES

from minicpmv_jax import cli

CKPT = str(FIXTURES / "minicpm-v-2_6" / "checkpoint")
IMAGE = str(FIXTURES / "minicpm-v-2_6" / "cases" / "single_448x448" / "image_0.png")


CASE = FIXTURES / "minicpm-v-2_6" / "cases" / "single_448x448"


def greedy_argv(question: str, max_new_tokens: int, *extra: str) -> list[str]:
    """`chat` on the tiny 2.6 checkpoint, float32, greedy (one beam, no penalty)."""
    return [
        "chat", "--model", CKPT, "--image", IMAGE, "--dtype", "float32", "--no-sampling",
        "--num-beams", "1", "--repetition-penalty", "1.0",
        "--max-new-tokens", str(max_new_tokens), *extra, question,
    ]  # fmt: skip


def test_one_question_with_image(capsys):
    """The fixture's greedy call, through the CLI: stdout is the official chat() answer."""
    case = json.loads((CASE / "case.json").read_text())
    assert cli.main(greedy_argv("What is in the image?", 16)) == 0
    out, err = capsys.readouterr()
    assert out.rstrip("\n") == case["chat_answer"]
    for word in ("loading", "compiling", "prefill", "new tokens", "tokens/s"):
        assert word in err
    assert "note: on CPU" not in err  # float32: nothing to say
    assert "new programs" not in err  # the warm-up compiled exactly what the request ran


def test_bf16_on_cpu_says_float32_is_faster(capsys):
    argv = greedy_argv("What is it?", 2)
    argv[argv.index("float32")] = "bfloat16"
    assert cli.main(argv) == 0
    assert "--dtype float32 decodes several times faster" in capsys.readouterr().err


def test_stream_prints_the_same_answer(capsys):
    assert cli.main(greedy_argv("What is it?", 12)) == 0
    blocking = capsys.readouterr().out
    assert cli.main(greedy_argv("What is it?", 12, "--stream")) == 0
    out, err = capsys.readouterr()
    assert out == blocking and "new programs" not in err


def test_interactive_session_reads_stdin(monkeypatch, capsys):
    monkeypatch.setattr(
        sys, "stdin", io.StringIO("first question\n\nsecond question\nexit\nignored\n")
    )
    argv = ["chat", "--model", CKPT, "--max-new-tokens", "6", "--seed", "1"]
    assert cli.main(argv) == 0
    _, err = capsys.readouterr()
    assert err.count("tokens/s") == 2  # two answers, the rest was skipped / after exit
    assert "interactive" in err


def test_errors_are_reported_not_raised(capsys):
    argv = ["chat", "--model", CKPT, "--temperature", "0", "--max-new-tokens", "4", "hi"]
    assert cli.main(argv) == 2
    assert "temperature" in capsys.readouterr().err
    assert cli.main(["chat", "--model", "/nonexistent/folder", "hi"]) == 2
    assert "error:" in capsys.readouterr().err


def test_layout_delegates_to_processor_cli(monkeypatch):
    processor_cli = pytest.importorskip("minicpmv_jax.processor_cli")
    seen = []
    monkeypatch.setattr(processor_cli, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["layout", "--model", CKPT, "x"]) == 0
    assert seen == [["--model", CKPT, "x"]]


def test_video_question(tmp_path, capsys):
    """--video samples frames with the 4.5 recipe (temporal groups) and answers about them;
    with --image too, the image is a temporal group of its own before the video's."""
    av = pytest.importorskip("av")
    import numpy as np

    path = tmp_path / "clip.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
        for i in range(24):
            frame = np.full((48, 64, 3), (i * 10, 200 - i * 5, 90), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    ckpt = str(FIXTURES / "minicpm-v-4_5" / "checkpoint")
    argv = ["chat", "--model", ckpt, "--video", str(path), "--max-new-tokens", "4",
            "--no-sampling", "--num-beams", "1", "--dtype", "float32", "Describe the video."]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "frames" in err and "tokens/s" in err
    image = str(FIXTURES / "minicpm-v-4_5" / "cases" / "single_448x448" / "image_0.png")
    assert cli.main([*argv[:3], "--image", image, *argv[3:]]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "new programs" not in err


# ---------------------------------------------------------------------------------- --mesh, bench


def test_mesh_gives_the_official_answer(capsys):
    """--mesh 1,2,4 shards the model over 8 (CPU) devices; greedy decoding still gives the
    official chat() answer of the fixture case."""
    case = json.loads((CASE / "case.json").read_text())
    assert cli.main(greedy_argv("What is in the image?", 16, "--mesh", "1,2,4")) == 0
    out, err = capsys.readouterr()
    assert out.rstrip("\n") == case["chat_answer"]
    assert "'fsdp': 2, 'tensor': 4" in err


@pytest.mark.parametrize("mesh", ["1,2", "a,b,c", "1,2,64", "0,1,1", "pipeline=2"])
def test_bad_mesh_is_a_clear_error(capsys, mesh):
    assert cli.main(["chat", "--model", CKPT, "--mesh", mesh, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "mesh" in err and "loading" not in err


def test_mesh_and_quant_reach_from_pretrained(monkeypatch, capsys):
    from minicpmv_jax.errors import CheckpointError
    from minicpmv_jax.model import MiniCPMV

    seen = {}

    def fake(path, **kw):
        seen.update(kw)
        raise CheckpointError("stop here")

    monkeypatch.setattr(MiniCPMV, "from_pretrained", fake)
    assert cli.main(["chat", "--model", CKPT, "--mesh", "2,1,4", "--quant", "int8", "hi"]) == 2
    assert dict(seen["mesh"].shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert seen["quant"] == "int8"
    assert cli.main(["chat", "--model", CKPT, "hi"]) == 2  # defaults: one device, float
    assert seen["mesh"] is None and seen["quant"] is None
    capsys.readouterr()


@pytest.fixture
def no_loading(monkeypatch):
    """MiniCPMV.from_pretrained fails the test if reached."""
    from minicpmv_jax.model import MiniCPMV

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(MiniCPMV, "from_pretrained", fail)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--image", "missing.png"], "--image missing.png: no such file"),
        (["--image", __file__], "--image .*test_cli.py"),
        (["--video", "missing.mp4"], "no such video file"),
        (["--temperature", "0"], "temperature"),
        (["--top-p", "1.5"], "top_p"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--max-slice-nums", "0"], "max_slice_nums"),
        (["--seed", "-3"], "seed"),
        (["--mesh", "1,2"], "--mesh"),
        (["--stream", "--no-sampling"], "--stream"),
    ],
)
def test_arguments_and_files_are_checked_before_loading(no_loading, capsys, extra, match):
    pytest.importorskip("av")
    assert cli.main(["chat", "--model", CKPT, *extra, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error:") and re.search(match, err)
    assert "loading" not in err


def test_mesh_value_may_start_with_minus(monkeypatch, capsys):
    """`--mesh -1,2,4` (no `=`): -1 takes the devices the other axes leave."""
    from minicpmv_jax.errors import CheckpointError
    from minicpmv_jax.model import MiniCPMV

    seen = {}

    def fake(path, **kw):
        seen.update(kw)
        raise CheckpointError("stop here")

    monkeypatch.setattr(MiniCPMV, "from_pretrained", fake)
    assert cli.main(["chat", "--model", CKPT, "--mesh", "-1,2,4", "hi"]) == 2
    assert dict(seen["mesh"].shape) == {"data": 1, "fsdp": 2, "tensor": 4}  # 8 CPU devices
    capsys.readouterr()


def test_ctrl_c_ends_the_session_with_one_line(monkeypatch, capsys):
    class Session:
        def __init__(self, args):
            pass

    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "ChatSession", Session)
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    monkeypatch.setattr(sys.stdin, "readline", interrupt)
    assert cli.main(["chat", "--model", CKPT]) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err


def test_no_pytorch_banner():
    """transformers' "PyTorch was not found" advice is not printed (torch is never needed)."""
    import subprocess

    code = f"from minicpmv_jax.processor import MiniCPMVProcessor as P; P.from_pretrained({CKPT!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "PyTorch" not in run.stderr


def test_bench_delegates_to_benchmarks_run(monkeypatch):
    run = cli._benchmarks_run()
    assert run is not None  # the repository's benchmarks/run.py
    seen = []
    monkeypatch.setattr(run, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench", "--preset", "tiny", "--quick"]) == 0
    assert seen == [["--preset", "tiny", "--quick"]]


def test_bench_without_a_source_checkout(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "benchmarks.run", None)  # as if it cannot be imported
    assert cli.main(["bench", "--quick"]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_chat_on_4_6_gives_the_official_greedy_answer(capsys):
    """`chat` on the tiny 4.6 checkpoint: stdout is the fixture's greedy text (end token dropped,
    stripped as chat() does); 4.6 keeps no per-call statistics, so the CLI reports the whole call."""
    case_dir = FIXTURES / "minicpm-v-4_6" / "cases" / "single_448x448"
    case = json.loads((case_dir / "case.json").read_text())
    argv = [
        "chat", "--model", str(FIXTURES / "minicpm-v-4_6" / "checkpoint"),
        "--image", str(case_dir / "image_0.png"), "--dtype", "float32", "--no-sampling",
        "--num-beams", "1", "--repetition-penalty", "1.0", "--max-new-tokens", "16",
        "Describe this image.",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out.rstrip("\n") == case["generated_text"].replace("<|im_end|>", "").strip()
    assert "compilation included" in err
