"""Quantizer benchmark shared by `ctmq bench` and benchmarks/bench_fake_quant.py.

Each quantizer runs forward+backward on one large tensor and is compared with
(a) the eager torch expression of the same quantizer with the usual detach()
STE, (b) torch's own fake_quantize op with the same number of levels, (c)
torch.compile of (a). Bandwidth counts the minimum bytes of fwd+bwd (read x,
write y, read dy, write dx) and is shown as a fraction of a plain device copy
measured in the same run. Every ratio is between numbers of one run.
"""

import dataclasses
import json
import statistics
import time

import torch

from . import quant
from .files import atomic_open

__all__ = [
    "Row",
    "JsonRows",
    "timeit",
    "timeit_interleaved",
    "cases",
    "run",
    "format_table",
    "device_name",
    "cpu_name",
    "write_json",
    "json_row_writer",
]


@dataclasses.dataclass
class Row:
    case: str
    impl: str
    ms: float
    gbps: float
    of_copy: float
    vs_eager: float


def timeit(fn, device, min_time=0.5, max_reps=1000):
    """Median seconds per call: CUDA events via triton's do_bench on GPU,
    perf_counter on CPU; warm-up calls are not timed."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(2):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class JsonRows:
    """A benchmark's JSON file, rewritten (atomically) after every row, so that a
    benchmark killed half way keeps what it measured: {**meta, "rows": [...]}."""

    def __init__(self, file, **meta):
        self.file, self.meta, self.rows = file, meta, []

    def add(self, row):
        self.rows.append(row)
        self.write()

    def write(self):
        if self.file:
            with atomic_open(self.file) as f:
                json.dump({**self.meta, "rows": self.rows}, f, indent=1)


def timeit_interleaved(fns, min_time=1.0, calls_per_turn=8, settle=0.0):
    """{name: median seconds per call} of CPU callables timed in turns of
    calls_per_turn calls each, so that a machine slowing down or speeding up
    during the run (these VMs drift by 10% and more within seconds) moves all
    of them alike and their ratios hold. The first call of each turn is not
    counted: it finds the caches full of the other callable's data. settle:
    seconds of sleep before each turn, so that the worker threads of the
    callable before (OpenMP's, ONNX Runtime's, which spin for milliseconds
    after their last region) are asleep when the next one's start."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    start = time.perf_counter()
    while min(len(t) for t in times.values()) < 5 or time.perf_counter() - start < min_time:
        for name, fn in fns.items():
            if settle:
                time.sleep(settle)
            fn()
            for _ in range(calls_per_turn - 1):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------- eager baselines
def _levels(c, bits):
    if bits == 1:
        return torch.where(c >= 0, 1.0, -1.0).to(c.dtype)
    n = 2**bits - 1
    return (torch.floor(c * (n / 2)) * 2 + 1) / n


def eager_act(x, bits):
    c = x.clamp(-1, 1)
    return c + (_levels(c, bits) - c).detach()


def eager_weight(w, bits):
    a = w.detach().abs().flatten(1)
    alpha = (a.mean(1) if bits == 1 else a.amax(1)).view((-1,) + (1,) * (w.dim() - 1))
    c = (w / alpha).clamp(-1, 1)
    return alpha * (c + (_levels(c, bits) - c).detach())


def eager_affine(x, scale, zp, qmin, qmax):
    q = torch.round(x * (1.0 / scale)) + zp
    mask = (q >= qmin) & (q <= qmax)
    y = (q.clamp(qmin, qmax) - zp) * scale
    return y.detach() + (x - x.detach()) * mask


def torch_op_act(x, bits):  # same number of levels, integer zero point
    n = 2**bits - 1
    return torch.fake_quantize_per_tensor_affine(x, 2.0 / n, 0, -(n + 1) // 2, (n - 1) // 2)


def torch_op_weight(w, bits):
    n = 2**bits - 1
    a = w.detach().abs().flatten(1)
    alpha = (a.mean(1) if bits == 1 else a.amax(1)).float()
    zeros = torch.zeros_like(alpha, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(
        w, alpha * 2 / n, zeros, 0, -(n + 1) // 2, (n - 1) // 2
    )


def cases(numel):
    """(name, make_input(shape source), {impl: fn}) for each quantizer."""
    wshape = (max(1, numel // 4608), 512, 3, 3)
    return [
        (
            "act W4A4 clipped",
            (numel,),
            {
                "ctmq": lambda x: quant.quantize_act(x, 4),
                "eager": lambda x: eager_act(x, 4),
                "torch.fake_quantize": lambda x: torch_op_act(x, 4),
            },
        ),
        (
            "act 1-bit approx_sign",
            (numel,),
            {
                "ctmq": lambda x: quant.quantize_act(x, 1, ste="approx_sign"),
                "eager": lambda x: eager_act(x, 1),
                "torch.fake_quantize": lambda x: torch_op_act(x, 1),
            },
        ),
        (
            "weight 4-bit per-channel",
            wshape,
            {
                "ctmq": lambda w: quant.quantize_weight(w, 4),
                "eager": lambda w: eager_weight(w, 4),
                "torch.fake_quantize": lambda w: torch_op_weight(w, 4),
            },
        ),
        (
            "weight 1-bit per-channel",
            wshape,
            {
                "ctmq": lambda w: quant.quantize_weight(w, 1),
                "eager": lambda w: eager_weight(w, 1),
                "torch.fake_quantize": lambda w: torch_op_weight(w, 1),
            },
        ),
        (
            "affine per-tensor int8",
            (numel,),
            {
                "ctmq": lambda x: quant.fake_quant_affine(x, 0.02, 3, -128, 127),
                "eager": lambda x: eager_affine(x, 0.02, 3, -128, 127),
                "torch.fake_quantize": lambda x: torch.fake_quantize_per_tensor_affine(
                    x, 0.02, 3, -128, 127
                ),
            },
        ),
    ]


def run(
    device="cuda", dtype=torch.bfloat16, numel=64 * 2**20, compile=True, only=None, on_row=None
):
    """Benchmark every case; returns (copy GB/s, [Row]); on_row(copy GB/s, row)
    is called as each row is measured."""
    device = torch.device(device)
    src = torch.randn(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    esize = src.element_size()
    copy_gbps = 2 * numel * esize / timeit(lambda: dst.copy_(src), device) / 1e9
    rows = []
    for name, shape, impls in cases(numel):
        if only and only not in name:
            continue
        x = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
        g = torch.randn(shape, device=device, dtype=dtype)
        nbytes = 4 * x.numel() * esize
        fns = dict(impls)
        if compile:
            fns["torch.compile(eager)"] = torch.compile(impls["eager"])
        times = {}
        for impl, fn in fns.items():

            def step(fn=fn, x=x, g=g):
                return torch.autograd.grad(fn(x), x, g)

            times[impl] = timeit(step, device)
        for impl, t in times.items():
            gbps = nbytes / t / 1e9
            rows.append(Row(name, impl, t * 1e3, gbps, gbps / copy_gbps, times["eager"] / t))
            if on_row is not None:
                on_row(copy_gbps, rows[-1])
    return copy_gbps, rows


def format_table(copy_gbps, rows, device_name):
    lines = [
        f"fake-quant fwd+bwd on {device_name}; copy {copy_gbps:.0f} GB/s "
        "(bytes read + written) in this run",
        f"{'case':26s} {'impl':22s} {'ms':>9s} {'GB/s':>8s} {'of copy':>8s} {'vs eager':>9s}",
    ]
    for r in rows:
        lines.append(
            f"{r.case:26s} {r.impl:22s} {r.ms:9.3f} {r.gbps:8.0f} "
            f"{r.of_copy:7.0%} {r.vs_eager:8.2f}x"
        )
    return "\n".join(lines)


def device_name(device):
    """The device as a figure's caption names it: the GPU's name, or the CPU's
    model, family/model numbers and vector ISA (the binary kernels' path
    depends on it), and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def cpu_name():
    """'AMD EPYC (family 26 model 2, AVX-512 VPOPCNTDQ), 2 cores': the CPU
    from /proc/cpuinfo where there is one (a VM often shows only the brand)."""
    import os
    import platform

    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split()) | set(info.get("Features", "").split())
    isa = (
        "AVX-512 VPOPCNTDQ"
        if "avx512_vpopcntdq" in flags
        else "AVX2"
        if "avx2" in flags
        else "NEON"
        if "asimd" in flags
        else platform.machine()
    )
    family = (
        f"family {info['cpu family']} model {info['model']}, "
        if "cpu family" in info and "model" in info
        else ""
    )
    return f"{name} ({family}{isa}), {os.cpu_count()} cores"


def write_json(path, copy_gbps, rows, device_name, **meta):
    log = JsonRows(path, device=device_name, copy_gbps=copy_gbps, **meta)
    log.rows = [dataclasses.asdict(r) for r in rows]
    log.write()


def json_row_writer(path, device_name, **meta):
    """on_row callback for run(): the JSON file of write_json, rewritten per row."""
    log = JsonRows(path, device=device_name, **meta)
    return lambda copy_gbps, row: (
        log.meta.update(copy_gbps=copy_gbps),
        log.add(dataclasses.asdict(row)),
    )
