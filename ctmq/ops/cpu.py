"""CPU kernels of ctmq's ops, registered with the dispatcher. The C++
extension (csrc/cpu) has kernels for quantize_act and its STE backward
(float32/float16/bfloat16) and for the binary ops; the other quantizer ops
(weights, approx_sign, fake_quant_affine) run the torch references, as do
float64 and a CPU without ctmq._C (the binary ops then raise: they have no
slow fallback). Inside ctmq.force_triton() (thread-local) the Triton kernels
run instead, in the interpreter."""

import torch

from .. import backend
from . import reference, schemas, triton_kernels
from .schemas import kernel
from .selection import binary_backend, binary_weight_layout
from .shapes import check_cpu_taps
from .triton_kernels import KERNEL_DTYPES


def _triton(t) -> bool:
    return t.dtype in KERNEL_DTYPES and backend.triton_forced()


def _cpp(t) -> bool:
    return t.dtype in KERNEL_DTYPES and backend.has_extension()


def check_qparams(x, scale, zero_point, qmin, qmax, axis):
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError(f"scale must be finite and > 0, got {scale.tolist()}")
    if not bool(((zero_point >= qmin) & (zero_point <= qmax)).all()):
        raise ValueError(
            f"zero_point must lie in [qmin, qmax] = [{qmin}, {qmax}], got {zero_point.tolist()}"
        )


@kernel(schemas.fake_quant_affine, "cpu", check_values=check_qparams)
def fake_quant_affine(x, scale, zero_point, qmin, qmax, axis):
    if _triton(x):
        return triton_kernels.fake_quant_affine(x, scale, zero_point, qmin, qmax, axis)
    return reference.fake_quant_affine_ref(x, scale, zero_point, qmin, qmax, axis)


@kernel(schemas.ste_masked_grad, "cpu")
def ste_masked_grad(grad, mask):
    if _triton(grad):
        return triton_kernels.ste_masked_grad(grad, mask)
    if _cpp(grad):
        return torch.ops.ctmq.masked_grad_fused(grad, mask)
    return reference.masked_grad_ref(grad, mask)


@kernel(schemas.quantize_act, "cpu")
def quantize_act(x, bits, ste):
    if _triton(x):
        return triton_kernels.quantize_act(x, bits, ste)
    if _cpp(x):
        return torch.ops.ctmq.quantize_act_fused(x, bits)
    return reference.quantize_act_ref(x, bits)


@kernel(schemas.approx_sign_grad, "cpu")
def approx_sign_grad(grad, x):
    if _triton(grad):
        return triton_kernels.approx_sign_grad(grad, x)
    return reference.approx_sign_grad_ref(grad, x)


@kernel(schemas.quantize_weight, "cpu")
def quantize_weight(w, bits, ste):
    if _triton(w):
        return triton_kernels.quantize_weight(w, bits, ste)
    return reference.quantize_weight_ref(w, bits)


@kernel(schemas.quantize_weight_grad, "cpu")
def quantize_weight_grad(grad, w, alpha, ste):
    if _triton(grad):
        return triton_kernels.quantize_weight_grad(grad, w, alpha, ste)
    return reference.quantize_weight_grad_ref(grad, w, alpha, ste)


@kernel(schemas.pack_bits, "cpu")
def pack_bits(x):
    if binary_backend(x) == "triton":
        return triton_kernels.pack_bits(x)
    return torch.ops.ctmq.pack_bits_cpu(x)


@kernel(schemas.binary_conv2d, "cpu")
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
    if binary_backend(x) == "triton":
        return triton_kernels.binary_conv2d(
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
        )
    check_cpu_taps(bits)
    if gemm is None or tap_popc is None:
        gemm, tap_popc = binary_weight_layout(bits, "cpp")
    return torch.ops.ctmq.binary_conv2d_cpu(
        x,
        in_channels,
        gemm,
        tap_popc,
        bits.shape[0],
        list(bits.shape[1:3]),
        stride,
        padding,
        dilation,
        scale,
        bias,
        residual,
        packed_out,
    )
