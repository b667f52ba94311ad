"""benchmarks/gpu_suite.sh's own plumbing, on any machine (SUITE_DRY_RUN=1 runs
each step as a sleep): the deadline skips what is left, and however the suite
ends it prints the summary and leaves at most 6 files in $OUT."""

import os
import pathlib
import signal
import subprocess
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
STEPS = [
    "build",
    "tests_mma",
    "tests_binary",
    "bench_binary_conv",
    "bench_deploy",
    "tests_quant",
    "bench_fake_quant",
    "bench_qat_step",
]


def _suite(out, **env):
    full = dict(os.environ, OUT=str(out), SUITE_DRY_RUN="1", **env)
    return subprocess.Popen(
        ["bash", str(SUITE)], env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _summary(out):
    rows = {}
    for line in (out / "summary.txt").read_text().splitlines()[2:]:
        parts = line.split()
        if parts and parts[0] in STEPS:
            rows[parts[0]] = " ".join(parts[1:3]) if parts[1] == "skipped" else parts[1]
    return rows


@pytest.mark.slow
def test_deadline_skips_the_rest_and_summary_is_written(tmp_path):
    # 15 s of the deadline are kept for stopping a step and the summary: 8 s for steps
    proc = _suite(tmp_path, SUITE_DEADLINE_S="23", SUITE_DRY_RUN_SLEEP="1")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out  # 2: steps were skipped
    rows = _summary(tmp_path)
    assert list(rows) == STEPS, out
    assert rows["build"] == "ok" and rows["tests_mma"] == "ok"
    assert rows["bench_qat_step"] == "skipped (deadline)"
    # one tarball of logs, not a file per step (only 8 files come back from a GPU machine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz", "summary.txt"]
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        logs = {pathlib.Path(n).name for n in tar.getnames()}
    assert {f"{s}.log" for s, st in rows.items() if st == "ok"} <= logs


def test_each_stage_runs_alone(tmp_path):
    proc = _suite(tmp_path, SUITE_STAGE="2", SUITE_DRY_RUN_SLEEP="0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert list(_summary(tmp_path)) == [
        "build",
        "tests_quant",
        "bench_fake_quant",
        "bench_qat_step",
    ]


@pytest.mark.slow
def test_sigterm_mid_step_still_writes_the_summary(tmp_path):
    proc = _suite(tmp_path, SUITE_DRY_RUN_SLEEP="30")
    time.sleep(2)
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert time.time() - start < 10, "the suite waited for the step to end"
    assert proc.returncode == 1, out
    assert _summary(tmp_path) == {"build": "interrupted"}
    assert (tmp_path / "logs.tar.gz").exists()


@pytest.mark.parametrize("stage", ["3"])
def test_bad_stage_fails(tmp_path, stage):
    proc = _suite(tmp_path, SUITE_STAGE=stage, SUITE_DRY_RUN_SLEEP="0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "SUITE_STAGE must be" in out


@pytest.mark.parametrize("stages,deadline", [("1", 470), ("2", 330), ("1 2", 800)])
def test_default_deadline_is_budgeted_per_stage(tmp_path, stages, deadline):
    """From a cold machine stage 1 builds the CUDA kernels (about 45 s on an
    H200) before its tests and benchmarks: each stage has its own budget."""
    proc = _suite(tmp_path, SUITE_STAGE=stages, SUITE_DRY_RUN_SLEEP="0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"of a {deadline} s deadline" in (tmp_path / "summary.txt").read_text()
