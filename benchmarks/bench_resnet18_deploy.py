"""Deployed binarized ResNet-18 (224x224, ImageNet stem, 1000 classes) against
the same architecture in torch eval, measured in the same run.

CPU: ctmq runtime vs float32 torch, batch 1 and 8. CUDA: ctmq runtime (CUDA
graphs) with each binary conv kernel that runs here (Triton; the tensor-core
kernel where built) vs float16 channels_last torch, batch 256 and 1.
Also the artifact size against the float32 checkpoint.

    python benchmarks/bench_resnet18_deploy.py [--device cpu|cuda] [--json out.json]
"""
import argparse
import os
import sys
import tempfile

import torch

from ctmq import bench, binary, deploy
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
        # CUDA: one runtime per binary conv kernel that runs here; each captures
        # its own CUDA graphs with the kernel chosen when it first runs
        kernels = binary.cuda_kernels(dev) if dev.type == "cuda" else ("cpp",)
        runtimes = {k: deploy.load(art, device=a.device) for k in kernels}
    set_bits(model, 32, 32)  # the float reference: the same architecture at full precision
    ref_dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = model.to(dev, ref_dtype)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    name = bench.device_name(dev)
    ref = "float16 channels_last" if dev.type == "cuda" else "float32"
    log = bench.JsonRows(a.json, device=name, reference=ref, checkpoint_bytes=sizes[0],
                         artifact_bytes=sizes[1])
    rows = []
    for b in a.batch or ([256, 1] if dev.type == "cuda" else [1, 8]):
        x = torch.randn(b, 3, 224, 224, device=dev)
        xr = x.to(ref_dtype)
        if dev.type == "cuda":
            xr = xr.contiguous(memory_format=torch.channels_last)

        def ref_fn():
            with torch.inference_mode():
                return model(xr)
        if dev.type != "cuda":  # in turn, call by call: this CPU's speed drifts within seconds
            rt = runtimes["cpp"]
            t = bench.timeit_interleaved({"ref": ref_fn, "ctmq": lambda: rt(x)}, min_time=a.min_time)
            rows.append(_row(b, "cpp", t["ctmq"], t["ref"]))
            log.add(rows[-1])
            continue
        t_ref = bench.timeit(ref_fn, dev)
        for kernel, rt in runtimes.items():
            try:
                with binary.use_kernel(kernel):
                    rows.append(_row(b, kernel, bench.timeit(lambda: rt(x), dev), t_ref))
            except Exception as e:  # keep the other kernel's figures
                rows.append({"batch": b, "kernel": kernel, "torch_ms": t_ref * 1e3,
                             "error": f"{type(e).__name__}: {e}"[:500]})
            log.add(rows[-1])
    print(f"binarized ResNet-18 deploy, 224x224, {name}; torch {ref} eval in the same run")
    print(f"{'batch':>5s} {'kernel':>7s} {'ctmq ms':>9s} {'torch ms':>9s} {'speedup':>8s} "
          f"{'ctmq img/s':>11s} {'torch img/s':>12s}")
    for r in rows:
        if "error" in r:
            print(f"{r['batch']:5d} {r['kernel']:>7s} failed: {r['error']}")
            continue
        print(f"{r['batch']:5d} {r['kernel']:>7s} {r['ctmq_ms']:9.2f} {r['torch_ms']:9.2f} "
              f"{r['speedup']:7.2f}x {r['ctmq_img_s']:11.1f} {r['torch_img_s']:12.1f}")
    print(f"artifact {sizes[1] / 1e6:.2f} MB vs float32 checkpoint {sizes[0] / 1e6:.2f} MB: "
          f"{sizes[0] / sizes[1]:.1f}x smaller")


def _row(batch, kernel, t_ctmq, t_ref):
    return {"batch": batch, "kernel": kernel, "ctmq_ms": t_ctmq * 1e3, "torch_ms": t_ref * 1e3,
            "speedup": t_ref / t_ctmq, "ctmq_img_s": batch / t_ctmq, "torch_img_s": batch / t_ref}


if __name__ == "__main__":
    sys.exit(main())
