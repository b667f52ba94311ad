"""Fused fake-quantization fwd+bwd vs eager torch, torch.fake_quantize and
torch.compile, as GB/s of the minimum bytes and a fraction of a device copy
measured in the same run.

    python benchmarks/bench_fake_quant.py [--device cuda] [--numel N] [--json out.json]
    pytest benchmarks/bench_fake_quant.py --benchmark-enable      # CPU, pytest-benchmark
"""

import argparse
import sys

import pytest
import torch

from ctmq import bench

CPU_NUMEL = 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--numel", type=int, default=None)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device == "cuda" else "float32"))
    numel = a.numel or (64 * 2**20 if a.device == "cuda" else 4 * 2**20)
    name = bench.device_name(a.device)
    on_row = bench.json_row_writer(a.json, name, numel=numel, dtype=str(dtype)) if a.json else None
    copy_gbps, rows = bench.run(a.device, dtype, numel, compile=not a.no_compile, on_row=on_row)
    print(bench.format_table(copy_gbps, rows, name))


# ------------------------------------------------- pytest-benchmark (CPU) ----
_CASES = {name: (shape, impls) for name, shape, impls in bench.cases(CPU_NUMEL)}


@pytest.mark.parametrize("impl", ["ctmq", "eager", "torch.fake_quantize"])
@pytest.mark.parametrize("case", list(_CASES))
def test_fwd_bwd(benchmark, case, impl):
    shape, impls = _CASES[case]
    x = torch.randn(shape).requires_grad_()
    g = torch.randn(shape)
    fn = impls[impl]
    benchmark.extra_info["min_bytes"] = 4 * x.numel() * x.element_size()
    benchmark(lambda: torch.autograd.grad(fn(x), x, g))


def test_copy_baseline(benchmark):
    src = torch.randn(CPU_NUMEL)
    dst = torch.empty_like(src)
    benchmark.extra_info["bytes"] = 2 * src.numel() * src.element_size()
    benchmark(lambda: dst.copy_(src))


if __name__ == "__main__":
    sys.exit(main())
