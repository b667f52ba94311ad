"""No call on CUDA tensors reaches a ctmq op without a CUDA kernel, and the
quantizers never synchronize host and device, checked on a machine without
CUDA: FakeTensorMode makes CUDA tensors (a fake CUDA device guard lets
tensors move between devices), a TorchDispatchMode records every
torch.ops.ctmq op reached, and Triton launches are recorded instead of run.

C++ ops must have a CUDA kernel in csrc (a TORCH_LIBRARY_IMPL(ctmq, CUDA, m)
block: what a CUDA build registers). Python ops (torch.library.custom_op)
must have a CUDA kernel registered (ctmq/ops/cuda.py): the test runs it on
the CUDA tensors and checks what it reaches in turn."""

import pathlib
import re
import shutil
import subprocess

import pytest
import torch
from setup_flags import CXX_STD
from torch._library.custom_ops import OPDEFS
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

import ctmq
from ctmq import binary, deploy, ops, quant
from ctmq.export import export_binary
from ctmq.nn import set_bits

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.skipif(not ctmq.has_extension(), reason="ctmq._C not built"),
    # the fake device guard would replace a CUDA build's real one in this process;
    # with a GPU the real tests cover these paths
    pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch"),
]


def cuda_kernels_in_csrc():
    """Names of the ctmq ops that csrc registers for CUDA."""
    names = set()
    for path in ROOT.glob("csrc/**/*.cpp"):
        for body in re.findall(
            r"TORCH_LIBRARY_IMPL\(\s*ctmq\s*,\s*CUDA\s*,\s*\w+\s*\)\s*\{(.*?)\}\s*$",
            path.read_text(),
            re.S | re.M,
        ):
            names |= set(re.findall(r'\.impl\(\s*"(\w+)"', body))
    return names


def test_csrc_cuda_registrations_are_found():
    assert "binary_conv2d_bmma" in cuda_kernels_in_csrc()


@pytest.fixture(scope="module")
def fake_cuda_guard(tmp_path_factory):
    """Registers c10's FakeGuardImpl for CUDA in this process: a CPU build of
    torch has no CUDA device guard, so moving a fake tensor to CUDA fails."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    import ctypes

    src = tmp_path_factory.mktemp("guard") / "fake_cuda_guard.cpp"
    src.write_text(
        "#include <c10/core/impl/FakeGuardImpl.h>\nnamespace {\n"
        "c10::impl::FakeGuardImpl<c10::DeviceType::CUDA> guard;\n"
        "c10::impl::DeviceGuardImplRegistrar reg(c10::DeviceType::CUDA, &guard);\n}\n"
    )
    lib = src.with_suffix(".so")
    tdir = pathlib.Path(torch.__file__).parent
    subprocess.run(
        [
            gxx,
            CXX_STD,
            "-shared",
            "-fPIC",
            f"-I{tdir / 'include'}",
            str(src),
            f"-L{tdir / 'lib'}",
            "-lc10",
            "-o",
            str(lib),
        ],
        check=True,
    )
    ctypes.CDLL(str(lib))


class OpRecorder(TorchDispatchMode):
    """Records (op, devices) of every ctmq op and host sync reached; runs the
    registered CUDA kernels of ctmq's Python ops instead of their fakes."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {a.device.type for a in _tensors(args, kwargs)}
        if func is torch.ops.aten._local_scalar_dense.default and "cuda" in devices:
            self.syncs.append(str(func))
        if (
            func is torch.ops.aten._to_copy.default
            and devices == {"cpu"}
            and torch.device(kwargs.get("device", "cpu")).type == "cuda"
        ):
            self.syncs.append("host-to-device copy")
        if getattr(func, "namespace", None) != "ctmq":
            return func(*args, **kwargs)
        name = func._schema.name
        self.ops.append((name, devices))
        cuda_kernel = OPDEFS[name]._backend_fns.get("cuda") if name in OPDEFS else None
        if "cuda" in devices and cuda_kernel is not None:  # a Python op's CUDA kernel
            with self:
                return cuda_kernel(*args, **kwargs)
        return func(*args, **kwargs)


def _tensors(args, kwargs):
    flat = list(args) + list(kwargs.values())
    out = []
    for a in flat:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [t for t in a if isinstance(t, torch.Tensor)]
    return out


@pytest.fixture
def fake_cuda(fake_cuda_guard, monkeypatch):
    """(recorder, launched Triton kernels): the test body runs in FakeTensorMode
    with CUDA 'available', a 9.0 device, and ctmq._C's CUDA kernels 'built'."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ops.selection, "cuda_capability", lambda device: (9, 0))
    monkeypatch.setattr(ops.selection, "bmma_built", lambda: True)
    launched = []
    from ctmq_kernels import binary as kb
    from ctmq_kernels import quant as kq

    def stub(kernel, grid):
        return lambda *args, **kwargs: launched.append(kernel.__name__)

    for mod in (kq, kb):
        for name in dir(mod):
            kernel = getattr(mod, name)
            if name.endswith("_kernel") and hasattr(type(kernel), "__getitem__"):
                monkeypatch.setattr(type(kernel), "__getitem__", stub)
    rec = OpRecorder()
    with FakeTensorMode(allow_non_fake_inputs=True), rec:
        yield rec, launched


def _no_cpu_only_ops(rec):
    cuda = cuda_kernels_in_csrc()
    reached = [name for name, devices in rec.ops if "cuda" in devices]
    bad = sorted(
        {
            n
            for n in reached
            if n.split("::")[1] not in cuda
            and "cuda" not in getattr(OPDEFS.get(n), "_backend_fns", {})
        }
    )
    assert not bad, f"ops without a CUDA kernel reached on CUDA tensors: {bad}"
    return reached


class _Ctx:
    """The part of an autograd context that ctmq's setup_context functions use."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass


def _backward(name, args):
    """Forward of op `name`, then its registered backward on gradients like the
    outputs (the C++ autograd engine needs a real device, so the test calls
    the op's backward formula itself)."""
    out = getattr(torch.ops.ctmq, name)(*args)
    ctx, opdef = _Ctx(), OPDEFS[f"ctmq::{name}"]
    opdef._setup_context_fn(ctx, args, out)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.empty_like(o) if o.is_floating_point() else None for o in outs]
    return opdef._backward_fn(ctx, *grads)


def test_quantizers_on_cuda_reach_cuda_kernels_without_host_sync(fake_cuda):
    rec, launched = fake_cuda
    dev = "cuda"
    x = torch.empty(4, 6, 5, 5, device=dev, dtype=torch.bfloat16)
    w = torch.empty(6, 6, 3, 3, device=dev)
    s1, z1 = torch.full((1,), 0.1, device=dev), torch.zeros(1, dtype=torch.int32, device=dev)
    s6, z6 = torch.full((6,), 0.1, device=dev), torch.zeros(6, dtype=torch.int32, device=dev)
    for bits in (1, 2, 4):
        quant.quantize_act(x, bits)
        quant.quantize_weight(w, bits)
        _backward("quantize_act", (x, bits, "clipped"))
        _backward("quantize_weight", (w, bits, "clipped"))
    quant.quantize_act(x, 1, ste="approx_sign")
    _backward("quantize_act", (x, 1, "approx_sign"))
    _backward("quantize_weight", (w, 1, "approx_sign"))
    quant.fake_quant_affine(x, 0.1, 3, -128, 127)  # Python numbers
    quant.fake_quant_affine(x, s1, z1, -8, 7)
    quant.fake_quant_affine(x, s6, z6, -8, 7, axis=1)
    _backward("fake_quant_affine", (x, s6, z6, -8, 7, 1))
    reached = _no_cpu_only_ops(rec)
    assert {
        "ctmq::quantize_act",
        "ctmq::quantize_weight",
        "ctmq::fake_quant_affine",
        "ctmq::ste_masked_grad",
        "ctmq::approx_sign_grad",
        "ctmq::quantize_weight_grad",
    } <= set(reached)
    assert {
        "_quantize_act_kernel",
        "_quantize_weight_kernel",
        "_fake_quant_affine_kernel",
        "_masked_grad_kernel",
        "_approx_sign_grad_kernel",
        "_quantize_weight_grad_kernel",
    } <= set(launched)
    assert not rec.syncs, f"host-device synchronizations: {rec.syncs}"


@pytest.mark.parametrize("kernel", ["triton", "bmma"])
def test_binary_entry_points_on_cuda_reach_cuda_kernels(fake_cuda, kernel):
    rec, launched = fake_cuda
    dev = "cuda"
    x = torch.empty(2, 40, 7, 7, device=dev)
    w = torch.empty(13, 40, 3, 3, device=dev)
    s, b = torch.empty(13, device=dev), torch.empty(13, device=dev)
    res = torch.empty(2, 13, 7, 7, device=dev)
    with binary.use_kernel(kernel):
        binary.pack_bits(x)
        wb = binary.pack_weight(w)
        binary.binary_conv2d(x, w, padding=1)
        binary.binary_conv2d(x, wb, padding=1, scale=s, bias=b, residual=res)
        xb = binary.pack_activation(x)
        binary.binary_conv2d(xb, wb, padding=1, scale=s, bias=b, residual=res, out="packed")
        binary.binary_linear(
            torch.empty(3, 70, device=dev), torch.empty(9, 70, device=dev), scale=s[:9]
        )
    _no_cpu_only_ops(rec)
    assert "_pack_bits_kernel" in launched
    conv = {n for n, _ in rec.ops} & {"ctmq::binary_conv2d_bmma"}
    if kernel == "bmma":
        assert conv and "_binary_conv_kernel" not in launched
    else:
        assert not conv and "_binary_conv_kernel" in launched


ZOO = [
    ("resnet18", dict(stem="cifar", width=0.25), 8),
    ("resnet18", dict(stem="cifar", block="basic", width=0.25), 8),  # packed outputs
    ("vgg_small", dict(width=0.125), 32),  # packed, adaptive pool
    ("reactnet_a", dict(stem="cifar", width=0.125), 16),
]  # RSign, RPReLU, concat


@pytest.mark.parametrize("kernel", ["triton", "bmma"])
@pytest.mark.parametrize(
    "name,kwargs,size", ZOO, ids=["resnet18", "resnet18-basic", "vgg_small", "reactnet_a"]
)
def test_deploy_runtime_on_cuda_reaches_cuda_kernels(
    fake_cuda, tmp_path, kernel, name, kwargs, size
):
    from ctmq.models import MODELS

    rec, launched = fake_cuda
    with unset_fake_temporarily():  # a real model, exported to a real artifact
        torch.manual_seed(0)
        m = MODELS[name](10, **kwargs)
        set_bits(m, 1, 1)
        export_binary(m.eval(), tmp_path / "m.ctmq", input_size=size)
        header, tensors = deploy.read_artifact(tmp_path / "m.ctmq")
    tensors = {k: torch.empty_like(v) for k, v in tensors.items()}  # fake: values don't matter
    with binary.use_kernel(kernel):
        rt = deploy.Runtime(header, tensors, device="cuda")
        logits = rt.run(torch.empty(2, 3, size, size, device="cuda"))
    assert logits.shape == (2, 10) and logits.device.type == "cuda"
    _no_cpu_only_ops(rec)
    bmma_ran = "ctmq::binary_conv2d_bmma" in {n for n, _ in rec.ops}
    assert bmma_ran == (kernel == "bmma") and ("_binary_conv_kernel" in launched) == (
        kernel == "triton"
    )
