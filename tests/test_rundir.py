"""The run directory is trustworthy: a changed model is refused on resume, a
damaged checkpoint is named and trained again, a resumed run computes what an
uninterrupted one does, one process at a time trains in it, stale temp files
go, files follow the umask, and progress shows up in a log file."""

import json
import os
import re
import stat

import pytest
import torch
from torch import nn

from ctmq import cli
from ctmq.engine import (
    CheckpointError,
    RunConfig,
    RunConfigError,
    Schedule,
    TrainConfig,
    fit,
    load_checkpoint,
    run,
)
from ctmq.engine.rundir import RunLock
from ctmq.files import atomic_open
from ctmq.nn import QConv2d

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
    return RunConfig(**{"out": str(tmp_path / "run"), **TINY, **kw})


def _quiet(*a, **k):
    pass


class Net(nn.Module):
    def __init__(self, extra=False, width=8):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.q = QConv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.extra = QConv2d(width, width, 3, padding=1) if extra else None
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = self.bn(self.q(self.stem(x)))
        if self.extra is not None:
            x = self.extra(x)
        return self.fc(x.mean((2, 3)))


def _loaders(n=64):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(
        ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    return train, torch.utils.data.DataLoader(ds, batch_size=64)


def _fit(model, out, log=_quiet, **kw):
    return fit(
        model,
        *_loaders(),
        Schedule.ctmq(2, 1, 1, 1, fp_epochs=1),
        str(out),
        config=TrainConfig(progress=False),
        log=log,
        **kw,
    )


def test_a_changed_model_is_refused_on_resume(tmp_path):
    out = tmp_path / "run"
    _fit(Net(), out)
    with pytest.raises(RunConfigError, match=r"another model \(extra is new\).*--restart"):
        _fit(Net(extra=True), out)
    with pytest.raises(RunConfigError, match=r"another model \(stem.weight was \[8, 1, 3, 3\]"):
        _fit(Net(width=4), out)
    _fit(Net(extra=True), out, restart=True)  # a restart discards the old run
    assert json.loads((out / "model.json").read_text())["modules"][-2][0] == "extra"


def test_a_damaged_checkpoint_is_named_and_trained_again(tmp_path):
    out = tmp_path / "run"
    _fit(Net(), out)
    ckpt = sorted((out / "stages").glob("ctmq-01-*.safetensors"))[0]
    whole = ckpt.read_bytes()
    ckpt.write_bytes(whole[:-100])  # truncated
    with pytest.raises(CheckpointError, match=f"{ckpt}: truncated"):
        load_checkpoint(ckpt, Net())
    lines = []
    _fit(Net(), out, log=lines.append)
    assert any(
        str(ckpt) in line and "truncated" in line and "training the stage again" in line
        for line in lines
    ), lines
    assert load_checkpoint(ckpt)[0].keys() == Net().state_dict().keys()
    # a checkpoint without its metrics file (a run killed between the two
    # writes) is not damage: the stage is trained again without a word
    metrics = ckpt.with_suffix(".json")
    metrics.unlink()
    lines = []
    _fit(Net(), out, log=lines.append)
    assert metrics.exists() and not any("training the stage again" in x for x in lines), lines
    # a flipped byte in the tensor data fails the checksum
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(ckpt)


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """The same numbers, bit for bit, after an interruption at any stage: each
    stage seeds the shuffling, augmentation and initialization it draws."""
    whole = run(_cfg(tmp_path, out=str(tmp_path / "whole")), log=_quiet)
    cfg = _cfg(tmp_path, out=str(tmp_path / "parts"))

    class Stop(Exception):
        pass

    class StopAt:
        def __init__(self, n):
            self.n, self.seen = n, 0

        def stage_start(self, sched, i, model):
            self.seen += 1
            if self.seen == self.n:
                raise Stop

    for n in (2, 3):  # interrupted twice, resumed each time
        with pytest.raises(Stop):
            run(cfg, log=_quiet, callback=StopAt(n))
    parts = run(cfg, log=_quiet)
    key = lambda r: (r["schedule"], r["index"], r["top1"], r["top5"], r["train_loss"])  # noqa: E731
    assert [key(r) for r in parts["stages"]] == [key(r) for r in whole["stages"]]
    for path in sorted((tmp_path / "whole" / "stages").glob("*.safetensors")):
        a, _ = load_checkpoint(path)
        b, _ = load_checkpoint(tmp_path / "parts" / "stages" / path.name)
        assert all(torch.equal(a[k], b[k]) for k in a), path.name


def test_one_process_at_a_time_and_stale_temp_files_go(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(str(out)):
        with pytest.raises(
            RunConfigError, match=f"{out} is in use by another ctmq process \\(pid {os.getpid()}\\)"
        ):
            _fit(Net(), out)
    (out / "stages").mkdir()
    stale = [out / "config.json.k2j4.tmp", out / "stages" / "x.safetensors.a1b2.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    keep = out / "stages" / "notes.txt"
    keep.write_text("mine")
    _fit(Net(), out)
    assert not any(p.exists() for p in stale) and keep.exists()
    with RunLock(str(out)):  # released when fit returned
        pass


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_open(tmp_path / "a.json") as f:
            f.write("{}")
        _fit(Net(), tmp_path / "run")
    finally:
        os.umask(old)
    modes = {
        stat.S_IMODE(p.stat().st_mode)
        for p in [tmp_path / "a.json", *(tmp_path / "run").rglob("*.json")]
    }
    assert modes == {0o640}


def test_out_that_is_a_file_is_one_clear_error(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(["train", "--out", str(f), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"out {f} is a file" in err and "Traceback" not in err


def test_progress_lines_when_not_on_a_terminal(tmp_path, capsys):
    """stderr is not a terminal under pytest: one line per epoch, no bars."""
    cfg = _cfg(tmp_path, schedule="direct", cycles=1, progress=True)
    run(cfg)
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if " epoch " in line]
    assert len(lines) == 3  # the FP stage (1 epoch) and W1A1 (2 epochs: the same total as ctmq)
    pattern = r".*: loss \d+\.\d+, train top-1 \d+\.\d+%, \d+ img/s, stage ETA \d+:\d\d:\d\d"
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    # each stage's last epoch leaves nothing to wait for
    assert lines[0].endswith("ETA 0:00:00") and lines[2].endswith("ETA 0:00:00"), lines
    assert [line.split(": loss")[0].split(" epoch ")[1] for line in lines] == ["1/1", "1/2", "2/2"]
    assert "\r" not in out.err


def test_a_checkpoint_is_read_once_to_load_and_its_header_alone_for_metadata(tmp_path, monkeypatch):
    """load_checkpoint checks and loads the same bytes (one read of the file);
    checkpoint_meta reads the header only; a malformed header is a
    CheckpointError naming the file."""
    import builtins

    from ctmq.engine import CheckpointError, checkpoint_meta, load_checkpoint, save_checkpoint

    model = nn.Linear(64, 64)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, {"stage": None, "note": "x"})
    size = path.stat().st_size
    reads = []
    real_open = builtins.open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def fileno(self):
            return self.f.fileno()

        def read(self, n=-1):
            data = self.f.read(n)
            reads.append(len(data))
            return data

    def counting_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Counting(f) if os.fspath(file) == os.fspath(path) and "b" in mode else f

    monkeypatch.setattr(builtins, "open", counting_open)
    assert checkpoint_meta(path)["note"] == "x"
    assert 0 < sum(reads) < size // 4, (reads, size)
    reads.clear()
    state, meta = load_checkpoint(path, nn.Linear(64, 64))
    assert sum(reads) == size and meta["note"] == "x"
    monkeypatch.undo()
    empty = tmp_path / "empty.safetensors"  # a model without tensors: nothing to check
    save_checkpoint(empty, nn.ReLU(), {"note": "none"})
    assert load_checkpoint(empty, nn.ReLU()) == ({}, {"note": "none"})
    blob = bytearray(path.read_bytes())
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = "nope"
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(blob[8 + n :]))
    with pytest.raises(CheckpointError, match=f"{path}: unreadable header"):
        checkpoint_meta(path)
