"""ctmq_kernels.quant: the Triton kernels against the torch reference path, bit
for bit except the 1-bit weight scale mean|w| (a few ulps: another summation
order), on CUDA, or on CPU tensors under TRITON_INTERPRET=1."""

import pytest
import torch
from conftest import requires_cuda

import ctmq
from ctmq import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd sizes: tails of the 8-element mask rows and of the 4096-element programs
SHAPES = [(1,), (9,), (3, 33, 7, 9), (2, 65, 7, 7), (4097,)]


def _on(t, device):
    return t.to(device)


def _variants(x):
    yield x
    if x.dim() == 4:
        yield x.contiguous(memory_format=torch.channels_last)
    yield x.transpose(0, -1)  # neither contiguous nor channels_last: dense, permuted


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_act_kernel(triton_device, dtype, shape, bits):
    base = (torch.randn(shape) * 1.3).to(dtype)
    base.view(-1)[:2] = torch.tensor([0.0, -0.0], dtype=dtype)[: base.numel()]
    for x in _variants(base):
        out, mask = torch.ops.ctmq.quantize_act(_on(x, triton_device), bits, "clipped")
        ref_out, ref_mask = ops.quantize_act_ref(ops.dense(x), bits)
        assert out.stride() == ref_out.stride()
        assert torch.equal(out.cpu(), ref_out) and torch.equal(mask.cpu(), ref_mask)
        g = ops.restride(torch.randn(x.shape).to(dtype), ref_out.shape, ref_out.stride())
        grad = torch.ops.ctmq.ste_masked_grad(_on(g, triton_device), mask)
        assert torch.equal(grad.cpu(), ops.masked_grad_ref(g, ref_mask))
        if bits == 1:
            xd = ops.dense(x)
            ours = torch.ops.ctmq.approx_sign_grad(_on(g, triton_device), _on(xd, triton_device))
            assert torch.equal(ours.cpu(), torch.ops.ctmq.approx_sign_grad(g, xd))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [pytest.param((64, 33, 3, 3), marks=pytest.mark.slow), (5, 7), (3, 1), (2, 2500)]
)
@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_quantize_weight_kernel(triton_device, dtype, shape, bits):
    w = torch.randn(shape).to(dtype)
    w[-1] = 0  # alpha = 0 channel
    variants = [w] + ([w.contiguous(memory_format=torch.channels_last)] if w.dim() == 4 else [])
    for wv in variants:
        out, alpha = torch.ops.ctmq.quantize_weight(_on(wv, triton_device), bits, "clipped")
        ref_out, ref_alpha = torch.ops.ctmq.quantize_weight(wv, bits, "clipped")
        assert out.stride() == ref_out.stride()
        if bits == 1:  # mean|w|: the reduction order differs, the rest is exact
            torch.testing.assert_close(alpha.cpu(), ref_alpha, rtol=2e-6, atol=0)
            torch.testing.assert_close(
                out.cpu(), ref_out, rtol=4e-6 if dtype is torch.float32 else 8e-3, atol=0
            )
        else:
            assert torch.equal(alpha.cpu(), ref_alpha) and torch.equal(out.cpu(), ref_out)
        g = ops.restride(torch.randn(shape).to(dtype), ref_out.shape, ref_out.stride())
        for ste in ("clipped", "approx_sign"):
            ours = torch.ops.ctmq.quantize_weight_grad(
                _on(g, triton_device), _on(wv, triton_device), _on(ref_alpha, triton_device), ste
            )
            assert torch.equal(
                ours.cpu(), torch.ops.ctmq.quantize_weight_grad(g, wv, ref_alpha, ste)
            )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,axis",
    [
        ((9,), None),
        ((3, 33, 7, 9), None),
        ((3, 33, 7, 9), 1),
        ((2, 65, 7, 7), 0),
        ((4, 5, 6), 2),
        ((4097,), 0),
    ],
)
def test_fake_quant_affine_kernel(triton_device, dtype, shape, axis):
    qmin, qmax = (-128, 127) if axis is None else (0, 255)
    if axis is None:
        scale, zp = torch.tensor([0.037]), torch.tensor([3], dtype=torch.int32)
    else:
        scale = torch.rand(shape[axis]) * 0.05 + 0.005
        zp = torch.randint(0, 20, (shape[axis],), dtype=torch.int32)
    base = (torch.randn(shape) * 3).to(dtype)
    for x in _variants(base):
        ax = axis
        if axis is not None and x.shape != base.shape:  # the transposed view swaps 0 and -1
            ax = {0: x.dim() - 1, x.dim() - 1: 0}.get(axis, axis)
        args = (scale, zp, qmin, qmax, ax)
        out, mask = torch.ops.ctmq.fake_quant_affine(
            _on(x, triton_device), _on(scale, triton_device), _on(zp, triton_device), qmin, qmax, ax
        )
        ref_out, ref_mask = torch.ops.ctmq.fake_quant_affine(x, *args)
        assert torch.equal(out.cpu(), ref_out) and torch.equal(mask.cpu(), ref_mask)


# Out-of-range inputs through torch's CUDA kernels, as an H200 gave them (torch
# 2.11, float32, bfloat16 and float16 alike): per tensor, qval = int64(zp +
# nearbyint(x / s)) saturates and NaN goes to qmin; per channel, qval =
# int64(nearbyint(x / s)) + zp adds in int64, so NaN, +-inf and values past
# 2^63 land at qmin or qmax by the sign of zp. (torch's CPU kernels differ:
# that path is torch's own op.)
NONFINITE = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1.0, 2.7, -100.0]
CUDA_PER_TENSOR = [-5.5, 2.0, -5.5, 2.0, -5.5, 1.0, 2.0, -5.5]  # scale 0.5, zp 3
CUDA_PER_CHANNEL = [
    [-5.5, -5.5, -5.5, -5.5, -5.5, 1.0, 2.0, -5.5],  # scale 0.5, zp 3
    [2.25, 2.25, 2.25, 2.25, 2.25, 1.0, 2.25, -1.5],
]  # scale 0.25, zp -2


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, in the interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quant_nonfinite_follow_torch_cuda_semantics(triton_device, dtype):
    """The Triton kernel reproduces torch's CUDA kernels on every device."""
    x = torch.tensor(NONFINITE).to(dtype)
    out, mask = torch.ops.ctmq.fake_quant_affine(
        _on(x, triton_device),
        _on(torch.tensor([0.5]), triton_device),
        _on(torch.tensor([3], dtype=torch.int32), triton_device),
        -8,
        7,
        None,
    )
    assert out.float().cpu().tolist() == CUDA_PER_TENSOR
    in_range = [False] * 5 + [True, False, False]  # 2.7 -> 5 + 3 > qmax, and with zp -2: 9
    assert ops.unpack_mask(mask.cpu(), x).tolist() == in_range
    rows = x.repeat(2, 1)
    out, mask = torch.ops.ctmq.fake_quant_affine(
        _on(rows, triton_device),
        _on(torch.tensor([0.5, 0.25]), triton_device),
        _on(torch.tensor([3, -2], dtype=torch.int32), triton_device),
        -8,
        7,
        0,
    )
    assert out.float().cpu().tolist() == CUDA_PER_CHANNEL
    assert ops.unpack_mask(mask.cpu(), rows).tolist() == [in_range, in_range]


def test_empty_and_large_offsets_guard(triton_device):
    e = torch.empty(0, 4, device=triton_device)
    out, mask = torch.ops.ctmq.quantize_act(e, 2, "clipped")
    assert out.shape == (0, 4) and mask.numel() == 0


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_fake_quant_matches_torch_cuda_including_nonfinite(dtype):
    x = (torch.randn(3, 33, 7, 9, device="cuda") * 3).to(dtype)
    x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e4], dtype=dtype)
    ours = ctmq.fake_quant_affine(x, 0.1, 3, -128, 127)
    assert torch.equal(ours, torch.fake_quantize_per_tensor_affine(x, 0.1, 3, -128, 127))
    scale = torch.rand(33, device="cuda") * 0.1 + 0.01
    zp = torch.randint(-5, 5, (33,), device="cuda", dtype=torch.int32)
    ours = ctmq.fake_quant_affine(x, scale, zp, -128, 127, axis=1)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 1, -128, 127)
    assert torch.equal(ours, ref)


@requires_cuda
def test_cuda_large_tensor_int64_offsets():
    x = torch.randn(2**31 + 17, device="cuda", dtype=torch.bfloat16)
    out, mask = torch.ops.ctmq.quantize_act(x, 1, "clipped")
    assert torch.equal(out[-17:].cpu(), torch.where(x[-17:].cpu() >= 0, 1.0, -1.0).bfloat16())
    assert mask.numel() == (x.numel() + 7) // 8


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_denormals_are_not_flushed(triton_device, bits):
    """A negative denormal is below zero: level -1/n, not +1/n (a flush to zero
    before the floor, cvt.rmi.ftz on a GPU, would make it +0)."""
    v = torch.tensor([-1e-40, 1e-40, -1e-45, -0.0, 0.0, -1e-38, 1e-38], dtype=torch.float32)
    ref, _ = ops.quantize_act_ref(v, bits)
    out, _ = torch.ops.ctmq.quantize_act(v.to(triton_device), bits, "clipped")
    assert torch.equal(out.cpu(), ref)
    w = torch.tensor([[-1e-40, 1.0], [1e-40, -1.0]])  # w / alpha stays denormal
    ref_w, _ = torch.ops.ctmq.quantize_weight(w, bits, "clipped")
    out_w, _ = torch.ops.ctmq.quantize_weight(w.to(triton_device), bits, "clipped")
    assert torch.equal(out_w.cpu(), ref_w)


@requires_cuda
def test_cuda_quantizers_never_synchronize():
    """No host-device sync in forward or backward (a sync stalls every training
    step and breaks CUDA graph capture): torch's sync debug mode raises on one."""
    x = torch.randn(4, 16, 9, 9, device="cuda", requires_grad=True)
    w = torch.randn(16, 16, 3, 3, device="cuda", requires_grad=True)
    scale, zp = (
        torch.full((16,), 0.05, device="cuda"),
        torch.zeros(16, dtype=torch.int32, device="cuda"),
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for y in (
            ctmq.quantize_act(x, 2),
            ctmq.quantize_act(x, 1, ste="approx_sign"),
            ctmq.fake_quant_affine(x, 0.05, 0, -8, 7),
            ctmq.fake_quant_affine(x, scale, zp, -8, 7, axis=1),
        ):
            torch.autograd.grad(y, x, torch.ones_like(y))
        for bits in (1, 4):
            y = ctmq.quantize_weight(w, bits)
            torch.autograd.grad(y, w, torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
