"""Export a binarized (W1A1) CNN to one deployable file.

The pipeline, one module each:

    trace.py   the model's eval-mode forward as a torch.fx graph (quantized
               layers, RSign and RPReLU kept as leaves)
    fuse.py    the binary convolutions and what fuses into them (BatchNorm,
               RSign, the residual add, packed output)
    lower.py   every other layer or function to its node of the vocabulary
               (ctmq.artifact.OPS), the walk over the graph
    here       the header (input, class names, architecture), checked as
               loading checks it, and the file (ctmq.artifact.write_artifact)
"""

import torch
from torch import nn

from ..artifact import ArtifactError, write_artifact
from ..nn import quantized_layers
from .lower import Lowering
from .trace import ExportError, trace

__all__ = ["ExportError", "export_binary", "trace"]


def _check_binarized(model):
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    quantized = quantized_layers(model)
    if not quantized:
        raise ExportError("the model has no quantized layers (QConv2d); nothing is binarized")
    wrong = [
        f"{n} (W{m.w_bits}A{m.a_bits})"
        for n, m in model.named_modules()
        if m in quantized and (m.w_bits, m.a_bits) != (1, 1)
    ]
    if wrong:
        raise ExportError(
            "the model is not binarized: these layers are not W1A1: "
            + ", ".join(wrong)
            + " (ctmq.nn.set_bits(model, 1, 1), or export a W1A1 stage checkpoint)"
        )


def _input_size(model, input_size):
    if input_size is None:
        stem = (getattr(model, "config", None) or {}).get("stem")
        if stem is None:
            raise ExportError(
                "input_size: give the image side the model expects (a model "
                "outside the zoo does not say)"
            )
        input_size = 224 if stem == "imagenet" else 32
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ExportError(f"input_size must be a positive int, got {input_size!r}")
    return input_size


def _input_channels(model, graph):
    """The input channels the model declares (config), else those the first
    layer reading the images expects."""
    declared = (getattr(model, "config", None) or {}).get("in_channels")
    if declared:
        return declared
    modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op == "placeholder":
            for reader in node.users:
                m = modules.get(reader.target) if reader.op == "call_module" else None
                if isinstance(m, nn.Conv2d):
                    return m.in_channels
    raise ExportError("cannot tell the input channels: the images must go to a Conv2d first")


def _numbers(name, values, count):
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ExportError(
            f"{name} must be {count} numbers (one per input channel), got {values!r}"
        ) from None
    if len(values) != count:
        raise ExportError(f"{name} needs {count} values (one per input channel), got {len(values)}")
    return values


def export_binary(
    model, path, input_size=None, mean=None, std=None, class_names=None, architecture=None
):
    """Write the W1A1 model to `path` (temp file + rename); returns the header.

    input_size: the image side the model expects (default: 224 for a zoo
    model with the imagenet stem, 32 for the cifar stem; required for other
    models); mean/std: the per-channel input normalization (std nonzero);
    class_names: one per class (default "0", "1", ...); architecture: what
    the header records as the model (default: the model's `architecture`
    attribute, as the zoo's models have, else its class name). The artifact
    is checked as loading checks it: nothing is written that loading refuses."""
    _check_binarized(model)
    input_size = _input_size(model, input_size)
    was_training = model.training
    model.eval()
    try:
        graph = trace(model)
        nodes, tensors = Lowering(model, graph).lower()
        channels = _input_channels(model, graph)
        with torch.no_grad():
            device = next(model.parameters()).device
            logits = model(torch.zeros(1, channels, input_size, input_size, device=device))
    finally:
        model.train(was_training)
    num_classes = logits.shape[-1]
    mean = _numbers("mean", mean, channels) if mean is not None else [0.0] * channels
    std = _numbers("std", std, channels) if std is not None else [1.0] * channels
    class_names = (
        list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    )
    if len(class_names) != num_classes:
        raise ExportError(f"class_names has {len(class_names)} names for {num_classes} classes")
    if architecture is None:
        architecture = getattr(model, "architecture", None) or {"name": type(model).__name__}
    header = {
        "architecture": dict(architecture),
        "input": {"channels": channels, "size": int(input_size), "mean": mean, "std": std},
        "class_names": class_names,
        "nodes": nodes,
    }
    try:
        return write_artifact(path, header, tensors)
    except ArtifactError as e:
        raise ExportError(f"the artifact would not load: {e}") from e
