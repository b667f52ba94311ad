"""ctmq.ops: opcheck on every op, gradcheck of the (linear) backward ops, the
packed mask format, and the C++ CPU kernels against the torch reference."""

import pytest
import torch
from torch.library import opcheck

import ctmq
from ctmq import ops

needs_ext = pytest.mark.skipif(not ctmq.has_extension(), reason="ctmq._C not built")


def _x(*shape, dtype=torch.float32, grad=False):
    return (torch.randn(shape) * 1.5).to(dtype).requires_grad_(grad)


def _op_cases():
    x = _x(3, 5, 7, 9, grad=True)
    xcl = _x(2, 33, 4, 5, grad=True).contiguous(memory_format=torch.channels_last)
    w = _x(8, 3, 3, 3, grad=True)
    g = _x(3, 5, 7, 9)
    _, mask = torch.ops.ctmq.quantize_act(x.detach(), 2, "clipped")
    alpha = ctmq.quant.weight_scale(w, 1)
    yield torch.ops.ctmq.quantize_act.default, (x, 2, "clipped")
    yield torch.ops.ctmq.quantize_act.default, (x, 1, "approx_sign")
    yield torch.ops.ctmq.quantize_act.default, (xcl, 3, "clipped")
    yield torch.ops.ctmq.quantize_weight.default, (w, 1, "clipped")
    yield torch.ops.ctmq.quantize_weight.default, (w, 4, "clipped")
    yield torch.ops.ctmq.ste_masked_grad.default, (g.requires_grad_(), mask)
    yield torch.ops.ctmq.approx_sign_grad.default, (_x(4, 6, grad=True), _x(4, 6))
    yield (
        torch.ops.ctmq.quantize_weight_grad.default,
        (_x(8, 3, 3, 3, grad=True), w.detach(), alpha, "approx_sign"),
    )
    yield (
        torch.ops.ctmq.fake_quant_affine.default,
        (x, torch.tensor([0.1]), torch.tensor([2], dtype=torch.int32), -8, 7, None),
    )
    yield (
        torch.ops.ctmq.fake_quant_affine.default,
        (xcl, torch.rand(33) + 0.1, torch.zeros(33, dtype=torch.int32), 0, 255, 1),
    )
    if ctmq.has_extension():
        yield torch.ops.ctmq.quantize_act_fused.default, (_x(3, 5, 7), 3)
        yield (
            torch.ops.ctmq.masked_grad_fused.default,
            (_x(3, 5, 7), torch.ops.ctmq.quantize_act_fused(_x(3, 5, 7), 3)[1]),
        )


@pytest.mark.parametrize("case", list(range(12)))
def test_opcheck(case):
    cases = list(_op_cases())
    if case >= len(cases):
        pytest.skip("C++ extension not built")
    op, args = cases[case]
    opcheck(op, args)


def test_backward_ops_gradcheck():
    """The STE backward ops are linear in grad: gradcheck them in float64."""
    x = _x(4, 11, dtype=torch.float64)
    _, mask = torch.ops.ctmq.quantize_act(x, 2, "clipped")
    g = _x(4, 11, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.ste_masked_grad(t, mask), (g,))
    assert torch.autograd.gradcheck(lambda t: ops.approx_sign_grad(t, x), (g,))
    w = _x(4, 11, dtype=torch.float64)
    alpha = ctmq.quant.weight_scale(w, 1)
    assert torch.autograd.gradcheck(
        lambda t: ops.quantize_weight_grad(t, w, alpha, "approx_sign"), (g,)
    )


def test_full_precision_gradcheck():
    x = _x(3, 4, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda t: ctmq.quantize_act(t, 32) * 2, (x,))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_pack_unpack_mask_roundtrip(n):
    m = torch.rand(n) > 0.5
    packed = ops.pack_mask(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(ops.unpack_mask(packed, m), m)
    # bit j of byte i is element 8 i + j
    expect = sum(int(m[j]) << j for j in range(min(8, n)))
    assert packed[0].item() == expect


def test_mask_follows_memory_order():
    x = _x(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    _, mask = torch.ops.ctmq.quantize_act(x, 2, "clipped")
    in_range = (x >= -1) & (x <= 1)
    flat = in_range.permute(0, 2, 3, 1).reshape(-1)  # memory order of channels_last
    assert torch.equal(ops.unpack_mask(mask, flat), flat)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("shape", [(1,), (13,), (3, 33, 7, 9), (70001,)])
def test_cpp_kernels_match_reference(dtype, bits, shape):
    x = _x(*shape, dtype=dtype)
    x.view(-1)[:4] = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=dtype)[: x.numel()]
    out, mask = torch.ops.ctmq.quantize_act_fused(x, bits)
    ref_out, ref_mask = ops.quantize_act_ref(x, bits)
    assert torch.equal(out, ref_out) and torch.equal(mask, ref_mask)
    g = _x(*shape, dtype=dtype)
    assert torch.equal(torch.ops.ctmq.masked_grad_fused(g, mask), ops.masked_grad_ref(g, mask))


@needs_ext
def test_cpp_kernels_check_arguments():
    with pytest.raises(RuntimeError, match="bits must be in 1..8"):
        torch.ops.ctmq.quantize_act_fused(_x(4), 9)
    with pytest.raises(RuntimeError, match="x must be dense"):
        torch.ops.ctmq.quantize_act_fused(_x(4, 4)[:, ::2], 2)
    with pytest.raises(RuntimeError, match="mask must be a contiguous uint8"):
        torch.ops.ctmq.masked_grad_fused(_x(20), torch.zeros(2, dtype=torch.uint8))


def test_op_level_errors_name_arguments():
    with pytest.raises(ValueError, match="bits"):
        torch.ops.ctmq.quantize_act(_x(4), 0, "clipped")
    with pytest.raises(ValueError, match="ste"):
        torch.ops.ctmq.quantize_weight(_x(4, 4), 2, "approx_sign")
