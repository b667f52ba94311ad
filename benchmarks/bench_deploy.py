"""Deployed binarized zoo models against the same architectures in torch eval,
measured in the same run.

Models (each exported at W1A1 and run by ctmq.deploy): resnet18 and
reactnet_a at 224x224 (ImageNet stem, 1000 classes), vgg_small at 32x32 (10
classes); resnet34 on request. The reference is the same architecture at
full precision in torch eval.

CPU: ctmq runtime vs float32 torch, batch 1 and 8, timed in turns (call by
call) so that the machine's drift moves both alike. CUDA: ctmq runtime (CUDA
graphs) with each binary conv kernel that runs here (Triton; the tensor-core
kernel where built) vs float16 channels_last torch, batch 256 and 1.
Also each artifact's size against the float32 checkpoint.

    python benchmarks/bench_deploy.py [--models resnet18,reactnet_a,vgg_small]
        [--device cpu|cuda] [--batch 1 8] [--json out.json]
"""
import argparse
import os
import sys
import tempfile

import torch

from ctmq import bench, binary, deploy
from ctmq.export import export_binary
from ctmq.models import MODELS
from ctmq.nn import set_bits

# name -> (constructor arguments, input side)
SETTINGS = {"resnet18": (dict(num_classes=1000, stem="imagenet"), 224),
            "resnet34": (dict(num_classes=1000, stem="imagenet"), 224),
            "reactnet_a": (dict(num_classes=1000, stem="imagenet"), 224),
            "vgg_small": (dict(num_classes=10, stem="cifar"), 32)}
DEFAULT_MODELS = "resnet18,reactnet_a,vgg_small"


def _models(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in SETTINGS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"models must be a comma-separated list of "
                                         f"{sorted(SETTINGS)}, got {text!r}")
    return names


def prepare(name, width, device, tmp):
    """(FP reference model, {kernel: runtime}, input side, (checkpoint bytes, artifact bytes))."""
    kwargs, size = SETTINGS[name]
    torch.manual_seed(0)
    model = MODELS[name](width=width, **kwargs)
    ckpt, art = os.path.join(tmp, f"{name}.safetensors"), os.path.join(tmp, f"{name}.ctmq")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    set_bits(model, 1, 1)
    model.eval()
    export_binary(model, art, input_size=size)
    sizes = (os.path.getsize(ckpt), os.path.getsize(art))
    # CUDA: one runtime per binary conv kernel that runs here; each captures
    # its own CUDA graphs with the kernel chosen when it first runs
    kernels = binary.cuda_kernels(device) if device.type == "cuda" else ("cpp",)
    runtimes = {k: deploy.load(art, device=device.type) for k in kernels}
    set_bits(model, 32, 32)  # the float reference: the same architecture at full precision
    if device.type == "cuda":
        model = model.to(device, torch.float16).to(memory_format=torch.channels_last)
    return model, runtimes, size, sizes


def measure(name, model, runtimes, size, batches, device, min_time):
    rows = []
    ref_dtype = torch.float16 if device.type == "cuda" else torch.float32
    for b in batches:
        x = torch.randn(b, 3, size, size, device=device)
        xr = x.to(ref_dtype)
        if device.type == "cuda":
            xr = xr.contiguous(memory_format=torch.channels_last)

        def ref_fn():
            with torch.inference_mode():
                return model(xr)
        if device.type != "cuda":
            rt = runtimes["cpp"]
            t = bench.timeit_interleaved({"ref": ref_fn, "ctmq": lambda: rt(x)}, min_time=min_time)
            rows.append(_row(name, size, b, "cpp", t["ctmq"], t["ref"]))
            continue
        t_ref = bench.timeit(ref_fn, device)
        for kernel, rt in runtimes.items():
            try:
                with binary.use_kernel(kernel):
                    rows.append(_row(name, size, b, kernel, bench.timeit(lambda: rt(x), device),
                                     t_ref))
            except Exception as e:  # keep the other kernel's figures
                rows.append({"model": name, "size": size, "batch": b, "kernel": kernel,
                             "torch_ms": t_ref * 1e3, "error": f"{type(e).__name__}: {e}"[:500]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=_models, default=_models(DEFAULT_MODELS),
                   help=f"comma-separated, of {sorted(SETTINGS)} (default {DEFAULT_MODELS})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch sizes (default: 1 8 on cpu, 256 1 on cuda)")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    p.add_argument("--min-time", type=float, default=3.0,
                   help="seconds of timing per model and batch size (cpu)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    name = bench.device_name(dev)
    ref = "float16 channels_last" if dev.type == "cuda" else "float32"
    log = bench.JsonRows(a.json, device=name, reference=ref, width=a.width, artifacts={})
    batches = a.batch or ([256, 1] if dev.type == "cuda" else [1, 8])
    print(f"binarized zoo deploy, {name}; torch {ref} eval of the same architecture in the "
          f"same run")
    print(f"{'model':>10s} {'input':>7s} {'batch':>5s} {'kernel':>7s} {'ctmq ms':>9s} "
          f"{'torch ms':>9s} {'speedup':>8s} {'ctmq img/s':>11s} {'torch img/s':>12s}")
    sizes = {}
    for model_name in a.models:
        with tempfile.TemporaryDirectory() as tmp:
            model, runtimes, size, sizes[model_name] = prepare(model_name, a.width, dev, tmp)
        log.meta["artifacts"][model_name] = {"checkpoint_bytes": sizes[model_name][0],
                                             "artifact_bytes": sizes[model_name][1]}
        for r in measure(model_name, model, runtimes, size, batches, dev, a.min_time):
            log.add(r)
            _print(r)
        del model, runtimes
    for model_name, (ckpt, art) in sizes.items():
        print(f"{model_name}: artifact {art / 1e6:.2f} MB vs float32 checkpoint "
              f"{ckpt / 1e6:.2f} MB: {ckpt / art:.1f}x smaller")


def _print(r):
    head = f"{r['model']:>10s} {r['size']:>3d}x{r['size']:<3d} {r['batch']:5d} {r['kernel']:>7s}"
    if "error" in r:
        print(f"{head} failed: {r['error']}")
        return
    print(f"{head} {r['ctmq_ms']:9.2f} {r['torch_ms']:9.2f} {r['speedup']:7.2f}x "
          f"{r['ctmq_img_s']:11.1f} {r['torch_img_s']:12.1f}")


def _row(model, size, batch, kernel, t_ctmq, t_ref):
    return {"model": model, "size": size, "batch": batch, "kernel": kernel,
            "ctmq_ms": t_ctmq * 1e3, "torch_ms": t_ref * 1e3, "speedup": t_ref / t_ctmq,
            "ctmq_img_s": batch / t_ctmq, "torch_img_s": batch / t_ref}


if __name__ == "__main__":
    sys.exit(main())
