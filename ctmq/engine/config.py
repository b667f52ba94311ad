"""The training configuration, written once: TrainConfig (how a stage trains)
nested in RunConfig (what `ctmq train` trains: model, data, schedule). Each
field carries its help text, choices and kind, from which the command line's
flags are made (add_arguments), so the CLI, the config files (flat keys) and
the Python API cannot drift apart. Every value is checked for its type where
a config is made: `lr: [0.1, 0.2]` or `distill: "yes"` is a ValueError
naming the option.
"""

import argparse
import dataclasses
import os
import typing
from typing import List, Optional, Union

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("cosine", "linear")
SCHEDULES = ("both", "ctmq", "direct")
DEVICES = ("auto", "cpu", "cuda")
STEMS = ("auto", "imagenet", "cifar")
BLOCKS = ("bireal", "basic")


def option(
    default=None, help="", *, choices=None, runtime=False, parse=None, metavar=None, flag=True
):
    """A config field: `runtime` options do not change what is trained (they may
    differ on resume); `parse` reads the flag's text; flag=False: no CLI flag."""
    meta = dict(
        help=help, choices=choices, runtime=runtime, parse=parse, metavar=metavar, flag=flag
    )
    return dataclasses.field(default=default, metadata=meta)


def int_list(text):
    """'2,2,2,4' -> [2, 2, 2, 4] (argparse type)."""
    if isinstance(text, str) and not text.strip():
        raise argparse.ArgumentTypeError("expected comma-separated integers, got nothing")
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def int_or_list(text):
    values = int_list(text)
    return values[0] if len(values) == 1 else values


# ------------------------------------------------------------ type checks
def _matches(value, kind):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if origin in (list, List):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    return True  # a nested dataclass: checked by its own __post_init__


def _describe(kind):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Union:
        names = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" (or null)" if type(None) in args else "")
    if origin in (list, List):
        return f"a list of {_PLURAL.get(args[0], 'values')}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind, getattr(kind, "__name__", str(kind))
    )


_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def check_fields(obj):
    """Each field of a config dataclass holds a value of its annotated type, and
    one of its choices where it has some; a ValueError names the option."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise ValueError(f"{f.name} must be {_describe(hints[f.name])}, got {value!r}")
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise ValueError(f"{f.name} must be one of {choices}, got {value!r}")


# ------------------------------------------------------------ the configs
@dataclasses.dataclass
class TrainConfig:
    """How each stage trains (ctmq.engine.fit's config)."""

    optimizer: str = option("adam", "optimizer: a fresh one per stage", choices=OPTIMIZERS)
    lr: float = option(2e-3, "learning rate at the start of each stage (after warm-up)")
    weight_decay: float = option(0.0, "weight decay")
    momentum: float = option(0.9, "SGD momentum (Nesterov)")
    batch_size: int = option(128, "training batch size (per process under torchrun)")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy")
    workers: int = option(0, "data loader worker processes", runtime=True)
    amp: bool = option(True, "bf16 autocast on CUDA")
    channels_last: bool = option(True, "channels_last memory format on CUDA")
    compile: bool = option(False, "torch.compile the model", runtime=True)
    progress: bool = option(
        True, "progress bars on a terminal, else a line per epoch", runtime=True
    )
    lr_schedule: str = option("cosine", "LR decay to zero within each stage", choices=LR_SCHEDULES)
    warmup_epochs: float = option(0.0, "linear LR warm-up at the start of each stage")
    weight_decay_binary: bool = option(
        True, "weight decay on the latent weights of quantized layers too"
    )
    distill: bool = option(
        False, "low-bit stages also match the logits of their cycle's FP model (KL)"
    )
    distill_temperature: float = option(1.0, "softmax temperature of --distill")
    distill_weight: float = option(1.0, "weight of the --distill term")

    def __post_init__(self):
        check_fields(self)
        for name in ("lr", "batch_size", "distill_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "weight_decay",
            "warmup_epochs",
            "distill_weight",
            "workers",
            "label_smoothing",
            "momentum",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


@dataclasses.dataclass(init=False)
class RunConfig:
    """What `ctmq train` trains: a zoo model on a dataset through the CTMQ and
    direct schedules, into one run directory; `train` is how (TrainConfig).
    Made from flat keyword arguments too (RunConfig(lr=0.01, dataset=...)),
    as config files and flags give them; the TrainConfig fields read through
    (cfg.lr is cfg.train.lr)."""

    dataset: str = option("digits", "dataset (digits is embedded: 8x8 images, no download)")
    data_root: Optional[str] = option(None, "folder of the dataset files (all but digits)")
    model: str = option("resnet18", "a zoo model")
    stem: str = option(
        "auto",
        "first layers: imagenet (7x7/2 conv + max pool) or cifar "
        "(3x3/1 conv); auto: imagenet for --dataset imagenet",
        choices=STEMS,
    )
    block: str = option("bireal", "resnet blocks", choices=BLOCKS)
    width: float = option(1.0, "channel width multiplier")
    schedule: str = option("both", "which schedules to train", choices=SCHEDULES)
    start_bits: int = option(4, "first low-bit stage of the ladder")
    target_bits: int = option(1, "last stage of the ladder")
    cycles: int = option(2, "CTMQ cycles")
    epochs_per_stage: Union[int, List[int]] = option(
        2,
        "epochs of each low-bit stage, or one per step of the ladder, start bits first "
        "(e.g. 2,2,2,4 for W4A4..W1A1)",
        parse=int_or_list,
        metavar="N[,N...]",
    )
    fp_epochs: Optional[int] = option(
        None,
        "epochs of FP stages (default: the first of --epochs-per-stage; 0 with --fp-checkpoint)",
    )
    final_epochs: Optional[int] = option(
        None, "epochs of each cycle's last (target-bit) stage (default: --epochs-per-stage)"
    )
    fp_checkpoint: Optional[str] = option(
        None, "FP starting point: a torchvision resnet18/34 state dict or a ctmq stage checkpoint"
    )
    seed: int = option(0, "random seed")
    out: str = option("runs/ctmq", "run directory", runtime=True)
    device: str = option("auto", "auto: cuda when available", choices=DEVICES, runtime=True)
    sync_bn: bool = option(False, "SyncBatchNorm under torchrun", runtime=True)
    train: TrainConfig = option(None, "how each stage trains", flag=False)

    def __init__(self, train=None, **values):
        names = {f.name for f in dataclasses.fields(self)} - {"train"}
        unknown = sorted(set(values) - names - set(TRAIN_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown}; known: {sorted(names | set(TRAIN_FIELDS))}"
            )
        for f in dataclasses.fields(self):
            if f.name != "train":
                object.__setattr__(self, f.name, values.get(f.name, f.default))
        if train is not None and not isinstance(train, TrainConfig):
            raise TypeError(f"train must be a TrainConfig, got {type(train).__name__}")
        own = {k: v for k, v in values.items() if k in TRAIN_FIELDS}
        self.train = dataclasses.replace(train or TrainConfig(), **own)
        check_fields(self)

    def __getattr__(self, name):  # cfg.lr reads cfg.train.lr
        if name in TRAIN_FIELDS and "train" in self.__dict__:
            return getattr(self.__dict__["train"], name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def flat(self):
        """Every option as one flat dict (the config file's and config.json's form)."""
        values = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"
        }
        return {**values, **dataclasses.asdict(self.train)}

    @classmethod
    def runtime_keys(cls):
        """Options that may differ when a run directory is resumed."""
        return tuple(
            f.name
            for f in (*dataclasses.fields(cls), *dataclasses.fields(TrainConfig))
            if f.metadata.get("runtime")
        )

    def semantic(self):
        """What is trained: the options config.json records and checks on resume."""
        runtime = self.runtime_keys()
        return {k: v for k, v in self.flat().items() if k not in runtime}

    def check(self):
        """This config can be trained here: known dataset and model, a device that
        exists, consistent options; a RunConfigError names the option."""
        import torch

        from .. import data as data_mod
        from ..models import MODELS
        from .rundir import RunConfigError

        if self.dataset not in data_mod.DATASETS:
            raise RunConfigError(
                f"dataset must be one of {data_mod.DATASETS}, got {self.dataset!r}"
            )
        if self.model not in MODELS:
            raise RunConfigError(f"model must be one of {tuple(MODELS)}, got {self.model!r}")
        if self.dataset == "digits" and self.data_root is not None:
            raise RunConfigError(
                "data_root does not apply to the embedded digits data set "
                "(drop --data-root, or choose --dataset)"
            )
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RunConfigError("device cuda: no CUDA device is available here")
        if self.sync_bn and self.torch_device().type != "cuda":
            raise RunConfigError("sync_bn: SyncBatchNorm runs on CUDA only; drop --sync-bn on CPU")
        if self.fp_checkpoint and not os.path.isfile(self.fp_checkpoint):
            raise RunConfigError(f"fp_checkpoint {self.fp_checkpoint} is not a file")
        try:
            schedules = self.schedules()
        except (TypeError, ValueError) as e:
            raise RunConfigError(str(e)) from e
        shortest = min(st.epochs for s in schedules for st in s.stages)
        if self.warmup_epochs >= shortest:
            raise RunConfigError(
                f"warmup_epochs ({self.warmup_epochs}) must be shorter than the "
                f"shortest stage ({shortest} epochs): the LR would never decay"
            )
        if self.distill and not self.fp_checkpoint and not schedules[0].stages[0].is_fp:
            raise RunConfigError(
                "distill: the first cycle has no FP stage (fp_epochs 0) and no "
                "fp_checkpoint, so its teacher would be the random starting "
                "weights; give --fp-checkpoint or --fp-epochs"
            )
        return self

    # -------------------------------------------------------- derived values
    def resolved_fp_epochs(self):
        if self.fp_epochs is not None:
            return self.fp_epochs
        if self.fp_checkpoint:
            return 0
        e = self.epochs_per_stage
        return e[0] if isinstance(e, (list, tuple)) and e else e

    def schedules(self):
        from .schedule import Schedule

        ctmq = Schedule.ctmq(
            self.start_bits,
            self.target_bits,
            self.cycles,
            self.epochs_per_stage,
            self.resolved_fp_epochs(),
            self.final_epochs,
        )
        direct = Schedule.direct_matching(ctmq)
        return {"both": [ctmq, direct], "ctmq": [ctmq], "direct": [direct]}[self.schedule]

    def train_config(self):
        return self.train

    def torch_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


# ------------------------------------------------------------ command line
def _flag_fields():
    for cls in (RunConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("flag", True):
                yield f, hints[f.name]


def add_arguments(parser, choices=None, skip=()):
    """One flag per config field (--name-with-dashes; bools as --x/--no-x),
    default None so that a config file's value stands unless a flag is given;
    `choices` overrides a field's choices (e.g. the zoo's model names)."""
    choices = choices or {}
    for f, kind in _flag_fields():
        if f.name in skip:
            continue
        meta = f.metadata
        default = f.default
        shown = "" if default is None else f" (default: {_shown(default)})"
        kwargs = dict(help=(meta["help"] + shown).replace("%", "%%"), default=None, dest=f.name)
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta.get("parse") or (base if base in (int, float) else str)
            kwargs["choices"] = choices.get(f.name, meta.get("choices"))
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _shown(value):
    if isinstance(value, bool):
        return "yes" if value else "no"
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def flag_names():
    return [f.name for f, _ in _flag_fields()]
