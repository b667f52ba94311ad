"""`ctmq export` and `ctmq infer`: the deployment side of the command line."""

import glob
import json
import os
import sys

from .common import CliError, add_device, positive_int, resolve_device

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TENSOR_EXTS = (".pt", ".npy")


# ------------------------------------------------------------------ export
def _run_schedules(run_dir):
    """The schedules a run directory trains (from its config.json), or None."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    from ..engine import Schedule
    from ..engine.config import RunConfig, flag_names

    try:
        if "schedules" in config:
            return [Schedule.from_dict(d) for d in config["schedules"]]
        return RunConfig(**{k: v for k, v in config.items() if k in flag_names()}).schedules()
    except (TypeError, ValueError, KeyError):
        return None


def _w1a1_stages(run_dir):
    """{key: path} of the run's W1A1 stage checkpoints."""
    from ..engine import CheckpointError, checkpoint_meta

    found = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(run_dir), "stages", "*.safetensors"))):
        try:
            meta = checkpoint_meta(path)
        except CheckpointError:
            continue
        stage = meta.get("stage") or {}
        if (stage.get("w_bits"), stage.get("a_bits")) == (1, 1) and meta.get("key"):
            found[meta["key"]] = path
    return found


def find_checkpoint(source, stage=None):
    """(path, note): a stage checkpoint file as given, or from a run directory
    its `stage` (a key), else the final W1A1 stage of its ctmq schedule (of
    direct if it has no ctmq one). An unfinished run is refused, naming its
    newest finished W1A1 stage."""
    if os.path.isfile(source):
        if stage is not None:
            raise CliError("--stage: give a run directory, not a checkpoint file")
        return source, source
    if not os.path.isdir(source):
        raise CliError(f"{source}: no such run directory or checkpoint file")
    stages = _w1a1_stages(source)
    if stage is not None:
        path = os.path.join(source, "stages", stage + ".safetensors")
        if not os.path.isfile(path):
            raise CliError(
                f"--stage {stage}: no such stage in {source}/stages; W1A1 stages: "
                f"{sorted(stages) or 'none'}"
            )
        return path, f"stage {stage}"
    if not stages:
        raise CliError(
            f"{source}: no W1A1 stage checkpoint under stages/ (train with --target-bits 1 first)"
        )
    newest = max(stages, key=lambda k: (k.startswith("ctmq-"), k))
    schedules = _run_schedules(source)
    if schedules is None:  # no readable config.json: the newest W1A1 stage, said so
        return stages[
            newest
        ], f"stage {newest} (the newest W1A1 stage; {source} has no config.json)"
    ordered = sorted(schedules, key=lambda s: {"ctmq": 0, "direct": 1}.get(s.name, 2))
    final = next(
        (
            s.stage_key(len(s.stages) - 1)
            for s in ordered
            if (s.stages[-1].w_bits, s.stages[-1].a_bits) == (1, 1)
        ),
        None,
    )
    if final is None:
        raise CliError(
            f"{source}: no schedule of this run ends at W1A1; give --stage KEY "
            f"(W1A1 stages: {sorted(stages)})"
        )
    if final not in stages:
        raise CliError(
            f"{source} is unfinished: its final W1A1 stage {final} is not trained yet; "
            f"finish the run, or export the newest finished W1A1 stage with "
            f"--stage {newest}"
        )
    return stages[final], f"stage {final} (the final W1A1 stage)"


def _export(args):
    from ..engine import RunConfigError, model_from_checkpoint
    from ..engine.checkpoint import CheckpointError
    from ..export import ExportError, export_binary

    if os.path.isdir(args.output):
        raise CliError(
            f"-o {args.output} is a directory; give the artifact's file name (e.g. model.ctmq)"
        )
    path, what = find_checkpoint(args.source, args.stage)
    try:
        model, meta = model_from_checkpoint(path)
    except (RunConfigError, CheckpointError) as e:
        raise CliError(str(e)) from e
    except Exception as e:
        raise CliError(f"{path}: not a ctmq checkpoint ({type(e).__name__}: {e})") from e
    try:
        header = export_binary(
            model,
            args.output,
            input_size=meta.get("image_size"),
            mean=meta.get("mean"),
            std=meta.get("std"),
            class_names=meta.get("class_names"),
        )
    except ExportError as e:
        raise CliError(f"{path}: {e}") from e
    size, ckpt = os.path.getsize(args.output), os.path.getsize(path)
    print(
        f"exported {what} -> {args.output}: {len(header['nodes'])} nodes, {size} bytes "
        f"({ckpt / size:.1f}x smaller than the float32 checkpoint)"
    )


# ------------------------------------------------------------------- infer
class _Unreadable(Exception):
    """One input that cannot be classified; the others go on."""


def _expand(targets):
    """The files named by paths, folders and glob patterns, in order; a name
    that matches nothing is an _Unreadable in the list."""
    files = []
    for target in targets:
        if os.path.isdir(target):
            found = sorted(
                f
                for f in glob.glob(os.path.join(glob.escape(target), "*"))
                if f.lower().endswith(IMAGE_EXTS + TENSOR_EXTS)
            )
            if not found:
                files.append(
                    _Unreadable(
                        f"{target}: no images ({', '.join(IMAGE_EXTS)}) or "
                        f"tensors ({', '.join(TENSOR_EXTS)}) in this folder"
                    )
                )
            files += found
        elif os.path.isfile(target):
            files.append(target)
        elif glob.has_magic(target) and glob.glob(target):
            files += sorted(f for f in glob.glob(target) if os.path.isfile(f))
        else:
            files.append(_Unreadable(f"{target}: no such file or folder"))
    return files


def _read_tensor(path):
    import numpy as np
    import torch

    if path.lower().endswith(".pt"):
        try:
            x = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and torch errors alike
            raise _Unreadable(
                f"{path}: not a readable tensor file ({type(e).__name__}: {e})"
            ) from e
        if not isinstance(x, torch.Tensor):
            raise _Unreadable(f"{path}: holds a {type(x).__name__}, not a tensor")
        if not (
            x.is_floating_point()
            or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
        ):
            raise _Unreadable(f"{path}: holds {x.dtype} values, expected numbers")
        return x.float()
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise _Unreadable(f"{path}: not a readable .npy file ({e})") from e
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise _Unreadable(f"{path}: holds {a.dtype} values, expected numbers")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _load_image(path, runtime):
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    if runtime.input_channels not in (1, 3):
        raise _Unreadable(
            f"{path}: the model takes {runtime.input_channels} channels; give it "
            "a tensor file instead of an image"
        )
    size = runtime.input_size
    try:
        with Image.open(path) as img:
            img = img.convert("L" if runtime.input_channels == 1 else "RGB")
            # the width, then the height: Pillow 13 picks the order of its two passes
            # by the image's shape, older releases always width first; one pass at
            # a time gives the same pixels on every release (and in ctmq-run)
            img = img.resize((size, img.height), Image.BILINEAR).resize(
                (size, size), Image.BILINEAR
            )
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise _Unreadable(f"{path}: not a readable image ({e})") from e
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.as_tensor(runtime.preprocess(torch.from_numpy(np.ascontiguousarray(a))[None]))


def _input(path, runtime):
    """The normalized (N, C, H, W) batch of one file, checked."""
    import torch

    low = path.lower()
    if low.endswith(TENSOR_EXTS):
        x = _read_tensor(path)
    elif low.endswith(IMAGE_EXTS):
        x = _load_image(path, runtime)
    else:
        raise _Unreadable(
            f"{path}: expected an image ({', '.join(IMAGE_EXTS)}) or a tensor "
            f"({', '.join(TENSOR_EXTS)})"
        )
    if x.dim() == 3:
        x = x[None]
    if getattr(runtime, "engine", None) == "native":
        x = x.float().numpy()  # the native runtime takes NumPy arrays
    try:
        runtime.check_images(x)
    except (TypeError, ValueError) as e:
        raise _Unreadable(f"{path}: {e}") from e
    if not bool(torch.isfinite(torch.as_tensor(x)).all()):
        raise _Unreadable(f"{path}: holds NaN or infinite values")
    return x


def load_runtime(path, device, engine="auto"):
    from ..deploy import ArtifactError, load

    try:
        return load(path, device=device, engine=engine)
    except (ArtifactError, ValueError) as e:
        raise CliError(str(e)) from e
    except (OSError, RuntimeError) as e:  # the native library or the extension missing
        raise CliError(f"--engine {engine}: {e}") from e


def add_engine(parser):
    from ..deploy import ENGINES

    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="CPU runtime: executor (the compiled executor on torch: the trained "
        "model's logits bit for bit), native (the torch-free runtime, the "
        "fastest; logits equal to float rounding), python (node by node); "
        "default auto: executor",
    )


def _infer(args):
    rt = load_runtime(args.model, resolve_device(args.device), args.engine)
    results, failed = [], []
    for item in _expand(args.inputs):
        try:
            if isinstance(item, _Unreadable):
                raise item
            x = _input(item, rt)
        except _Unreadable as e:
            failed.append(str(e))
            print(f"ctmq infer: error: {e}", file=sys.stderr)
            continue
        try:
            predictions = rt.predict(x, args.topk)
        except ValueError as e:  # what the runtime refuses of this input
            failed.append(f"{item}: {e}")
            print(f"ctmq infer: error: {item}: {e}", file=sys.stderr)
            continue
        for row, (idx, prob) in enumerate(zip(*predictions, strict=True)):
            label = item if x.shape[0] == 1 else f"{item}[{row}]"
            top = [
                (rt.class_names[i], float(p))
                for i, p in zip(idx.tolist(), prob.tolist(), strict=True)
            ]
            results.append({"input": label, "top": top})
            print(f"{label}: " + ", ".join(f"{c} {p:.1%}" for c, p in top))
    if args.json:
        from ..files import atomic_open

        with atomic_open(args.json) as f:
            json.dump(results, f, indent=1)
    if failed and not results:
        raise CliError(f"no input could be classified ({len(failed)} failed)")
    if failed:
        print(
            f"ctmq infer: {len(failed)} of {len(failed) + len(results)} inputs failed",
            file=sys.stderr,
        )
        return 1
    return 0


def add_commands(sub):
    e = sub.add_parser(
        "export",
        help="export a W1A1 run or checkpoint for deployment",
        description="Write the final W1A1 stage of a run (or a stage checkpoint) "
        "as a deployable artifact. An unfinished run is refused; --stage "
        "exports a stage of your choice.",
    )
    e.add_argument(
        "source",
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="a run directory (its final W1A1 stage) or a stage checkpoint",
    )
    e.add_argument("-o", "--output", required=True, help="the artifact to write (e.g. model.ctmq)")
    e.add_argument(
        "--stage",
        metavar="KEY",
        help="the stage of the run directory to export (its key, e.g. ctmq-04-c1-W1A1)",
    )
    e.set_defaults(func=_export)

    i = sub.add_parser(
        "infer",
        help="classify images or tensors with an exported model",
        description="Classify each input; an input that cannot be read is "
        "reported and the others go on (exit status 1 if any failed).",
    )
    i.add_argument("model", metavar="MODEL.ctmq")
    i.add_argument(
        "inputs",
        metavar="INPUT",
        nargs="+",
        help="images (PNG/JPEG/...; resized and normalized per the model), tensor "
        "files (.pt/.npy, normalized (N, C, H, W) or (C, H, W)), folders of them, "
        "or glob patterns",
    )
    add_device(i)
    add_engine(i)
    i.add_argument(
        "--topk", type=positive_int, default=5, help="classes shown per input (default 5)"
    )
    i.add_argument("--json", help="also write the predictions to this JSON file")
    i.set_defaults(func=_infer)
