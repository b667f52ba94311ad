"""A CTMQ run: schedules -> stages -> checkpoints and reports in one directory.

    out/config.json                  the run's configuration (checked on resume)
    out/stages/<key>.safetensors     weights + BN statistics after each stage
    out/stages/<key>.json            that stage's metrics (written after the weights)
    out/report.{json,csv,png}

A stage is complete when both of its files exist; running the same command
again skips complete stages and continues from the last one, so a run killed
at any moment loses at most the stage in progress. All files are written to a
temp file and renamed. Under torchrun, rank 0 alone writes; every rank loads
the same checkpoints.
"""
import dataclasses
import json
import os
import shutil
import zlib

import torch

from .. import data as data_mod
from .._io import atomic_open
from ..models import MODELS, load_torchvision_weights
from . import report as report_mod
from .schedule import Schedule
from .trainer import TrainConfig, evaluate, init_distributed, make_loaders, train_stage

SCHEDULES = ("both", "ctmq", "direct")
# Settings that do not change what is trained: they may differ on resume.
_RUNTIME_KEYS = ("out", "device", "compile", "progress", "workers", "sync_bn")


class RunConfigError(ValueError):
    """A bad configuration, or one that differs from the run directory's."""


@dataclasses.dataclass
class RunConfig:
    dataset: str = "digits"
    data_root: str = None
    model: str = "resnet18"
    stem: str = "auto"          # imagenet for dataset imagenet, else cifar
    block: str = "bireal"
    width: float = 1.0
    schedule: str = "both"
    start_bits: int = 4
    target_bits: int = 1
    cycles: int = 2
    epochs_per_stage: int = 2   # or a list, one per step of the ladder (start_bits first)
    fp_epochs: int = None       # default: epochs_per_stage (0 with an FP checkpoint)
    final_epochs: int = None    # each cycle's target-bit stage; default: epochs_per_stage
    fp_checkpoint: str = None
    seed: int = 0
    optimizer: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    label_smoothing: float = 0.0
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    weight_decay_binary: bool = True
    distill: bool = False
    distill_temperature: float = 1.0
    distill_weight: float = 1.0
    out: str = "runs/ctmq"
    device: str = "auto"
    compile: bool = False
    sync_bn: bool = False
    workers: int = 0
    progress: bool = True

    def check(self):
        if self.dataset not in data_mod.DATASETS:
            raise RunConfigError(f"dataset must be one of {data_mod.DATASETS}, got {self.dataset!r}")
        if self.model not in MODELS:
            raise RunConfigError(f"model must be one of {tuple(MODELS)}, got {self.model!r}")
        if self.schedule not in SCHEDULES:
            raise RunConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise RunConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RunConfigError("device cuda: no CUDA device is available here")
        if self.sync_bn and self.torch_device().type != "cuda":
            raise RunConfigError("sync_bn: SyncBatchNorm runs on CUDA only; drop --sync-bn on CPU")
        if self.fp_checkpoint and not os.path.isfile(self.fp_checkpoint):
            raise RunConfigError(f"fp_checkpoint {self.fp_checkpoint} is not a file")
        try:
            schedules = self.schedules()
            self.train_config()
        except (TypeError, ValueError) as e:
            raise RunConfigError(str(e)) from e
        shortest = min(st.epochs for s in schedules for st in s.stages)
        if self.warmup_epochs >= shortest:
            raise RunConfigError(f"warmup_epochs ({self.warmup_epochs}) must be shorter than the "
                                 f"shortest stage ({shortest} epochs): the LR would never decay")
        if self.distill and not self.fp_checkpoint and not schedules[0].stages[0].is_fp:
            raise RunConfigError("distill: the first cycle has no FP stage (fp_epochs 0) and no "
                                 "fp_checkpoint, so its teacher would be the random starting "
                                 "weights; give --fp-checkpoint or --fp-epochs")
        return self

    def semantic(self):
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _RUNTIME_KEYS}

    def resolved_fp_epochs(self):
        if self.fp_epochs is not None:
            return self.fp_epochs
        if self.fp_checkpoint:
            return 0
        e = self.epochs_per_stage
        return e[0] if isinstance(e, (list, tuple)) and e else e

    def schedules(self):
        ctmq = Schedule.ctmq(self.start_bits, self.target_bits, self.cycles,
                             self.epochs_per_stage, self.resolved_fp_epochs(), self.final_epochs)
        direct = Schedule.direct_matching(ctmq)
        return {"both": [ctmq, direct], "ctmq": [ctmq], "direct": [direct]}[self.schedule]

    def train_config(self):
        return TrainConfig(optimizer=self.optimizer, lr=self.lr, weight_decay=self.weight_decay,
                           batch_size=self.batch_size, label_smoothing=self.label_smoothing,
                           workers=self.workers, compile=self.compile, progress=self.progress,
                           lr_schedule=self.lr_schedule, warmup_epochs=self.warmup_epochs,
                           weight_decay_binary=self.weight_decay_binary, distill=self.distill,
                           distill_temperature=self.distill_temperature,
                           distill_weight=self.distill_weight)

    def torch_device(self):
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def build_model(cfg, data):
    stem = cfg.stem if cfg.stem != "auto" else ("imagenet" if cfg.dataset == "imagenet" else "cifar")
    return MODELS[cfg.model](data.num_classes, stem=stem, block=cfg.block, width=cfg.width,
                             in_channels=data.in_channels)


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
    """(state dict, metadata) of a stage checkpoint; loads it into model if given."""
    from safetensors.torch import load_file
    state = load_file(path)
    if model is not None:
        model.load_state_dict(state, strict=True)
    return state, checkpoint_meta(path)


def model_from_checkpoint(path):
    """(model at the stage's bit depths, metadata), rebuilt from a stage checkpoint alone."""
    from ..nn import set_bits
    state, meta = load_checkpoint(path)
    cfg = dict(meta.get("model") or {})
    name = cfg.pop("name", None)
    if name not in MODELS:
        raise RunConfigError(f"{path}: its metadata names no known model ({name!r})")
    model = MODELS[name](**cfg)
    model.load_state_dict(state)
    stage = meta.get("stage", {})
    set_bits(model, stage.get("w_bits", 32), stage.get("a_bits", 32))
    return model, meta


def _load_fp_checkpoint(model, path):
    if path.endswith(".safetensors"):
        state, meta = load_checkpoint(path)
        if meta:  # a ctmq stage checkpoint
            model.load_state_dict(state, strict=True)
            return []
    return load_torchvision_weights(model, path)


def _write_json(path, obj):
    with atomic_open(path) as f:
        json.dump(obj, f, indent=1)


def _prepare_dir(cfg, restart, info):
    """Create or check the run directory against cfg (rank 0), then barrier."""
    path = os.path.join(cfg.out, "config.json")
    if info.is_main:
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            new = json.loads(json.dumps(cfg.semantic()))
            # an option newer than the run directory's config.json had its default there
            defaults = json.loads(json.dumps(RunConfig().semantic()))
            old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff and not restart:
                details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
                raise RunConfigError(f"{cfg.out} holds a run with another configuration ({details}); "
                                     "use another --out, or --restart to discard it")
            if restart:
                shutil.rmtree(os.path.join(cfg.out, "stages"), ignore_errors=True)
        os.makedirs(os.path.join(cfg.out, "stages"), exist_ok=True)
        _write_json(path, cfg.semantic())
    info.barrier()


class _Teachers:
    """The frozen FP model each low-bit stage distills from: the FP stage that
    began its cycle (its checkpoint), else the starting weights. One kept at
    a time, rebuilt when the cycle changes."""

    def __init__(self, cfg, data, device, init_state, channels_last):
        self.cfg, self.data, self.device = cfg, data, device
        self.init_state, self.channels_last = init_state, channels_last
        self.key, self.model = None, None

    def get(self, sched, index):
        if not self.cfg.distill or sched.stages[index].is_fp:
            return None
        j = sched.cycle_teacher(index)
        key = "init" if j is None else sched.stage_key(j)
        if key != self.key:
            from ..nn import set_bits
            teacher = build_model(self.cfg, self.data).to(self.device)
            if self.channels_last:
                teacher = teacher.to(memory_format=torch.channels_last)
            if j is None:
                teacher.load_state_dict(self.init_state)
            else:
                load_checkpoint(os.path.join(self.cfg.out, "stages", key + ".safetensors"), teacher)
            set_bits(teacher, 32, 32)
            self.key, self.model = key, teacher.eval().requires_grad_(False)
        return self.model


def _notify(callback, name, *args):
    fn = getattr(callback, name, None)
    if fn is not None:
        fn(*args)


def _stage_seed(seed, key):
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31)


def run(cfg, restart=False, log=print, callback=None, schedules=None):
    """Train every schedule of cfg (or `schedules`: a list of Schedule with
    distinct names); returns the report dict.

    callback: an object with optional methods stage_start(schedule, index,
    model) and stage_end(schedule, index, model, metrics), called around each
    stage this call trains (not around complete stages it skips)."""
    cfg.check()
    device = cfg.torch_device()
    info = init_distributed(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    log = log if info.is_main else (lambda *a, **k: None)
    data = data_mod.load(cfg.dataset, cfg.data_root)
    _prepare_dir(cfg, restart, info)
    schedules = schedules or cfg.schedules()
    tcfg = cfg.train_config()

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data)
    if cfg.fp_checkpoint:
        skipped = _load_fp_checkpoint(model, cfg.fp_checkpoint)
        if skipped:
            log(f"fp checkpoint: {len(skipped)} tensors not loaded (shape or name differs), "
                f"e.g. {skipped[:3]}")
    if cfg.sync_bn and info.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device.type == "cuda" and tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    forward = model
    if info.enabled:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if device.type == "cuda" else None)
    if tcfg.compile:
        forward = torch.compile(forward)
    loaders = make_loaders(data, tcfg.batch_size, info, cfg.seed, tcfg.workers,
                           pin_memory=device.type == "cuda")
    meta_base = {"model": dict(model.config, name=cfg.model) if hasattr(model, "config") else {},
                 "dataset": cfg.dataset, "mean": data.mean, "std": data.std,
                 "image_size": data.image_size, "class_names": data.class_names}

    teachers = _Teachers(cfg, data, device, init_state,
                         device.type == "cuda" and tcfg.channels_last)
    rows = []
    for sched in schedules:
        log(str(sched))
        model.load_state_dict(init_state)
        pending = None  # checkpoint of the last complete stage, loaded before training on
        for i, stage in enumerate(sched.stages):
            key = sched.stage_key(i)
            ckpt = os.path.join(cfg.out, "stages", key + ".safetensors")
            metrics_path = os.path.join(cfg.out, "stages", key + ".json")
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
                teacher = teachers.get(sched, i)  # before seeding: building it draws numbers
                torch.manual_seed(_stage_seed(cfg.seed, key))
                _notify(callback, "stage_start", sched, i, model)
                metrics = train_stage(model, stage, label, loaders, tcfg, device, info,
                                      augment=data.augment, forward=forward, teacher=teacher)
                metrics["top1"], metrics["top5"] = evaluate(model, loaders[1], device, tcfg)
                log(f"{label}: top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% "
                    f"loss {metrics['train_loss']:.4f} ({metrics['seconds']:.1f} s)")
                if info.is_main:
                    save_checkpoint(ckpt, model, dict(meta_base, stage=dataclasses.asdict(stage),
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
    rep = report_mod.build(schedules, rows, cfg.semantic())
    if info.is_main:
        report_mod.write(cfg.out, rep)
    info.barrier()
    return rep
