"""ctmq.quant on the CPU: torch-exact affine fake-quant, the CTMQ family against
its float64 definition, STE gradients, bad input, torch.compile."""

import math

import pytest
import torch

import ctmq
from ctmq import quant

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (7,), (3, 33, 7, 9), (2, 65, 5, 1), (1, 1, 7, 7)]


def _layouts(x):
    """x as given, channels_last and a non-dense slice (same values each)."""
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    big = torch.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    big[..., ::2] = x
    yield "strided", big[..., ::2]


def _qparams(shape, axis, qmin, qmax):
    lo, hi = max(qmin, -10), min(qmax, 10) + 1
    if axis is None:
        return float(torch.rand(()) * 0.2 + 0.01), int(torch.randint(lo, hi, ()))
    c = shape[axis]
    return torch.rand(c) * 0.2 + 0.01, torch.randint(lo, hi, (c,), dtype=torch.int32)


def _torch_fake_quant(x, scale, zp, qmin, qmax, axis):
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, axis % x.dim(), qmin, qmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_fake_quant_affine_matches_torch(dtype, shape, axis):
    if axis is not None and not -len(shape) <= axis < len(shape):
        pytest.skip("axis out of range for this shape")
    qmin, qmax = (-128, 127) if axis != 1 else (0, 15)
    scale, zp = _qparams(shape, axis, qmin, qmax)
    base = (torch.randn(shape) * 3).to(dtype)
    for _, x in _layouts(base):
        x1 = x.detach().clone().requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        ours = ctmq.fake_quant_affine(x1, scale, zp, qmin, qmax, axis=axis)
        ref = _torch_fake_quant(x2, scale, zp, qmin, qmax, axis)
        assert torch.equal(ours, ref)
        g = torch.randn(shape).to(dtype)
        ours.backward(g)
        ref.backward(g)
        assert torch.equal(x1.grad, x2.grad)


def test_fake_quant_affine_tensor_qparams_and_nonfinite():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, 2.5, 3.5, -2.5, 0.0])
    for axis, scale, zp in [
        (None, torch.tensor(0.5), torch.tensor(3)),
        (0, torch.full((8,), 0.5), torch.full((8,), 3, dtype=torch.int32)),
    ]:
        ours = ctmq.fake_quant_affine(x, scale, zp, -8, 7, axis=axis)
        ref = _torch_fake_quant(
            x,
            scale.item() if axis is None else scale,
            int(zp.item()) if axis is None else zp,
            -8,
            7,
            axis,
        )
        assert torch.equal(ours, ref)


def _boundary_distance(v, bits):
    """How far v * n / 2 is from an integer (a decision boundary of Q_k)."""
    n = 2**bits - 1
    t = v.double().clamp(-1, 1) * (n / 2)
    return (t - t.round()).abs()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_act_matches_float64_definition(bits, dtype):
    x = torch.cat(
        [
            torch.randn(20000) * 1.2,
            torch.linspace(-1.2, 1.2, 4097),
            torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-45, -1e-45, 5.0, -5.0]),
        ]
    )
    x = x.to(dtype)
    ours = ctmq.quantize_act(x, bits).double()
    ref = quant.ctmq_quantize_ref(x, bits).to(dtype).double()
    n = 2**bits - 1
    levels = torch.tensor([-1 + 2 * i / n for i in range(n + 1)], dtype=torch.float64).to(dtype)
    assert torch.isin(ours.to(dtype), levels).all()
    diff = ours != ref
    # fp32 arithmetic may put an input within rounding of a boundary on the
    # other side; nowhere else may the two differ, and then by one level.
    near = _boundary_distance(x, bits) < 1e-6 * n
    assert not (diff & ~near).any(), x[diff & ~near][:5]
    assert ((ours - ref).abs()[diff] <= 2 / n + 1e-2).all()
    if bits == 1:  # exactly sign with 0 -> +1 (the packed kernels' convention)
        assert torch.equal(ours, torch.where(x.double() >= 0, 1.0, -1.0).double())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(64, 33, 3, 3), (5, 7), (1, 1, 1, 1), (3, 130)])
def test_quantize_weight_matches_float64_definition(bits, shape):
    w = torch.randn(shape)
    ours = ctmq.quantize_weight(w, bits).double()
    ref = quant.quantize_weight_ref(w, bits)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    alpha = quant.weight_scale(w, bits).double()
    a = w.double().abs().reshape(shape[0], -1)
    torch.testing.assert_close(alpha, a.mean(1) if bits == 1 else a.amax(1), rtol=1e-6, atol=0)


def test_quantize_weight_zero_channel_and_layouts():
    w = torch.randn(4, 8, 3, 3)
    w[2] = 0
    for bits in (1, 3):
        q = ctmq.quantize_weight(w, bits)
        assert torch.equal(q[2], torch.zeros_like(q[2]))
        assert torch.isfinite(q).all()
        for _, wl in _layouts(w):
            assert torch.equal(ctmq.quantize_weight(wl, bits), q)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_act_ste_gradients(bits, dtype):
    base = (torch.randn(2, 9, 5, 7) * 1.5).to(dtype)
    for _, x in _layouts(base):
        x = x.detach().clone().requires_grad_()
        g = torch.randn(x.shape).to(dtype)
        ctmq.quantize_act(x, bits).backward(g)
        xd = x.detach().float()
        assert torch.equal(x.grad, (g.float() * ((xd >= -1) & (xd <= 1))).to(dtype))
        if bits == 1:
            x.grad = None
            ctmq.quantize_act(x, 1, ste="approx_sign").backward(g)
            slope = torch.clamp_min(2 - 2 * xd.abs(), 0)
            assert torch.equal(x.grad, (g.float() * slope).to(dtype))


@pytest.mark.parametrize("bits,ste", [(1, "clipped"), (1, "approx_sign"), (3, "clipped")])
def test_weight_ste_gradients(bits, ste):
    w = torch.randn(6, 5, 3, 3, requires_grad=True)
    g = torch.randn_like(w)
    ctmq.quantize_weight(w, bits, ste=ste).backward(g)
    v = w.detach() / quant.weight_scale(w, bits).view(-1, 1, 1, 1)
    slope = torch.clamp_min(2 - 2 * v.abs(), 0) if ste == "approx_sign" else (v.abs() <= 1).float()
    assert torch.equal(w.grad, g * slope)
    if bits > 1:  # alpha = max|w|: the clipped STE passes everything
        assert torch.equal(w.grad, g)


def test_full_precision_is_identity_and_empty_tensors():
    x = torch.randn(3, 4, requires_grad=True)
    assert ctmq.quantize_act(x, 32) is x
    assert ctmq.quantize_weight(x, 32) is x
    for fn in (
        lambda t: ctmq.quantize_act(t, 2),
        lambda t: ctmq.quantize_weight(t, 1),
        lambda t: ctmq.fake_quant_affine(t, 0.1, 0, -8, 7),
    ):
        e = torch.empty(0, 3, requires_grad=True)
        out = fn(e)
        assert out.shape == (0, 3)
        out.sum().backward()
        assert e.grad.shape == (0, 3)


def test_nan_inf_propagate_in_family():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3])
    for bits in (1, 2, 8):
        q = ctmq.quantize_act(x, bits)
        assert math.isnan(q[0]) and q[1] == 1 and q[2] == -1
    w = torch.tensor([[1.0, float("nan")], [0.5, -0.25]])
    q = ctmq.quantize_weight(w, 2)
    assert torch.isnan(q[0]).all() and torch.isfinite(q[1]).all()  # as amax propagates NaN


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda x: ctmq.quantize_act(x, 0), ValueError, "bits"),
        (lambda x: ctmq.quantize_act(x, 9), ValueError, "bits"),
        (lambda x: ctmq.quantize_act(x, 2.0), TypeError, "bits"),
        (lambda x: ctmq.quantize_act(x, True), TypeError, "bits"),
        (lambda x: ctmq.quantize_act(x, 2, ste="approx_sign"), ValueError, "approx_sign"),
        (lambda x: ctmq.quantize_act(x, 1, ste="tanh"), ValueError, "ste"),
        (lambda x: ctmq.quantize_act(x.to(torch.int32), 2), TypeError, "x must be a floating"),
        (lambda x: ctmq.quantize_act(x.to(torch.complex64), 2), TypeError, "x must be a floating"),
        (lambda x: ctmq.quantize_act(x.numpy(), 2), TypeError, "torch.Tensor"),
        (lambda x: ctmq.quantize_weight(x.to(torch.int64), 1), TypeError, "w must be a floating"),
        (lambda x: ctmq.quantize_weight(x[0, 0], 1), ValueError, "0-d"),
        (lambda x: ctmq.fake_quant_affine(x, 0.0, 0, -8, 7), ValueError, "scale"),
        (lambda x: ctmq.fake_quant_affine(x, -1.0, 0, -8, 7), ValueError, "scale"),
        (lambda x: ctmq.fake_quant_affine(x, float("inf"), 0, -8, 7), ValueError, "scale"),
        (lambda x: ctmq.fake_quant_affine(x, float("nan"), 0, -8, 7), ValueError, "scale"),
        (lambda x: ctmq.fake_quant_affine(x, torch.tensor(0.0), 0, -8, 7), ValueError, "scale"),
        (lambda x: ctmq.fake_quant_affine(x, 0.1, 0, 7, 7), ValueError, "qmin"),
        (lambda x: ctmq.fake_quant_affine(x, 0.1, 0, 8, 7), ValueError, "qmin"),
        (lambda x: ctmq.fake_quant_affine(x, 0.1, 9, -8, 7), ValueError, "zero_point"),
        (
            lambda x: ctmq.fake_quant_affine(x, 0.1, torch.tensor(9), -8, 7),
            ValueError,
            "zero_point",
        ),
        (lambda x: ctmq.fake_quant_affine(x, 0.1, 0.5, -8, 7), TypeError, "zero_point"),
        (
            lambda x: ctmq.fake_quant_affine(x, 0.1, torch.tensor(0.5), -8, 7),
            TypeError,
            "zero_point",
        ),
        (lambda x: ctmq.fake_quant_affine(x, 0.1, 0, -8.0, 7), TypeError, "qmin"),
        (
            lambda x: ctmq.fake_quant_affine(
                x, torch.ones(3), torch.zeros(3, dtype=torch.int32), -8, 7, axis=1
            ),
            ValueError,
            "x.shape[axis] = 4",
        ),
        (
            lambda x: ctmq.fake_quant_affine(
                x, torch.ones(4), torch.zeros(4, dtype=torch.int32), -8, 7, axis=2
            ),
            ValueError,
            "axis",
        ),
        (
            lambda x: ctmq.fake_quant_affine(
                x, torch.ones(4), torch.full((4,), 8, dtype=torch.int32), -8, 7, axis=1
            ),
            ValueError,
            "zero_point",
        ),
        (
            lambda x: ctmq.fake_quant_affine(
                x, torch.tensor([1.0, 1, -1, 1]), torch.zeros(4, dtype=torch.int32), -8, 7, axis=1
            ),
            ValueError,
            "scale",
        ),
        (lambda x: ctmq.fake_quant_affine(x, 0.1, 0, -8, 7, axis=1), TypeError, "scale"),
        (lambda x: ctmq.fake_quant_affine(x, torch.ones(2, 2), 0, -8, 7), ValueError, "scale"),
    ],
)
def test_bad_input_is_named(call, exc, words):
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        call(torch.randn(3, 4))


class _TinyQNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        w = ctmq.quantize_weight(self.conv.weight, 1, ste="approx_sign")
        x = torch.nn.functional.conv2d(ctmq.quantize_act(x, 2), w, self.conv.bias, padding=1)
        x = ctmq.quantize_act(x, 1, ste="approx_sign").mean((2, 3))
        x = ctmq.fake_quant_affine(x, 0.05, 0, -128, 127)
        return self.fc(x)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _TinyQNet()
    x = torch.randn(2, 3, 8, 8)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert torch.equal(out, eager)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
