"""Bit packing and XNOR-popcount binary convolution (user-facing).

    xb = pack_activation(x)              # float NCHW -> PackedActivation (NHWC int32 words)
    wb = pack_weight(conv.weight)        # float OIHW -> PackedWeight, packed once
    y  = binary_conv2d(x, wb, stride=1, padding=1)              # == F.conv2d(sign(x), sign(w))
    y  = binary_conv2d(x, wb, padding=1, scale=s, bias=b)       # ... * s[c] + b[c]
    yb = binary_conv2d(xb, wb, padding=1, scale=s, bias=b, out="packed")  # sign of that, packed
    z  = binary_linear(x2d, w2d, scale=s, bias=b)              # sign(x2d) @ sign(w2d).T, the GEMM

sign maps x >= 0 to +1 (and -0.0 to +1, NaN to -1). With out="float" the result
equals F.conv2d(sign(x), sign(w), stride, padding, dilation) exactly (zero
padding at the border, as in the training model), in float32; scale and bias,
when given, are applied as `y * scale[c] + bias[c]` in float32. out="packed"
returns the next layer's input: bit = (that float value >= 0), so a chain of
binary layers never materializes floats.
"""

import dataclasses
import numbers

import torch
from torch import Tensor

from . import backend, ops

__all__ = [
    "PackedActivation",
    "PackedWeight",
    "pack_bits",
    "unpack_bits",
    "pack_activation",
    "pack_weight",
    "binary_conv2d",
    "binary_linear",
    "use_kernel",
    "cuda_kernels",
    "backend_info",
]


@dataclasses.dataclass
class PackedActivation:
    """Sign bits of an (N, C, H, W) tensor: `bits` is int32 (N, H, W, ceil(C/32))."""

    bits: Tensor
    channels: int

    @property
    def shape(self):
        n, h, w, _ = self.bits.shape
        return (n, self.channels, h, w)


@dataclasses.dataclass
class PackedWeight:
    """Sign bits of an (O, C, KH, KW) conv weight: `bits` is int32 (O, KH, KW, ceil(C/32))
    in the packed format. Each kernel's own form of the same bits
    (ops.binary_weight_layout: for the C++ kernel 16 output channels
    interleaved per 32-bit word + per-tap popcounts, for the tensor-core kernel
    the per-tap popcounts) is made once per (device, kernel) and kept in
    `layouts` for the weight's lifetime, so a CUDA graph captured with either
    kernel keeps reading live buffers; `gemm` and `tap_popc` are the last one
    asked for."""

    bits: Tensor
    in_channels: int
    gemm: Tensor | None = None
    tap_popc: Tensor | None = None
    layouts: dict = dataclasses.field(default_factory=dict, repr=False)

    def layout_for(self, bits: Tensor, backend: str):
        """(gemm, tap_popc) for `bits` (self.bits on the input's device) under `backend`."""
        key = (bits.device, backend)
        if key not in self.layouts:
            self.layouts[key] = ops.binary_weight_layout(bits, backend)
        layout = self.layouts[key]
        self.gemm, self.tap_popc = layout
        return layout  # the local pair: another thread may set self.gemm meanwhile

    @property
    def out_channels(self):
        return self.bits.shape[0]

    @property
    def kernel_size(self):
        return tuple(self.bits.shape[1:3])


def _check_float(name, t, dims=None):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (sign-binarized inside), got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def pack_bits(x: Tensor, dim: int = 1) -> Tensor:
    """Sign-binarize x (x >= 0 -> bit 1) and pack `dim` into int32 words, moved
    last: the result has x's shape without `dim`, plus ceil(C/32) words."""
    _check_float("x", x)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim must be in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-D x, got {dim}"
        )
    dim %= x.dim()
    if x.dim() == 4 and dim == 1:
        return ops.pack_bits(x)
    moved = x.movedim(dim, -1)
    c = moved.shape[-1]
    rows = moved.reshape(-1, c)  # (M, C): a view where possible
    packed = ops.pack_bits(rows.t().unsqueeze(0).unsqueeze(2))  # (1, C, 1, M), channels innermost
    return packed.reshape(moved.shape[:-1] + (packed.shape[-1],))


def unpack_bits(bits: Tensor, channels: int, dim: int = 1, dtype=torch.float32) -> Tensor:
    """Inverse of pack_bits on +-1 data: float +-1 with the channels put back at `dim`."""
    if not isinstance(bits, Tensor) or bits.dtype != torch.int32:
        raise TypeError(
            f"bits must be an int32 tensor from pack_bits, got "
            f"{getattr(bits, 'dtype', type(bits).__name__)}"
        )
    if not (isinstance(channels, numbers.Integral) and 1 <= channels <= 32 * bits.shape[-1]):
        raise ValueError(
            f"channels must be in 1..{32 * bits.shape[-1]} for "
            f"{bits.shape[-1]} words, got {channels}"
        )
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    b = ((bits.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :channels]
    out = b.to(dtype) * 2 - 1
    return out.movedim(-1, dim)


def pack_activation(x: Tensor) -> PackedActivation:
    """Pack a float (N, C, H, W) activation for binary_conv2d (keeps C)."""
    _check_float("x", x, 4)
    return PackedActivation(ops.pack_bits(x), x.shape[1])


def pack_weight(w: Tensor) -> PackedWeight:
    """Pack a conv weight (O, C, KH, KW) once, for repeated binary_conv2d calls,
    or a linear weight (O, K), packed as a 1x1 kernel, for binary_linear."""
    _check_float("weight", w)
    if w.dim() == 2:
        w = w[:, :, None, None]
    elif w.dim() != 4:
        raise ValueError(
            f"weight must be 4-D (O, C, KH, KW) or 2-D (O, K), got shape {tuple(w.shape)}"
        )
    bits = pack_bits(w, dim=1).contiguous()
    packed = PackedWeight(bits, w.shape[1])
    packed.layout_for(bits, ops.binary_backend(bits))
    return packed


def _pair(name, v, low):
    if type(v) is int:  # the common cases first: isinstance against numbers.* is slow
        pair = [v, v]
    elif type(v) in (tuple, list) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        pair = [v[0], v[1]]
    elif isinstance(v, numbers.Integral) and not isinstance(v, bool):
        pair = [int(v), int(v)]
    elif (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in v)
    ):
        pair = [int(v[0]), int(v[1])]
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(pair) < low:
        raise ValueError(f"{name} must be >= {low}, got {tuple(pair)}")
    return pair


def _float32_on(name, v, like):
    """An optional float tensor argument as float32 on like's device; its
    shape is checked by the op (ctmq::binary_conv2d)."""
    if v is None:
        return None
    _check_float(name, v)
    return v.detach().to(like.device, torch.float32)


def binary_conv2d(
    x, weight, stride=1, padding=0, dilation=1, scale=None, bias=None, out="float", residual=None
):
    """XNOR-popcount convolution of sign(x) with sign(weight); see the module doc.

    x: float (N, C, H, W) tensor (any strides) or a PackedActivation;
    weight: float (O, C, KH, KW) tensor or a PackedWeight; residual: a float
    (N, O, OH, OW) tensor added last, in the epilogue (a shortcut), as
    `(y * scale + bias) + residual`. Returns a float32 (N, O, OH, OW) tensor,
    or with out="packed" a PackedActivation."""
    if out not in ("float", "packed"):
        raise ValueError(f"out must be 'float' or 'packed', got {out!r}")
    if isinstance(x, PackedActivation):
        xb, channels = x.bits.contiguous(), x.channels
    elif isinstance(x, Tensor) and x.dtype == torch.int32:
        raise TypeError(
            "x is int32: pass packed activations as a PackedActivation "
            "(ctmq.binary.pack_activation), which keeps the channel count"
        )
    else:
        _check_float("x", x, 4)
        xb, channels = ops.pack_bits(x), x.shape[1]
    if not isinstance(weight, PackedWeight):
        weight = pack_weight(weight)
    if weight.in_channels != channels:
        raise ValueError(f"weight expects {weight.in_channels} input channels, x has {channels}")
    stride, padding, dilation = (
        _pair("stride", stride, 1),
        _pair("padding", padding, 0),
        _pair("dilation", dilation, 1),
    )
    bits = weight.bits.to(xb.device)
    gemm, tap_popc = weight.layout_for(bits, ops.binary_backend(xb))
    y = ops.binary_conv2d(
        xb,
        channels,
        bits,
        gemm,
        tap_popc,
        stride,
        padding,
        dilation,
        _float32_on("scale", scale, xb),
        _float32_on("bias", bias, xb),
        _float32_on("residual", residual, xb),
        out == "packed",
    )
    return PackedActivation(y, weight.out_channels) if out == "packed" else y


def binary_linear(x, weight, scale=None, bias=None, out="float"):
    """sign(x) @ sign(weight).T as an XNOR-popcount GEMM (the conv kernels on a
    1x1 kernel and 1x1 images, so every backend has it), with the same
    epilogue as binary_conv2d: `y * scale[o] + bias[o]`, out="packed" for the
    next binary layer. x: float (N, K) or a PackedActivation from a previous
    binary_linear; weight: float (O, K) or pack_weight of it. Returns float32
    (N, O), or a PackedActivation of shape (N, O, 1, 1)."""
    if isinstance(x, PackedActivation):
        if tuple(x.bits.shape[1:3]) != (1, 1):
            raise ValueError(
                f"x: a PackedActivation of a (N, K) matrix (1x1 images) expected, got "
                f"shape {x.shape}"
            )
    else:
        _check_float("x", x, 2)
        x = x[:, :, None, None]
    if isinstance(weight, PackedWeight):
        if weight.kernel_size != (1, 1):
            raise ValueError(
                f"weight: a PackedWeight of an (O, K) matrix (kernel 1x1) expected, got "
                f"kernel {weight.kernel_size}"
            )
    else:
        _check_float("weight", weight, 2)
        weight = pack_weight(weight)
    y = binary_conv2d(x, weight, scale=scale, bias=bias, out=out)
    return y if out == "packed" else y.view(y.shape[0], y.shape[1])


def use_kernel(kernel):
    """Context manager: the binary conv kernel that CUDA tensors run inside the
    block, in this thread: "triton" (XNOR-popcount on CUDA cores, any GPU
    Triton supports) or "bmma" (binary tensor cores, mma.sync b1 AND.POPC;
    compute capability 8.0 or newer, built into ctmq._C by nvcc). The default
    outside any block is the environment variable CTMQ_BINARY_KERNEL, read once
    when ctmq is imported, else "triton". A kernel that cannot run on the
    input's device is a RuntimeError at the call, saying why."""
    return backend.use_binary_kernel(kernel)


def cuda_kernels(device=None):
    """The binary conv kernels that can run on a CUDA device (default: the
    current one): "triton" where triton imports, "bmma" where ctmq._C has it
    and the device is sm_80 or newer."""
    if not torch.cuda.is_available():
        return ()
    device = torch.device("cuda") if device is None else torch.device(device)
    found = []
    try:
        backend.triton_kernels("binary")
        found.append("triton")
    except RuntimeError:
        pass
    if (
        ops.selection.bmma_built()
        and ops.selection.cuda_capability(device) >= ops.BMMA_MIN_CAPABILITY
    ):
        found.append("bmma")
    return tuple(found)


def backend_info():
    """What runs binary convs on each device, e.g. {"cpu": "avx512-vpopcntdq",
    "cuda": "triton", "cuda_kernels": ("triton", "bmma")}: the CPU code path,
    the CUDA kernel chosen now (use_kernel), and the CUDA kernels that can
    run here; an entry says "unavailable: why" where nothing can."""
    try:
        cpu = ops.binary_cpu_path("")
    except RuntimeError as e:
        cpu = f"unavailable: {e}"
    available = cuda_kernels()
    if not torch.cuda.is_available():
        cuda = "unavailable: no CUDA device"
    else:
        try:
            cuda = backend.cuda_binary_kernel()
            if cuda not in available:
                cuda = f"unavailable: {cuda!r} is chosen, this machine has {list(available)}"
        except ValueError as e:
            cuda = f"unavailable: {e}"
    return {"cpu": cpu, "cuda": cuda, "cuda_kernels": available}
