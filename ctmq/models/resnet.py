"""ResNet-18 and ResNet-34 with quantized 3x3 convolutions and real-valued shortcuts.

* depth 18: [2, 2, 2, 2] blocks per stage, depth 34: [3, 4, 6, 3] (He et al.
  2016), blocks of two 3x3 convs in both;
* stem: FP conv (7x7/2 + max pool for "imagenet", 3x3/1 for "cifar") + BN,
  no ReLU (as Bi-Real: the next quantized conv takes the signed activation);
* 3x3 convs: QConv2d (bit depths set with ctmq.nn.set_bits);
* shortcuts: identity, or average pool + FP 1x1 conv + BN where the shape
  changes; "bireal" blocks put one around every 3x3 conv, "basic" blocks one
  around each pair;
* at full precision (a_bits = 32) a 3x3 conv's input passes through hardtanh,
  the real-valued limit of the quantizer family (Q_k clamps to [-1, 1]), so
  the FP "accurate" model has its nonlinearity and every stage sees the same
  function up to quantization;
* FP average pool + FC;
* in eval mode, a W1A1 conv + BN computes exactly what the exported runtime
  does (ctmq.nn.conv_bn), so deployed and trained predictions agree.
Module names follow torchvision's resnet18/resnet34 so their state dicts load.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import QConv2d, conv_bn
from ..quant import FULL_PRECISION
from .common import act_input as _act_input
from .common import check_args, init_weights, scaled

STEMS = ("imagenet", "cifar")
BLOCKS = ("bireal", "basic")
DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def _shortcut(cin, cout, stride):
    if stride == 1 and cin == cout:
        return None
    pool = (
        nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False) if stride == 2 else nn.Identity()
    )
    return nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


class BiRealBlock(nn.Module):
    """Two units x -> BN(QConv(x)) + shortcut(x), a shortcut around each conv."""

    def __init__(self, cin, cout, stride, **qkw):
        super().__init__()
        self.conv1 = QConv2d(cin, cout, 3, stride=stride, padding=1, bias=False, **qkw)
        self.bn1 = nn.BatchNorm2d(cout)
        self.downsample = _shortcut(cin, cout, stride)
        self.conv2 = QConv2d(cout, cout, 3, padding=1, bias=False, **qkw)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        short = x if self.downsample is None else self.downsample(x)
        x = conv_bn(self.conv1, self.bn1, _act_input(x, self.conv1)) + short
        return conv_bn(self.conv2, self.bn2, _act_input(x, self.conv2)) + x


class BasicBlock(nn.Module):
    """ResNet's basic block with hardtanh for ReLU: one shortcut per two convs."""

    def __init__(self, cin, cout, stride, **qkw):
        super().__init__()
        self.conv1 = QConv2d(cin, cout, 3, stride=stride, padding=1, bias=False, **qkw)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = QConv2d(cout, cout, 3, padding=1, bias=False, **qkw)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x):
        short = x if self.downsample is None else self.downsample(x)
        y = F.hardtanh(conv_bn(self.conv1, self.bn1, _act_input(x, self.conv1)))
        return F.hardtanh(conv_bn(self.conv2, self.bn2, _act_input(y, self.conv2)) + short)


class ResNet(nn.Module):
    """ResNet-18/34 (depth) of Bi-Real or basic blocks; see the module docstring.
    config holds the constructor arguments that rebuild it (bit depths aside)."""

    def __init__(
        self,
        num_classes=1000,
        stem="imagenet",
        block="bireal",
        width=1.0,
        in_channels=3,
        w_bits=FULL_PRECISION,
        a_bits=FULL_PRECISION,
        act_ste="approx_sign",
        depth=18,
    ):
        super().__init__()
        check_args("resnet", num_classes, stem, STEMS, block, BLOCKS, width)
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {tuple(DEPTHS)}, got {depth!r}")
        self.config = dict(
            num_classes=num_classes,
            stem=stem,
            block=block,
            width=width,
            in_channels=in_channels,
            depth=depth,
        )
        chans = [scaled(c, width) for c in (64, 128, 256, 512)]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, chans[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, chans[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(chans[0])
        block_cls = BiRealBlock if block == "bireal" else BasicBlock
        qkw = dict(w_bits=w_bits, a_bits=a_bits, act_ste=act_ste)
        cin = chans[0]
        for i, (cout, n) in enumerate(zip(chans, DEPTHS[depth], strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [block_cls(cin, cout, stride, **qkw)]
            blocks += [block_cls(cout, cout, 1, **qkw) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    @property
    def architecture(self):
        """What an exported artifact records: the zoo name and the arguments."""
        return dict(self.config, name=f"resnet{self.config['depth']}")

    def forward(self, x):
        x = self.maxpool(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet18(ResNet):
    """ResNet(depth=18), the class of resnet18 models (depth 18 only)."""

    def __init__(self, *args, depth=18, **kwargs):
        _check_depth(depth, 18)
        super().__init__(*args, depth=18, **kwargs)


def _check_depth(depth, expected):
    if depth != expected:
        raise ValueError(f"depth: resnet{expected} has depth {expected}, got {depth!r}")


def resnet18(num_classes=1000, stem="imagenet", block="bireal", width=1.0, **kwargs):
    """ResNet-18 with quantized 3x3 convs; FP first conv, shortcuts and FC.
    kwargs: in_channels, w_bits, a_bits, act_ste (and depth=18, from config)."""
    return ResNet18(num_classes, stem=stem, block=block, width=width, **kwargs)


def resnet34(num_classes=1000, stem="imagenet", block="bireal", width=1.0, **kwargs):
    """ResNet-34 ([3, 4, 6, 3] blocks), otherwise as resnet18."""
    _check_depth(kwargs.pop("depth", 34), 34)
    return ResNet(num_classes, stem=stem, block=block, width=width, depth=34, **kwargs)


def _torchvision_key(key):
    # torchvision: downsample = (1x1 conv stride 2, BN); ours: (avg pool, 1x1 conv, BN)
    if ".downsample.0." in key:
        return key.replace(".downsample.0.", ".downsample.1.")
    if ".downsample.1." in key:
        return key.replace(".downsample.1.", ".downsample.2.")
    return key


def load_torchvision_weights(model, source):
    """Initialize model from a torchvision resnet18/34 state dict (a dict, or a
    file: safetensors, or torch.save loaded with weights_only=True). Tensors
    whose shape differs (another stem, width or class count) are skipped.
    Returns the list of skipped or missing parameter names."""
    if isinstance(source, dict):
        state = source
    else:
        path = str(source)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if (
            isinstance(state, dict)
            and "state_dict" in state
            and isinstance(state["state_dict"], dict)
        ):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{source!r}: expected a state dict of tensors (torchvision resnet)")
    own = model.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        ours = _torchvision_key(key.removeprefix("module."))
        if ours in own and own[ours].shape == value.shape:
            loaded[ours] = value
        else:
            skipped.append(key)
    if not loaded:
        raise ValueError(f"{source!r}: no tensor matches this model (is it a torchvision resnet?)")
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in own if k not in loaded and not k.endswith("num_batches_tracked")]
    return skipped + missing
