"""The CTMQ training engine: schedules, stage runner, checkpoints, resume, reports."""

from .checkpoint import CheckpointError, checkpoint_meta, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .fit import fit
from .run import RunConfig, build_model, model_from_checkpoint, run
from .rundir import RunConfigError
from .schedule import Schedule, Stage
from .study import study
from .trainer import StageDiverged, evaluate, make_loaders, train_stage

__all__ = [
    "CheckpointError",
    "RunConfig",
    "RunConfigError",
    "Schedule",
    "Stage",
    "StageDiverged",
    "TrainConfig",
    "build_model",
    "checkpoint_meta",
    "evaluate",
    "fit",
    "load_checkpoint",
    "make_loaders",
    "model_from_checkpoint",
    "run",
    "save_checkpoint",
    "study",
    "train_stage",
]
