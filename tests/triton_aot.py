"""Compile every Triton kernel of ctmq ahead of time for a CUDA target, on a
machine without a GPU, and report each kernel's resources.

The real launchers of ctmq_kernels (the code ctmq.ops calls) run on meta
tensors under a fake CUDA driver that names the target (sm_90 or sm_80):
Triton specializes and compiles each launch as it would on that GPU, down to
a cubin (Triton's bundled ptxas), and launches nothing. The configurations are
the ones ctmq runs: float32/float16/bfloat16 quantizers on ResNet-18
activation and weight shapes, the binary conv with every epilogue on
ResNet-18's 3x3 shapes, its 1x1 downsample and the linear case.

    python tests/triton_aot.py --arch 90 [--json out.json]   # prints the table

tests/test_triton_aot.py runs this for sm_90 and sm_80 and checks: every
@triton.jit kernel was compiled, none uses local memory (spills), and the
quantizer kernels carry no flush-to-zero (.ftz) instruction. Must run without
TRITON_INTERPRET (the interpreter replaces the compiler).
"""

import argparse
import ast
import collections
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_aot.py compiles kernels: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ctmq_kernels import binary as kbinary  # noqa: E402
from ctmq_kernels import quant as kquant  # noqa: E402

MODULES = (kquant, kbinary)
# kernels that must round exactly as the CPU path does: no .ftz anywhere
EXACT_MODULES = (kquant,)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# ResNet-18 at 224x224, batch 256: activations (N, C, H, W), weights (O, C, KH, KW)
ACTS = [(256, 64, 56, 56), (256, 128, 28, 28), (256, 512, 7, 7), (3, 5, 7, 9)]
WEIGHTS = [(64, 3, 7, 7), (64, 64, 3, 3), (128, 64, 1, 1), (512, 512, 3, 3), (1000, 512)]
# (in, out, size, stride) of the 7 binarizable 3x3 convs
CONV3X3 = [
    (64, 64, 56, 1),
    (64, 128, 56, 2),
    (128, 128, 28, 1),
    (128, 256, 28, 2),
    (256, 256, 14, 1),
    (256, 512, 14, 2),
    (512, 512, 7, 1),
]
EPILOGUES = ("float", "scale_bias", "residual", "packed", "packed_residual")


class FakeCudaDriver:
    """The part of Triton's active-driver interface that compiling needs."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True

    def get_active_torch_device(self):
        return torch.device("cuda", 0)


def meta(shape, dtype=torch.float32, channels_last=False):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def quantizer_launches():
    """(config name, thunk) for each quantizer launch ctmq makes."""
    for dtype in DTYPES:
        dn = str(dtype).replace("torch.", "")
        for shape in ACTS:
            cl = len(shape) == 4 and shape[0] > 3
            x = meta(shape, dtype, channels_last=cl)
            mask = meta(((x.numel() + 7) // 8,), torch.uint8)
            scale, inv = meta((1,)), meta((1,))
            zp = meta((1,), torch.int32)
            tag = f"{dn} {tuple(shape)}{' channels_last' if cl else ''}"
            for bits in (1, 2, 4):
                yield (
                    f"quantize_act bits={bits} {tag}",
                    lambda x=x, b=bits: kquant.quantize_act(x, b),
                )
            yield f"masked_grad {tag}", lambda x=x, m=mask: kquant.masked_grad(x, m)
            yield f"approx_sign_grad {tag}", lambda x=x: kquant.approx_sign_grad(x, x)
            yield (
                f"fake_quant_affine per-tensor {tag}",
                lambda x=x, s=scale, i=inv, z=zp: kquant.fake_quant_affine(
                    x, s, i, z, -128, 127, 1, 1, False
                ),
            )
            axis = 1
            nch = x.shape[axis]
            cs, ci, cz = meta((nch,)), meta((nch,)), meta((nch,), torch.int32)
            yield (
                f"fake_quant_affine per-channel {tag}",
                lambda x=x, s=cs, i=ci, z=cz, n=nch, axis=axis: kquant.fake_quant_affine(
                    x, s, i, z, -8, 7, x.stride(axis), n, True
                ),
            )
        for shape in WEIGHTS:
            w = meta(shape, dtype)
            alpha = meta((shape[0],))
            tag = f"{dn} {tuple(shape)}"
            for bits in (1, 2, 4):
                yield (
                    f"quantize_weight bits={bits} {tag}",
                    lambda w=w, b=bits: kquant.quantize_weight(w, b),
                )
            for approx in (False, True):
                yield (
                    f"quantize_weight_grad approx_sign={approx} {tag}",
                    (lambda w=w, a=alpha, ap=approx: kquant.quantize_weight_grad(w, w, a, ap)),
                )


def _conv(batch, cin, cout, size, k, stride, pad, epilogue, tag):
    x = meta((batch, size, size, (cin + 31) // 32), torch.int32)
    wbits = meta((cout, k, k, (cin + 31) // 32), torch.int32)
    out = (size + 2 * pad - k) // stride + 1
    sb = epilogue != "float"
    res = meta((batch, cout, out, out)) if "residual" in epilogue else None
    packed = epilogue.startswith("packed")
    vec = meta((cout,))
    return (
        f"binary_conv2d {epilogue} {tag}",
        lambda: kbinary.binary_conv2d(
            x,
            cin,
            wbits,
            [stride] * 2,
            [pad] * 2,
            [1, 1],
            vec if sb else None,
            vec if sb else None,
            res,
            packed,
        ),
    )


def binary_launches():
    """(config name, thunk) for each binary launch ctmq makes (deploy batch 256 and 1)."""
    for dtype in DTYPES:
        for shape in ACTS:
            x = meta(shape, dtype, channels_last=True)
            yield (
                f"pack_bits {str(dtype).replace('torch.', '')} {tuple(shape)} channels_last",
                lambda x=x: kbinary.pack_bits(x),
            )
        yield "pack_bits strided", lambda: kbinary.pack_bits(meta((256, 64, 56, 112))[..., ::2])
    for batch in (256, 1):
        for cin, cout, size, stride in CONV3X3:
            for epilogue in EPILOGUES:
                yield _conv(
                    batch,
                    cin,
                    cout,
                    size,
                    3,
                    stride,
                    1,
                    epilogue,
                    f"3x3 {cin}x{cout}@{size}/s{stride} b{batch}",
                )
        for epilogue in EPILOGUES:  # a 1x1 downsample and the linear layer (a 1x1 image)
            yield _conv(batch, 64, 128, 56, 1, 2, 0, epilogue, f"1x1 64x128@56/s2 b{batch}")
            yield _conv(batch, 512, 1000, 1, 1, 1, 0, epilogue, f"linear 512x1000 b{batch}")


def jit_kernels():
    """{name: module} of every @triton.jit kernel in MODULES: the JIT functions
    that no other JIT function of its module calls (the rest are helpers)."""
    found = {}
    for mod in MODULES:
        jits = {n: f for n, f in vars(mod).items() if isinstance(f, JITFunction)}
        called = set()
        for f in jits.values():
            tree = ast.parse(inspect.getsource(f.fn).lstrip())
            called |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} - {
                f.fn.__name__
            }
        found.update({n: mod.__name__ for n in jits if n not in called})
    return found


def _cuobjdump():
    path = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else "cuobjdump"


def resource_usage(cubin, tmp):
    """{REG, STACK, SHARED, LOCAL} of the one function in a cubin (cuobjdump)."""
    path = pathlib.Path(tmp) / "k.cubin"
    path.write_bytes(cubin)
    text = subprocess.run(
        [_cuobjdump(), "--dump-resource-usage", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def compile_all(arch):
    """[{kernel, module, config, regs, stack, shared, local, ftz}] for every launch."""
    driver.set_active(FakeCudaDriver(arch))
    launched = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):  # compile, never launch
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        launched.append((self.fn.__name__, self.fn.__module__, kernel))
        return kernel

    JITFunction.run = run
    rows, seen = [], {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for config, thunk in list(quantizer_launches()) + list(binary_launches()):
                del launched[:]
                thunk()
                for name, module, kernel in launched:
                    key = kernel.hash if hasattr(kernel, "hash") else kernel.metadata.hash
                    if key not in seen:
                        ptx = kernel.asm["ptx"]
                        seen[key] = dict(
                            resource_usage(kernel.asm["cubin"], tmp),
                            ftz=sorted(
                                set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.ftz\b[.\w]*", ptx))
                            ),
                            num_warps=kernel.metadata.num_warps,
                        )
                    rows.append(
                        dict(kernel=name, module=module, config=config, hash=key, **seen[key])
                    )
    finally:
        JITFunction.run = original
    return rows


def summarize(rows):
    """{kernel: {configs, compiles, regs_max, regs_min, local_max, stack_max, shared_max}}."""
    out = collections.OrderedDict()
    for r in rows:
        s = out.setdefault(
            r["kernel"],
            {
                "module": r["module"],
                "configs": 0,
                "hashes": set(),
                "regs": [],
                "local": 0,
                "stack": 0,
                "shared": 0,
                "ftz": set(),
            },
        )
        s["configs"] += 1
        s["hashes"].add(r["hash"])
        s["regs"].append(r["REG"])
        s["local"] = max(s["local"], r["LOCAL"])
        s["stack"] = max(s["stack"], r["STACK"])
        s["shared"] = max(s["shared"], r["SHARED"])
        s["ftz"] |= set(r["ftz"])
    return out


def table(rows, arch):
    lines = [
        f"| kernel (sm_{arch}, triton {triton.__version__}) | launch configs | compiled variants "
        "| registers | local memory (spills) | stack | shared |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summarize(rows).items():
        regs = (
            f"{min(s['regs'])}-{max(s['regs'])}"
            if min(s["regs"]) != max(s["regs"])
            else str(s["regs"][0])
        )
        lines.append(
            f"| {name} | {s['configs']} | {len(s['hashes'])} | {regs} | {s['local']} B "
            f"| {s['stack']} B | {s['shared']} B |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--arch", type=int, default=90, help="compute capability x10: 90 (Hopper), 80 (Ampere)"
    )
    p.add_argument("--json", help="write every launch's row and the discovered kernels here")
    a = p.parse_args(argv)
    t0 = time.time()
    rows = compile_all(a.arch)
    print(table(rows, a.arch))
    print(
        f"{len(rows)} launches, {len({r['hash'] for r in rows})} compiled kernels, "
        f"{time.time() - t0:.0f} s"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "arch": a.arch,
                    "triton": triton.__version__,
                    "kernels": jit_kernels(),
                    "exact_modules": [m.__name__ for m in EXACT_MODULES],
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
