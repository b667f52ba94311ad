"""The Triton kernels (ctmq_kernels) as implementations of ctmq's ops, for
CUDA tensors and, under ctmq.force_triton(), CPU tensors in the interpreter.
Arguments arrive checked and dense (schemas.kernel)."""

import torch

from .. import backend

# the dtypes the Triton and C++ kernels take; float64 runs the references
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _quant():
    return backend.triton_kernels("quant")


def _binary():
    return backend.triton_kernels("binary")


def fake_quant_affine(x, scale, zero_point, qmin, qmax, axis):
    scale = scale.to(torch.float32)
    per_channel = axis is not None
    return _quant().fake_quant_affine(
        x,
        scale,
        1.0 / scale,
        zero_point.to(torch.int32),
        qmin,
        qmax,
        x.stride(axis) if per_channel else 1,
        x.shape[axis] if per_channel else 1,
        per_channel,
    )


def ste_masked_grad(grad, mask):
    return _quant().masked_grad(grad, mask)


def quantize_act(x, bits, ste):
    return _quant().quantize_act(x, bits)


def approx_sign_grad(grad, x):
    return _quant().approx_sign_grad(grad, x)


def quantize_weight(w, bits, ste):
    return _quant().quantize_weight(w, bits)


def quantize_weight_grad(grad, w, alpha, ste):
    return _quant().quantize_weight_grad(grad, w, alpha, ste == "approx_sign")


def pack_bits(x):
    return _binary().pack_bits(x)


def binary_conv2d(
    x,
    in_channels,
    bits,
    gemm,
    tap_popc,
    stride,
    padding,
    dilation,
    scale,
    bias,
    residual,
    packed_out,
):
    return _binary().binary_conv2d(
        x, in_channels, bits, stride, padding, dilation, scale, bias, residual, packed_out
    )
