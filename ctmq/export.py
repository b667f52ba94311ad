"""Export a binarized (W1A1) ResNet-18 to one deployable file.

The artifact (format: ctmq.artifact) holds the packed binary weights with
their folded per-channel scale/bias, the full-precision stem, shortcuts and
FC as they are, and a JSON header with the node list the runtime executes.

Each binary conv is folded with the BatchNorm that follows it into
    BN(conv(sign x, alpha * sign w)) = conv(sign x, sign w) * scale + bias
by ctmq.nn.fold_binary_conv_bn, the function the model's own eval path uses,
so the deployed network computes the same values as the trained one.
"""
import torch

from . import binary
from .artifact import write_artifact
from .models import ResNet18
from .models.resnet import BasicBlock, BiRealBlock
from .nn import fold_binary_conv_bn, quantized_layers

class ExportError(ValueError):
    """The model cannot be exported (not a W1A1 ResNet-18)."""


class _Graph:
    def __init__(self):
        self.nodes, self.tensors, self._n = [], {}, 0

    def value(self):
        self._n += 1
        return f"v{self._n}"

    def add(self, op, inputs, **attrs):
        out = self.value()
        self.nodes.append({"op": op, "in": list(inputs), "out": out, **attrs})
        return out

    def tensor(self, name, t):
        self.tensors[name] = t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).contiguous()
        return name

    def conv(self, name, conv, x):
        return self.add("conv2d", [x], weight=self.tensor(f"{name}.weight", conv.weight),
                        bias=self.tensor(f"{name}.bias", conv.bias) if conv.bias is not None else None,
                        stride=list(conv.stride), padding=list(conv.padding),
                        dilation=list(conv.dilation))

    def bn(self, name, bn, x):
        return self.add("batch_norm", [x], weight=self.tensor(f"{name}.weight", bn.weight),
                        bias=self.tensor(f"{name}.bias", bn.bias),
                        mean=self.tensor(f"{name}.running_mean", bn.running_mean),
                        var=self.tensor(f"{name}.running_var", bn.running_var), eps=bn.eps)

    def binary_conv(self, name, conv, bn, x, out, residual=None):
        """conv + BN (folded), then + residual in the same epilogue when given."""
        scale, bias = fold_binary_conv_bn(conv, bn)
        pw = binary.pack_weight(conv.weight.detach().float().cpu())
        inputs = [x] if residual is None else [x, residual]
        return self.add("binary_conv", inputs, weight=self.tensor(f"{name}.bits", pw.bits),
                        scale=self.tensor(f"{name}.scale", scale),
                        bias=self.tensor(f"{name}.bias", bias), in_channels=conv.in_channels,
                        stride=list(conv.stride), padding=list(conv.padding),
                        dilation=list(conv.dilation), output=out)

    def shortcut(self, name, block, x):
        if block.downsample is None:
            return x
        pool, conv, bn = block.downsample
        if isinstance(pool, torch.nn.AvgPool2d):
            x = self.add("avg_pool2d", [x], kernel=2, stride=2, ceil_mode=True)
        return self.bn(f"{name}.downsample.2", bn, self.conv(f"{name}.downsample.1", conv, x))


def _build_graph(model):
    g = _Graph()
    x = "input"
    x = g.bn("bn1", model.bn1, g.conv("conv1", model.conv1, x))
    if isinstance(model.maxpool, torch.nn.MaxPool2d):
        x = g.add("max_pool2d", [x], kernel=3, stride=2, padding=1)
    for li in range(1, 5):
        for bi, block in enumerate(getattr(model, f"layer{li}")):
            name = f"layer{li}.{bi}"
            short = g.shortcut(name, block, x)
            if isinstance(block, BiRealBlock):
                x = g.binary_conv(f"{name}.conv1", block.conv1, block.bn1, x, "float", residual=short)
                x = g.binary_conv(f"{name}.conv2", block.conv2, block.bn2, x, "float", residual=x)
            elif isinstance(block, BasicBlock):
                # sign(hardtanh(y)) == sign(y): conv1's epilogue packs the signs
                h = g.binary_conv(f"{name}.conv1", block.conv1, block.bn1, x, "packed")
                t = g.binary_conv(f"{name}.conv2", block.conv2, block.bn2, h, "float", residual=short)
                x = g.add("hardtanh", [t])
            else:
                raise ExportError(f"{name}: unknown block type {type(block).__name__}")
    x = g.add("global_avg_pool", [x])
    x = g.add("linear", [x], weight=g.tensor("fc.weight", model.fc.weight),
              bias=g.tensor("fc.bias", model.fc.bias))
    g.nodes.append({"op": "output", "in": [x], "out": "output"})
    return g


def export_binary(model, path, input_size=None, mean=None, std=None, class_names=None):
    """Write the W1A1 model to `path` (temp file + rename); returns the header.

    input_size: the image side the model expects (default 224 for the
    imagenet stem, else 32); mean/std: the per-channel input normalization;
    class_names: one per class (default "0", "1", ...)."""
    if not isinstance(model, ResNet18):
        raise ExportError(f"export_binary supports ctmq.models.resnet18, got {type(model).__name__}")
    quantized = set(quantized_layers(model))
    wrong = [f"{n} (W{m.w_bits}A{m.a_bits})" for n, m in model.named_modules()
             if m in quantized and (m.w_bits, m.a_bits) != (1, 1)]
    if wrong:
        raise ExportError("the model is not binarized: these layers are not W1A1: " + ", ".join(wrong)
                          + " (ctmq.nn.set_bits(model, 1, 1), or export a W1A1 stage checkpoint)")
    cfg = dict(model.config)
    channels = cfg["in_channels"]
    if input_size is None:
        input_size = 224 if cfg["stem"] == "imagenet" else 32
    mean = list(mean) if mean is not None else [0.0] * channels
    std = list(std) if std is not None else [1.0] * channels
    if len(mean) != channels or len(std) != channels:
        raise ExportError(f"mean and std need {channels} values (one per input channel)")
    class_names = list(class_names) if class_names is not None else [str(i) for i in range(cfg["num_classes"])]
    if len(class_names) != cfg["num_classes"]:
        raise ExportError(f"class_names has {len(class_names)} names for {cfg['num_classes']} classes")
    was_training = model.training
    model.eval()
    try:
        g = _build_graph(model)
    finally:
        model.train(was_training)
    header = {"architecture": dict(cfg, name="resnet18"),
              "input": {"channels": channels, "size": int(input_size), "mean": [float(v) for v in mean],
                        "std": [float(v) for v in std]},
              "class_names": class_names, "nodes": g.nodes}
    return write_artifact(path, header, g.tensors)
