"""Training options of ctmq.engine: distillation from the cycle's FP model,
the final stage's length, LR schedules with warm-up, weight decay off the
latent binary weights, and older run directories resuming with them."""

import importlib
import json
import math

import pytest
import torch

from ctmq import cli
from ctmq.engine import RunConfig, Schedule, load_checkpoint, run
from ctmq.engine.trainer import TrainConfig, distillation_loss, lr_factor, param_groups
from ctmq.models import resnet18
from ctmq.nn import set_bits

fit_mod = importlib.import_module("ctmq.engine.fit")  # the module; ctmq.engine.fit is the function
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


def test_distillation_loss_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(6, 10)
    for t in (1.0, 4.0):
        assert distillation_loss(logits, logits.clone(), t).abs().item() < 1e-6
        assert distillation_loss(logits, torch.randn(6, 10), t).item() > 0
    # T^2 KL of softmaxes, batch mean, against a direct computation
    s, q = torch.randn(4, 5), torch.randn(4, 5)
    p_t = torch.softmax(q / 2, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / 2, 1))).sum(1).mean() * 4
    assert torch.allclose(distillation_loss(s, q, 2.0), kl, atol=1e-6)


def test_distillation_gradient_reaches_the_student_only():
    student = torch.nn.Linear(8, 5)
    teacher = torch.nn.Linear(8, 5)
    x = torch.randn(16, 8)
    distillation_loss(student(x), teacher(x), 2.0).backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None and teacher.bias.grad is None


def test_lr_factor_warms_up_then_decays_to_zero():
    total, warm = 100, 10
    for schedule in ("cosine", "linear"):
        ramp = [lr_factor(s, total, warm, schedule) for s in range(warm)]
        assert ramp == sorted(ramp) and ramp[0] == pytest.approx(0.1) and ramp[-1] == 1.0
        assert lr_factor(warm, total, warm, schedule) == 1.0
        tail = [lr_factor(s, total, warm, schedule) for s in range(warm, total + 1)]
        assert tail == sorted(tail, reverse=True) and tail[-1] == pytest.approx(0.0, abs=1e-12)
    mid = warm + (total - warm) // 2
    assert lr_factor(mid, total, warm, "linear") == pytest.approx(0.5)
    assert lr_factor(mid, total, warm, "cosine") == pytest.approx(0.5)
    assert lr_factor(30, 100, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_weight_decay_skips_the_latent_weights_of_quantized_layers():
    model = resnet18(10, stem="cifar", width=0.125)
    cfg = TrainConfig(weight_decay=1e-4, weight_decay_binary=False)
    set_bits(model, 1, 1)
    decayed, free = param_groups(model, cfg)
    binary = {id(m.weight) for m in model.modules() if getattr(m, "w_bits", 32) < 32}
    assert binary and {id(p) for p in free["params"]} == binary and free["weight_decay"] == 0.0
    assert id(model.conv1.weight) in {id(p) for p in decayed["params"]}  # the FP stem decays
    assert len(decayed["params"]) + len(free["params"]) == len(list(model.parameters()))
    set_bits(model, 32, 32)  # an FP stage: everything decays
    (only,) = param_groups(model, cfg)
    assert len(only["params"]) == len(list(model.parameters()))
    (only,) = param_groups(model, TrainConfig(weight_decay=1e-4))  # the default
    assert len(only["params"]) == len(list(model.parameters()))


def test_final_epochs_and_cycle_teachers():
    s = Schedule.ctmq(
        start_bits=3, target_bits=1, cycles=2, epochs_per_stage=2, fp_epochs=1, final_epochs=5
    )
    assert [(st.label, st.epochs) for st in s.stages] == [
        ("FP", 1),
        ("W3A3", 2),
        ("W2A2", 2),
        ("W1A1", 5),
    ] * 2
    assert [s.cycle_teacher(i) for i in range(8)] == [None, 0, 0, 0, None, 4, 4, 4]
    d = Schedule.direct_matching(s)
    assert d.total_epochs == s.total_epochs and d.cycle_teacher(1) == 0
    no_fp = Schedule.ctmq(2, 1, 2, 1, fp_epochs=0)  # cycle 1 learns from the starting weights
    assert [no_fp.cycle_teacher(i) for i in range(5)] == [None, None, None, 2, 2]
    with pytest.raises(ValueError, match="final_epochs"):
        Schedule.ctmq(final_epochs=0)


@pytest.mark.slow
def test_distillation_teaches_each_stage_with_its_cycles_fp_checkpoint(tmp_path, monkeypatch):
    cfg = RunConfig(
        out=str(tmp_path / "run"), distill=True, distill_temperature=2.0, final_epochs=2, **TINY
    )
    seen = []
    real = fit_mod.train_stage

    def spy(model, stage, label, *args, teacher=None, **kwargs):
        seen.append(
            (
                label,
                stage.epochs,
                None
                if teacher is None
                else {k: v.clone() for k, v in teacher.state_dict().items()},
                teacher,
            )
        )
        return real(model, stage, label, *args, teacher=teacher, **kwargs)

    monkeypatch.setattr(fit_mod, "train_stage", spy)
    run(cfg, log=lambda *a: None)
    stages = tmp_path / "run" / "stages"
    ctmq_fp = [
        sorted(stages.glob("init-FP-*.safetensors"))[0],
        sorted(stages.glob("ctmq-*-c2-FP.safetensors"))[0],
    ]
    labels = [
        label.split()[0] + " " + label.split()[-2] + " " + label.split()[-1] for label, *_ in seen
    ]
    assert labels == [
        "ctmq c1 FP",
        "ctmq c1 W2A2",
        "ctmq c1 W1A1",
        "ctmq c2 FP",
        "ctmq c2 W2A2",
        "ctmq c2 W1A1",
        "direct c1 W1A1",
    ]
    assert [epochs for _, epochs, _, _ in seen] == [1, 1, 2, 1, 1, 2, 7]  # equal totals
    expected = [None, ctmq_fp[0], ctmq_fp[0], None, ctmq_fp[1], ctmq_fp[1], ctmq_fp[0]]
    for (label, _, state, teacher), path in zip(seen, expected, strict=True):
        if path is None:
            assert state is None, label
            continue
        ref, _ = load_checkpoint(str(path))
        assert all(torch.equal(state[k], ref[k]) for k in ref), label
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert all(getattr(m, "w_bits", 32) == 32 for m in teacher.modules())


def test_a_run_directory_without_the_new_options_resumes(tmp_path):
    cfg = RunConfig(out=str(tmp_path / "run"), **TINY)
    run(cfg, log=lambda *a: None)
    path = tmp_path / "run" / "config.json"
    old = json.loads(path.read_text())
    for key in (
        "final_epochs",
        "lr_schedule",
        "warmup_epochs",
        "weight_decay_binary",
        "distill",
        "distill_temperature",
        "distill_weight",
    ):
        del old[key]
    path.write_text(json.dumps(old))
    logs = []
    run(cfg, log=logs.append)  # the defaults: the same configuration, every stage complete
    assert sum("skipped" in line for line in logs) == 8  # 6 ctmq + 2 direct stages
    with pytest.raises(ValueError, match="distill: False -> True"):
        run(RunConfig(out=str(tmp_path / "run"), distill=True, **TINY), log=lambda *a: None)


def test_epochs_per_stage_as_a_list_sets_each_step_of_the_ladder():
    s = Schedule.ctmq(start_bits=4, target_bits=1, cycles=2, epochs_per_stage=[3, 1, 2, 4])
    assert [(st.label, st.epochs) for st in s.stages] == [
        ("FP", 3),
        ("W4A4", 3),
        ("W3A3", 1),
        ("W2A2", 2),
        ("W1A1", 4),
    ] * 2
    s = Schedule.ctmq(3, 1, 1, (1, 2, 3), fp_epochs=0, final_epochs=6)  # final_epochs wins
    assert [(st.label, st.epochs) for st in s.stages] == [("W3A3", 1), ("W2A2", 2), ("W1A1", 6)]
    cfg = RunConfig(epochs_per_stage=[2, 1, 1, 5], cycles=1).check()
    assert cfg.resolved_fp_epochs() == 2
    assert [st.epochs for st in cfg.schedules()[0].stages] == [2, 2, 1, 1, 5]
    assert cfg.schedules()[1].total_epochs == 11  # direct: same total
    with pytest.raises(ValueError, match=r"2 values given for a ladder of 4 steps"):
        Schedule.ctmq(4, 1, 1, [1, 2])
    with pytest.raises(ValueError, match=r"epochs_per_stage\[1\] must be >= 1"):
        Schedule.ctmq(4, 1, 1, [1, 0, 1, 1])
    with pytest.raises(TypeError, match="an int or a list of 4 ints"):
        Schedule.ctmq(4, 1, 1, "2")
    with pytest.raises(ValueError, match="epochs_per_stage"):
        RunConfig(epochs_per_stage=[1, 1]).check()


def test_cli_epochs_per_stage_takes_one_value_or_a_list(tmp_path, monkeypatch):
    got = []
    monkeypatch.setattr("ctmq.engine.run", lambda cfg, restart=False: got.append(cfg))
    monkeypatch.setattr("ctmq.engine.report.format_table", lambda rep: "")
    cli.main(["train", "--out", str(tmp_path / "a"), "--epochs-per-stage", "3"])
    cli.main(["train", "--out", str(tmp_path / "b"), "--epochs-per-stage", "2,2,2,4"])
    assert [c.epochs_per_stage for c in got] == [3, [2, 2, 2, 4]]


def test_cli_training_options_reach_the_config(tmp_path, monkeypatch):
    got = {}
    monkeypatch.setattr("ctmq.engine.run", lambda cfg, restart=False: got.setdefault("cfg", cfg))
    monkeypatch.setattr("ctmq.engine.report.format_table", lambda rep: "")
    cli.main(
        [
            "train",
            "--out",
            str(tmp_path / "r"),
            "--final-epochs",
            "4",
            "--lr-schedule",
            "linear",
            "--warmup-epochs",
            "0.5",
            "--no-weight-decay-binary",
            "--distill",
            "--distill-temperature",
            "3",
            "--distill-weight",
            "0.5",
        ]
    )
    cfg = got["cfg"]
    assert (
        cfg.final_epochs,
        cfg.lr_schedule,
        cfg.warmup_epochs,
        cfg.weight_decay_binary,
        cfg.distill,
        cfg.distill_temperature,
        cfg.distill_weight,
    ) == (4, "linear", 0.5, False, True, 3.0, 0.5)
    t = cfg.train_config()
    assert (t.lr_schedule, t.warmup_epochs, t.distill) == ("linear", 0.5, True)


def test_options_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="warmup_epochs .* shorter than the shortest stage"):
        RunConfig(warmup_epochs=2, epochs_per_stage=2).check()
    RunConfig(warmup_epochs=1.5, epochs_per_stage=2).check()
    with pytest.raises(ValueError, match="distill: the first cycle has no FP stage"):
        RunConfig(distill=True, fp_epochs=0).check()


def test_a_changed_schedule_does_not_reuse_stale_stages(tmp_path):
    """A complete stage is reused only if its checkpoint was trained as the
    schedule now asks."""
    cfg = RunConfig(out=str(tmp_path / "run"), fp_epochs=1, **{**TINY, "cycles": 1})
    run(
        cfg, log=lambda *a: None, schedules=[Schedule.custom("mine", [{"bits": 1, "epochs": 1}], 1)]
    )
    with pytest.raises(ValueError, match="holds stage .* now asks for"):
        run(
            cfg,
            log=lambda *a: None,
            schedules=[Schedule.custom("mine", [{"bits": 1, "epochs": 2}], 1)],
        )
