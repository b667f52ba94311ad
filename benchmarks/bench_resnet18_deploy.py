"""Deployed binarized ResNet-18 (224x224, ImageNet stem, 1000 classes) against
the same architecture in torch eval, measured in the same run.

CPU: ctmq runtime vs float32 torch, batch 1 and 8. CUDA: ctmq runtime (Triton
binary kernels, CUDA graphs; and the tensor-core kernel where built) vs float16
channels_last torch, batch 256 and 1.
Also the artifact size against the float32 checkpoint.

    python benchmarks/bench_resnet18_deploy.py [--device cpu|cuda] [--json out.json]
"""
import argparse
import json
import os
import sys
import tempfile

import torch

from ctmq import bench, deploy
from ctmq._io import atomic_open
from ctmq.export import export_binary
from ctmq.models import resnet18
from ctmq.nn import set_bits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--min-time", type=float, default=3.0, help="seconds of timing per batch size (cpu)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = resnet18(1000, stem="imagenet", width=a.width)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, art = os.path.join(tmp, "fp32.safetensors"), os.path.join(tmp, "m.ctmq")
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
        set_bits(model, 1, 1)
        model.eval()
        export_binary(model, art, input_size=224)
        sizes = (os.path.getsize(ckpt), os.path.getsize(art))
        rt = deploy.load(art, device=a.device)
        # a second runtime for the tensor-core kernel (opt-in while unverified):
        # each runtime captures its own CUDA graphs with the kernels chosen then
        bmma = dev.type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key(
            "ctmq::binary_conv2d_bmma", "CUDA")
        rt_bmma = deploy.load(art, device=a.device) if bmma else None
    set_bits(model, 32, 32)  # the float reference: the same architecture at full precision
    ref_dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = model.to(dev, ref_dtype)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    rows = []
    for b in a.batch or ([256, 1] if dev.type == "cuda" else [1, 8]):
        x = torch.randn(b, 3, 224, 224, device=dev)
        xr = x.to(ref_dtype)
        if dev.type == "cuda":
            xr = xr.contiguous(memory_format=torch.channels_last)
        def ref():
            with torch.inference_mode():
                return model(xr)
        if dev.type == "cuda":
            t_ref, t_rt = bench.timeit(ref, dev), bench.timeit(lambda: rt(x), dev)
        else:  # in turn, call by call: this CPU's speed drifts within seconds
            t = bench.timeit_interleaved({"ref": ref, "ctmq": lambda: rt(x)}, min_time=a.min_time)
            t_ref, t_rt = t["ref"], t["ctmq"]
        row = {"batch": b, "ctmq_ms": t_rt * 1e3, "torch_ms": t_ref * 1e3,
               "speedup": t_ref / t_rt, "ctmq_img_s": b / t_rt, "torch_img_s": b / t_ref}
        if rt_bmma is not None:
            with bench.bmma_kernel():
                t_bm = bench.timeit(lambda: rt_bmma(x), dev)
            row.update(bmma_ms=t_bm * 1e3, bmma_speedup=t_ref / t_bm, bmma_img_s=b / t_bm)
        rows.append(row)
    name = bench.device_name(dev)
    ref = "float16 channels_last" if dev.type == "cuda" else "float32"
    print(f"binarized ResNet-18 deploy, 224x224, {name}; torch {ref} eval in the same run")
    print(f"{'batch':>5s} {'ctmq ms':>9s} {'torch ms':>9s} {'speedup':>8s} {'ctmq img/s':>11s} {'torch img/s':>12s}")
    for r in rows:
        print(f"{r['batch']:5d} {r['ctmq_ms']:9.2f} {r['torch_ms']:9.2f} {r['speedup']:7.2f}x "
              f"{r['ctmq_img_s']:11.1f} {r['torch_img_s']:12.1f}")
        if "bmma_ms" in r:
            print(f"{'bmma':>5s} {r['bmma_ms']:9.2f} {'':9s} {r['bmma_speedup']:7.2f}x {r['bmma_img_s']:11.1f}")
    print(f"artifact {sizes[1] / 1e6:.2f} MB vs float32 checkpoint {sizes[0] / 1e6:.2f} MB: "
          f"{sizes[0] / sizes[1]:.1f}x smaller")
    if a.json:
        with atomic_open(a.json) as f:
            json.dump({"device": name, "reference": ref, "rows": rows, "checkpoint_bytes": sizes[0],
                       "artifact_bytes": sizes[1]}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
