"""`ctmq export`, `ctmq infer` and `ctmq bench --deploy` (the deployment side of the CLI)."""
import glob
import json
import os

import torch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TENSOR_EXTS = (".pt", ".npy")


class DeployCliError(Exception):
    """An expected error, printed as one line by ctmq.cli."""


def find_checkpoint(source):
    """A stage checkpoint file, or the final W1A1 stage of a run directory
    (the ctmq schedule's if there is one, else the direct one's)."""
    if os.path.isfile(source):
        return source
    if not os.path.isdir(source):
        raise DeployCliError(f"{source}: no such run directory or checkpoint file")
    from .engine import checkpoint_meta
    best = None
    for path in sorted(glob.glob(os.path.join(source, "stages", "*.safetensors"))):
        meta = checkpoint_meta(path)
        stage = meta.get("stage", {})
        if (stage.get("w_bits"), stage.get("a_bits")) != (1, 1):
            continue
        rank = (meta.get("schedule") == "ctmq", meta.get("key", ""))
        if best is None or rank > best[0]:
            best = (rank, path)
    if best is None:
        raise DeployCliError(f"{source}: no W1A1 stage checkpoint under stages/ "
                             "(train with --target-bits 1 first)")
    return best[1]


def export_command(args):
    from .engine import RunConfigError, model_from_checkpoint
    from .export import ExportError, export_binary
    path = find_checkpoint(args.source)
    try:
        model, meta = model_from_checkpoint(path)
    except RunConfigError as e:
        raise DeployCliError(str(e)) from e
    except Exception as e:
        raise DeployCliError(f"{path}: not a ctmq checkpoint ({e})") from e
    try:
        header = export_binary(model, args.output, input_size=meta.get("image_size"),
                               mean=meta.get("mean"), std=meta.get("std"),
                               class_names=meta.get("class_names"))
    except ExportError as e:
        raise DeployCliError(f"{path}: {e}") from e
    size, ckpt = os.path.getsize(args.output), os.path.getsize(path)
    print(f"exported {path} -> {args.output}: {len(header['nodes'])} nodes, {size} bytes "
          f"({ckpt / size:.1f}x smaller than the float32 checkpoint)")


def _read_inputs(target, runtime):
    """[(name, normalized input tensor (1, C, H, W))] from an image, a tensor file or a folder."""
    if os.path.isdir(target):
        files = sorted(f for f in glob.glob(os.path.join(target, "*"))
                       if f.lower().endswith(IMAGE_EXTS + TENSOR_EXTS))
        if not files:
            raise DeployCliError(f"{target}: no images ({', '.join(IMAGE_EXTS)}) or tensors "
                                 f"({', '.join(TENSOR_EXTS)}) in this folder")
    elif os.path.isfile(target):
        files = [target]
    else:
        raise DeployCliError(f"{target}: no such file or folder")
    out = []
    for f in files:
        low = f.lower()
        if low.endswith(".pt"):
            x = torch.load(f, map_location="cpu", weights_only=True)
        elif low.endswith(".npy"):
            import numpy as np
            x = torch.from_numpy(np.load(f, allow_pickle=False))
        elif low.endswith(IMAGE_EXTS):
            x = runtime.preprocess(_load_image(f, runtime)[None])
        else:
            raise DeployCliError(f"{f}: expected an image ({', '.join(IMAGE_EXTS)}) or a tensor "
                                 f"({', '.join(TENSOR_EXTS)})")
        if not isinstance(x, torch.Tensor):
            raise DeployCliError(f"{f}: holds no tensor")
        x = x.float()
        if x.dim() == 3:
            x = x[None]
        try:
            runtime.check_images(x)
        except (TypeError, ValueError) as e:
            raise DeployCliError(f"{f}: {e}") from e
        out.append((f, x))
    return out


def _load_image(path, runtime):
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    try:
        img = Image.open(path)
        img = img.convert("L" if runtime.input_channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DeployCliError(f"{path}: not a readable image ({e})") from e
    if runtime.input_channels not in (1, 3):
        raise DeployCliError(f"{path}: the model takes {runtime.input_channels} channels; "
                             "give it a tensor file instead of an image")
    img = img.resize((runtime.input_size, runtime.input_size), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a))


def _load_runtime(path, device):
    from .deploy import ArtifactError, load
    try:
        return load(path, device=device)
    except (ArtifactError, ValueError) as e:
        raise DeployCliError(str(e)) from e


def infer_command(args):
    rt = _load_runtime(args.model, args.device)
    results = []
    for name, x in _read_inputs(args.inputs, rt):
        for row, (idx, prob) in enumerate(zip(*rt.predict(x, args.topk))):
            label = name if x.shape[0] == 1 else f"{name}[{row}]"
            top = [(rt.class_names[i], float(p)) for i, p in zip(idx.tolist(), prob.tolist())]
            results.append({"input": label, "top": top})
            print(f"{label}: " + ", ".join(f"{c} {p:.1%}" for c, p in top))
    if args.json:
        from ._io import atomic_open
        with atomic_open(args.json) as f:
            json.dump(results, f, indent=1)


def bench_deploy_command(args):
    from . import bench
    rt = _load_runtime(args.deploy, args.device or "cpu")
    dev = rt.device
    print(f"ctmq bench --deploy {args.deploy}: {bench.device_name(dev)}, input "
          f"{rt.input_channels}x{rt.input_size}x{rt.input_size}")
    print(f"{'batch':>5s} {'ms/batch':>9s} {'images/s':>9s}")
    for b in args.batch or [1, 8]:
        x = torch.randn(b, rt.input_channels, rt.input_size, rt.input_size, device=dev)
        t = bench.timeit(lambda: rt(x), dev)
        print(f"{b:5d} {t * 1e3:9.3f} {b / t:9.1f}")
