"""Every bad input to the command line is one line naming the argument and what
was expected (`ctmq <command>: error: ...`, exit 2), never a traceback; infer
goes on past inputs it cannot read; export refuses an unfinished run."""

import json
import shutil

import numpy as np
import pytest
import torch

from ctmq import cli
from ctmq.export import export_binary
from ctmq.models import resnet18
from ctmq.nn import set_bits

TINY = [
    "--width",
    "0.125",
    "--start-bits",
    "2",
    "--epochs-per-stage",
    "1",
    "--batch-size",
    "256",
    "--no-progress",
]


def _fails(argv, capsys, words, status=2):
    try:
        got = cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        got = e.code
    err = capsys.readouterr().err
    assert got == status, err
    assert words in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "config,words",
    [
        ("lr: [0.1, 0.2]\n", "lr must be a number, got [0.1, 0.2]"),
        ('distill: "yes"\n', "distill must be true or false, got 'yes'"),
        ("cycles: 2.5\n", "cycles must be an integer, got 2.5"),
        ("epochs_per_stage: [1, x]\n", "epochs_per_stage must be an integer or a list of integers"),
        ("lr: 0.1\n  batch_size: 3\n", "not valid YAML (line 2"),
        ("- lr\n", "expected a mapping of option names to values"),
        ("dataset: digits\ndata_root: /data\n", "data_root does not apply to the embedded digits"),
        ("optimizer: rmsprop\n", "optimizer must be one of ('sgd', 'adam'), got 'rmsprop'"),
    ],
)
def test_bad_config_values_are_one_line(tmp_path, capsys, config, words):
    path = tmp_path / "c.yaml"
    path.write_text(config)
    _fails(["train", "--config", str(path), "--out", str(tmp_path / "r")], capsys, words)
    assert not (tmp_path / "r").exists()


def test_bad_json_config_and_flag_values(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text("{'lr': 1}")
    _fails(["train", "--config", str(path)], capsys, "not valid JSON")
    _fails(
        ["train", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")],
        capsys,
        "data_root does not apply",
    )
    _fails(["train", "--epochs-per-stage", "1,x"], capsys, "expected comma-separated integers")
    _fails(["train", "--lr", "fast"], capsys, "invalid float value: 'fast'")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    m = resnet18(10, stem="cifar", width=0.125, in_channels=1)
    set_bits(m, 1, 1)
    path = tmp_path_factory.mktemp("art") / "m.ctmq"
    export_binary(m.eval(), path, input_size=8)
    return path


def test_infer_reports_unreadable_inputs_and_goes_on(tmp_path, capsys, artifact):
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((2, 1, 8, 8), np.float32))
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    nan = np.zeros((1, 1, 8, 8), np.float32)
    nan[0, 0, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "dir").mkdir()
    shutil.copy(good, tmp_path / "dir" / "a.npy")
    argv = [
        "infer",
        str(artifact),
        str(good),
        str(tmp_path / "words.npy"),
        str(tmp_path / "nan.npy"),
        str(tmp_path / "broken.png"),
        str(tmp_path / "missing.png"),
        str(tmp_path / "dir"),
        str(tmp_path / "g*.npy"),
        "--topk",
        "2",
        "--json",
        str(tmp_path / "p.json"),
    ]
    err = _fails(argv, capsys, "words.npy: holds <U1 values, expected numbers", status=1)
    for words in (
        "nan.npy: holds NaN or infinite values",
        "broken.png: not a readable image",
        "missing.png: no such file or folder",
        "4 of 10 inputs failed",
    ):
        assert words in err
    preds = json.loads((tmp_path / "p.json").read_text())
    # good.npy (2 rows), dir/a.npy (2 rows), good.npy again through the glob (2 rows)
    assert len(preds) == 6 and all(len(p["top"]) == 2 for p in preds)


def test_infer_bad_flags_and_nothing_readable(tmp_path, capsys, artifact):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    for topk in ("0", "-1", "two"):
        _fails(
            ["infer", str(artifact), str(tmp_path / "x.npy"), "--topk", topk],
            capsys,
            "argument --topk: expected a positive integer",
        )
    _fails(
        ["infer", str(artifact), str(tmp_path / "none.npy")],
        capsys,
        "no input could be classified (1 failed)",
    )
    _fails(
        ["bench", "deploy", str(artifact), "--batch", "0"],
        capsys,
        "argument --batch: expected a positive integer, got 0",
    )


def test_export_refuses_an_unfinished_run_and_a_folder_as_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--schedule", "ctmq", "--cycles", "2", "--out", str(out)]) == 0
    for late in ("ctmq-04-c2-W2A2", "ctmq-05-c2-W1A1"):  # the second cycle, half done
        for ext in (".safetensors", ".json"):
            (out / "stages" / (late + ext)).unlink()
    (out / "report.json").unlink()
    _fails(
        ["export", str(out), "-o", str(tmp_path / "m.ctmq")],
        capsys,
        "is unfinished: its final W1A1 stage ctmq-05-c2-W1A1 is not trained yet; finish the "
        "run, or export the newest finished W1A1 stage with --stage ctmq-02-c1-W1A1",
    )
    assert not (tmp_path / "m.ctmq").exists()
    assert (
        cli.main(["export", str(out), "--stage", "ctmq-02-c1-W1A1", "-o", str(tmp_path / "m.ctmq")])
        == 0
    )
    assert "exported stage ctmq-02-c1-W1A1" in capsys.readouterr().out
    _fails(
        ["export", str(out), "--stage", "ctmq-09", "-o", str(tmp_path / "n.ctmq")],
        capsys,
        "--stage ctmq-09: no such stage",
    )
    _fails(
        ["export", str(out), "--stage", "ctmq-02-c1-W1A1", "-o", str(tmp_path)],
        capsys,
        f"-o {tmp_path} is a directory",
    )
