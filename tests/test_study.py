"""ctmq study: arms x seeds from a shared FP stage, the report built from the
runs' own reports, and confidence intervals on paired seeds."""

import csv
import json
import math

import pytest

from ctmq import cli
from ctmq.cli.train import STUDY_KEYS, read_config_file
from ctmq.engine import RunConfig, RunConfigError, Schedule
from ctmq.engine.study import ARMS, arm_schedules, paired_interval, t975

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


def test_t_quantiles_and_the_paired_interval():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(30) == 2.042
    assert t975(40) == pytest.approx(2.021, abs=1e-3) and t975(120) == pytest.approx(
        1.980, abs=1e-3
    )
    ci = paired_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, half-width 4.303 / sqrt(3)
    assert (ci["mean"], ci["sd"], ci["n"]) == (2.0, 1.0, 3)
    assert ci["low"] == pytest.approx(2 - 4.303 / math.sqrt(3))
    assert ci["high"] == pytest.approx(2 + 4.303 / math.sqrt(3))
    assert paired_interval([0.5])["low"] is None
    with pytest.raises(ValueError):
        t975(0)


def test_arm_schedules():
    cfg = RunConfig(
        start_bits=3, target_bits=1, cycles=2, epochs_per_stage=2, fp_epochs=1, final_epochs=3
    )
    arms = arm_schedules(
        cfg,
        ARMS + ("mine",),
        {
            "mine": [
                {"bits": 2, "epochs": 4},
                {"bits": 32, "epochs": 1},
                {"w_bits": 1, "a_bits": 1, "epochs": 3},
            ]
        },
    )
    total = arms["ctmq"].total_epochs
    assert total == 1 + (2 + 2 + 3) + 1 + (2 + 2 + 3)
    assert arms["direct"].total_epochs == arms["ladder"].total_epochs == total
    assert [(s.label, s.epochs) for s in arms["direct-final"].stages] == [("FP", 1), ("W1A1", 3)]
    assert [(s.label, s.epochs) for s in arms["ladder"].stages] == [
        ("FP", 1),
        ("W3A3", 5),
        ("W2A2", 5),
        ("W1A1", 5),
    ]
    assert [(s.cycle, s.label, s.epochs) for s in arms["mine"].stages] == [
        (1, "FP", 1),
        (1, "W2A2", 4),
        (2, "FP", 1),
        (2, "W1A1", 3),
    ]
    # every arm starts from the same shared FP stage
    assert {s.stage_key(0) for s in arms.values()} == {"init-FP-e1"}
    assert len({s.name for s in arms.values()}) == len(arms)
    with pytest.raises(RunConfigError, match="arm 'nope'"):
        arm_schedules(cfg, ["nope"])
    with pytest.raises(ValueError, match="stage 0"):
        Schedule.custom("bad", [{"bits": 9, "epochs": 1}], 1)


@pytest.mark.slow
def test_study_on_the_digits_reports_what_its_runs_measured(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["study", "--out", str(out), "--seeds", "0,1,2", "--arms", ",".join(ARMS)]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "progress"]
    assert cli.main(argv + ["--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "vs direct (95% CI, paired t)" in printed
    rep = json.loads((out / "study.json").read_text())
    seeds = ["0", "1", "2"]
    runs = {s: json.loads((out / f"seed-{s}" / "report.json").read_text()) for s in seeds}
    for s in seeds:  # one shared FP stage per seed, trained once
        assert len(list((out / f"seed-{s}" / "stages").glob("init-FP-*.safetensors"))) == 1
        firsts = {r["key"] for r in runs[s]["stages"] if r["index"] == 0}
        assert len(firsts) == 1 and firsts.pop().startswith("init-FP")
    assert list(rep["arms"]) == list(ARMS)
    for arm, a in rep["arms"].items():
        top1 = [runs[s]["final"][arm]["top1"] for s in seeds]
        assert [a["top1"][s] for s in seeds] == top1
        mean = sum(top1) / 3
        assert a["top1_mean"] == pytest.approx(mean)
        assert a["top1_sd"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in top1) / 2))
        rows = {s: [r for r in runs[s]["stages"] if r["schedule"] == arm] for s in seeds}
        assert a["curve"] == {s: [r["top1"] for r in rows[s]] for s in seeds}
        assert a["seconds"] == {s: pytest.approx(sum(r["seconds"] for r in rows[s])) for s in seeds}
        # the interval is on the per-seed differences, not on the two arms' spreads
        diffs = [runs[s]["final"][arm]["top1"] - runs[s]["final"]["direct"]["top1"] for s in seeds]
        v = a["vs_direct"]
        assert [v["per_seed"][s] for s in seeds] == pytest.approx(diffs)
        dm = sum(diffs) / 3
        dsd = math.sqrt(sum((d - dm) ** 2 for d in diffs) / 2)
        assert v["mean"] == pytest.approx(dm)
        assert v["low"] == pytest.approx(dm - 4.303 * dsd / math.sqrt(3))
        assert v["high"] == pytest.approx(dm + 4.303 * dsd / math.sqrt(3))
        assert v["test"].startswith("paired t")
    with open(out / "study.csv") as f:
        table = {r["arm"]: r for r in csv.DictReader(f)}
    assert float(table["ctmq"]["top1_mean"]) == pytest.approx(rep["arms"]["ctmq"]["top1_mean"])
    assert (out / "study.png").stat().st_size > 0
    # resumable: a second call trains nothing
    assert cli.main(argv + ["--no-progress"]) == 0
    again = capsys.readouterr().out
    assert again.count("skipped") == 3 * 13 and " s)" not in again  # 2 + 2 + 3 + 6 stages a seed


def test_shipped_configs_parse():
    """configs/*.yaml hold only known options; digits-hard's arms share the
    total epochs, its FP ceiling included."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    values = read_config_file(str(root / "digits-hard.yaml"), STUDY_KEYS)
    seeds, arms, custom = values.pop("seeds"), values.pop("arms"), values.pop("schedules")
    assert len(seeds) >= 3 and set(ARMS) <= set(arms)
    schedules = arm_schedules(RunConfig(**values), arms, custom)
    totals = {name: s.total_epochs for name, s in schedules.items() if name != "direct-final"}
    assert len(set(totals.values())) == 1, totals
    imagenet = RunConfig(**read_config_file(str(root / "imagenet-resnet18.yaml")))
    assert (imagenet.dataset, imagenet.stem, imagenet.block, imagenet.cycles) == (
        "imagenet",
        "imagenet",
        "bireal",
        2,
    )
    assert [s.label for s in imagenet.schedules()[0].stages][:4] == ["W4A4", "W3A3", "W2A2", "W1A1"]


def test_study_cli_input_errors_are_clear(tmp_path, capsys):
    cfg = tmp_path / "s.json"
    for values, words in (
        ({"seeds": "0,x"}, "seeds: expected comma-separated integers"),
        ({"seeds": 5}, "seeds: a list of integers expected"),
        ({"seeds": ["0", "1"]}, "seeds must be distinct integers"),
        ({"seed": 3}, "seed does not apply to a study: use --seeds"),
        (
            {"schedules": {"m": [{"bits": 1, "epochs": 2.5}]}, "arms": ["m"]},
            "epochs must be an int",
        ),
    ):
        cfg.write_text(json.dumps(values))
        assert cli.main(["study", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
