"""`minicpmv-jax layout` (minicpmv_jax.processor_cli)."""

from conftest import FIXTURES

from minicpmv_jax.processor_cli import collapse_runs, main

REAL = FIXTURES / "minicpm-v-4_5-real-tokenizer"


def test_collapse_runs():
    assert collapse_runs("a<unk><unk><unk>b<unk>c", "<unk>") == "a<unk>x3b<unk>c"


def test_layout_1024x768_matches_spec_example(capsys):
    image = REAL / "cases" / "single_1024x768_en" / "image_0.png"
    rc = main(
        [
            "layout",
            "--model",
            str(REAL / "processor"),
            "--image",
            str(image),
            "What is in the image?",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "2 cols x 2 rows" in out and "source (h, w) (28, 37)" in out
    assert "input_ids: 353 tokens" in out  # spec §11.1 (4.5, enable_thinking=False)
    assert "[[7, 71], [73, 137], [139, 203], [206, 270], [272, 336]]" in out
    assert "<image_id>0</image_id><image><unk>x64</image><slice><unk>x64</slice>" in out


def test_layout_bad_image(capsys, tmp_path):
    rc = main(["--model", str(REAL / "processor"), "--image", str(tmp_path / "x.png"), "q"])
    assert rc == 2
    assert "no such file" in capsys.readouterr().err
