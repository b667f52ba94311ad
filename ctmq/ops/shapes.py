"""Shapes and argument checks shared by every implementation of an op (fake,
CPU, CUDA): one output-shape formula and one argument check per op. The
binary kernels' shape formulas live with the Triton kernels (ctmq_kernels,
which need nothing of ctmq) and are imported from there."""

import torch
from torch import Tensor

from ctmq_kernels.shapes import (  # noqa: F401  (re-exported)
    binary_conv2d_empty,
    binary_conv2d_output_shape,
    conv_output_size,
    pack_bits_output_shape,
    words,
)

VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
CPU_MAX_TAPS = 64  # the C++ binary conv keeps each output's valid taps in a 64-bit mask
_INT32_MAX = 2**31 - 1
STE_MODES = ("clipped", "approx_sign")


def check_bits(bits: int):
    if bits not in VALID_BITS:
        raise ValueError(
            f"bits must be one of {VALID_BITS} (32 is handled as identity "
            f"by ctmq.quant), got {bits}"
        )


def check_ste(ste: str, bits: int):
    if ste not in STE_MODES:
        raise ValueError(f"ste must be one of {STE_MODES}, got {ste!r}")
    if ste == "approx_sign" and bits != 1:
        raise ValueError(f"ste='approx_sign' applies to bits=1 only, got bits={bits}")


def check_cpu_taps(bits: Tensor):
    """The C++ kernel's limit on the kernel size."""
    if bits.shape[1] * bits.shape[2] > CPU_MAX_TAPS:
        raise ValueError(
            f"the CPU binary conv takes kernels of at most {CPU_MAX_TAPS} taps, got "
            f"{bits.shape[1]}x{bits.shape[2]}"
        )


def _check_packed(name, t, device):
    if t.dtype != torch.int32 or t.dim() != 4:
        raise ValueError(
            f"{name} must be an int32 4-D tensor of packed bits, got {t.dtype} {tuple(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like x, got {t.device}")


def _check_float32(name, t, shape, device):
    if t is None:
        return
    if t.dtype != torch.float32 or tuple(t.shape) != tuple(shape) or t.device != device:
        raise ValueError(
            f"{name} must be a float32 tensor of shape {tuple(shape)} on {device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )


def check_binary_conv2d(
    x: Tensor, in_channels: int, bits: Tensor, stride, padding, dilation, scale, bias, residual
):
    """Every argument of a binary conv, with a ValueError naming the one that
    is wrong; the kernels rely on it (besides their own layout tensors)."""
    _check_packed("x", x, x.device)
    _check_packed("weight bits", bits, x.device)
    if in_channels < 1 or words(in_channels) != x.shape[3]:
        raise ValueError(
            f"in_channels ({in_channels}) does not fit x's {x.shape[3]} words per pixel"
        )
    if bits.shape[3] != x.shape[3]:
        raise ValueError(
            f"weight bits are packed for {bits.shape[3]} words per pixel, x has {x.shape[3]}"
        )
    if bits.shape[1] < 1 or bits.shape[2] < 1:
        raise ValueError(
            f"weight bits must have a kernel of at least 1x1, got {tuple(bits.shape[1:3])}"
        )
    for name, v, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(v) != 2 or min(v) < low or max(v) > _INT32_MAX:
            raise ValueError(f"{name} must be 2 values in [{low}, 2^31), got {tuple(v)}")
    shape = binary_conv2d_output_shape(x.shape, bits.shape, stride, padding, dilation, False)
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(
            f"kernel {tuple(bits.shape[1:3])} (dilation {tuple(dilation)}) does "
            f"not fit the padded input {tuple(x.shape[1:3])} + 2 * "
            f"{tuple(padding)}"
        )
    if in_channels * bits.shape[1] * bits.shape[2] >= 2**24:
        raise ValueError(
            f"in_channels * KH * KW must stay below 2^24 (the conv's integer sums "
            f"are exact in float32), got {in_channels} * {bits.shape[1]} * "
            f"{bits.shape[2]}"
        )
    o = bits.shape[0]
    _check_float32("scale", scale, (o,), x.device)
    _check_float32("bias", bias, (o,), x.device)
    _check_float32("residual", residual, shape, x.device)
