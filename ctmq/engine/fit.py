"""CTMQ on any model: fit(model, loaders, schedules, out) trains stage by stage
with checkpoints, resume and reports in one run directory.

    out/config.json                  what is trained (checked on resume)
    out/model.json                   the model's structure (checked on resume)
    out/stages/<key>.safetensors     weights + BN statistics after each stage
    out/stages/<key>.json            that stage's metrics (written after the weights)
    out/report.{json,csv,png}

A stage is complete when both of its files exist and the checkpoint passes its
checksum; calling fit again with the same arguments skips complete stages and
continues from the last one, so a run killed at any moment loses at most the
stage in progress (a damaged checkpoint is trained again). Each stage seeds
every random generator it draws from (torch, Python, NumPy, the loader's)
from the seed and its key, so a resumed run computes what an uninterrupted
one does. One process at a time trains in a directory (a lock); every file is
written to a temp file and renamed. Under torchrun, rank 0 alone writes;
every rank loads the same checkpoints.

The model is any nn.Module whose quantizable layers are ctmq.nn.QConv2d /
QLinear (ctmq.nn.convert, or built with them); set_bits switches their bit
depths between stages. A checkpoint holds the state dict and the stage; the
model's code is the caller's (rebuild it, then load_checkpoint(path, model)).
"""

import contextlib
import copy
import dataclasses
import json
import os
import random
import zlib
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..nn import quantized_layers, set_bits
from . import report as report_mod
from . import rundir
from .checkpoint import (
    CheckpointError,
    checkpoint_meta,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from .config import TrainConfig
from .rundir import RunConfigError
from .schedule import Schedule
from .trainer import evaluate, init_distributed, train_stage

__all__ = [
    "CheckpointError",
    "RunConfigError",
    "checkpoint_meta",
    "fit",
    "load_checkpoint",
    "save_checkpoint",
]


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


def stage_seed(seed, key):
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31)


def seed_stage(seed, key, train_loader):
    """Seed every generator a stage draws from, from the run's seed and the
    stage's key alone: torch (CPU and CUDA), Python's random, NumPy's global
    generator and the loader's own generator (its shuffling, and its workers'
    seeds). A stage trained after a resume then draws the same numbers as in
    an uninterrupted run."""
    s = stage_seed(seed, key)
    torch.manual_seed(s)
    random.seed(s)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(s)
    generator = getattr(train_loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(s)


def _check_schedules(schedules) -> list[Schedule]:
    if isinstance(schedules, Schedule):
        schedules = [schedules]
    schedules = list(schedules) if isinstance(schedules, (list, tuple)) else None
    if not schedules or not all(isinstance(s, Schedule) for s in schedules):
        raise TypeError("schedules must be a ctmq.engine.Schedule or a non-empty list of them")
    names = [s.name for s in schedules]
    if len(set(names)) != len(names):
        raise ValueError(f"schedules need distinct names, got {names}")
    return schedules


def _complete_metrics(sched, index, stage, ckpt, metrics_path, log, label):
    """The metrics of a stage whose files exist and pass their checks, else None
    (a damaged stage is removed, to be trained again)."""
    if not (os.path.exists(ckpt) and os.path.exists(metrics_path)):
        return None
    try:
        trained = verify_checkpoint(ckpt).get("stage")
        with open(metrics_path) as f:
            metrics = json.load(f)
        if not isinstance(metrics, dict) or not {"top1", "top5", "train_loss", "seconds"} <= set(
            metrics
        ):
            raise ValueError("its metrics file lacks top1/top5/train_loss/seconds")
    except (CheckpointError, OSError, ValueError) as e:
        log(f"{label}: {e}; training the stage again")
        for path in (ckpt, metrics_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return None
    if trained != dataclasses.asdict(stage):
        raise RunConfigError(
            f"{ckpt} holds stage {trained}, but schedule {sched.name!r} now asks for "
            f"{dataclasses.asdict(stage)} there; use another --out, or --restart to discard "
            "the run"
        )
    return metrics


class _Run:
    """What fit() trains with: the model and its forward (DDP, compiled), the
    loaders, the run directory, and the process's part (rank)."""

    def __init__(
        self,
        model,
        forward,
        loaders,
        out,
        tcfg,
        device,
        info,
        seed,
        meta,
        augment,
        log,
        callback,
        init_state,
    ):
        self.model, self.forward, self.loaders, self.out = model, forward, loaders, out
        self.tcfg, self.device, self.info, self.seed, self.meta = tcfg, device, info, seed, meta
        self.augment, self.log, self.callback = augment, log, callback
        self.teachers = _Teachers(model, out, init_state)

    def paths(self, key):
        base = os.path.join(self.out, "stages", key)
        return base + ".safetensors", base + ".json"

    def train(self, sched, i, key, label):
        """Train stage i of sched (the model holds the previous stage's
        weights), evaluate it and write its checkpoint and metrics."""
        stage = sched.stages[i]
        ckpt, metrics_path = self.paths(key)
        teacher = self.teachers.get(sched, i, self.tcfg.distill)  # before seeding
        seed_stage(self.seed, key, self.loaders[0])
        _notify(self.callback, "stage_start", sched, i, self.model)
        metrics = train_stage(
            self.model,
            stage,
            label,
            self.loaders,
            self.tcfg,
            self.device,
            self.info,
            augment=self.augment,
            forward=self.forward,
            teacher=teacher,
            log=self.log,
        )
        metrics["top1"], metrics["top5"] = evaluate(
            self.model, self.loaders[1], self.device, self.tcfg
        )
        self.log(
            f"{label}: top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% "
            f"loss {metrics['train_loss']:.4f} ({metrics['seconds']:.1f} s)"
        )
        if self.info.is_main:
            save_checkpoint(
                ckpt,
                self.model,
                dict(self.meta, stage=dataclasses.asdict(stage), schedule=sched.name, key=key),
            )
            rundir.write_json(metrics_path, metrics)
        self.info.barrier()
        _notify(self.callback, "stage_end", sched, i, self.model, metrics)
        return metrics

    def schedule(self, sched, init_state):
        """Every stage of one schedule, skipping complete ones; report rows."""
        self.log(str(sched))
        self.model.load_state_dict(init_state)
        pending = None  # checkpoint of the last complete stage, loaded before training on
        rows = []
        for i, stage in enumerate(sched.stages):
            key = sched.stage_key(i)
            ckpt, metrics_path = self.paths(key)
            label = f"{sched.name} {i}/{len(sched.stages) - 1} c{stage.cycle} {stage.label}"
            metrics = _complete_metrics(sched, i, stage, ckpt, metrics_path, self.log, label)
            if metrics is not None:
                self.log(f"{label}: complete (top-1 {metrics['top1']:.2f}%), skipped")
                pending = ckpt
            else:
                if pending:
                    load_checkpoint(pending, self.model)
                    pending = None
                metrics = self.train(sched, i, key, label)
            rows.append(
                dict(
                    schedule=sched.name,
                    index=i,
                    key=key,
                    cycle=stage.cycle,
                    label=stage.label,
                    w_bits=stage.w_bits,
                    a_bits=stage.a_bits,
                    epochs=stage.epochs,
                    top1=metrics["top1"],
                    top5=metrics["top5"],
                    train_loss=metrics["train_loss"],
                    seconds=metrics["seconds"],
                )
            )
        if pending:
            load_checkpoint(pending, self.model)
        return rows


def _check_arguments(model, schedules, config) -> tuple[list[Schedule], TrainConfig]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not quantized_layers(model):
        raise ValueError(
            "model has no QConv2d/QLinear layers to quantize: build it with them, "
            "or call ctmq.nn.convert(model) first"
        )
    schedules = _check_schedules(schedules)
    tcfg = config if config is not None else TrainConfig()
    if not isinstance(tcfg, TrainConfig):
        raise TypeError(f"config must be a ctmq.engine.TrainConfig, got {type(tcfg).__name__}")
    return schedules, tcfg


def _default_run_config(schedules, tcfg, seed, train_loader):
    # batch_size and workers are the loaders', recorded as such
    return {
        "seed": seed,
        "schedules": [s.to_dict() for s in schedules],
        "train": {
            k: v
            for k, v in dataclasses.asdict(tcfg).items()
            if k not in ("batch_size", "workers", "progress", "compile")
        },
        "batch_size": getattr(train_loader, "batch_size", None),
    }


def _place(model, tcfg, device, info):
    """(model on its device, forward): DDP under torchrun, torch.compile if asked."""
    model = model.to(device)
    if device.type == "cuda" and tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = model
    if info.enabled:  # (DDP's constructor gives every rank rank 0's parameters and buffers)
        forward = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if device.type == "cuda" else None
        )
    if tcfg.compile:
        forward = torch.compile(forward)
    return model, forward


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    schedules: Union[Schedule, Sequence[Schedule]],
    out: str,
    *,
    config: Optional[TrainConfig] = None,
    seed: int = 0,
    device=None,
    restart: bool = False,
    augment: Optional[Callable] = None,
    meta: Optional[dict] = None,
    log: Callable = print,
    callback=None,
    run_config: Optional[dict] = None,
    run_defaults: Optional[dict] = None,
) -> dict:
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
    (default: the schedules, config and seed). The model's structure is
    checked on resume too: a changed model needs another `out` or restart."""
    checked, tcfg = _check_arguments(model, schedules, config)
    out = os.fspath(out)
    rundir.check_out_dir(out)
    device = torch.device(
        device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    info = init_distributed(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    log = log if info.is_main else (lambda *a, **k: None)
    if run_config is None:
        run_config = _default_run_config(checked, tcfg, seed, train_loader)
    lock = rundir.RunLock(out)
    if info.is_main:
        os.makedirs(out, exist_ok=True)
        lock.acquire()
    try:
        if info.is_main:
            rundir.remove_stale_temps(out)
            rundir.prepare(out, run_config, restart, rundir.model_structure(model), run_defaults)
        info.barrier()
        model, forward = _place(model, tcfg, device, info)
        init_state = {k: v.clone() for k, v in model.state_dict().items()}
        run = _Run(
            model,
            forward,
            (train_loader, val_loader),
            out,
            tcfg,
            device,
            info,
            seed,
            dict(meta or {}),
            augment,
            log,
            callback,
            init_state,
        )
        rows = [row for sched in checked for row in run.schedule(sched, init_state)]
        rep = report_mod.build(checked, rows, run_config)
        if info.is_main:
            report_mod.write(out, rep)
        info.barrier()
    finally:
        lock.release()
    return rep
