"""The ctmq command line: bench runs end to end, bad flags exit 2 with a message."""

import json
import subprocess
import sys

import pytest

from ctmq import cli


def test_bench_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        cli.main(["bench", "quant", "--device", "cpu", "--numel", "9216", "--json", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "act W4A4 clipped" in text and "vs eager" in text
    data = json.loads(out.read_text())
    impls = {r["impl"] for r in data["rows"]}
    assert impls == {"ctmq", "eager", "torch.fake_quantize"}
    assert len(data["rows"]) == 15 and data["copy_gbps"] > 0
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in data["rows"])


def test_bench_rejects_bad_flags(capsys):
    assert cli.main(["bench", "quant", "--device", "cpu", "--numel", "10"]) == 2
    assert "--numel must be >= 4608" in capsys.readouterr().err
    assert cli.main(["bench", "quant", "--device", "cpu", "--numel", "9216", "--only", "nope"]) == 2
    assert "--only 'nope' matches no case" in capsys.readouterr().err


def test_console_script_help():
    res = subprocess.run(
        [sys.executable, "-m", "ctmq.cli", "bench", "quant", "--help"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "--numel" in res.stdout


@pytest.mark.parametrize(
    "argv",
    [[], ["train"], ["study"], ["export"], ["infer"], ["bench"], ["bench", "deploy"]],
    ids=lambda a: " ".join(a) or "ctmq",
)
def test_every_help_renders(argv, capsys):
    """--help of the command and of each subcommand: exit 0, a percent sign
    printed as one."""
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("usage: ctmq"), out
    assert "%%" not in out and "%(" not in out
    if not argv:
        assert "95% confidence" in out


def _benchmark_module(name):
    """A script of benchmarks/ (not a package) imported by path."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_qat_step_benchmark_runs_small(tmp_path):
    mod = _benchmark_module("bench_qat_step")
    out = tmp_path / "qat.json"
    mod.main(
        [
            "--device",
            "cpu",
            "--batch",
            "2",
            "--image-size",
            "32",
            "--width",
            "0.125",
            "--steps",
            "1",
            "--bits",
            "32",
            "1",
            "--json",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["bits"], r["quantizers"]) for r in rows] == [(32, "-"), (1, "ctmq"), (1, "torch")]
    assert all(r["ms"] > 0 for r in rows)


def test_binary_conv_benchmark_runs(tmp_path):
    mod = _benchmark_module("bench_binary_conv")
    out = tmp_path / "b.json"
    mod.main(["--batch", "1", "--min-time", "0.01", "--json", str(out)])
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 7 and all(
        r["ctmq_ms"] > 0 and r["speedup"] > 0 for r in data["rows"]
    )


def test_deploy_benchmark_runs(tmp_path, capsys):
    import ctmq

    if not ctmq.has_extension():
        pytest.skip("ctmq._C not built")
    mod = _benchmark_module("bench_deploy")
    out = tmp_path / "d.json"
    mod.main(
        [
            "--models",
            "resnet18,vgg_small",
            "--width",
            "0.125",
            "--batch",
            "1",
            "--threads",
            "1",
            "--engines",
            "executor",
            "--peers",
            "torch",
            "--min-time",
            "0.05",
            "--json",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert [(r["model"], r["size"], r["batch"], r["threads"]) for r in data["rows"]] == [
        ("resnet18", 224, 1, 1),
        ("vgg_small", 32, 1, 1),
    ]
    assert all(
        set(r["ms"]) == {"executor", "torch"} and min(r["ms"].values()) > 0 for r in data["rows"]
    )
    assert all(a["artifact_bytes"] < a["checkpoint_bytes"] for a in data["artifacts"].values())
    # the per-layer split and the binary convs against the path's peak
    split = data["splits"][0]["native kernels"]
    assert split["parts"]["binary convs"] > 0 and split["wall_ms"] >= split["parts"]["binary convs"]
    shapes = data["floors"][0]["shapes"]
    assert sum(s["layers"] for s in shapes) == 16 and all(0 < s["pct_peak"] for s in shapes)
    # resnet18 at width 1/8 (8 channels): one 64-bit word per tap and pixel
    assert (
        sum(s["words"] for s in shapes)
        == 9 * (4 * 8 * 56**2 + 16 * (28**2 * 4) + 32 * 14**2 * 4 + 64 * 7**2 * 4) // 1
    )
    text = capsys.readouterr().out
    assert text.count("smaller") == 2 and "where the time goes" in text
    with pytest.raises(SystemExit):
        mod.main(["--models", "resnet50"])
    with pytest.raises(SystemExit):
        mod.main(["--peers", "tflite"])


def test_train_without_the_training_extras_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a)
    )
    assert cli.main(["train", "--out", "unused"]) == 2
    assert "training needs tqdm: pip install 'ctmq[train]'" in capsys.readouterr().err


def test_importing_every_module_runs_no_command():
    """Tools that walk the package (the wheel check, docs generators) import
    ctmq.cli.__main__ too: it must not run the command then."""
    import importlib
    import pkgutil

    import ctmq

    for mod in pkgutil.walk_packages(ctmq.__path__, "ctmq."):
        importlib.import_module(mod.name)
