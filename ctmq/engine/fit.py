"""CTMQ on any model: fit(model, loaders, schedules, out) trains stage by stage
with checkpoints, resume and reports in one run directory.

    out/config.json                  what is trained (checked on resume)
    out/stages/<key>.safetensors     weights + BN statistics after each stage
    out/stages/<key>.json            that stage's metrics (written after the weights)
    out/report.{json,csv,png}

A stage is complete when both of its files exist; calling fit again with the
same arguments skips complete stages and continues from the last one, so a
run killed at any moment loses at most the stage in progress. Every file is
written to a temp file and renamed. Under torchrun, rank 0 alone writes;
every rank loads the same checkpoints.

The model is any nn.Module whose quantizable layers are ctmq.nn.QConv2d /
QLinear (ctmq.nn.convert, or built with them); set_bits switches their bit
depths between stages. A checkpoint holds the state dict and the stage; the
model's code is the caller's (rebuild it, then load_checkpoint(path, model)).
"""
import copy
import dataclasses
import json
import os
import shutil
import zlib
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .._io import atomic_open
from ..nn import quantized_layers, set_bits
from . import report as report_mod
from .schedule import Schedule
from .trainer import TrainConfig, evaluate, init_distributed, train_stage


class RunConfigError(ValueError):
    """A bad configuration, or one that differs from the run directory's."""


# --------------------------------------------------------------- checkpoints
def save_checkpoint(path, model, meta):
    from safetensors.torch import save
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata={"ctmq": json.dumps(meta)})
    with atomic_open(path, "wb") as f:
        f.write(blob)


def checkpoint_meta(path):
    """The metadata of a stage checkpoint, without reading its tensors."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get("ctmq", "{}"))


def load_checkpoint(path, model=None):
    """(state dict, metadata) of a stage checkpoint; loads it into model if
    given, and sets the model's bit depths to the stage's."""
    from safetensors.torch import load_file
    state = load_file(path)
    meta = checkpoint_meta(path)
    if model is not None:
        model.load_state_dict(state, strict=True)
        stage = meta.get("stage")
        if stage and quantized_layers(model):
            set_bits(model, stage["w_bits"], stage["a_bits"])
    return state, meta


def _write_json(path, obj):
    with atomic_open(path) as f:
        json.dump(obj, f, indent=1)


def prepare_run_dir(out, config, restart, info, defaults=None):
    """Create `out`, or check that the run it holds was made with `config`
    (a JSON-able dict; keys missing from an older config.json take their
    value from `defaults`); rank 0 writes, then every rank waits."""
    path = os.path.join(out, "config.json")
    if info.is_main:
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            new = json.loads(json.dumps(config))
            old = {**{k: v for k, v in (defaults or {}).items() if k not in old}, **old}
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff and not restart:
                details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
                raise RunConfigError(f"{out} holds a run with another configuration ({details}); "
                                     "use another --out, or --restart to discard it")
            if restart:
                shutil.rmtree(os.path.join(out, "stages"), ignore_errors=True)
        os.makedirs(os.path.join(out, "stages"), exist_ok=True)
        _write_json(path, config)
    info.barrier()


# ---------------------------------------------------------------- the loop
class _Teachers:
    """The frozen FP model each low-bit stage distills from: the FP stage that
    began its cycle (its checkpoint), else the starting weights. A copy of
    the model, one kept at a time, rebuilt when the cycle changes."""

    def __init__(self, model, out, init_state):
        self.model, self.out, self.init_state = model, out, init_state
        self.key, self.teacher = None, None

    def get(self, sched, index, distill):
        if not distill or sched.stages[index].is_fp:
            return None
        j = sched.cycle_teacher(index)
        key = "init" if j is None else sched.stage_key(j)
        if key != self.key:
            self.teacher = None  # release the last one before copying
            teacher = copy.deepcopy(self.model)
            if j is None:
                teacher.load_state_dict(self.init_state)
            else:
                load_checkpoint(os.path.join(self.out, "stages", key + ".safetensors"), teacher)
            set_bits(teacher, 32, 32)
            self.key, self.teacher = key, teacher.eval().requires_grad_(False)
        return self.teacher


def _notify(callback, name, *args):
    fn = getattr(callback, name, None)
    if fn is not None:
        fn(*args)


def _stage_seed(seed, key):
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31)


def _check_schedules(schedules):
    if isinstance(schedules, Schedule):
        schedules = [schedules]
    schedules = list(schedules) if isinstance(schedules, (list, tuple)) else None
    if not schedules or not all(isinstance(s, Schedule) for s in schedules):
        raise TypeError("schedules must be a ctmq.engine.Schedule or a non-empty list of them")
    names = [s.name for s in schedules]
    if len(set(names)) != len(names):
        raise ValueError(f"schedules need distinct names, got {names}")
    return schedules


def fit(model: nn.Module, train_loader, val_loader,
        schedules: Union[Schedule, Sequence[Schedule]], out: str, *,
        config: Optional[TrainConfig] = None, seed: int = 0, device=None,
        restart: bool = False, augment: Optional[Callable] = None,
        meta: Optional[dict] = None, log: Callable = print, callback=None,
        run_config: Optional[dict] = None, run_defaults: Optional[dict] = None) -> dict:
    """Train `model` through each schedule (Schedule.ctmq(...), .direct(...),
    .custom(...), or a list of them with distinct names), writing checkpoints
    and reports to `out`; returns the report dict. Every schedule starts from
    the model's weights at the call (its first FP stage, shared by all, is
    trained once).

    config: optimizer, LR schedule, distillation, bf16 autocast and
    channels_last on CUDA, torch.compile (TrainConfig; default TrainConfig());
    device: default cuda when available; under torchrun (WORLD_SIZE > 1) the
    model is wrapped in DistributedDataParallel (give each rank its shard:
    a DistributedSampler); augment: a function applied to each training batch
    on the device; meta: JSON-able values stored in every checkpoint;
    callback: an object with optional methods stage_start(schedule, index,
    model) and stage_end(schedule, index, model, metrics), called around
    each stage this call trains (not around complete stages it skips).
    run_config/run_defaults: what config.json records and checks on resume
    (default: the schedules, config and seed)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not quantized_layers(model):
        raise ValueError("model has no QConv2d/QLinear layers to quantize: build it with them, "
                         "or call ctmq.nn.convert(model) first")
    schedules = _check_schedules(schedules)
    tcfg = config if config is not None else TrainConfig()
    if not isinstance(tcfg, TrainConfig):
        raise TypeError(f"config must be a ctmq.engine.TrainConfig, got {type(tcfg).__name__}")
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    info = init_distributed(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    log = log if info.is_main else (lambda *a, **k: None)
    if run_config is None:  # (batch_size and workers are the loaders', recorded as such)
        run_config = {"seed": seed, "schedules": [s.to_dict() for s in schedules],
                      "train": {k: v for k, v in dataclasses.asdict(tcfg).items()
                                if k not in ("batch_size", "workers", "progress", "compile")},
                      "batch_size": getattr(train_loader, "batch_size", None)}
    prepare_run_dir(out, run_config, restart, info, run_defaults)

    channels_last = device.type == "cuda" and tcfg.channels_last
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = model
    if info.enabled:  # (DDP's constructor gives every rank rank 0's parameters and buffers)
        forward = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if device.type == "cuda" else None)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    if tcfg.compile:
        forward = torch.compile(forward)
    loaders = (train_loader, val_loader)
    meta = dict(meta or {})
    teachers = _Teachers(model, out, init_state)
    rows = []
    for sched in schedules:
        log(str(sched))
        model.load_state_dict(init_state)
        pending = None  # checkpoint of the last complete stage, loaded before training on
        for i, stage in enumerate(sched.stages):
            key = sched.stage_key(i)
            ckpt = os.path.join(out, "stages", key + ".safetensors")
            metrics_path = os.path.join(out, "stages", key + ".json")
            label = f"{sched.name} {i}/{len(sched.stages) - 1} c{stage.cycle} {stage.label}"
            if os.path.exists(ckpt) and os.path.exists(metrics_path):
                trained = checkpoint_meta(ckpt).get("stage")
                if trained != dataclasses.asdict(stage):
                    raise RunConfigError(
                        f"{ckpt} holds stage {trained}, but schedule {sched.name!r} now asks "
                        f"for {dataclasses.asdict(stage)} there; use another --out, or "
                        f"--restart to discard the run")
                with open(metrics_path) as f:
                    metrics = json.load(f)
                log(f"{label}: complete (top-1 {metrics['top1']:.2f}%), skipped")
                pending = ckpt
            else:
                if pending:
                    load_checkpoint(pending, model)
                    pending = None
                teacher = teachers.get(sched, i, tcfg.distill)  # before seeding
                torch.manual_seed(_stage_seed(seed, key))
                _notify(callback, "stage_start", sched, i, model)
                metrics = train_stage(model, stage, label, loaders, tcfg, device, info,
                                      augment=augment, forward=forward, teacher=teacher)
                metrics["top1"], metrics["top5"] = evaluate(model, val_loader, device, tcfg)
                log(f"{label}: top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% "
                    f"loss {metrics['train_loss']:.4f} ({metrics['seconds']:.1f} s)")
                if info.is_main:
                    save_checkpoint(ckpt, model, dict(meta, stage=dataclasses.asdict(stage),
                                                      schedule=sched.name, key=key))
                    _write_json(metrics_path, metrics)
                info.barrier()
                _notify(callback, "stage_end", sched, i, model, metrics)
            rows.append(dict(schedule=sched.name, index=i, key=key, cycle=stage.cycle,
                             label=stage.label, w_bits=stage.w_bits, a_bits=stage.a_bits,
                             epochs=stage.epochs, top1=metrics["top1"], top5=metrics["top5"],
                             train_loss=metrics["train_loss"], seconds=metrics["seconds"]))
        if pending:
            load_checkpoint(pending, model)
    rep = report_mod.build(schedules, rows, run_config)
    if info.is_main:
        report_mod.write(out, rep)
    info.barrier()
    return rep
