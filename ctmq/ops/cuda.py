"""CUDA kernels of ctmq's ops, registered with the dispatcher: the Triton
kernels for float32/float16/bfloat16 (float64 runs the references); for the
binary conv, the kernel chosen by ctmq.binary.use_kernel (thread-local):
Triton, or the binary tensor-core kernel of ctmq._C ("bmma"). Nothing here
synchronizes host and device."""

import torch

from . import reference, schemas, triton_kernels
from .schemas import kernel
from .selection import binary_backend, binary_weight_layout
from .triton_kernels import KERNEL_DTYPES


def check_qparams(x, scale, zero_point, qmin, qmax, axis):
    """A bad value fails as a device-side assert: no host sync (a training step
    must not stall, and CUDA graphs must capture it)."""
    torch._assert_async(
        (torch.isfinite(scale) & (scale > 0)).all(),
        "fake_quant_affine: scale must be finite and > 0",
    )
    torch._assert_async(
        ((zero_point >= qmin) & (zero_point <= qmax)).all(),
        f"fake_quant_affine: zero_point must lie in [qmin, qmax] = [{qmin}, {qmax}]",
    )


def _triton_or_reference(triton_fn, reference_fn):
    """The op's CUDA kernel: triton_fn, or reference_fn for float64."""

    def run(first, *args):
        if first.dtype in KERNEL_DTYPES:
            return triton_fn(first, *args)
        return reference_fn(first, *args)

    run.__name__ = triton_fn.__name__
    return run


@kernel(schemas.fake_quant_affine, "cuda", check_values=check_qparams)
def fake_quant_affine(x, scale, zero_point, qmin, qmax, axis):
    if x.dtype in KERNEL_DTYPES:
        return triton_kernels.fake_quant_affine(x, scale, zero_point, qmin, qmax, axis)
    return reference.fake_quant_affine_ref(x, scale, zero_point, qmin, qmax, axis)


kernel(schemas.ste_masked_grad, "cuda")(
    _triton_or_reference(triton_kernels.ste_masked_grad, reference.masked_grad_ref)
)
kernel(schemas.quantize_act, "cuda")(
    _triton_or_reference(
        triton_kernels.quantize_act, lambda x, bits, ste: reference.quantize_act_ref(x, bits)
    )
)
kernel(schemas.approx_sign_grad, "cuda")(
    _triton_or_reference(triton_kernels.approx_sign_grad, reference.approx_sign_grad_ref)
)
kernel(schemas.quantize_weight, "cuda")(
    _triton_or_reference(
        triton_kernels.quantize_weight, lambda w, bits, ste: reference.quantize_weight_ref(w, bits)
    )
)
kernel(schemas.quantize_weight_grad, "cuda")(
    _triton_or_reference(triton_kernels.quantize_weight_grad, reference.quantize_weight_grad_ref)
)
# ctmq._C has no CUDA pack: the Triton one packs for either conv kernel
kernel(schemas.pack_bits, "cuda")(triton_kernels.pack_bits)


@kernel(schemas.binary_conv2d, "cuda")
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
    if binary_backend(x) == "bmma":
        if tap_popc is None:
            _, tap_popc = binary_weight_layout(bits, "bmma")
        return torch.ops.ctmq.binary_conv2d_bmma(
            x,
            in_channels,
            bits,
            tap_popc,
            stride,
            padding,
            dilation,
            scale,
            bias,
            residual,
            packed_out,
        )
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
