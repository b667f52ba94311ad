"""`ctmq train`: a RunConfig (a zoo model, a dataset, the CTMQ and direct
schedules) trained by ctmq.engine.fit into one run directory (its layout,
resume and reports: see ctmq.engine.fit). config.json holds the RunConfig;
a run directory made with another configuration is refused.
"""

import torch

from .. import data as data_mod
from ..models import MODELS, load_torchvision_weights
from .checkpoint import checkpoint_meta, load_checkpoint
from .config import RunConfig
from .fit import fit
from .rundir import RunConfigError
from .trainer import init_distributed, make_loaders


def build_model(cfg, data):
    stem = (
        cfg.stem if cfg.stem != "auto" else ("imagenet" if cfg.dataset == "imagenet" else "cifar")
    )
    block = cfg.block if cfg.model.startswith("resnet") else None  # the others have one kind
    try:
        return MODELS[cfg.model](
            data.num_classes, stem=stem, block=block, width=cfg.width, in_channels=data.in_channels
        )
    except ValueError as e:  # e.g. vgg_small with the imagenet stem
        raise RunConfigError(f"model {cfg.model}: {e}") from e


def model_from_checkpoint(path):
    """(model at the stage's bit depths, metadata), rebuilt from a zoo model's
    stage checkpoint alone."""
    meta = checkpoint_meta(path)  # the tensors are read once, into the model below
    cfg = dict(meta.get("model") or {})
    name = cfg.pop("name", None)
    if name not in MODELS:
        raise RunConfigError(
            f"{path}: its metadata names no zoo model ({name!r}); rebuild "
            "the model in code and load it with load_checkpoint(path, model)"
        )
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
            log(
                f"fp checkpoint: {len(skipped)} tensors not loaded (shape or name differs), "
                f"e.g. {skipped[:3]}"
            )
    if cfg.sync_bn and info.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    loaders = make_loaders(
        data, tcfg.batch_size, info, cfg.seed, tcfg.workers, pin_memory=device.type == "cuda"
    )
    meta = {
        "model": dict(model.config, name=cfg.model),
        "dataset": cfg.dataset,
        "mean": data.mean,
        "std": data.std,
        "image_size": data.image_size,
        "class_names": data.class_names,
    }
    return fit(
        model,
        *loaders,
        schedules or cfg.schedules(),
        cfg.out,
        config=tcfg,
        seed=cfg.seed,
        device=device,
        restart=restart,
        augment=data_mod.augment_batch if data.augment else None,
        meta=meta,
        log=log,
        callback=callback,
        run_config=cfg.semantic(),
        run_defaults=RunConfig().semantic(),
    )
