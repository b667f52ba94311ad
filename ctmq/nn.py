"""Quantized layers: drop-in QConv2d / QLinear with run-time bit depths.

A quantized layer quantizes its *input* activation with quantize_act and its
weight with quantize_weight (per output channel) at the bit depths it holds;
32 means full precision for either. CTMQ changes the depths in place between
stages with set_bits(model, w_bits, a_bits).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from .quant import FULL_PRECISION, check_bits, quantize_act, quantize_weight, weight_scale

__all__ = [
    "QConv2d",
    "QLinear",
    "set_bits",
    "get_bits",
    "convert",
    "quantized_layers",
    "RSign",
    "RPReLU",
]


class _QMixin:
    # first base of QConv2d / QLinear: takes the quantization arguments, passes
    # the rest to the torch layer
    def __init__(
        self,
        *args,
        w_bits=FULL_PRECISION,
        a_bits=FULL_PRECISION,
        act_ste="approx_sign",
        weight_ste="clipped",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.set_bits(w_bits, a_bits)
        self.act_ste = act_ste
        self.weight_ste = weight_ste

    def set_bits(self, w_bits, a_bits):
        self.w_bits = check_bits("w_bits", w_bits)
        self.a_bits = check_bits("a_bits", a_bits)

    def _ste(self, ste, bits):
        # approx_sign is a 1-bit STE; at other depths the clipped STE applies
        return ste if bits == 1 else "clipped"

    def quantized_input(self, x):
        return quantize_act(x, self.a_bits, self._ste(self.act_ste, self.a_bits))

    def quantized_weight(self):
        return quantize_weight(self.weight, self.w_bits, self._ste(self.weight_ste, self.w_bits))

    def extra_repr(self):
        return f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}"


class QConv2d(_QMixin, nn.Conv2d):
    """nn.Conv2d whose input and weight are quantized to a_bits / w_bits.

    act_ste: STE of the 1-bit activation quantizer ("approx_sign", Bi-Real's,
    by default; "clipped"); weight_ste likewise for 1-bit weights.
    """

    def forward(self, x):
        if (
            not self.training
            and self.w_bits == 1
            and self.a_bits == 1
            and self.padding_mode == "zeros"
        ):
            # eval at W1A1: the deploy runtime's arithmetic, the exact integer
            # conv of the signs times the weight scale (a float conv of +-alpha
            # would round exact zeros to +-1e-8, and the next sign would flip)
            return _sign_conv(self, x, weight_scale(self.weight.float(), 1), self.bias)
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QLinear(_QMixin, nn.Linear):
    """nn.Linear whose input and weight are quantized to a_bits / w_bits."""

    def forward(self, x):
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


def quantized_layers(model):
    """The QConv2d/QLinear modules of model, in module order."""
    return [m for m in model.modules() if isinstance(m, _QMixin)]


def set_bits(model, w_bits, a_bits):
    """Set the bit depths of every quantized layer of model (32 = full precision)."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("set_bits: model has no QConv2d/QLinear layers (see ctmq.nn.convert)")
    for m in layers:
        m.set_bits(w_bits, a_bits)
    return model


def get_bits(model):
    """(w_bits, a_bits) shared by all quantized layers; ValueError if they differ."""
    depths = {(m.w_bits, m.a_bits) for m in quantized_layers(model)}
    if len(depths) != 1:
        raise ValueError(f"get_bits: quantized layers hold {sorted(depths) or 'no'} depths")
    return depths.pop()


def _swap(module, w_bits, a_bits, **kw):
    if isinstance(module, nn.Conv2d):
        q = QConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            w_bits=w_bits,
            a_bits=a_bits,
            **kw,
        )
    else:
        q = QLinear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            w_bits=w_bits,
            a_bits=a_bits,
            **kw,
        )
    q = q.to(device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        q.weight.copy_(module.weight)
        if module.bias is not None:
            q.bias.copy_(module.bias)
    return q


def convert(
    model, w_bits=FULL_PRECISION, a_bits=FULL_PRECISION, keep_first=True, keep_last=True, **kwargs
):
    """Swap model's nn.Conv2d/nn.Linear (not already quantized) for QConv2d/QLinear
    in place, copying their parameters. The first conv and the last linear stay
    full precision unless keep_first/keep_last is False (standard for binarized
    nets). kwargs go to the quantized layers (act_ste, weight_ste)."""
    check_bits("w_bits", w_bits)
    check_bits("a_bits", a_bits)
    names = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    if not names:
        raise ValueError("convert: model has no nn.Conv2d or nn.Linear to quantize")
    convs = [n for n in names if isinstance(model.get_submodule(n), nn.Conv2d)]
    linears = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
    skip = set()
    if keep_first and convs:
        skip.add(convs[0])
    if keep_last and linears:
        skip.add(linears[-1])
    for name in names:
        if name in skip:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _swap(getattr(parent, child), w_bits, a_bits, **kwargs))
    return model


# ------------------------------------------------ the binary conv + BN of deploy
def fold_binary_conv_bn(conv, bn):
    """Per-channel (scale, bias), float32, with
    BN(conv(sign x, alpha * sign w) + b) == conv(sign x, sign w) * scale + bias:
    scale = alpha * gamma / sqrt(var + eps), bias = beta + (b - mean) * gamma / sqrt(var + eps)
    (b: the conv's bias, if it has one). The one definition that the eval path
    below and the exported runtime share."""
    with torch.no_grad():
        alpha = weight_scale(conv.weight.float(), 1)
        gamma = bn.weight.float() if bn.weight is not None else 1.0  # affine=False: 1 and 0
        beta = bn.bias.float() if bn.bias is not None else 0.0
        inv_std = gamma / torch.sqrt(bn.running_var.float() + bn.eps)
        if conv.bias is None:
            return alpha * inv_std, beta - bn.running_mean.float() * inv_std
        return alpha * inv_std, beta + (conv.bias.float() - bn.running_mean.float()) * inv_std


def conv_bn(conv, bn, x):
    """bn(conv(x)); in eval mode at W1A1 computed as the deploy runtime does:
    the exact integer conv of the signs (float32, no autocast) * scale + bias."""
    if bn.training or not (conv.w_bits == 1 and conv.a_bits == 1) or is_fx_symbolic_tracing():
        # (traced for export, ctmq.export, as the two modules it folds)
        return bn(conv(x))
    scale, bias = fold_binary_conv_bn(conv, bn)
    return _sign_conv(conv, x, scale, bias)


def _sign_conv(conv, x, scale, bias):
    """conv(sign x, sign w) * scale + bias per channel, float32 without
    autocast: the integer conv is exact, then one multiply and one add, as
    the binary conv kernels' epilogue computes."""
    with torch.autocast(x.device.type, enabled=False):
        sx = torch.where(x >= 0, 1.0, -1.0).float()
        sw = torch.where(conv.weight >= 0, 1.0, -1.0).float()
        y = F.conv2d(sx, sw, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        y = y * scale.view(1, -1, 1, 1)
        return y if bias is None else y + bias.float().view(1, -1, 1, 1)


# ------------------------------------------------ ReActNet's learnable activations
class RSign(nn.Module):
    """ReActNet's RSign threshold (Liu et al. 2020; their LearnableBias "move"
    before BinaryActivation): x + bias, one learnable bias per channel (zeros).

    The sign itself is taken by the following QConv2d's activation quantizer at
    a_bits = 1; at the ladder's other depths the bias shifts that quantizer's
    input (at 32, the hardtanh the models put before a full-precision conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return x + self.bias.view(1, -1, 1, 1)


class RPReLU(nn.Module):
    """ReActNet's RPReLU: PReLU(x + shift_in) + shift_out, per channel (their
    LearnableBias, nn.PReLU, LearnableBias), slopes initialized to 0.25."""

    def __init__(self, channels: int):
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(channels))
        self.weight = nn.Parameter(torch.full((channels,), 0.25))
        self.shift_out = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        y = F.prelu(x + self.shift_in.view(1, -1, 1, 1), self.weight)
        return y + self.shift_out.view(1, -1, 1, 1)
