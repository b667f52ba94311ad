"""Under torchrun, 2 CPU processes (gloo) finish a CTMQ run with identical weights
(ctmq train's run, and ctmq.engine.fit on a user's converted model); rank 0
alone writes checkpoints and reports."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # starts two training processes

WORKER = pathlib.Path(__file__).with_name("ddp_worker.py")


@pytest.mark.parametrize("mode", ["0", "fit"], ids=["ctmq-train", "fit-user-model"])
def test_two_processes_finish_with_identical_weights(tmp_path, mode):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(WORKER),
            str(out),
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    last = load_file(str(out / "stages" / "ctmq-02-c1-W1A1.safetensors"))
    for k in last:
        assert torch.equal(last[k], r0[k]), k
    assert (out / "report.json").exists()
    assert not list((out / "stages").glob("*.tmp"))


def test_sync_bn_needs_cuda(tmp_path):
    from ctmq.engine import RunConfig, RunConfigError

    with pytest.raises(RunConfigError, match="sync_bn"):
        RunConfig(device="cpu", sync_bn=True, out=str(tmp_path)).check()


def test_cuda_ranks_choose_their_device_before_nccl_starts(monkeypatch):
    """NCCL binds its communicator to the current device: set_device comes first."""
    from ctmq.engine import trainer

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(trainer.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(trainer.dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(trainer.torch.cuda, "set_device", lambda i: calls.append(f"device {i}"))
    info = trainer.init_distributed("cuda")
    assert calls == ["device 1", "nccl"] and info.local_rank == 1
