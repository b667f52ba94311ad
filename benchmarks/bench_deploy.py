"""Deployed binarized zoo models against the float engines a user would run
instead, measured in the same run.

CPU. Each model is exported at W1A1 and run by ctmq's engines:
  native    the native runtime (ctmq.deploy.load(engine="native"): the
            executor on its own float kernels and thread pool, no torch)
  executor  the torch runtime's compiled executor (float ops through ATen:
            the model's eval logits bit for bit)
and the same architecture at full precision (for resnet18/resnet34 the
torchvision ResNet, for the others the zoo's model with 32-bit layers) by:
  torch     torch float32 eager, inference_mode
  compile   torch.compile of it (--peers ...,compile; minutes to compile)
  ort       ONNX Runtime float32 (CPUExecutionProvider) on the model
            exported by torch.onnx (pip install 'ctmq[peers]')
for each batch size and thread count, all engines timed in turns in one
process (median ms per batch; the machine's drift moves all alike), with a
pause before each turn in which the threads of the engine before stop
spinning. Then,
for the fastest ctmq engine's kernels: where the time goes (binary convs,
pooling, layout and packing, float convs, classifier, the rest), and the
binary convs against the hardware's floor: words per second per binary conv
shape against the path's peak measured by a register-only micro-benchmark
(torch.ops.ctmq.binary_cpu_peak) on as many cores as threads.

--isa avx2 runs the whole measurement with every engine capped at AVX2
(ctmq's path; ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and
MKL_ENABLE_INSTRUCTIONS for torch): an AVX2 machine emulated on this CPU,
labelled as such. ONNX Runtime has no such cap (MLAS picks its kernels from
the CPU), so on an AVX-512 machine its figures stay AVX-512's: the ratios to
it are then conservative for ctmq. --ctmq-run PATH also times the native
command line's whole process (load + first inference) and names its size.

CUDA (--device cuda): ctmq's runtime (CUDA graphs) with each binary conv
kernel that runs here (Triton; the tensor-core kernel where built) against
float16 channels_last torch, batch 256 and 1.

    python benchmarks/bench_deploy.py [--models resnet18,reactnet_a,vgg_small]
        [--batch 1 8] [--threads 1 2] [--peers torch,ort[,compile]]
        [--isa native|avx2] [--ctmq-run build/ctmq-run] [--json out.json]
    python benchmarks/bench_deploy.py --device cuda [--models resnet18]
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

ISA_CAPS = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "CTMQ_BENCH_ISA": "avx2",
    }
}


def _cap_isa(argv):
    """--isa avx2: run again with torch's ISA caps in the environment (read
    when torch loads, so before the import)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    isa = None
    for i, a in enumerate(argv):
        if a == "--isa" and i + 1 < len(argv):
            isa = argv[i + 1]
        elif a.startswith("--isa="):
            isa = a.split("=", 1)[1]
    if isa in ISA_CAPS and os.environ.get("CTMQ_BENCH_ISA") != isa:
        env = dict(os.environ, **ISA_CAPS[isa])
        sys.exit(subprocess.call([sys.executable, os.path.abspath(__file__), *argv], env=env))


if __name__ == "__main__":
    _cap_isa(None)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ctmq import bench, binary, deploy, ops  # noqa: E402
from ctmq.artifact import read_artifact  # noqa: E402
from ctmq.export import export_binary  # noqa: E402
from ctmq.models import MODELS  # noqa: E402
from ctmq.nn import set_bits  # noqa: E402

# name -> (constructor arguments, input side)
SETTINGS = {
    "resnet18": (dict(num_classes=1000, stem="imagenet"), 224),
    "resnet34": (dict(num_classes=1000, stem="imagenet"), 224),
    "reactnet_a": (dict(num_classes=1000, stem="imagenet"), 224),
    "vgg_small": (dict(num_classes=10, stem="cifar"), 32),
}
DEFAULT_MODELS = "resnet18,reactnet_a,vgg_small"
ENGINES = ("native", "executor")
PEERS = ("torch", "compile", "ort")
# the per-layer split: op -> part of the network
PARTS = {
    "binary_conv": "binary convs",
    "max_pool2d": "pooling",
    "avg_pool2d": "pooling",
    "global_avg_pool": "pooling",
    "adaptive_avg_pool2d": "pooling",
    "pack": "layout+pack",
    "to_nhwc": "layout+pack",
    "to_nchw": "layout+pack",
    "conv2d": "float convs",
    "batch_norm": "float convs",
    "linear": "classifier",
}
PART_ORDER = (
    "binary convs",
    "float convs",
    "pooling",
    "layout+pack",
    "classifier",
    "other ops",
    "overhead",
)


def _names(allowed, what):
    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if not names or bad:
            raise argparse.ArgumentTypeError(
                f"{what} must be a comma-separated list of {sorted(allowed)}, got {text!r}"
            )
        return names

    return parse


# ------------------------------------------------------------ float references
class _Block(nn.Module):  # torchvision's BasicBlock
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.down is None else self.down(x)))


class TorchvisionResNet(nn.Module):
    """torchvision's resnet18/resnet34 (same layers, same order), written out
    so that the benchmark needs no torchvision."""

    def __init__(self, blocks, width=1.0, num_classes=1000):
        super().__init__()
        w = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(
            nn.Conv2d(3, w[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(w[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, cin = [], w[0]
        for i, (n, c) in enumerate(zip(blocks, w, strict=True)):
            for j in range(n):
                layers.append(_Block(cin, c, 2 if i > 0 and j == 0 else 1))
                cin = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def float_reference(name, zoo_model, width):
    """The float model a user would deploy instead, in eval."""
    if name in ("resnet18", "resnet34"):
        blocks = (2, 2, 2, 2) if name == "resnet18" else (3, 4, 6, 3)
        model = TorchvisionResNet(blocks, width, SETTINGS[name][0]["num_classes"])
    else:
        model = zoo_model
        set_bits(model, 32, 32)
    return model.eval()


def onnx_session(model, size, threads):
    """An ONNX Runtime session of model (float32, dynamic batch), or the
    reason there is none."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (pip install 'ctmq[peers]')"
    import io

    buf = io.BytesIO()
    x = torch.randn(1, 3, size, size)
    try:
        torch.onnx.export(
            model,
            (x,),
            buf,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
            dynamo=False,
        )
    except Exception as e:  # noqa: BLE001 - a peer that does not export is reported, not fatal
        return f"torch.onnx.export failed: {type(e).__name__}: {e}"[:300]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------ CPU measurement
def prepare_cpu(name, width, tmp):
    """(artifact path, float reference model, input side, (checkpoint bytes, artifact bytes))."""
    kwargs, size = SETTINGS[name]
    torch.manual_seed(0)
    model = MODELS[name](width=width, **kwargs)
    set_bits(model, 1, 1)
    model.eval()
    art = os.path.join(tmp, f"{name}.ctmq")
    export_binary(model, art, input_size=size)
    ref = float_reference(name, model, width)
    ckpt = os.path.join(tmp, f"{name}.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, ckpt)
    return art, ref, size, (os.path.getsize(ckpt), os.path.getsize(art))


def cpu_callables(art, ref, size, batch, threads, engines, peers, path, sessions):
    """{engine: zero-argument callable} for one batch size and thread count,
    and {engine: why it is missing}."""
    torch.set_num_threads(threads)
    rng = np.random.default_rng(batch)
    xn = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    x = torch.from_numpy(xn)
    fns, missing = {}, {}
    if "native" in engines:
        try:
            nat = deploy.load(art, engine="native", threads=threads, cpu_path=path)
            fns["native"] = lambda: nat(xn)
        except (OSError, RuntimeError) as e:
            missing["native"] = str(e)
    if "executor" in engines:
        rt = deploy.load(art, engine="executor")
        fns["executor"] = lambda: rt(x)

    def eager():
        with torch.inference_mode():
            return ref(x)

    if "torch" in peers:
        fns["torch"] = eager
    if "compile" in peers:
        compiled = torch.compile(ref)

        def run_compiled():
            with torch.inference_mode():
                return compiled(x)

        try:
            run_compiled()
            fns["compile"] = run_compiled
        except Exception as e:  # noqa: BLE001 - reported as the peer's failure
            missing["compile"] = f"{type(e).__name__}: {e}"[:300]
    if "ort" in peers:
        sess = sessions.get(threads)
        if isinstance(sess, str):
            missing["ort"] = sess
        else:
            fns["ort"] = lambda: sess.run(None, {"x": xn})
    return fns, missing


def measure_cpu(name, art, ref, size, batches, thread_counts, engines, peers, path, min_time):
    rows = []
    sessions = {t: onnx_session(ref, size, t) for t in thread_counts} if "ort" in peers else {}
    for threads in thread_counts:
        for b in batches:
            fns, missing = cpu_callables(art, ref, size, b, threads, engines, peers, path, sessions)
            t = bench.timeit_interleaved(fns, min_time=min_time, settle=0.03)
            rows.append(
                {
                    "model": name,
                    "size": size,
                    "batch": b,
                    "threads": threads,
                    "ms": {k: v * 1e3 for k, v in t.items()},
                    "missing": missing,
                }
            )
    return rows


def split(art, size, batch, threads, path, reps=10):
    """Where the time of the ctmq kernels goes: ({part: ms}, wall ms, [(node,
    op, ms)]) from the executor's profile, for the engine with its own float
    kernels (the native runtime's) and for the exact (ATen) one; the best
    of reps runs per step."""
    import json

    from ctmq import _C

    header, tensors = read_artifact(art)
    torch.set_num_threads(threads)
    x = torch.randn(batch, 3, size, size)
    out = {}
    for label, aten in (("native kernels", False), ("executor (ATen float ops)", True)):
        ex = _C.Executor(json.dumps(header), {k: v.contiguous() for k, v in tensors.items()}, aten)
        best, wall = None, math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            _, _, steps = ex.profile(x)
            wall = min(wall, time.perf_counter() - t0)
            best = (
                steps
                if best is None
                else [(n, o, min(s, b[2])) for (n, o, s), b in zip(steps, best, strict=True)]
            )
        parts = dict.fromkeys(PART_ORDER, 0.0)
        for _, op, s in best:
            parts[PARTS.get(op, "other ops")] += s * 1e3
        parts["overhead"] = max(0.0, wall * 1e3 - sum(parts.values()))
        out[label] = (parts, wall * 1e3, [(n, o, s * 1e3) for n, o, s in best])
    return out


def binary_floor(art, steps, size, batch, threads, peak):
    """Per binary conv shape: words per image, ms, words/s against the
    path's peak on `threads` cores."""
    from ctmq.deploy import runtime as _rt

    rt = _rt.Runtime(*read_artifact(art), engine="python")
    _, env = rt.run(torch.zeros(1, 3, size, size), trace=True)
    ms = {n: s for n, op, s in steps if op == "binary_conv"}
    shapes = {}
    for node in rt.header["nodes"]:
        if node["op"] != "binary_conv":
            continue
        w = rt.t[node["weight"]]  # (O, KH, KW, int32 words)
        o, kh, kw = w.shape[:3]
        cin = node["in_channels"]
        hin, hout = env[node["in"][0]].shape[-2], env[node["out"]].shape[-2]  # (packed too)
        words = hout * hout * o * kh * kw * math.ceil(cin / 64)
        key = (
            f"{cin}x{o}@{hin}"
            + (f"/s{node['stride'][0]}" if node["stride"][0] > 1 else "")
            + (f" {kh}x{kw}" if (kh, kw) != (3, 3) else "")
        )
        r = shapes.setdefault(key, {"shape": key, "layers": 0, "words": 0, "ms": 0.0})
        r["layers"] += 1
        r["words"] += words
        r["ms"] += ms.get(node["out"], 0.0)
    for r in shapes.values():
        r["pct_peak"] = (
            100 * r["words"] * batch / (r["ms"] / 1e3) / (peak * threads) if r["ms"] else 0
        )
    return list(shapes.values())


def native_process(ctmq_run, art, size, runs=7):
    """ctmq-run's size and the wall time of its whole process (load, first
    inference of one image, exit), best and median of runs."""
    with tempfile.TemporaryDirectory() as tmp:
        x = os.path.join(tmp, "x.npy")
        np.save(x, np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32))
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run([ctmq_run, art, x, "--threads", "1"], check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "bytes": os.path.getsize(ctmq_run),
        "best_ms": times[0] * 1e3,
        "median_ms": times[len(times) // 2] * 1e3,
    }


def run_cpu(a):
    isa = os.environ.get("CTMQ_BENCH_ISA", "native")
    path = "avx2" if isa == "avx2" else "auto"
    ops.binary_cpu_path(path)
    cpu = bench.cpu_name() + (
        " (AVX2 emulated: every engine capped at AVX2 but ONNX Runtime)" if isa == "avx2" else ""
    )
    kernels = ops.binary_cpu_path("")
    print(
        f"binarized zoo deploy, CPU {cpu}; ctmq path {kernels}; torch {torch.__version__}"
        + _ort_version(a.peers),
        flush=True,
    )
    log = bench.JsonRows(
        a.json,
        cpu=cpu,
        path=kernels,
        isa=isa,
        torch=torch.__version__,
        width=a.width,
        artifacts={},
        splits=[],
        floors=[],
    )
    peak = torch.ops.ctmq.binary_cpu_peak(0.5)  # words per second, one core
    log.meta["peak_words_per_s"] = peak
    for model_name in a.models:
        with tempfile.TemporaryDirectory() as tmp:
            art, ref, size, sizes = prepare_cpu(model_name, a.width, tmp)
            log.meta["artifacts"][model_name] = {
                "checkpoint_bytes": sizes[0],
                "artifact_bytes": sizes[1],
            }
            rows = measure_cpu(
                model_name, art, ref, size, a.batch, a.threads, a.engines, a.peers, path, a.min_time
            )
            for r in rows:
                log.add(r)
            print(format_speed(model_name, size, rows, a.engines, a.peers))
            threads = max(a.threads)
            for b in a.batch:
                parts = split(art, size, b, threads, path)
                native_steps = parts["native kernels"][2]
                floor = binary_floor(art, native_steps, size, b, threads, peak)
                log.meta["splits"].append(
                    {
                        "model": model_name,
                        "batch": b,
                        "threads": threads,
                        **{k: {"parts": v[0], "wall_ms": v[1]} for k, v in parts.items()},
                    }
                )
                log.meta["floors"].append(
                    {"model": model_name, "batch": b, "threads": threads, "shapes": floor}
                )
                log.write()
                print(format_split(model_name, b, threads, parts))
                print(format_floor(floor, b, threads, peak))
            if a.ctmq_run:
                proc = native_process(a.ctmq_run, art, size)
                log.meta.setdefault("ctmq_run", {})[model_name] = proc
                log.write()
                print(
                    f"ctmq-run ({proc['bytes'] / 1e6:.2f} MB): process start to first "
                    f"{model_name} prediction and exit, best {proc['best_ms']:.1f} ms, median "
                    f"{proc['median_ms']:.1f} ms"
                )
            print(
                f"{model_name}: artifact {sizes[1] / 1e6:.2f} MB vs float32 checkpoint "
                f"{sizes[0] / 1e6:.2f} MB ({sizes[0] / sizes[1]:.1f}x smaller)\n",
                flush=True,
            )
    ops.binary_cpu_path("auto")


def _ort_version(peers):
    if "ort" not in peers:
        return ""
    try:
        import onnxruntime

        return f"; onnxruntime {onnxruntime.__version__}"
    except ImportError:
        return ""


def format_speed(model, size, rows, engines, peers):
    cols = [e for e in ENGINES if e in engines] + [p for p in PEERS if p in peers]
    lines = [
        f"{model} {size}x{size}: median ms per batch (all timed in turns, one process)",
        f"{'batch':>5s} {'thr':>3s} "
        + " ".join(f"{c:>9s}" for c in cols)
        + "  ctmq (fastest engine) vs each float engine",
    ]
    for r in rows:
        ms = r["ms"]
        mine = (
            min((ms[e], e) for e in engines if e in ms) if any(e in ms for e in engines) else None
        )
        ratios = ", ".join(f"{ms[p] / mine[0]:.2f}x {p}" for p in PEERS if p in ms and mine)
        lines.append(
            f"{r['batch']:5d} {r['threads']:3d} "
            + " ".join(f"{ms[c]:9.2f}" if c in ms else f"{'-':>9s}" for c in cols)
            + (f"  {mine[1]}: {ratios}" if mine else "")
        )
        for k, why in r["missing"].items():
            lines.append(f"      {k}: not measured: {why}")
    return "\n".join(lines)


def format_split(model, batch, threads, parts):
    lines = [
        f"{model} batch {batch}, {threads} threads: where the time goes (ms, best of 10 "
        f"profiled runs per step)",
        f"{'':27s} " + " ".join(f"{p:>12s}" for p in PART_ORDER) + f" {'wall':>7s}",
    ]
    for label, (p, wall, _) in parts.items():
        lines.append(
            f"{label:27s} " + " ".join(f"{p[k]:12.3f}" for k in PART_ORDER) + f" {wall:7.3f}"
        )
    return "\n".join(lines)


def format_floor(shapes, batch, threads, peak):
    words = sum(r["words"] for r in shapes)
    ms = sum(r["ms"] for r in shapes)
    floor_ms = words * batch / (peak * threads) * 1e3
    lines = [
        f"binary convs against the floor: {words / 1e6:.1f} M words per image; path peak "
        f"{peak / 1e9:.2f} G words/s per core x {threads}; all: {ms:.3f} ms, floor "
        f"{floor_ms:.3f} ms ({100 * floor_ms / ms if ms else 0:.0f}% of peak)",
        f"{'shape':>16s} {'layers':>6s} {'Mwords':>7s} {'ms':>7s} {'% peak':>7s}",
    ]
    for r in shapes:
        lines.append(
            f"{r['shape']:>16s} {r['layers']:6d} {r['words'] / 1e6:7.2f} {r['ms']:7.3f} "
            f"{r['pct_peak']:6.0f}%"
        )
    return "\n".join(lines)


# ------------------------------------------------------------ CUDA
def prepare_cuda(name, width, device, tmp):
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
    # one runtime per binary conv kernel that runs here; each captures its own
    # CUDA graphs with the kernel chosen when it first runs
    runtimes = {k: deploy.load(art, device="cuda") for k in binary.cuda_kernels(device)}
    set_bits(model, 32, 32)  # the float reference: the same architecture at full precision
    model = model.to(device, torch.float16).to(memory_format=torch.channels_last)
    return model, runtimes, size, sizes


def measure_cuda(name, model, runtimes, size, batches, device):
    rows = []
    for b in batches:
        x = torch.randn(b, 3, size, size, device=device)
        xr = x.to(torch.float16).contiguous(memory_format=torch.channels_last)

        def ref_fn():
            with torch.inference_mode():
                return model(xr)

        t_ref = bench.timeit(ref_fn, device)
        for kernel, rt in runtimes.items():
            try:
                with binary.use_kernel(kernel):
                    rows.append(
                        _row(name, size, b, kernel, bench.timeit(lambda: rt(x), device), t_ref)
                    )
            except Exception as e:  # noqa: BLE001 - keep the other kernel's figures
                rows.append(
                    {
                        "model": name,
                        "size": size,
                        "batch": b,
                        "kernel": kernel,
                        "torch_ms": t_ref * 1e3,
                        "error": f"{type(e).__name__}: {e}"[:500],
                    }
                )
    return rows


def run_cuda(a):
    dev = torch.device("cuda")
    name = bench.device_name(dev)
    log = bench.JsonRows(
        a.json, device=name, reference="float16 channels_last", width=a.width, artifacts={}
    )
    batches = a.batch or [256, 1]
    print(
        f"binarized zoo deploy, {name}; torch float16 channels_last eval of the same "
        f"architecture in the same run"
    )
    print(
        f"{'model':>10s} {'input':>7s} {'batch':>5s} {'kernel':>7s} {'ctmq ms':>9s} "
        f"{'torch ms':>9s} {'speedup':>8s} {'ctmq img/s':>11s} {'torch img/s':>12s}"
    )
    for model_name in a.models:
        with tempfile.TemporaryDirectory() as tmp:
            model, runtimes, size, sizes = prepare_cuda(model_name, a.width, dev, tmp)
        log.meta["artifacts"][model_name] = {
            "checkpoint_bytes": sizes[0],
            "artifact_bytes": sizes[1],
        }
        for r in measure_cuda(model_name, model, runtimes, size, batches, dev):
            log.add(r)
            _print_cuda(r)
        del model, runtimes


def _print_cuda(r):
    head = f"{r['model']:>10s} {r['size']:>3d}x{r['size']:<3d} {r['batch']:5d} {r['kernel']:>7s}"
    if "error" in r:
        print(f"{head} failed: {r['error']}")
        return
    print(
        f"{head} {r['ctmq_ms']:9.2f} {r['torch_ms']:9.2f} {r['speedup']:7.2f}x "
        f"{r['ctmq_img_s']:11.1f} {r['torch_img_s']:12.1f}"
    )


def _row(model, size, batch, kernel, t_ctmq, t_ref):
    return {
        "model": model,
        "size": size,
        "batch": batch,
        "kernel": kernel,
        "ctmq_ms": t_ctmq * 1e3,
        "torch_ms": t_ref * 1e3,
        "speedup": t_ref / t_ctmq,
        "ctmq_img_s": batch / t_ctmq,
        "torch_img_s": batch / t_ref,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        type=_names(SETTINGS, "--models"),
        default=DEFAULT_MODELS.split(","),
        help=f"comma-separated, of {sorted(SETTINGS)} (default {DEFAULT_MODELS})",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes (default: 1 8 on cpu, 256 1 on cuda)",
    )
    p.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts (default 1 2)"
    )
    p.add_argument(
        "--engines",
        type=_names(ENGINES, "--engines"),
        default=list(ENGINES),
        help="ctmq engines (default native,executor)",
    )
    p.add_argument(
        "--peers",
        type=_names(PEERS, "--peers"),
        default=["torch", "ort"],
        help="float engines (default torch,ort; compile adds torch.compile)",
    )
    p.add_argument(
        "--isa",
        choices=["native", *ISA_CAPS],
        default="native",
        help="avx2: every engine capped at AVX2 (an AVX2 machine emulated)",
    )
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    p.add_argument(
        "--min-time",
        type=float,
        default=3.0,
        help="seconds of timing per model, batch size and thread count (cpu)",
    )
    p.add_argument("--ctmq-run", help="a built ctmq-run: time its whole process too")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if any(b < 1 for b in a.batch or []) or any(t < 1 for t in a.threads):
        p.error("--batch and --threads must be >= 1")
    if a.device == "cpu":
        a.batch = a.batch or [1, 8]
    return a


def main(argv=None):
    _cap_isa(argv)
    a = parse_args(argv)
    if a.device == "cuda":
        run_cuda(a)
    else:
        run_cpu(a)


if __name__ == "__main__":
    sys.exit(main())
