"""The `ctmq` command line: train -> export -> infer, and bench."""
import argparse
import dataclasses
import json
import os
import sys

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CliError(Exception):
    """An expected error: printed as one line, exit status 2, no traceback."""


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bench(args):
    from . import bench
    if args.deploy:
        return _deploy("bench_deploy_command")(args)

    device = args.device or _default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available here")
    dtype = _DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    numel = args.numel or (64 * 2**20 if device == "cuda" else 4 * 2**20)
    if numel < 4608:
        raise CliError(f"--numel must be >= 4608 (one 512x3x3 weight channel), got {numel}")
    compile_ = args.compile if args.compile is not None else device == "cuda"
    name = bench.device_name(device)
    print(f"ctmq bench: {numel} elements of {args.dtype or dtype}, {name}"
          f"{'' if compile_ else ' (without torch.compile baselines; --compile adds them)'}",
          flush=True)
    copy_gbps, rows = bench.run(device, dtype, numel, compile=compile_, only=args.only)
    if not rows:
        raise CliError(f"--only {args.only!r} matches no case")
    print(bench.format_table(copy_gbps, rows, name))
    if args.json:
        bench.write_json(args.json, copy_gbps, rows, name, numel=numel, dtype=str(dtype))
        print(f"wrote {args.json}")


STUDY_KEYS = ("seeds", "arms", "schedules")  # config keys of `ctmq study` besides RunConfig's


def _read_config_file(path, extra=()):
    if not os.path.isfile(path):
        raise CliError(f"--config {path}: no such file")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise CliError("--config: YAML files need PyYAML (pip install pyyaml); "
                           "or use a .json file") from e
        values = yaml.safe_load(text)
    elif path.endswith(".json"):
        values = json.loads(text)
    else:
        raise CliError(f"--config {path}: expected a .json, .yaml or .yml file")
    if not isinstance(values, dict):
        raise CliError(f"--config {path}: expected a mapping of option names to values")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    from .engine import RunConfig
    known = {f.name for f in dataclasses.fields(RunConfig)} | set(extra)
    unknown = sorted(set(values) - known)
    if unknown:
        raise CliError(f"--config {path}: unknown option(s) {unknown}; known: {sorted(known)}")
    return values


TRAIN_EXTRAS = ("tqdm", "matplotlib")  # always; scikit-learn (digits) and PyYAML where used


def _check_train_extras():
    import importlib.util
    missing = [m for m in TRAIN_EXTRAS if importlib.util.find_spec(m) is None]
    if missing:
        raise CliError(f"training needs {', '.join(missing)}: pip install 'ctmq[train]'")


def _options(args, extra=()):
    """The config file's values, overridden by the flags given."""
    values = _read_config_file(args.config, extra) if args.config else {}
    values.update({k: v for k, v in vars(args).items()
                   if k not in ("command", "func", "config", "restart") and v is not None})
    return values


def _train(args):
    _check_train_extras()
    from . import data as data_mod
    from .engine import RunConfig, RunConfigError, StageDiverged, run
    from .engine import report as report_mod

    cfg = RunConfig(**_options(args))
    try:
        rep = run(cfg, restart=args.restart)
    except (RunConfigError, data_mod.DataError, StageDiverged) as e:
        raise CliError(str(e)) from e
    if int(os.environ.get("RANK", "0")) == 0:
        print(report_mod.format_table(rep))
        print(f"reports: {cfg.out}/report.json, report.csv, report.png")


def _int_list(text):
    if isinstance(text, str) and not text.strip():
        raise argparse.ArgumentTypeError("expected comma-separated integers, got nothing")
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _epochs_arg(text):
    values = _int_list(text)
    return values[0] if len(values) == 1 else values


def _study(args):
    _check_train_extras()
    from . import data as data_mod
    from .engine import RunConfig, RunConfigError, StageDiverged
    from .engine.study import ARMS, format_table, study

    values = _options(args, STUDY_KEYS)
    for key, instead in (("seed", "--seeds"), ("schedule", "--arms")):
        if key in values:
            raise CliError(f"{key} does not apply to a study: use {instead}")
    seeds = values.pop("seeds", None)
    if isinstance(seeds, str):
        try:
            seeds = _int_list(seeds)
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
    cfg = RunConfig(**values)
    try:
        rep = study(cfg, seeds, arms, custom, restart=args.restart)
    except (RunConfigError, data_mod.DataError, StageDiverged, ValueError, TypeError) as e:
        raise CliError(str(e)) from e
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_table(rep))
        print(f"reports: {cfg.out}/study.json, study.csv, study.png")


def _add_train(sub):
    t = sub.add_parser("train", help="train with CTMQ and the direct baseline; resumable",
                       description="Train a binarizable CNN with CTMQ (and the direct "
                       "baseline). Flags override --config; running the same command again "
                       "resumes from the last completed stage.")
    _training_options(t)
    t.set_defaults(func=_train)
    s = sub.add_parser("study", help="several schedules x seeds: mean ± sd and paired "
                       "differences against direct with 95%% confidence intervals",
                       description="Train each arm (schedule) for each seed from a shared FP "
                       "stage and report per arm mean ± sd and, against direct, the paired "
                       "difference per seed with a 95%% CI (paired t). Takes train's options; "
                       "resumable.")
    _training_options(s)
    s.add_argument("--seeds", type=_int_list, help="comma-separated seeds (default 0,1,2)")
    s.add_argument("--arms", help="comma-separated arms: direct, direct-final, ladder, ctmq, or "
                   "a schedule named in the config file's 'schedules' (default: the four; "
                   "direct, the baseline of the paired differences, is always run)")
    s.set_defaults(func=_study)


def _training_options(t):
    from .data import DATASETS
    from .engine.run import SCHEDULES
    from .models import MODELS
    a = t.add_argument
    a("--config", help="a .json or .yaml file of options (flag names with _ or -)")
    a("--dataset", choices=DATASETS, help="default: digits (embedded, no download)")
    a("--data-root", help="folder of the dataset files (all but digits)")
    a("--model", choices=list(MODELS), help="a zoo model (default: resnet18)")
    a("--stem", choices=["auto", "imagenet", "cifar"], help="default: auto (imagenet for "
      "--dataset imagenet, else cifar)")
    a("--block", choices=["bireal", "basic"], help="resnet blocks (default: bireal)")
    a("--width", type=float, help="channel width multiplier (default 1.0)")
    a("--schedule", choices=SCHEDULES, help="default: both")
    a("--start-bits", type=int, help="first low-bit stage (default 4)")
    a("--target-bits", type=int, help="last stage (default 1)")
    a("--cycles", type=int, help="CTMQ cycles (default 2)")
    a("--epochs-per-stage", type=_epochs_arg, help="epochs of each low-bit stage (default 2), "
      "or one per step of the ladder, start bits first (e.g. 2,2,2,4 for W4A4..W1A1)")
    a("--fp-epochs", type=int, help="epochs of FP stages (default: --epochs-per-stage; "
      "0 with --fp-checkpoint)")
    a("--final-epochs", type=int, help="epochs of each cycle's last (target-bit) stage "
      "(default: --epochs-per-stage)")
    a("--fp-checkpoint", help="FP starting point: a torchvision resnet18/34 state dict or a "
      "ctmq stage checkpoint")
    a("--optimizer", choices=["adam", "sgd"])
    a("--lr", type=float)
    a("--weight-decay", type=float)
    a("--batch-size", type=int)
    a("--label-smoothing", type=float)
    a("--lr-schedule", choices=["cosine", "linear"], help="LR decay to zero within each stage "
      "(default cosine)")
    a("--warmup-epochs", type=float, help="linear LR warm-up at the start of each stage "
      "(default 0)")
    a("--weight-decay-binary", action=argparse.BooleanOptionalAction, default=None,
      help="weight decay on the latent weights of quantized layers too (default: yes)")
    a("--distill", action=argparse.BooleanOptionalAction, default=None,
      help="low-bit stages also match the logits of their cycle's FP model (KL; default: no)")
    a("--distill-temperature", type=float, help="softmax temperature of --distill (default 1)")
    a("--distill-weight", type=float, help="weight of the --distill term (default 1)")
    a("--out", help="run directory (default: runs/ctmq for train, runs/study for study)")
    a("--device", choices=["auto", "cpu", "cuda"])
    a("--seed", type=int)
    a("--workers", type=int, help="data loader workers")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile")
    a("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
      help="SyncBatchNorm under torchrun")
    a("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")
    a("--restart", action="store_true", help="discard an existing run in --out")


def _deploy(name):
    def run(args):
        from . import cli_deploy
        try:
            return getattr(cli_deploy, name)(args)
        except cli_deploy.DeployCliError as e:
            raise CliError(str(e)) from e
    return run


def build_parser():
    p = argparse.ArgumentParser(prog="ctmq", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _add_train(sub)
    b = sub.add_parser("bench", help="benchmark the fused quantizers (fwd+bwd) against "
                       "eager torch, torch.fake_quantize and torch.compile")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    b.add_argument("--dtype", choices=list(_DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    b.add_argument("--numel", type=int, help="elements per tensor (default 64Mi on cuda, 4Mi on cpu)")
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile baselines (default: on cuda only)")
    b.add_argument("--only", help="run only cases whose name contains this text")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.add_argument("--deploy", metavar="MODEL.ctmq",
                   help="instead: latency and throughput of an exported model's runtime")
    b.add_argument("--batch", type=int, nargs="+", help="with --deploy: batch sizes (default 1 8)")
    b.set_defaults(func=_bench)

    e = sub.add_parser("export", help="export a W1A1 run or checkpoint for deployment")
    e.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run directory (its final W1A1 stage) or a stage checkpoint")
    e.add_argument("-o", "--output", required=True, help="the artifact to write (e.g. model.ctmq)")
    e.set_defaults(func=_deploy("export_command"))

    i = sub.add_parser("infer", help="classify images or tensors with an exported model")
    i.add_argument("model", metavar="MODEL.ctmq")
    i.add_argument("inputs", metavar="IMAGE_OR_DIR",
                   help="an image (PNG/JPEG/...; resized and normalized per the model), a "
                   "tensor file (.pt/.npy, normalized (N, C, H, W)), or a folder of them")
    i.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    i.add_argument("--topk", type=int, default=5)
    i.add_argument("--json", help="also write the predictions to this JSON file")
    i.set_defaults(func=_deploy("infer_command"))
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CliError as e:
        print(f"ctmq {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
