"""ctmq_kernels.binary: the Triton packing and XNOR-popcount conv against the
float reference (on CUDA, or on CPU tensors under TRITON_INTERPRET=1)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from ctmq import binary


def sign(t):
    return torch.where(t >= 0, 1.0, -1.0)


GRID = [
    (c, hw, k, s, p, b)
    for c, hw, k, s, p, b in itertools.product(
        [1, 31, 33, 65, 130], [(7, 7), (8, 5)], [1, 3], [1, 2], [0, 1], [1, 3]
    )
    if not (k == 1 and p == 1) and not (b == 3 and c in (31, 130))
]


@pytest.mark.parametrize(
    "c,hw,k,stride,pad,batch",
    [pytest.param(*g, marks=pytest.mark.slow) if g[0] >= 65 else g for g in GRID],
)  # (the interpreter is slow)
def test_triton_binary_conv_matches_reference(triton_device, c, hw, k, stride, pad, batch):
    o = 5 if c < 64 else 37
    x = torch.randn(batch, c, *hw)
    w = torch.randn(o, c, k, k)
    scale, bias = torch.randn(o), torch.randn(o) * 3
    ref = F.conv2d(sign(x), sign(w), stride=stride, padding=pad)
    ref_sb = ref * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    xd, wd = x.to(triton_device), w.to(triton_device)
    y = binary.binary_conv2d(xd, wd, stride=stride, padding=pad)
    assert y.device.type == triton_device and torch.equal(y.cpu(), ref)
    y_sb = binary.binary_conv2d(xd, wd, stride=stride, padding=pad, scale=scale, bias=bias)
    assert torch.equal(y_sb.cpu(), ref_sb)
    packed = binary.binary_conv2d(
        binary.pack_activation(xd),
        binary.pack_weight(wd),
        stride=stride,
        padding=pad,
        scale=scale,
        bias=bias,
        out="packed",
    )
    assert torch.equal(binary.unpack_bits(packed.bits.cpu(), o), sign(ref_sb))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_triton_pack_bits_matches_cpu_format(triton_device, layout):
    x = torch.randn(2, 70, 5, 6)
    x[0, :3, 0, 0] = torch.tensor([0.0, -0.0, -1e-30])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[..., ::2]
    bits = binary.pack_bits(x.to(triton_device)).cpu()
    assert bits.shape == (2, x.shape[2], x.shape[3], 3)
    assert torch.equal(binary.unpack_bits(bits, 70), sign(x))


def test_triton_residual_epilogue(triton_device):
    x = torch.randn(2, 40, 7, 7)
    w = torch.randn(13, 40, 3, 3)
    scale, bias, res = torch.randn(13), torch.randn(13), torch.randn(2, 13, 7, 7) * 5
    ref = (
        F.conv2d(sign(x), sign(w), padding=1) * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    ) + res
    d = triton_device
    y = binary.binary_conv2d(
        x.to(d), w.to(d), padding=1, scale=scale, bias=bias, residual=res.to(d)
    )
    assert torch.equal(y.cpu(), ref)
    p = binary.binary_conv2d(
        x.to(d), w.to(d), padding=1, scale=scale, bias=bias, residual=res.to(d), out="packed"
    )
    assert torch.equal(binary.unpack_bits(p.bits.cpu(), 13), sign(ref))


def test_triton_dilation_and_borders(triton_device):
    x = torch.randn(1, 40, 6, 6)
    w = torch.randn(9, 40, 3, 3)
    for dil, pad in [(2, 2), (2, 0)]:
        ref = F.conv2d(sign(x), sign(w), padding=pad, dilation=dil)
        y = binary.binary_conv2d(
            x.to(triton_device), w.to(triton_device), padding=pad, dilation=dil
        )
        assert torch.equal(y.cpu(), ref)


@pytest.mark.parametrize("k", [1, 33, 100])
def test_triton_binary_linear(triton_device, k):
    x, w = torch.randn(3, k), torch.randn(37, k)
    scale, bias = torch.rand(37) + 0.5, torch.randn(37)
    ref = sign(x) @ sign(w).T * scale + bias
    y = binary.binary_linear(x.to(triton_device), w.to(triton_device), scale=scale, bias=bias)
    assert y.device.type == triton_device and torch.equal(y.cpu(), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "c,o,hw,stride,pad",
    [
        (1, 5, (7, 7), 1, 1),
        (33, 13, (8, 5), 2, 1),
        (65, 37, (7, 7), 1, 0),
        (130, 64, (9, 9), 2, 1),
        (256, 70, (14, 14), 1, 1),
        (512, 96, (7, 7), 1, 1),
    ],
)
def test_cuda_bmma_matches_reference(c, o, hw, stride, pad):
    from ctmq import ops

    if "bmma" not in binary.cuda_kernels():
        pytest.skip("ctmq._C was built without the CUDA kernels, or the GPU is older than sm_80")
    with binary.use_kernel("bmma"):
        _check_bmma_conv(c, o, hw, stride, pad)
        assert ops.binary_backend(torch.empty(1, device="cuda")) == "bmma"


def _check_bmma_conv(c, o, hw, stride, pad):
    x, w = torch.randn(3, c, *hw), torch.randn(o, c, 3, 3)
    scale, bias, res = torch.randn(o), torch.randn(o), None
    ref = F.conv2d(sign(x), sign(w), stride=stride, padding=pad)
    y = binary.binary_conv2d(x.cuda(), w.cuda(), stride=stride, padding=pad)
    assert torch.equal(y.cpu(), ref)
    ref_sb = ref * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    res = torch.randn(ref.shape)
    y = binary.binary_conv2d(
        x.cuda(), w.cuda(), stride=stride, padding=pad, scale=scale, bias=bias, residual=res.cuda()
    )
    assert torch.equal(y.cpu(), ref_sb + res)
    p = binary.binary_conv2d(
        x.cuda(), w.cuda(), stride=stride, padding=pad, scale=scale, bias=bias, out="packed"
    )
    assert torch.equal(binary.unpack_bits(p.bits.cpu(), o), sign(ref_sb))
