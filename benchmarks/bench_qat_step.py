"""ResNet-18 training step time: FP vs W4A4 vs W1A1, with ctmq's fused
quantizers vs the same model with eager torch quantizer expressions, eager and
torch.compile'd. Every ratio is to the FP step of the same mode in the same run.

    python benchmarks/bench_qat_step.py                 # CUDA: bf16 autocast, b256, 224x224, eager
    python benchmarks/bench_qat_step.py --compile-bits 32 4   # also torch.compile'd
    python benchmarks/bench_qat_step.py --device cpu --batch 4 --image-size 64 --width 0.25
"""

import argparse
import sys
import time
import types

import torch
import torch.nn.functional as F

from ctmq import bench
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
                lambda self, x: x if self.a_bits == 32 else bench.eager_act(x, self.a_bits), m
            )
            m.quantized_weight = types.MethodType(
                lambda self: (
                    self.weight
                    if self.w_bits == 32
                    else bench.eager_weight(self.weight, self.w_bits)
                ),
                m,
            )


def step_time(model, x, y, device, steps, compiled):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    fwd = torch.compile(model) if compiled else model
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

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
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    p.add_argument("--bits", type=int, nargs="+", default=[32, 4, 1])
    p.add_argument(
        "--compile-bits",
        type=int,
        nargs="*",
        default=[],
        help="bit depths also timed under torch.compile, e.g. 32 4 (each compiles "
        "ResNet-18 once: about a minute on a GPU); default none: the target is eager",
    )
    p.add_argument(
        "--compile-torch-quantizers",
        action="store_true",
        help="also compile the eager-torch-quantizer model (one more compilation per depth)",
    )
    p.add_argument("--json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    batch = a.batch or (256 if device.type == "cuda" else 8)
    compile_bits = a.compile_bits
    torch.manual_seed(0)
    model = resnet18(1000, stem="imagenet", width=a.width).to(device)
    x = torch.randn(batch, 3, a.image_size, a.image_size, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    name = bench.device_name(device)
    log = bench.JsonRows(a.json, device=name, batch=batch, image_size=a.image_size, width=a.width)
    print(
        f"ResNet-18 train step, {name}, batch {batch}, {a.image_size}x{a.image_size}, "
        f"width {a.width}{', bf16 autocast, channels_last' if device.type == 'cuda' else ', fp32'}"
    )
    print(
        f"{'mode':9s} {'stage':6s} {'quantizers':10s} {'ms':>9s} {'img/s':>9s} {'vs FP':>7s}",
        flush=True,
    )
    fp = {}
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
                mode = "compiled" if compiled else "eager"
                if bits == 32:
                    fp[mode] = t * 1e3
                r = {
                    "mode": mode,
                    "bits": bits,
                    "quantizers": kind if bits != 32 else "-",
                    "ms": t * 1e3,
                    "img_s": batch / t,
                    "vs_fp": fp[mode] / (t * 1e3) if mode in fp else float("nan"),
                }
                log.add(r)  # written as measured: a run stopped later keeps it
                stage = "FP" if bits == 32 else f"W{bits}A{bits}"
                print(
                    f"{r['mode']:9s} {stage:6s} {r['quantizers']:10s} {r['ms']:9.2f} "
                    f"{r['img_s']:9.0f} {r['vs_fp']:6.3f}x",
                    flush=True,
                )
    use_quantizers(model, "ctmq")


if __name__ == "__main__":
    sys.exit(main())
