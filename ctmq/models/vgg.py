"""VGG-Small, the CIFAR-10 baseline of binarized networks: BNN's CIFAR net
(Hubara et al. 2016) without its hidden FC layers, named in LQ-Nets (Zhang et
al. 2018), the model of the XNOR-Net / IR-Net (Qin et al. 2020) / ReCU (Xu et
al. 2021) CIFAR-10 tables; IR-Net's layout and module names:

* conv0: FP 3x3 conv (128) + bn0 + hardtanh;
* conv1..conv5: QConv2d 3x3, channels 128-256-256-512-512, each + BN (conv_bn)
  + hardtanh, a 2x2 max pool after the BN of conv1, conv3 and conv5;
* flatten + FP fc (512 * 4 * 4 -> classes).

IR-Net pools between a conv and its BN; here the pool follows the BN, so that
each quantized conv is immediately followed by its BN, the pair that conv_bn
computes and the exporter folds into the binary conv's per-channel
(scale, bias). Max pool commutes with that affine map wherever its scale
gamma / sqrt(var + eps) is positive, so the orders differ only on channels
with a negative scale (and in BN's batch statistics, taken before pooling).
hardtanh follows every BN as in IR-Net: sign(hardtanh y) == sign(y), and at
full precision it is the clamp the ResNets apply before a quantized conv.

The fc sees an adaptive average pool to 4 x 4 first: the identity on the 4 x 4
maps of a 32 x 32 input (the literature's model), and a resampling for other
sizes (28 x 28 MNIST: 3 x 3, 8 x 8 digits: 1 x 1). width scales every conv.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import QConv2d, conv_bn
from ..quant import FULL_PRECISION
from .common import check_args, init_weights, scaled

CHANNELS = (128, 128, 256, 256, 512, 512)
POOL_AFTER = (1, 3, 5)  # the convs whose BN output is max-pooled


class VGGSmall(nn.Module):
    """VGG-Small (CIFAR, 32 x 32 input); config holds the arguments that rebuild it."""

    def __init__(
        self,
        num_classes=10,
        stem="cifar",
        block=None,
        width=1.0,
        in_channels=3,
        w_bits=FULL_PRECISION,
        a_bits=FULL_PRECISION,
        act_ste="approx_sign",
    ):
        super().__init__()
        check_args("vgg_small", num_classes, stem, ("cifar",), block, (None,), width)
        self.config = dict(
            num_classes=num_classes, stem=stem, block=block, width=width, in_channels=in_channels
        )
        chans = [scaled(c, width) for c in CHANNELS]
        self.conv0 = nn.Conv2d(in_channels, chans[0], 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(chans[0])
        qkw = dict(w_bits=w_bits, a_bits=a_bits, act_ste=act_ste)
        for i in range(1, len(chans)):
            conv = QConv2d(chans[i - 1], chans[i], 3, padding=1, bias=False, **qkw)
            self.add_module(f"conv{i}", conv)
            self.add_module(f"bn{i}", nn.BatchNorm2d(chans[i]))
        self.pooling = nn.MaxPool2d(2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(chans[-1] * 4 * 4, num_classes)
        init_weights(self)

    @property
    def architecture(self):
        """What an exported artifact records: the zoo name and the arguments."""
        return dict(self.config, name="vgg_small")

    def forward(self, x):
        x = F.hardtanh(self.bn0(self.conv0(x)))
        for i in range(1, len(CHANNELS)):
            x = conv_bn(getattr(self, f"conv{i}"), getattr(self, f"bn{i}"), x)
            if i in POOL_AFTER:
                x = self.pooling(x)
            x = F.hardtanh(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def vgg_small(num_classes=10, stem="cifar", block=None, width=1.0, in_channels=3, **qkw):
    """VGG-Small: FP first conv and fc, five quantized 3x3 convs. stem must be
    "cifar" and block None (accepted for the engine's uniform call).
    qkw: w_bits, a_bits, act_ste."""
    return VGGSmall(
        num_classes, stem=stem, block=block, width=width, in_channels=in_channels, **qkw
    )
