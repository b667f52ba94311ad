"""ResNet-18 training step time: FP vs W4A4 vs W1A1, with ctmq's fused
quantizers vs the same model with eager torch quantizer expressions, eager and
torch.compile'd. Every ratio is to the FP step of the same mode in the same run.

    python benchmarks/bench_qat_step.py                 # CUDA: bf16 autocast, b256, 224x224
    python benchmarks/bench_qat_step.py --device cpu --batch 4 --image-size 64 --width 0.25
"""
import argparse
import json
import sys
import time
import types

import torch
import torch.nn.functional as F

from ctmq import bench
from ctmq._io import atomic_open
from ctmq.models import resnet18
from ctmq.nn import quantized_layers, set_bits


def use_quantizers(model, kind):
    """kind "ctmq": the fused ops (QConv2d's own); "torch": eager expressions
    (clamp/floor/detach STE, bench.eager_act / eager_weight)."""
    for m in quantized_layers(model):
        if kind == "ctmq":
            m.__dict__.pop("quantized_input", None)
            m.__dict__.pop("quantized_weight", None)
        else:
            m.quantized_input = types.MethodType(
                lambda self, x: x if self.a_bits == 32 else bench.eager_act(x, self.a_bits), m)
            m.quantized_weight = types.MethodType(
                lambda self: self.weight if self.w_bits == 32 else bench.eager_weight(self.weight, self.w_bits), m)


def step_time(model, x, y, device, steps, compiled):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    fwd = torch.compile(model) if compiled else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            loss = F.cross_entropy(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--bits", type=int, nargs="+", default=[32, 4, 1])
    p.add_argument("--compile-bits", type=int, nargs="*", default=None,
                   help="bit depths also timed under torch.compile (default: 32 4 on cuda, none on cpu)")
    p.add_argument("--compile-torch-quantizers", action="store_true",
                   help="also compile the eager-torch-quantizer model (one more compilation per depth)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    batch = a.batch or (256 if device.type == "cuda" else 8)
    compile_bits = a.compile_bits if a.compile_bits is not None else ([32, 4] if device.type == "cuda" else [])
    torch.manual_seed(0)
    model = resnet18(1000, stem="imagenet", width=a.width).to(device)
    x = torch.randn(batch, 3, a.image_size, a.image_size, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    rows = []
    for compiled in (False, True):
        for bits in a.bits:
            if compiled and bits not in compile_bits:
                continue
            kinds = ["ctmq"] if bits == 32 else ["ctmq", "torch"]
            if compiled and not a.compile_torch_quantizers:
                kinds = kinds[:1]
            for kind in kinds:
                torch._dynamo.reset()
                set_bits(model, bits, bits)
                use_quantizers(model, kind)
                t = step_time(model, x, y, device, a.steps, compiled)
                rows.append({"mode": "compiled" if compiled else "eager", "bits": bits,
                             "quantizers": kind if bits != 32 else "-", "ms": t * 1e3,
                             "img_s": batch / t})
    use_quantizers(model, "ctmq")
    fp = {r["mode"]: r["ms"] for r in rows if r["bits"] == 32}
    name = bench.device_name(device)
    print(f"ResNet-18 train step, {name}, batch {batch}, {a.image_size}x{a.image_size}, "
          f"width {a.width}{', bf16 autocast, channels_last' if device.type == 'cuda' else ', fp32'}")
    print(f"{'mode':9s} {'stage':6s} {'quantizers':10s} {'ms':>9s} {'img/s':>9s} {'vs FP':>7s}")
    for r in rows:
        r["vs_fp"] = fp[r["mode"]] / r["ms"] if r["mode"] in fp else float("nan")
        stage = "FP" if r["bits"] == 32 else f"W{r['bits']}A{r['bits']}"
        print(f"{r['mode']:9s} {stage:6s} {r['quantizers']:10s} {r['ms']:9.2f} {r['img_s']:9.0f} "
              f"{r['vs_fp']:6.3f}x")
    if a.json:
        with atomic_open(a.json) as f:
            json.dump({"device": name, "batch": batch, "image_size": a.image_size,
                       "width": a.width, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
