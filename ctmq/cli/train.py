"""`ctmq train` and `ctmq study`: options from the config dataclasses
(ctmq.engine.config), overriding a --config file's values."""

import argparse
import json
import os

from .common import CliError

STUDY_KEYS = ("seeds", "arms", "schedules")  # config keys of `ctmq study` besides RunConfig's
TRAIN_EXTRAS = ("tqdm", "matplotlib")  # always; scikit-learn (digits) and PyYAML where used


def read_config_file(path, extra=()):
    """The option values of a .json/.yaml config file (flag names with _ or -)."""
    if not os.path.isfile(path):
        raise CliError(f"--config {path}: no such file")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise CliError(
                "--config: YAML files need PyYAML (pip install pyyaml); or use a .json file"
            ) from e
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
            raise CliError(
                f"--config {path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}"
            ) from None
    elif path.endswith(".json"):
        try:
            values = json.loads(text)
        except ValueError as e:
            raise CliError(f"--config {path}: not valid JSON ({e})") from None
    else:
        raise CliError(f"--config {path}: expected a .json, .yaml or .yml file")
    if not isinstance(values, dict):
        raise CliError(f"--config {path}: expected a mapping of option names to values")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    from ..engine.config import flag_names

    known = set(flag_names()) | set(extra)
    unknown = sorted(set(values) - known)
    if unknown:
        raise CliError(f"--config {path}: unknown option(s) {unknown}; known: {sorted(known)}")
    return values


def _check_train_extras():
    import importlib.util

    missing = [m for m in TRAIN_EXTRAS if importlib.util.find_spec(m) is None]
    if missing:
        raise CliError(f"training needs {', '.join(missing)}: pip install 'ctmq[train]'")


def _options(args, extra=()):
    """The config file's values, overridden by the flags given."""
    values = read_config_file(args.config, extra) if args.config else {}
    values.update(
        {
            k: v
            for k, v in vars(args).items()
            if k not in ("command", "func", "config", "restart") and v is not None
        }
    )
    return values


def _run_config(values):
    from ..engine import RunConfig

    try:
        return RunConfig(**values)
    except (TypeError, ValueError) as e:
        raise CliError(str(e)) from None


def _train(args):
    _check_train_extras()
    from .. import data as data_mod
    from ..engine import RunConfigError, StageDiverged, run
    from ..engine import report as report_mod
    from ..engine.checkpoint import CheckpointError

    cfg = _run_config(_options(args))
    try:
        rep = run(cfg, restart=args.restart)
    except (RunConfigError, CheckpointError, data_mod.DataError, StageDiverged) as e:
        raise CliError(str(e)) from e
    if int(os.environ.get("RANK", "0")) == 0:
        print(report_mod.format_table(rep))
        print(f"reports: {cfg.out}/report.json, report.csv, report.png")


def _study(args):
    _check_train_extras()
    from .. import data as data_mod
    from ..engine import RunConfigError, StageDiverged
    from ..engine.checkpoint import CheckpointError
    from ..engine.config import int_list
    from ..engine.study import ARMS, format_table, study

    values = _options(args, STUDY_KEYS)
    for key, instead in (("seed", "--seeds"), ("schedule", "--arms")):
        if key in values:
            raise CliError(f"{key} does not apply to a study: use {instead}")
    seeds = values.pop("seeds", None)
    if isinstance(seeds, str):
        try:
            seeds = int_list(seeds)
        except argparse.ArgumentTypeError as e:
            raise CliError(f"seeds: {e}") from e
    seeds = [0, 1, 2] if seeds is None else seeds
    if not isinstance(seeds, list):
        raise CliError(f"seeds: a list of integers expected, got {seeds!r}")
    arms = values.pop("arms", None) or list(ARMS)
    if isinstance(arms, str):
        arms = [a.strip() for a in arms.split(",") if a.strip()]
    custom = values.pop("schedules", None) or {}
    if not isinstance(custom, dict):
        raise CliError("schedules (config file): a mapping of schedule names to lists of stages")
    values.setdefault("out", "runs/study")
    cfg = _run_config(values)
    try:
        rep = study(cfg, seeds, arms, custom, restart=args.restart)
    except (
        RunConfigError,
        CheckpointError,
        data_mod.DataError,
        StageDiverged,
        ValueError,
        TypeError,
    ) as e:
        raise CliError(str(e)) from e
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_table(rep))
        print(f"reports: {cfg.out}/study.json, study.csv, study.png")


def _training_options(parser, skip=()):
    from ..data import DATASETS
    from ..engine.config import add_arguments
    from ..models import MODELS

    parser.add_argument(
        "--config",
        help="a .json or .yaml file of options (flag names with _ or -); flags given override it",
    )
    add_arguments(parser, choices={"dataset": DATASETS, "model": list(MODELS)}, skip=skip)
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard the run already in --out and train from the start",
    )


def add_commands(sub):
    t = sub.add_parser(
        "train",
        help="train with CTMQ and the direct baseline; resumable",
        description="Train a binarizable CNN with CTMQ (and the direct "
        "baseline). Flags override --config; running the same command again "
        "resumes from the last completed stage.",
    )
    _training_options(t)
    t.set_defaults(func=_train)
    s = sub.add_parser(
        "study",
        help="several schedules x seeds: mean ± sd and paired "
        "differences against direct with 95%% confidence intervals",
        description="Train each arm (schedule) for each seed from a shared FP "
        "stage and report per arm mean ± sd and, against direct, the paired "
        "difference per seed with a 95% CI (paired t). Takes train's options "
        "but --seed and --schedule; resumable. Default --out: runs/study.",
    )
    _training_options(s, skip=("seed", "schedule"))
    s.add_argument("--seeds", type=_seed_list, help="comma-separated seeds (default 0,1,2)")
    s.add_argument(
        "--arms",
        help="comma-separated arms: direct, direct-final, ladder, ctmq, or "
        "a schedule named in the config file's 'schedules' (default: the four; "
        "direct, the baseline of the paired differences, is always run)",
    )
    s.set_defaults(func=_study)


def _seed_list(text):
    from ..engine.config import int_list

    return int_list(text)
