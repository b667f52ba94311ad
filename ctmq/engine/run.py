"""`ctmq train`: a RunConfig (a zoo model, a dataset, the CTMQ and direct
schedules) trained by ctmq.engine.fit into one run directory (its layout,
resume and reports: see ctmq.engine.fit). config.json holds the RunConfig;
a run directory made with another configuration is refused.
"""
import dataclasses
import os

import torch

from .. import data as data_mod
from ..models import MODELS, load_torchvision_weights
from .checkpoint import checkpoint_meta, load_checkpoint
from .fit import fit
from .rundir import RunConfigError
from .schedule import Schedule
from .trainer import TrainConfig, init_distributed, make_loaders

SCHEDULES = ("both", "ctmq", "direct")
# Settings that do not change what is trained: they may differ on resume.
_RUNTIME_KEYS = ("out", "device", "compile", "progress", "workers", "sync_bn")


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
    block = cfg.block if cfg.model.startswith("resnet") else None  # the others have one kind
    try:
        return MODELS[cfg.model](data.num_classes, stem=stem, block=block, width=cfg.width,
                                 in_channels=data.in_channels)
    except ValueError as e:  # e.g. vgg_small with the imagenet stem
        raise RunConfigError(f"model {cfg.model}: {e}") from e


def model_from_checkpoint(path):
    """(model at the stage's bit depths, metadata), rebuilt from a zoo model's
    stage checkpoint alone."""
    meta = checkpoint_meta(path)  # the tensors are read once, into the model below
    cfg = dict(meta.get("model") or {})
    name = cfg.pop("name", None)
    if name not in MODELS:
        raise RunConfigError(f"{path}: its metadata names no zoo model ({name!r}); rebuild "
                             "the model in code and load it with load_checkpoint(path, model)")
    model = MODELS[name](**cfg)
    load_checkpoint(path, model)
    return model, meta


def _load_fp_checkpoint(model, path):
    if path.endswith(".safetensors"):
        state, meta = load_checkpoint(path)
        if meta:  # a ctmq stage checkpoint
            model.load_state_dict(state, strict=True)
            return []
    return load_torchvision_weights(model, path)


def run(cfg, restart=False, log=print, callback=None, schedules=None):
    """Train every schedule of cfg (or `schedules`: a list of Schedule with
    distinct names) on cfg's zoo model and dataset; returns the report dict.
    The training itself is ctmq.engine.fit (callback: see there)."""
    cfg.check()
    device = cfg.torch_device()  # fit picks the rank's CUDA device under torchrun
    info = init_distributed(device.type)
    data = data_mod.load(cfg.dataset, cfg.data_root)
    tcfg = cfg.train_config()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data)
    if cfg.fp_checkpoint:
        skipped = _load_fp_checkpoint(model, cfg.fp_checkpoint)
        if skipped and info.is_main:
            log(f"fp checkpoint: {len(skipped)} tensors not loaded (shape or name differs), "
                f"e.g. {skipped[:3]}")
    if cfg.sync_bn and info.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    loaders = make_loaders(data, tcfg.batch_size, info, cfg.seed, tcfg.workers,
                           pin_memory=device.type == "cuda")
    meta = {"model": dict(model.config, name=cfg.model), "dataset": cfg.dataset,
            "mean": data.mean, "std": data.std, "image_size": data.image_size,
            "class_names": data.class_names}
    return fit(model, *loaders, schedules or cfg.schedules(), cfg.out, config=tcfg,
               seed=cfg.seed, device=device, restart=restart,
               augment=data_mod.augment_batch if data.augment else None, meta=meta, log=log,
               callback=callback, run_config=cfg.semantic(), run_defaults=RunConfig().semantic())
