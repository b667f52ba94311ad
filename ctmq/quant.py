"""Quantizers of ctmq (public API): the CTMQ k-bit family and torch-style affine.

    quantize_act(x, bits)      a_q = Q_k(x), levels {-1 + 2i/n}, n = 2^k - 1
    quantize_weight(w, bits)   w_q = alpha_c Q_k(w / alpha_c) per output channel
    fake_quant_affine(...)     torch.fake_quantize_per_{tensor,channel}_affine,
                               bit for bit, forward and gradient

bits = 32 is the identity (full precision). Each function is one torch.library
op (ctmq.ops), so torch.compile(fullgraph=True) traces it without a break.
The *_ref functions are float64 references of the formulas in docs/design.md.
"""

import math
import numbers

import torch
from torch import Tensor

from . import ops

__all__ = [
    "quantize_act",
    "quantize_weight",
    "weight_scale",
    "fake_quant_affine",
    "check_bits",
    "ctmq_quantize_ref",
    "quantize_weight_ref",
    "FULL_PRECISION",
    "ACCEPTED_BITS",
]

FULL_PRECISION = 32
ACCEPTED_BITS = ops.VALID_BITS + (FULL_PRECISION,)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensor(name, t):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, float16, bfloat16 or "
            f"float64), got {t.dtype}"
        )


def check_bits(name, bits):
    """bits as an int in ACCEPTED_BITS, else ValueError/TypeError naming `name`."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"{name} must be an int in {ACCEPTED_BITS}, got {bits!r}")
    if int(bits) not in ACCEPTED_BITS:
        raise ValueError(f"{name} must be one of {ACCEPTED_BITS}, got {bits}")
    return int(bits)


def _check_ste(ste, bits):
    # at full precision no quantizer runs; any known STE is accepted there
    ops.check_ste(ste, 1 if bits == FULL_PRECISION else bits)


def quantize_act(x: Tensor, bits: int, ste: str = "clipped") -> Tensor:
    """Activation quantizer Q_bits(x) with a straight-through gradient.

    ste="clipped": gradient passes where -1 <= x <= 1; ste="approx_sign"
    (bits=1 only): Bi-Real's ApproxSign, gradient * max(0, 2 - 2|x|).
    """
    _check_tensor("x", x)
    bits = check_bits("bits", bits)
    _check_ste(ste, bits)
    if bits == FULL_PRECISION:
        return x
    return torch.ops.ctmq.quantize_act(x, bits, ste)[0]


def quantize_weight(w: Tensor, bits: int, ste: str = "clipped") -> Tensor:
    """Weight quantizer alpha_c * Q_bits(w / alpha_c), one alpha per output channel
    (dim 0): mean|w_c| at 1 bit (XNOR-Net), max|w_c| above. alpha gets no
    gradient; the STE applies to w / alpha_c."""
    _check_tensor("w", w)
    bits = check_bits("bits", bits)
    _check_ste(ste, bits)
    if w.dim() == 0:
        raise ValueError("w must have an output-channel dimension (dim 0), got a 0-d tensor")
    if bits == FULL_PRECISION:
        return w
    return torch.ops.ctmq.quantize_weight(w, bits, ste)[0]


def weight_scale(w: Tensor, bits: int) -> Tensor:
    """The per-output-channel alpha that quantize_weight uses (float32, [C])."""
    _check_tensor("w", w)
    bits = check_bits("bits", bits)
    if bits == FULL_PRECISION:
        raise ValueError("weight_scale: bits=32 has no scale")
    return torch.ops.ctmq.quantize_weight(w.detach(), bits, "clipped")[1]


def _qparam_tensor(name, value, x, per_channel, dtype):
    if isinstance(value, Tensor):
        if value.is_complex() or (dtype is torch.int32) != (not value.is_floating_point()):
            kind = "an integer" if dtype is torch.int32 else "a floating"
            raise TypeError(f"{name} must be {kind} tensor or number, got {value.dtype}")
        if per_channel and value.dim() != 1:
            raise ValueError(
                f"{name} must be a 1-D tensor for per-channel quantization "
                f"(axis given), got shape {tuple(value.shape)}"
            )
        if not per_channel and value.numel() != 1:
            raise ValueError(
                f"{name} must hold one value for per-tensor quantization "
                f"(axis=None), got shape {tuple(value.shape)}"
            )
        return value.to(device=x.device, dtype=dtype).reshape(-1)
    if per_channel:
        raise TypeError(
            f"{name} must be a 1-D tensor when axis is given, got {type(value).__name__}"
        )
    if dtype is torch.int32:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {value!r}")
    # a fill kernel with the value as its argument: no host-to-device copy, so
    # no stall, and CUDA graphs can capture it
    return torch.full((1,), value, dtype=dtype, device=x.device)


def fake_quant_affine(x: Tensor, scale, zero_point, qmin: int, qmax: int, axis=None) -> Tensor:
    """torch.fake_quantize_per_tensor_affine (axis=None) or
    torch.fake_quantize_per_channel_affine (axis=int), bit for bit in value and
    gradient, fused on CUDA (float32, float16, bfloat16).

    scale: float or float tensor (> 0, finite); zero_point: int or integer
    tensor in [qmin, qmax]; per channel, both are 1-D of length x.shape[axis].
    Bad values are a ValueError, except in CUDA tensors: those are checked on
    the device (no host sync per call), and a bad one fails as a device-side
    assert at the next synchronization.
    """
    _check_tensor("x", x)
    for name, v in (("qmin", qmin), ("qmax", qmax)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if qmin >= qmax:
        raise ValueError(f"qmin must be < qmax, got qmin={qmin}, qmax={qmax}")
    per_channel = axis is not None
    if per_channel:
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be None or an int, got {axis!r}")
        axis = int(axis)
        if not -x.dim() <= axis < x.dim():
            raise ValueError(
                f"axis must be in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-D x, got {axis}"
            )
        axis = axis % x.dim()
    if not per_channel and isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        if not (math.isfinite(float(scale)) and float(scale) > 0):
            raise ValueError(f"scale must be finite and > 0, got {scale}")
    if (
        not per_channel
        and isinstance(zero_point, numbers.Integral)
        and not isinstance(zero_point, bool)
        and not qmin <= int(zero_point) <= qmax
    ):
        raise ValueError(
            f"zero_point must lie in [qmin, qmax] = [{qmin}, {qmax}], got {zero_point}"
        )
    scale_t = _qparam_tensor("scale", scale, x, per_channel, torch.float32)
    zp_t = _qparam_tensor("zero_point", zero_point, x, per_channel, torch.int32)
    if per_channel:
        for name, t in (("scale", scale_t), ("zero_point", zp_t)):
            if t.numel() != x.shape[axis]:
                raise ValueError(
                    f"{name} must have x.shape[axis] = {x.shape[axis]} elements "
                    f"(axis={axis}), got {t.numel()}"
                )
    return torch.ops.ctmq.fake_quant_affine(x, scale_t, zp_t, int(qmin), int(qmax), axis)[0]


# ------------------------------------------------------------ float64 references
def ctmq_quantize_ref(v: Tensor, bits: int) -> Tensor:
    """Q_k of docs/design.md, literally, in float64."""
    v = v.double()
    if bits == FULL_PRECISION:
        return v
    n = 2**bits - 1
    return 2 * torch.floor((v.clamp(-1, 1) + 1) / 2 * n + 0.5) / n - 1


def quantize_weight_ref(w: Tensor, bits: int) -> Tensor:
    w = w.double()
    if bits == FULL_PRECISION:
        return w
    a = w.abs().reshape(w.shape[0], -1)
    alpha = (a.mean(1) if bits == 1 else a.amax(1)).view((-1,) + (1,) * (w.dim() - 1))
    safe = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    return alpha * ctmq_quantize_ref(w / safe, bits)
