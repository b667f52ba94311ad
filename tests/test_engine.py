"""ctmq.engine: schedules, exact weight transfer, resume after a kill, reports,
bad configurations, divergence."""

import csv
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from ctmq import cli, data
from ctmq.engine import (
    RunConfig,
    RunConfigError,
    Schedule,
    StageDiverged,
    TrainConfig,
    load_checkpoint,
    run,
)

TINY = dict(
    dataset="digits",
    width=0.125,
    start_bits=2,
    target_bits=1,
    cycles=2,
    epochs_per_stage=1,
    batch_size=256,
    progress=False,
)


def _cfg(tmp_path, **kw):
    return RunConfig(out=str(tmp_path / "run"), **{**TINY, **kw})


def test_schedules():
    s = Schedule.ctmq(start_bits=4, target_bits=1, cycles=2, epochs_per_stage=3, fp_epochs=2)
    labels = [st.label for st in s.stages]
    assert labels == ["FP", "W4A4", "W3A3", "W2A2", "W1A1"] * 2
    assert [st.cycle for st in s.stages] == [1] * 5 + [2] * 5
    assert s.total_epochs == 2 + 12 + 2 + 12
    d = Schedule.direct_matching(s)
    assert [st.label for st in d.stages] == ["FP", "W1A1"]
    assert d.total_epochs == s.total_epochs and d.stages[0] == s.stages[0]
    assert d.stage_key(0) == s.stage_key(0)  # the first FP stage is shared
    assert Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert "W3A3" in str(s)
    no_fp = Schedule.ctmq(2, 1, 2, 1, fp_epochs=0)
    assert [st.label for st in no_fp.stages] == ["W2A2", "W1A1", "FP", "W2A2", "W1A1"]
    d = Schedule.direct_matching(no_fp)  # no FP stage to share: all epochs at W1A1
    assert [(st.label, st.epochs) for st in d.stages] == [("W1A1", no_fp.total_epochs)]


def test_each_stage_gets_the_optimizer_its_config_names():
    from ctmq.engine.trainer import _optimizer

    model = torch.nn.Linear(4, 2)
    sgd = _optimizer(model, TrainConfig(optimizer="sgd", lr=0.5, momentum=0.8))
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.8
    adam = _optimizer(model, TrainConfig(optimizer="adam", lr=0.5))
    assert type(adam) is torch.optim.Adam and adam.defaults["lr"] == 0.5


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(start_bits=1, target_bits=2), "start_bits"),
        (dict(target_bits=0), "target_bits"),
        (dict(start_bits=9), "start_bits"),
        (dict(cycles=0), "cycles"),
        (dict(epochs_per_stage=0), "epochs_per_stage"),
    ],
)
def test_schedule_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Schedule.ctmq(**kwargs)


class _Recorder:
    def __init__(self):
        self.starts = []

    def stage_start(self, sched, i, model):
        self.starts.append((sched.name, i, {k: v.clone() for k, v in model.state_dict().items()}))


def test_weight_transfer_between_stages_is_exact_and_reports(tmp_path):
    cfg = _cfg(tmp_path)
    rec = _Recorder()
    rep = run(cfg, log=lambda *a: None, callback=rec)
    stages_dir = tmp_path / "run" / "stages"
    scheds = {s.name: s for s in cfg.schedules()}
    checked = 0
    for name, i, state in rec.starts:
        if i == 0:
            continue
        prev, _ = load_checkpoint(
            str(stages_dir / (scheds[name].stage_key(i - 1) + ".safetensors"))
        )
        assert prev.keys() == state.keys()
        for k in prev:
            assert torch.equal(prev[k], state[k]), (name, i, k)
        checked += 1
    assert checked == 5 + 1  # every ctmq stage after the first, and direct's W1A1
    # the shared FP stage was trained once
    assert [(n, i) for n, i, _ in rec.starts].count(("direct", 0)) == 0
    # reports: json, csv, png, consistent with the schedules
    assert len(rep["stages"]) == sum(len(s.stages) for s in scheds.values())
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["stages"] == json.loads(json.dumps(rep["stages"]))
    with open(tmp_path / "run" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["schedule"], r["label"]) for r in rows] == [
        (r["schedule"], r["label"]) for r in rep["stages"]
    ]
    assert float(rows[-1]["top1"]) == pytest.approx(rep["final"]["direct"]["top1"])
    assert set(rep["final"]) == {"ctmq", "direct"} and rep["final"]["ctmq"]["label"] == "W1A1"
    for r in rep["stages"]:
        assert 0 <= r["top1"] <= r["top5"] <= 100 and r["seconds"] > 0
    assert (tmp_path / "run" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the checkpoint carries what export needs
    _, meta = load_checkpoint(str(stages_dir / (scheds["ctmq"].stage_key(2) + ".safetensors")))
    assert meta["stage"]["w_bits"] == 1 and meta["model"]["stem"] == "cifar"
    assert len(meta["class_names"]) == 10


@pytest.mark.slow
def test_resume_after_kill_continues_from_last_complete_stage(tmp_path):
    out = tmp_path / "run"
    args = [
        "--dataset",
        "digits",
        "--width",
        "0.125",
        "--start-bits",
        "2",
        "--cycles",
        "2",
        "--epochs-per-stage",
        "1",
        "--batch-size",
        "256",
        "--no-progress",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctmq.cli", "train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = out / "stages" / "ctmq-01-c1-W2A2.json"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.exists(), (
        proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    assert "ctmq-01-c1-W2A2.json" in done and len(done) < 7
    assert not list((out / "stages").glob("*.tmp"))  # a kill leaves no half-written file in place
    assert cli.main(["train", *args]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    assert all(after[k] == v for k, v in done.items())  # complete stages were not redone
    assert len(after) == 7  # init FP + 5 more ctmq stages + direct W1A1
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["stages"]) == 8


class _Interrupted(Exception):
    pass


class _StopAt(_Recorder):
    """Records each stage's starting state; interrupts the run when stage `index` starts."""

    def __init__(self, index):
        super().__init__()
        self.index = index

    def stage_start(self, sched, i, model):
        super().stage_start(sched, i, model)
        if i == self.index:
            raise _Interrupted


def test_resume_starts_from_the_last_complete_checkpoint(tmp_path):
    """A resumed run trains on from the last complete stage's weights and BN statistics."""
    cfg = _cfg(tmp_path, schedule="ctmq", cycles=1)  # FP, W2A2, W1A1
    with pytest.raises(_Interrupted):
        run(cfg, log=lambda *a: None, callback=_StopAt(2))  # FP and W2A2 complete
    stages, sched = tmp_path / "run" / "stages", cfg.schedules()[0]
    first, last = (
        load_checkpoint(str(stages / f"{sched.stage_key(i)}.safetensors"))[0] for i in (0, 1)
    )
    resumed = _StopAt(2)
    with pytest.raises(_Interrupted):
        run(cfg, log=lambda *a: None, callback=resumed)
    assert [(name, i) for name, i, _ in resumed.starts] == [("ctmq", 2)]
    state = resumed.starts[0][2]
    assert state.keys() == last.keys()
    assert all(torch.equal(state[k], last[k]) for k in state)
    assert not all(torch.equal(state[k], first[k]) for k in state)  # the FP stage's weights differ


def test_changed_config_against_run_dir_fails_unless_restart(tmp_path, capsys):
    cfg = _cfg(tmp_path, schedule="direct", cycles=1)
    run(cfg, log=lambda *a: None)
    changed = _cfg(tmp_path, schedule="direct", cycles=1, lr=0.01)
    with pytest.raises(RunConfigError, match="another configuration.*lr"):
        run(changed, log=lambda *a: None)
    rep = run(changed, restart=True, log=lambda *a: None)
    assert rep["config"]["lr"] == 0.01
    # runtime-only settings may change on resume
    run(
        _cfg(tmp_path, schedule="direct", cycles=1, lr=0.01, workers=0, progress=True),
        log=lambda *a: None,
    )


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--start-bits", "1", "--target-bits", "2"], "start_bits"),
        (["--target-bits", "0"], "target_bits"),
        (["--start-bits", "9"], "start_bits"),
        (["--dataset", "mnist"], "needs --data-root"),
        (["--dataset", "mnist", "--data-root", "/nonexistent/mnist"], "not a directory"),
        (["--fp-checkpoint", "/nonexistent.pth"], "fp_checkpoint"),
    ],
)
def test_cli_bad_configs_fail_clearly(tmp_path, capsys, argv, words):
    assert cli.main(["train", "--out", str(tmp_path / "r"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert "ctmq train: error:" in err and words in err and "Traceback" not in err


def test_cli_unknown_dataset_and_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--dataset", "svhn"])
    assert e.value.code == 2
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"epochs": 3}))
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "unknown option(s) ['epochs']" in capsys.readouterr().err


def test_cli_config_file_and_flags_override(tmp_path, capsys):
    conf = tmp_path / "c.json"
    conf.write_text(
        json.dumps(
            {**TINY, "schedule": "direct", "cycles": 1, "lr": 0.5, "out": str(tmp_path / "r")}
        )
    )
    assert cli.main(["train", "--config", str(conf), "--lr", "0.001"]) == 0
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["config"]["lr"] == 0.001 and rep["config"]["schedule"] == "direct"
    assert "final direct" in capsys.readouterr().out


def test_nan_loss_names_stage_and_step(tmp_path, monkeypatch):
    real = data.load

    def poisoned(name, root=None):
        d = real(name, root)
        x, y = d.train.tensors
        d.train = torch.utils.data.TensorDataset(torch.full_like(x, float("nan")), y)
        return d

    monkeypatch.setattr(data, "load", poisoned)
    with pytest.raises(StageDiverged, match=r"stage ctmq 0/\d+ c1 FP: loss is nan at step 1"):
        run(_cfg(tmp_path), log=lambda *a: None)


def test_the_distillation_teacher_is_the_full_precision_model(tmp_path):
    from ctmq.engine.fit import _Teachers
    from ctmq.nn import QConv2d, quantized_layers, set_bits

    model = torch.nn.Sequential(QConv2d(3, 4, 3), QConv2d(4, 4, 3))
    set_bits(model, 1, 1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    sched = Schedule.ctmq(2, 1, 1, 1, fp_epochs=0)  # W2A2, W1A1: no FP stage in cycle 1
    teacher = _Teachers(model, str(tmp_path), start).get(sched, 1, distill=True)
    assert teacher is not model and not teacher.training
    assert {(q.w_bits, q.a_bits) for q in quantized_layers(teacher)} == {(32, 32)}
    assert {(q.w_bits, q.a_bits) for q in quantized_layers(model)} == {(1, 1)}
    assert not any(p.requires_grad for p in teacher.parameters())


def test_an_fp_checkpoint_of_another_head_loads_the_rest_and_says_so(tmp_path):
    """A torchvision-style state dict whose classifier has 1000 classes (and
    whose shortcuts differ): the rest loads, and the log says what did not."""
    from ctmq.engine.run import build_model

    cfg = _cfg(tmp_path, cycles=1, schedule="ctmq")
    state = build_model(cfg, data.load("digits")).state_dict()
    state["fc.weight"] = torch.zeros(1000, state["fc.weight"].shape[1])
    state["fc.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "fp.pth")
    lines = []
    run(
        _cfg(tmp_path, cycles=1, schedule="ctmq", fp_checkpoint=str(tmp_path / "fp.pth")),
        log=lines.append,
    )
    said = [x for x in lines if x.startswith("fp checkpoint: ")]
    assert len(said) == 1 and re.match(r"fp checkpoint: \d+ tensors not loaded", said[0]), lines
