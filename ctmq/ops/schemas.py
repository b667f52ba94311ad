"""ctmq's ops: one schema each, with its argument check, fake implementation
and autograd formula. Device kernels are registered by ctmq/ops/cpu.py and
ctmq/ops/cuda.py through `kernel(op, device)`, which puts the op's own check
and layout normalization in front of them: a kernel sees checked, dense
arguments and never an empty input.

The STE ops save a bit-packed mask (1 bit per element, memory order of the
tensor) for backward instead of a float tensor: it is what the gradient
needs, 1/16 of a bf16 activation. approx_sign needs |x| itself, so it saves x.
The binary ops (pack_bits, binary_conv2d) are inference only.
"""

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.library import custom_op

from .layout import dense, mask_bytes, restride, rows_dense
from .shapes import (
    binary_conv2d_empty,
    binary_conv2d_output_shape,
    check_binary_conv2d,
    check_bits,
    check_ste,
    pack_bits_output_shape,
)


class _Spec(NamedTuple):
    prepare: Callable  # args -> checked args in the kernels' layout
    outputs: Callable  # args -> uninitialized outputs (the fake; the result of an empty input)
    is_empty: Callable  # args -> True when there is nothing to compute


_SPECS = {}
_KERNELS = {}  # (op, device type) -> the registered kernel, checks included


def _define(op, prepare, outputs, is_empty):
    """Registers op's check, fake and empty-input result."""
    spec = _SPECS[op] = _Spec(prepare, outputs, is_empty)
    op.register_fake(lambda *args: spec.outputs(*spec.prepare(*args)))


def kernel(op, device: str, check_values: Optional[Callable] = None):
    """Decorator: fn becomes op's kernel for `device` (a dispatcher
    registration), called with the op's prepared arguments. check_values:
    the device's check of argument values (not shapes), run even on an empty
    input."""
    spec = _SPECS[op]

    def register(fn):
        def run(*args):
            args = spec.prepare(*args)
            if check_values is not None:
                check_values(*args)
            return spec.outputs(*args) if spec.is_empty(*args) else fn(*args)

        run.__name__ = run.__qualname__ = fn.__name__
        run.__module__ = fn.__module__
        op.register_kernel(device, run)
        _KERNELS[op, device] = run
        return fn

    return register


def device_kernel(op, device_type: str):
    """op's kernel for a device type as registered (argument checks
    included), for a caller that needs no dispatcher: no autograd, no
    tracing. The deploy runtime calls the binary ops this way, which saves
    the ~30 us a call of a Python custom op's dispatch."""
    try:
        return _KERNELS[op, device_type]
    except KeyError:
        raise NotImplementedError(
            f"{op._qualname} has no kernel for {device_type} tensors"
        ) from None


def _first_empty(t, *_):
    return t.numel() == 0


# A custom_op with no device kernel of its own (device_types=()): the body
# below is its documentation; cpu.py and cuda.py register the kernels.
_NO_DEVICES = ()


# ------------------------------------------------------------ fake_quant_affine
@custom_op("ctmq::fake_quant_affine", mutates_args=(), device_types=_NO_DEVICES)
def fake_quant_affine(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: Optional[int]
) -> tuple[Tensor, Tensor]:
    """(out, packed STE mask) of affine fake quantization; axis=None: scale
    and zero_point have one element, else one per channel of dim `axis`."""
    raise NotImplementedError


def _affine_prepare(x, scale, zero_point, qmin, qmax, axis):
    return dense(x), scale, zero_point, qmin, qmax, axis


_define(
    fake_quant_affine,
    _affine_prepare,
    lambda x, *_: (torch.empty_like(x), mask_bytes(x)),
    _first_empty,
)


@custom_op("ctmq::ste_masked_grad", mutates_args=(), device_types=_NO_DEVICES)
def ste_masked_grad(grad: Tensor, mask: Tensor) -> Tensor:
    """grad * bit, bit i of mask for memory element i of grad (grad dense)."""
    raise NotImplementedError


_define(
    ste_masked_grad,
    lambda grad, mask: (grad, mask),
    lambda grad, mask: torch.empty_like(grad),
    _first_empty,
)


def _masked_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.shape, ctx.stride = output.shape, output.stride()


def _masked_grad_backward(ctx, grad_grad):
    return ste_masked_grad(restride(grad_grad, ctx.shape, ctx.stride), ctx.saved_tensors[0]), None


ste_masked_grad.register_autograd(_masked_grad_backward, setup_context=_masked_grad_setup)


def _affine_setup(ctx, inputs, output):
    out, mask = output
    ctx.save_for_backward(mask)
    ctx.shape, ctx.stride = out.shape, out.stride()


def _affine_backward(ctx, grad_out, _grad_mask):
    (mask,) = ctx.saved_tensors
    grad = ste_masked_grad(restride(grad_out, ctx.shape, ctx.stride), mask)
    return grad, None, None, None, None, None


fake_quant_affine.register_autograd(_affine_backward, setup_context=_affine_setup)


# ------------------------------------------------------------------ activations
@custom_op("ctmq::quantize_act", mutates_args=(), device_types=_NO_DEVICES)
def quantize_act(x: Tensor, bits: int, ste: str) -> tuple[Tensor, Tensor]:
    """(Q_bits(x), packed mask of -1 <= x <= 1); ste only matters for backward."""
    raise NotImplementedError


def _act_prepare(x, bits, ste):
    check_bits(bits)
    check_ste(ste, bits)
    return dense(x), bits, ste


_define(
    quantize_act, _act_prepare, lambda x, *_: (torch.empty_like(x), mask_bytes(x)), _first_empty
)


@custom_op("ctmq::approx_sign_grad", mutates_args=(), device_types=_NO_DEVICES)
def approx_sign_grad(grad: Tensor, x: Tensor) -> Tensor:
    """grad * max(0, 2 - 2|x|) (Bi-Real's ApproxSign); grad and x share strides."""
    raise NotImplementedError


_define(
    approx_sign_grad,
    lambda grad, x: (grad, x),
    lambda grad, x: torch.empty_like(grad),
    _first_empty,
)


def _approx_sign_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.shape, ctx.stride = output.shape, output.stride()


def _approx_sign_grad_backward(ctx, grad_grad):
    (x,) = ctx.saved_tensors
    return approx_sign_grad(restride(grad_grad, ctx.shape, ctx.stride), x), None


approx_sign_grad.register_autograd(
    _approx_sign_grad_backward, setup_context=_approx_sign_grad_setup
)


def _act_setup(ctx, inputs, output):
    x, _bits, ste = inputs
    out, mask = output
    ctx.ste = ste
    ctx.shape, ctx.stride = out.shape, out.stride()
    # approx_sign needs |x|: save x in out's layout (a view unless x was strided).
    ctx.save_for_backward(restride(x, out.shape, out.stride()) if ste == "approx_sign" else mask)


def _act_backward(ctx, grad_out, _grad_mask):
    (saved,) = ctx.saved_tensors
    grad = restride(grad_out, ctx.shape, ctx.stride)
    if ctx.ste == "approx_sign":
        return approx_sign_grad(grad, saved), None, None
    return ste_masked_grad(grad, saved), None, None


quantize_act.register_autograd(_act_backward, setup_context=_act_setup)


# ---------------------------------------------------------------------- weights
@custom_op("ctmq::quantize_weight", mutates_args=(), device_types=_NO_DEVICES)
def quantize_weight(w: Tensor, bits: int, ste: str) -> tuple[Tensor, Tensor]:
    """(alpha_c * Q_bits(w / alpha_c), alpha) per output channel (dim 0);
    alpha = mean|w_c| at 1 bit (XNOR-Net), max|w_c| above."""
    raise NotImplementedError


def _weight_prepare(w, bits, ste):
    check_bits(bits)
    check_ste(ste, bits)
    return rows_dense(w), bits, ste


_define(
    quantize_weight,
    _weight_prepare,
    lambda w, *_: (torch.empty_like(w), w.new_zeros((w.shape[0],), dtype=torch.float32)),
    _first_empty,
)


@custom_op("ctmq::quantize_weight_grad", mutates_args=(), device_types=_NO_DEVICES)
def quantize_weight_grad(grad: Tensor, w: Tensor, alpha: Tensor, ste: str) -> Tensor:
    """grad * STE'(w / alpha_c); grad and w share strides, rows dense."""
    raise NotImplementedError


_define(
    quantize_weight_grad,
    lambda grad, w, alpha, ste: (grad, w, alpha, ste),
    lambda grad, *_: torch.empty_like(grad),
    _first_empty,
)


def _weight_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.ste = inputs[3]
    ctx.shape, ctx.stride = output.shape, output.stride()


def _weight_grad_backward(ctx, grad_grad):
    w, alpha = ctx.saved_tensors
    gg = quantize_weight_grad(restride(grad_grad, ctx.shape, ctx.stride), w, alpha, ctx.ste)
    return gg, None, None, None


quantize_weight_grad.register_autograd(_weight_grad_backward, setup_context=_weight_grad_setup)


def _weight_setup(ctx, inputs, output):
    w, _bits, ste = inputs
    out, alpha = output
    ctx.mark_non_differentiable(alpha)
    ctx.ste = ste
    ctx.shape, ctx.stride = out.shape, out.stride()
    ctx.save_for_backward(restride(w, out.shape, out.stride()), alpha)


def _weight_backward(ctx, grad_out, _grad_alpha):
    w, alpha = ctx.saved_tensors
    grad = quantize_weight_grad(restride(grad_out, ctx.shape, ctx.stride), w, alpha, ctx.ste)
    return grad, None, None


quantize_weight.register_autograd(_weight_backward, setup_context=_weight_setup)


# ------------------------------------------------------------------ binary ops
# Packed format (docs/design.md): NHWC int32 words, bit j of word w = channel
# 32w + j, bit 1 = +1.
@custom_op("ctmq::pack_bits", mutates_args=(), device_types=_NO_DEVICES)
def pack_bits(x: Tensor) -> Tensor:
    """float (N, C, H, W), any strides -> int32 (N, H, W, ceil(C/32)): bit 1
    where x >= 0."""
    raise NotImplementedError


def _pack_prepare(x):
    if not x.is_floating_point() or x.dim() != 4:
        raise ValueError(
            f"x must be a float 4-D (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}"
        )
    return (x,)


_define(
    pack_bits,
    _pack_prepare,
    lambda x: x.new_empty(pack_bits_output_shape(x.shape), dtype=torch.int32),
    _first_empty,
)


@custom_op("ctmq::binary_conv2d", mutates_args=(), device_types=_NO_DEVICES)
def binary_conv2d(
    x: Tensor,
    in_channels: int,
    bits: Tensor,
    gemm: Optional[Tensor],
    tap_popc: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    scale: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    packed_out: bool,
) -> Tensor:
    """XNOR-popcount conv of packed x (N, H, W, words) with packed weight bits
    (O, KH, KW, words); epilogue ((conv * scale) + bias) + residual; float32
    (N, O, OH, OW), or packed (N, OH, OW, ceil(O/32)). gemm/tap_popc: the
    weight in the chosen kernel's own layout (ops.binary_weight_layout), made
    here when None."""
    raise NotImplementedError


def _conv_prepare(
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
    check_binary_conv2d(x, in_channels, bits, stride, padding, dilation, scale, bias, residual)

    def contiguous(t):
        return None if t is None else t.contiguous()

    return (
        x.contiguous(),
        in_channels,
        bits.contiguous(),
        gemm,
        tap_popc,
        list(stride),
        list(padding),
        list(dilation),
        contiguous(scale),
        contiguous(bias),
        contiguous(residual),
        packed_out,
    )


def _conv_shape(
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
    return binary_conv2d_output_shape(x.shape, bits.shape, stride, padding, dilation, packed_out)


def _conv_outputs(
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
    return binary_conv2d_empty(x, bits.shape, stride, padding, dilation, packed_out)


_define(binary_conv2d, _conv_prepare, _conv_outputs, lambda *args: 0 in _conv_shape(*args))
