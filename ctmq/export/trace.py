"""Capture a model's eval-mode forward as a torch.fx graph, ctmq's quantized
layers, RSign and RPReLU kept as leaves, with each node's source line.

Why fx and not torch.export: the lowering needs the modules themselves (a
QConv2d's bit depths and weights, a BatchNorm's running statistics), which fx
keeps as leaf call_module nodes; torch.export traces through them into aten
ops that would have to be matched back into layers.
"""

import operator
import os

import torch
import torch.fx

from ..nn import QConv2d, QLinear, RPReLU, RSign


class ExportError(ValueError):
    """The model cannot be exported; the message names the layer and why."""


LEAVES = (QConv2d, QLinear, RSign, RPReLU)


class _Proxy(torch.fx.Proxy):
    """fx's Proxy records `a += b` as `a + b` (it has no __iadd__), which hides
    that eager mode changes the tensor `a` for its other readers; this one
    records operator.iadd, which the lowering checks."""

    def __iadd__(self, other):
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})


class _Tracer(torch.fx.Tracer):
    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m, qualname):
        return isinstance(m, LEAVES) or super().is_leaf_module(m, qualname)

    def proxy(self, node):
        return _Proxy(node, self)


def trace(model):
    """The fx graph of model's forward, quantized layers kept as leaves."""
    try:
        return _Tracer().trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, ... on what it cannot follow
        raise ExportError(
            f"cannot capture {type(model).__name__}'s forward with torch.fx "
            f"({type(e).__name__}: {e}); the forward must not branch on tensor "
            "values or shapes"
        ) from e


_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(__file__)


def where(node):
    """` at "file", line N, in f: code` of the model source that made an fx
    node (its innermost frame outside torch and this exporter)."""
    trace_lines = (node.meta.get("stack_trace") or "").strip().splitlines()
    for i in range(len(trace_lines) - 1, -1, -1):
        line = trace_lines[i].strip()
        if line.startswith("File ") and _TORCH_DIR not in line and _OWN_DIR not in line:
            code = trace_lines[i + 1].strip() if i + 1 < len(trace_lines) else ""
            return f" at {line[5:]}: {code}"
    return ""


def what(node, modules):
    """How an error names an fx node: the layer (type and name) or the function."""
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} layer {node.target!r}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"{node.op} {node.target}"
