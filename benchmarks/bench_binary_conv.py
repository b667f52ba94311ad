"""Binary convolution throughput on ResNet-18's 7 binarizable 3x3 shapes (224x224
input; --1x1 adds its three 1x1 downsampling convs): ctmq's XNOR-popcount kernel
against torch's F.conv2d on the same shapes, measured in the same run.
CPU: against float32; "ctmq" = float NCHW in (activation packing included),
float out, weights pre-packed, as ctmq.binary.binary_conv2d runs it; "kernel"
= the C++ conv alone (torch.ops.ctmq.binary_conv2d_cpu, packed in), float NCHW
out and packed out (scale/bias epilogue, the deploy chain between binary
layers), each rated in 64-bit words per cycle (words = N*OH*OW*O*KH*KW*ceil(C/64);
cycles = seconds x the TSC frequency, from /proc/cpuinfo or --tsc-ghz) against
the path's peak, measured in the same run by a register-only loop of its
xor + popcount + accumulate (torch.ops.ctmq.binary_cpu_peak, one core; with
N threads the rows are rated against N times that).
Kernel times are the fastest call, the ctmq / torch ratio the median's.
CUDA: each CUDA binary kernel that runs here (Triton, tensor cores), float in/out
and packed in/out, against cuDNN in bfloat16 and float16, channels_last (CUDA
events via triton's do_bench, median).

    python benchmarks/bench_binary_conv.py [--device cpu|cuda] [--batch 1 8] [--json out.json]
    taskset -c 1 python benchmarks/bench_binary_conv.py --threads 1 --paths auto avx2 --1x1
"""

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ctmq import bench, binary, ops

# (in, out, spatial size, stride): the 3x3 convs of ResNet-18 at 224x224
SHAPES = [
    (64, 64, 56, 1),
    (64, 128, 56, 2),
    (128, 128, 28, 1),
    (128, 256, 28, 2),
    (256, 256, 14, 1),
    (256, 512, 14, 2),
    (512, 512, 7, 1),
]
# its 1x1 downsampling convs (stride 2, no padding)
SHAPES_1X1 = [(64, 128, 56, 2), (128, 256, 28, 2), (256, 512, 14, 2)]


def tsc_hz(ghz=None):
    """The TSC frequency in Hz: --tsc-ghz, else /proc/cpuinfo's "cpu MHz" (on
    x86 VMs with a constant TSC, the TSC's rate), else None."""
    if ghz:
        return ghz * 1e9
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) * 1e6
    except (OSError, ValueError):
        pass
    return None


def _time_turns(fns, min_time):
    """{name: [seconds per call]}: the callables in alternating turns of 8
    calls (the first of a turn not counted), at least 5 turns and min_time."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    start = time.perf_counter()
    while min(len(t) for t in times.values()) < 35 or time.perf_counter() - start < min_time:
        for name, fn in fns.items():
            fn()
            for _ in range(7):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def run_cpu(batch, min_time=0.6, on_row=None, shapes=None, hz=None, peak=None, threads=None):
    """One row per shape: ctmq (packing included) against torch float32, and
    the kernel alone (float and packed out) in words per cycle against the
    path's peak (peak: words per second; hz: the TSC frequency)."""
    rows = []
    conv = torch.ops.ctmq.binary_conv2d_cpu
    for cin, cout, size, stride, k in shapes or [(*s, 3) for s in SHAPES]:
        x = torch.randn(batch, cin, size, size)
        w = torch.randn(cout, cin, k, k)
        wb = binary.pack_weight(w)
        xb = binary.pack_activation(x).bits
        gemm, tap_popc = wb.layout_for(wb.bits, "cpp")
        scale, bias = torch.rand(cout) + 0.5, torch.randn(cout)
        pad = k // 2
        geometry = ([k, k], [stride, stride], [pad, pad], [1, 1])
        t = _time_turns(
            {  # in turns: this CPU's speed drifts within seconds
                "ctmq": lambda: binary.binary_conv2d(x, wb, stride=stride, padding=pad),
                "torch": lambda: F.conv2d(x, w, stride=stride, padding=pad),
                "float": lambda: conv(
                    xb, cin, gemm, tap_popc, cout, *geometry, None, None, None, False
                ),
                "packed": lambda: conv(
                    xb, cin, gemm, tap_popc, cout, *geometry, scale, bias, None, True
                ),
            },
            min_time,
        )
        t_bin, t_f32 = statistics.median(t["ctmq"]), statistics.median(t["torch"])
        out = (size + 2 * pad - k) // stride + 1
        macs = batch * cout * out * out * cin * k * k
        words = batch * out * out * cout * k * k * ((cin + 63) // 64)
        row = {
            "shape": ("1x1 " if k == 1 else "")
            + f"{cin}x{cout}@{size}"
            + ("/s2" if stride == 2 else ""),
            "batch": batch,
            "threads": threads or torch.get_num_threads(),
            "path": ops.binary_cpu_path(""),
            "ctmq_ms": t_bin * 1e3,
            "torch_f32_ms": t_f32 * 1e3,
            "speedup": t_f32 / t_bin,
            "binary_gops": 2 * macs / t_bin / 1e9,
            "words": words,
        }
        for kind in ("float", "packed"):
            best = min(t[kind])
            row[f"kernel_{kind}_ms"] = best * 1e3
            if hz:
                row[f"kernel_{kind}_wpc"] = words / (best * hz)
            if peak:  # against the peak of every thread's core
                row[f"kernel_{kind}_pct_peak"] = 100 * words / best / (peak * row["threads"])
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def run_cuda(batch, on_row=None):
    """Per shape: cuDNN bf16/fp16 channels_last; each CUDA binary kernel that
    can run here (binary.cuda_kernels(): Triton, and the tensor-core kernel
    where built) twice: "float" = float NCHW in (packing included), float out;
    "packed" = packed in, packed out with a scale/bias threshold, the deploy
    chain between binary layers. Float I/O alone is 4 bytes per element in and
    out (more than cuDNN's bf16 moves): the 5x target is about the packed chain.
    A kernel that fails is reported in the row ("<kernel>_error") and the
    others are still timed."""
    dev = torch.device("cuda")
    kernels = binary.cuda_kernels(dev)
    rows = []
    for cin, cout, size, stride in SHAPES:
        x = torch.randn(batch, cin, size, size, device=dev)
        w = torch.randn(cout, cin, 3, 3, device=dev)
        scale, bias = torch.rand(cout, device=dev) + 0.5, torch.randn(cout, device=dev)
        out = (size + 2 - 3) // stride + 1
        macs = batch * cout * out * out * cin * 9
        row = {"shape": f"{cin}x{cout}@{size}" + ("/s2" if stride == 2 else ""), "batch": batch}
        for name, dt in (("cudnn_bf16_ms", torch.bfloat16), ("cudnn_f16_ms", torch.float16)):
            xh = x.to(dt).contiguous(memory_format=torch.channels_last)
            wh = w.to(dt).contiguous(memory_format=torch.channels_last)
            row[name] = bench.timeit(lambda: F.conv2d(xh, wh, stride=stride, padding=1), dev) * 1e3
        for kernel in kernels:
            try:
                with binary.use_kernel(kernel):
                    wb, xb = binary.pack_weight(w), binary.pack_activation(x)
                    row[f"{kernel}_float_ms"] = (
                        bench.timeit(
                            lambda: binary.binary_conv2d(x, wb, stride=stride, padding=1), dev
                        )
                        * 1e3
                    )
                    row[f"{kernel}_packed_ms"] = (
                        bench.timeit(
                            lambda: binary.binary_conv2d(
                                xb,
                                wb,
                                stride=stride,
                                padding=1,
                                scale=scale,
                                bias=bias,
                                out="packed",
                            ),
                            dev,
                        )
                        * 1e3
                    )
            except Exception as e:  # keep the other kernels' and cuDNN's figures
                row[f"{kernel}_error"] = f"{type(e).__name__}: {e}"[:500]
                print(
                    f"{row['shape']} b{batch}: {kernel} failed: {row[f'{kernel}_error']}",
                    flush=True,
                )
        packed = [row[k] for k in row if k.endswith("_packed_ms")]
        if packed:
            row["speedup"] = row["cudnn_bf16_ms"] / min(packed)
            row["binary_tops"] = 2 * macs / (min(packed) * 1e-3) / 1e12
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


CUDA_COLUMNS = [
    ("triton_float_ms", "triton f"),
    ("triton_packed_ms", "triton p"),
    ("bmma_float_ms", "bmma f"),
    ("bmma_packed_ms", "bmma p"),
    ("cudnn_bf16_ms", "cudnn bf16"),
    ("cudnn_f16_ms", "cudnn f16"),
]


def format_cuda_rows(rows, title):
    """ms per kernel; f = float in/out, p = packed in/out; the ratio is cuDNN bf16
    over the faster packed ctmq kernel."""

    def cell(r, key):
        return f"{r[key]:10.3f}" if key in r else f"{'-':>10s}"

    lines = [
        title,
        f"{'shape':16s} {'batch':>5s} "
        + " ".join(f"{h:>10s}" for _, h in CUDA_COLUMNS)
        + f" {'vs bf16':>8s} {'bin TOPS':>9s}",
    ]
    for r in rows:
        ratio = f" {r['speedup']:7.2f}x {r['binary_tops']:9.1f}" if "speedup" in r else ""
        lines.append(
            f"{r['shape']:16s} {r['batch']:5d} "
            + " ".join(cell(r, k) for k, _ in CUDA_COLUMNS)
            + ratio
        )
    for b in sorted({r["batch"] for r in rows}):
        total = cuda_totals(rows, b)
        packed = [v for k, v in total.items() if k.endswith("_packed_ms")]
        ratio = f" {total['cudnn_bf16_ms'] / min(packed):7.2f}x" if packed else ""
        lines.append(
            f"{'total':16s} {b:5d} " + " ".join(cell(total, k) for k, _ in CUDA_COLUMNS) + ratio
        )
    return "\n".join(lines)


def cuda_totals(rows, batch):
    """{column: sum over the shapes of `batch`} for the columns every shape has."""
    mine = [r for r in rows if r["batch"] == batch]
    return {k: sum(r[k] for r in mine) for k, _ in CUDA_COLUMNS if all(k in r for r in mine)}


def format_rows(rows, title):
    """ctmq (packing included) against torch float32; the kernel alone, float
    and packed out: fastest ms, words per TSC cycle, % of the path's peak;
    one section per path, totals over the 3x3 shapes per batch and threads."""

    def kern(r, kind):
        if f"kernel_{kind}_ms" not in r:
            return f"{'-':>8s} {'-':>6s} {'-':>5s}"
        wpc = r.get(f"kernel_{kind}_wpc")
        pct = r.get(f"kernel_{kind}_pct_peak")
        return (
            f"{r[f'kernel_{kind}_ms']:8.3f} "
            + (f"{wpc:6.2f}" if wpc else f"{'-':>6s}")
            + " "
            + (f"{pct:4.0f}%" if pct else f"{'-':>5s}")
        )

    lines = [title]
    for path in dict.fromkeys(r.get("path", "") for r in rows):
        mine = [r for r in rows if r.get("path", "") == path]
        peak = mine[0].get("peak_wpc")
        lines += [
            "",
            f"path {path}" + (f", peak {peak:.2f} words per cycle" if peak else ""),
            f"{'shape':20s} {'batch':>5s} {'thr':>3s} {'ctmq ms':>9s} {'torch f32 ms':>12s} "
            f"{'speedup':>8s} {'bin GOPS':>9s} | {'float ms':>8s} {'w/cyc':>6s} {'peak':>5s} | "
            f"{'pack ms':>8s} {'w/cyc':>6s} {'peak':>5s}",
        ]
        for r in mine:
            lines.append(
                f"{r['shape']:20s} {r['batch']:5d} {r.get('threads', 0):3d} {r['ctmq_ms']:9.3f} "
                f"{r['torch_f32_ms']:12.3f} {r['speedup']:7.2f}x {r['binary_gops']:9.0f} | "
                f"{kern(r, 'float')} | {kern(r, 'packed')}"
            )
        for key in sorted({(r["batch"], r.get("threads", 0)) for r in mine}):
            group = [
                r
                for r in mine
                if (r["batch"], r.get("threads", 0)) == key and not r["shape"].startswith("1x1")
            ]
            tb, tf = sum(r["ctmq_ms"] for r in group), sum(r["torch_f32_ms"] for r in group)
            kf = sum(r.get("kernel_float_ms", 0) for r in group)
            kp = sum(r.get("kernel_packed_ms", 0) for r in group)
            lines.append(
                f"{'total 3x3':20s} {key[0]:5d} {key[1]:3d} {tb:9.3f} {tf:12.3f} {tf / tb:7.2f}x "
                f"{'':9s} | {kf:8.3f} {'':12s} | {kp:8.3f}"
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--batch", type=int, nargs="+", default=None, help="default: 1 8 on cpu, 256 1 on cuda"
    )
    p.add_argument("--min-time", type=float, default=0.6, help="seconds per shape (cpu)")
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="cpu: torch thread counts to run (default: torch's)",
    )
    p.add_argument(
        "--paths",
        nargs="+",
        default=["auto"],
        help="cpu: code paths to run, as ctmq.ops.binary_cpu_path requests them",
    )
    p.add_argument("--1x1", dest="with_1x1", action="store_true", help="cpu: also the 1x1 convs")
    p.add_argument(
        "--tsc-ghz",
        type=float,
        default=None,
        help="cpu: the TSC frequency (default: /proc/cpuinfo's cpu MHz)",
    )
    p.add_argument("--json")
    a = p.parse_args(argv)
    name = bench.device_name(a.device)
    info = binary.backend_info()
    log = bench.JsonRows(
        a.json, device=name, path=info[a.device], cuda_kernels=list(info["cuda_kernels"])
    )
    if a.device == "cuda":
        rows = [r for b in (a.batch or [256, 1]) for r in run_cuda(b, on_row=log.add)]
        print(
            format_cuda_rows(
                rows,
                f"binary conv 3x3, {name}; ctmq CUDA kernels: "
                f"{', '.join(info['cuda_kernels']) or 'none'}; "
                f"cuDNN (torch {torch.__version__}) in the same run",
            )
        )
        return
    hz = tsc_hz(a.tsc_ghz)
    shapes = [(*s, 3) for s in SHAPES] + ([(*s, 1) for s in SHAPES_1X1] if a.with_1x1 else [])
    rows = []
    try:
        for request in a.paths:
            path = ops.binary_cpu_path(request)
            mine = []
            peak = torch.ops.ctmq.binary_cpu_peak(0.5)
            for threads in a.threads or [torch.get_num_threads()]:
                torch.set_num_threads(threads)
                for b in a.batch or [1, 8]:
                    mine += run_cpu(b, a.min_time, shapes=shapes, hz=hz, peak=peak, threads=threads)
            # the peak once more after the rows: the best of both rates them (this
            # machine's clock drifts; a low reading would flatter the kernel)
            best = max(peak, torch.ops.ctmq.binary_cpu_peak(0.5))
            print(
                f"path {path}: peak {best / 1e9:.2f} G words/s"
                + (f" = {best / hz:.2f} words per TSC cycle" if hz else ""),
                flush=True,
            )
            for r in mine:
                r["peak_words_per_s"] = best
                if hz:
                    r["peak_wpc"] = best / hz
                for kind in ("float", "packed"):
                    if f"kernel_{kind}_pct_peak" in r:
                        r[f"kernel_{kind}_pct_peak"] *= peak / best
                log.add(r)
            rows += mine
    finally:
        ops.binary_cpu_path("auto")
    clock = f"TSC {hz / 1e9:.3f} GHz" if hz else "no TSC frequency: no words per cycle"
    print(
        format_rows(
            rows,
            f"binary conv, {name}; ctmq CPU paths: {', '.join(a.paths)}; {clock}; "
            f"torch {torch.__version__} float32 F.conv2d in the same run",
        )
    )


if __name__ == "__main__":
    sys.exit(main())
