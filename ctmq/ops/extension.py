"""Fake implementations of the C++ extension's ops (csrc/ctmq_library.cpp),
registered when ctmq._C is built (`import ctmq` must not need it), so that
FakeTensorMode and torch.compile can trace the kernels that call them."""

import torch

from .. import backend
from .layout import mask_bytes
from .shapes import binary_conv2d_empty, pack_bits_output_shape


def _fake(name):
    def register(fn):
        if backend.has_extension() and hasattr(torch.ops.ctmq, name):
            torch.library.register_fake(f"ctmq::{name}")(fn)
        return fn

    return register


@_fake("quantize_act_fused")
def _(x, bits):
    return torch.empty_like(x), mask_bytes(x)


@_fake("masked_grad_fused")
def _(grad, mask):
    return torch.empty_like(grad)


@_fake("pack_bits_cpu")
def _(x):
    return x.new_empty(pack_bits_output_shape(x.shape), dtype=torch.int32)


@_fake("binary_weight_gemm")
def _(bits):
    groups, taps = (bits.shape[0] + 15) // 16, bits.shape[1] * bits.shape[2]
    return (
        bits.new_empty((groups, taps * bits.shape[3], 16), dtype=torch.int32),
        bits.new_empty((groups, taps, 16), dtype=torch.int32),
    )


@_fake("binary_conv2d_bmma")
def _(x, in_channels, bits, tap_popc, stride, padding, dilation, scale, bias, residual, packed_out):
    return binary_conv2d_empty(x, bits.shape, stride, padding, dilation, packed_out)


@_fake("binary_conv2d_cpu")
def _(
    x,
    in_channels,
    weight,
    tap_popc,
    out_channels,
    kernel_size,
    stride,
    padding,
    dilation,
    scale,
    bias,
    residual,
    packed_out,
):
    bits_shape = (out_channels, kernel_size[0], kernel_size[1], x.shape[3])
    return binary_conv2d_empty(x, bits_shape, stride, padding, dilation, packed_out)
