"""The references: every op in plain torch calls, on any device. They define
the semantics (docs/design.md) and the kernels are tested against them (bit
for bit, except the 1-bit weight scale mean|w|, whose summation order
differs: within a few ulps). The quantizer references also run where no
kernel applies (float64; CPU quantizer ops without a C++ kernel)."""

from typing import Optional

import torch
from torch import Tensor

from .layout import pack_mask, unpack_mask


def ctmq_levels(v: Tensor, bits: int) -> Tensor:
    """Q_k, the quantizer of every ctmq op, on a float tensor, in the op order
    the kernels use."""
    if bits == 1:  # sign with 0 -> +1; NaN stays NaN
        return torch.where(v >= 0, 1.0, torch.where(v < 0, -1.0, v))
    n = 2**bits - 1
    c = torch.where(v > 1, 1.0, torch.where(v < -1, -1.0, v))
    # 2 floor((c+1)/2 n + 1/2)/n - 1 == (2 floor(c n/2) + 1)/n for odd n; this
    # form keeps the sign of c exact near 0 (c + 1 would round it away).
    return (torch.floor(c * (n * 0.5)) * 2 + 1) / n


def approx_sign_slope(v: Tensor) -> Tensor:
    """d ApproxSign / dv (Bi-Real): max(0, 2 - 2|v|)."""
    return torch.clamp_min(2 - 2 * v.abs(), 0)


def clipped_slope(v: Tensor) -> Tensor:
    """The clipped STE: 1 inside [-1, 1], 0 outside."""
    return ((v >= -1) & (v <= 1)).to(v.dtype)


def _compute_dtype(t: Tensor):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def weight_scale_shape(w: Tensor):
    return (w.shape[0],) + (1,) * (w.dim() - 1)


def fake_quant_affine_ref(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: Optional[int]
) -> tuple[Tensor, Tensor]:
    """torch's own fake quantization with its STE mask, packed (x dense)."""
    if axis is None:
        out, mask = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(
            x, float(scale.item()), int(zero_point.item()), qmin, qmax
        )
    else:
        out, mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
            x, scale.to(torch.float32), zero_point.to(torch.int32), axis, qmin, qmax
        )
    if tuple(mask.stride()) != tuple(out.stride()):
        mask = torch.empty_strided(
            out.shape, out.stride(), dtype=mask.dtype, device=mask.device
        ).copy_(mask)
    return out, pack_mask(mask)


def masked_grad_ref(grad: Tensor, mask: Tensor) -> Tensor:
    """grad * bit, bit i of mask for memory element i of grad (grad dense)."""
    return grad * unpack_mask(mask, grad)


def quantize_act_ref(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(Q_bits(x), packed mask of -1 <= x <= 1), x dense."""
    v = x.to(_compute_dtype(x))
    return ctmq_levels(v, bits).to(x.dtype), pack_mask((v >= -1) & (v <= 1))


def approx_sign_grad_ref(grad: Tensor, x: Tensor) -> Tensor:
    """grad * max(0, 2 - 2|x|); grad and x share strides."""
    compute = _compute_dtype(grad)
    return (grad.to(compute) * approx_sign_slope(x.to(compute))).to(grad.dtype)


def quantize_weight_ref(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(alpha_c * Q_bits(w / alpha_c), alpha) per output channel (dim 0);
    alpha = mean|w_c| at 1 bit (XNOR-Net), max|w_c| above; alpha 0 leaves
    the channel at 0."""
    v = w.to(_compute_dtype(w))
    a = v.abs().reshape(w.shape[0], -1)
    alpha = a.mean(1) if bits == 1 else a.amax(1)
    safe = torch.where(alpha > 0, alpha, 1.0).view(weight_scale_shape(w))
    out = (ctmq_levels(v / safe, bits) * alpha.view(weight_scale_shape(w))).to(w.dtype)
    return out, alpha.to(torch.float32)


def quantize_weight_grad_ref(grad: Tensor, w: Tensor, alpha: Tensor, ste: str) -> Tensor:
    """grad * STE'(w / alpha_c); grad and w share strides."""
    compute = _compute_dtype(grad)
    safe = torch.where(alpha > 0, alpha, 1.0).to(compute).view(weight_scale_shape(w))
    v = w.to(compute) / safe
    slope = approx_sign_slope(v) if ste == "approx_sign" else clipped_slope(v)
    return (grad.to(compute) * slope).to(grad.dtype)


# ------------------------------------------------------------------ binary ops
def pack_bits_ref(x: Tensor) -> Tensor:
    """float (N, C, H, W) -> int32 (N, H, W, ceil(C/32)): bit j of word w is
    channel 32w + j, 1 where x >= 0."""
    n, c, h, w = x.shape
    words = (c + 31) // 32
    bits = (x >= 0).permute(0, 2, 3, 1).to(torch.int64)
    bits = torch.nn.functional.pad(bits, (0, 32 * words - c)).view(n, h, w, words, 32)
    shifts = torch.arange(32, dtype=torch.int64, device=x.device)
    word = (bits << shifts).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_signs(packed: Tensor, channels: int) -> Tensor:
    """int32 (..., words) -> float64 (..., channels) of +-1."""
    shifts = torch.arange(32, dtype=torch.int64, device=packed.device)
    bits = (packed.to(torch.int64)[..., None] >> shifts) & 1
    return (bits.flatten(-2)[..., :channels] * 2 - 1).to(torch.float64)


def tap_popcounts(bits: Tensor) -> Tensor:
    """(O, KH, KW, words) int32 -> (O, KH*KW) int32 popcount of each channel's tap."""
    v = bits.to(torch.int64) & 0xFFFFFFFF  # the 32 bits, unsigned
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    v = (v * 0x01010101 & 0xFFFFFFFF) >> 24
    return v.sum(-1).flatten(1).to(torch.int32).contiguous()


def binary_conv2d_ref(
    x: Tensor,
    in_channels: int,
    bits: Tensor,
    stride,
    padding,
    dilation,
    scale: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    packed_out: bool,
) -> Tensor:
    """The binary conv as a float64 conv of +-1 values with zero padding (a
    tap outside the image adds nothing), then the float32 epilogue
    ((conv * scale) + bias) + residual; packed_out packs its signs."""
    xs = unpack_signs(x, in_channels).permute(0, 3, 1, 2)
    ws = unpack_signs(bits, in_channels).permute(0, 3, 1, 2)
    y = torch.nn.functional.conv2d(
        xs, ws, stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation)
    ).to(torch.float32)
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return pack_bits_ref(y) if packed_out else y
