"""The CTMQ training engine: schedules, stage runner, checkpoints, resume, reports."""
from .run import (RunConfig, RunConfigError, build_model, checkpoint_meta, load_checkpoint,
                  model_from_checkpoint, run, save_checkpoint)
from .schedule import Schedule, Stage
from .study import study
from .trainer import StageDiverged, TrainConfig, evaluate, train_stage

__all__ = ["RunConfig", "RunConfigError", "Schedule", "Stage", "StageDiverged", "TrainConfig",
           "build_model", "checkpoint_meta", "evaluate", "load_checkpoint", "model_from_checkpoint", "run", "save_checkpoint", "study", "train_stage"]
