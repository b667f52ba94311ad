"""Lowering of a traced model to the artifact's nodes: one export function per
op of the vocabulary (ctmq.artifact.OPS), registered with the torch layers,
functions and methods it takes (@exports), and the walk over the fx graph
that calls them (Lowering). The binary convolutions and what fuses with them
are ctmq.export.fuse's.

Anything else is an ExportError naming the layer or function and the line of
the model's source that calls it.
"""

import collections
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..artifact.vocabulary import EXPORTS
from ..nn import QConv2d, QLinear, RPReLU, RSign
from . import fuse
from .trace import ExportError, what, where

MODULE_RULES, FUNCTION_RULES, METHOD_RULES = {}, {}, {}
EXPORT_OPS = {"binary_conv", "output"}  # ops with an export function (those two: fuse, walker)
PASS = (nn.Identity, nn.Dropout, nn.Dropout2d)


def exports(*ops, modules=(), functions=(), methods=()):
    """Register an export function fn(lw, node) -> value name for the layers,
    functions and methods that become `ops`."""

    def register(fn):
        EXPORT_OPS.update(ops)
        MODULE_RULES.update(dict.fromkeys(modules, fn))
        FUNCTION_RULES.update(dict.fromkeys(functions, fn))
        METHOD_RULES.update(dict.fromkeys(methods, fn))
        return fn

    return register


def _pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def _call_args(node, names, defaults):
    """A call's arguments by name (positional, then keyword), with defaults;
    for builtins whose signature Python cannot read."""
    values = dict(zip(names, node.args, strict=False))  # (defaults past the args)
    extra = set(node.kwargs) - set(names)
    if len(node.args) > len(names) or extra:
        return None
    values.update(node.kwargs)
    return [values.get(n, defaults.get(n)) for n in names]


def _one_input(lw, node):
    if node.op == "call_module":
        if len(node.args) != 1 or node.kwargs:
            lw.fail(node, "layers must take one tensor")
        return node.args[0]
    return node.args[0] if node.args else node.kwargs.get("input")


# ------------------------------------------------------------ the rules
@exports("conv2d", modules=(nn.Conv2d,))
def _conv2d(lw, node):
    m = lw.module(node)
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        lw.fail(node, f"padding {m.padding!r} ({m.padding_mode}): give zero padding as numbers")
    return lw.add(
        "conv2d",
        [lw.float_arg(node, _one_input(lw, node))],
        weight=lw.tensor(f"{node.target}.weight", m.weight),
        bias=lw.tensor(f"{node.target}.bias", m.bias) if m.bias is not None else None,
        stride=list(m.stride),
        padding=list(m.padding),
        dilation=list(m.dilation),
        groups=m.groups,
    )


def _affine(bn, key):
    t = getattr(bn, key)
    if t is not None:
        return t
    return torch.ones(bn.num_features) if key == "weight" else torch.zeros(bn.num_features)


@exports("batch_norm", modules=(nn.BatchNorm2d,))
def _batch_norm(lw, node):
    m, name = lw.module(node), node.target
    if not m.track_running_stats or m.running_mean is None:
        lw.fail(node, "BatchNorm without running statistics (track_running_stats=False)")
    return lw.add(
        "batch_norm",
        [lw.float_arg(node, _one_input(lw, node))],
        weight=lw.tensor(f"{name}.weight", _affine(m, "weight")),
        bias=lw.tensor(f"{name}.bias", _affine(m, "bias")),
        mean=lw.tensor(f"{name}.running_mean", m.running_mean),
        var=lw.tensor(f"{name}.running_var", m.running_var),
        eps=m.eps,
    )


def _max_pool_args(lw, node):
    """(kernel, stride, padding, dilation, ceil_mode, return_indices)."""
    m = lw.module(node)
    if m is not None:
        return (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    got = _call_args(
        node, names, dict(stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False)
    )
    if got is None:
        lw.fail(node, "max pool arguments not understood")
    return got[1:]


@exports("max_pool2d", modules=(nn.MaxPool2d,), functions=(F.max_pool2d, torch.max_pool2d))
def _max_pool2d(lw, node):
    kernel, stride, padding, dilation, ceil_mode, indices = _max_pool_args(lw, node)
    if indices or ceil_mode or _pair(dilation) != [1, 1]:
        lw.fail(node, "max pool with indices, ceil_mode or dilation")
    stride = kernel if stride in (None, [], ()) else stride
    return lw.add(
        "max_pool2d",
        [lw.float_arg(node, _one_input(lw, node))],
        kernel=_pair(kernel),
        stride=_pair(stride),
        padding=_pair(padding),
    )


@exports("avg_pool2d", modules=(nn.AvgPool2d,), functions=(F.avg_pool2d,))
def _avg_pool2d(lw, node):
    m = lw.module(node)
    if m is not None:
        kernel, stride, padding, ceil, include, divisor = (
            m.kernel_size,
            m.stride,
            m.padding,
            m.ceil_mode,
            m.count_include_pad,
            m.divisor_override,
        )
    else:
        got = _call_args(
            node,
            (
                "input",
                "kernel_size",
                "stride",
                "padding",
                "ceil_mode",
                "count_include_pad",
                "divisor_override",
            ),
            dict(stride=None, padding=0, ceil_mode=False, count_include_pad=True),
        )
        if got is None:
            lw.fail(node, "average pool arguments not understood")
        kernel, stride, padding, ceil, include, divisor = got[1:]
    if divisor is not None:
        lw.fail(node, "average pool with divisor_override")
    stride = kernel if stride in (None, [], ()) else stride
    return lw.add(
        "avg_pool2d",
        [lw.float_arg(node, _one_input(lw, node))],
        kernel=_pair(kernel),
        stride=_pair(stride),
        padding=_pair(padding),
        ceil_mode=bool(ceil),
        count_include_pad=bool(include),
    )


@exports("add", functions=fuse.ADD, methods=("add", "add_"))
def _add(lw, node):
    args = node.args
    if len(args) != 2 or node.kwargs or not all(isinstance(a, torch.fx.Node) for a in args):
        lw.fail(node, "only the sum of two tensors runs")
    return lw.add("add", [lw.float_arg(node, a) for a in args])


@exports("concat", functions=(torch.cat,))
def _concat(lw, node):
    args, kw = node.args, node.kwargs
    tensors = args[0] if args else kw.get("tensors")
    dim = args[1] if len(args) > 1 else kw.get("dim", 0)
    if dim not in (1, -3) or not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
        lw.fail(node, "only concatenation of 2+ tensors along channels (dim=1) runs")
    return lw.add("concat", [lw.float_arg(node, a) for a in tensors])


@exports("hardtanh", modules=(nn.Hardtanh, nn.ReLU6), functions=(F.hardtanh, F.relu6))
def _hardtanh(lw, node):
    m = lw.module(node)
    if m is not None:  # nn.ReLU6 is a Hardtanh(0, 6)
        x, low, high = _one_input(lw, node), m.min_val, m.max_val
    elif node.target is F.relu6:
        x, low, high = _one_input(lw, node), 0.0, 6.0
    else:
        x, low, high = fuse.bound(node, "input", "min_val", "max_val")
    return lw.add("hardtanh", [lw.float_arg(node, x)], min_val=float(low), max_val=float(high))


@exports("relu", modules=(nn.ReLU,), functions=(F.relu, torch.relu), methods=("relu",))
def _relu(lw, node):
    if (
        node.op == "call_function"
        and node.target is torch.relu
        and (len(node.args) != 1 or node.kwargs)
    ):
        lw.fail(node, "torch.relu takes one tensor")
    return lw.add("relu", [lw.float_arg(node, _one_input(lw, node))])


@exports("prelu", modules=(nn.PReLU,))
def _prelu(lw, node):
    return lw.add(
        "prelu",
        [lw.float_arg(node, _one_input(lw, node))],
        weight=lw.tensor(f"{node.target}.weight", lw.module(node).weight),
    )


@exports("rprelu", modules=(RPReLU,))
def _rprelu(lw, node):
    m, name = lw.module(node), node.target
    return lw.add(
        "rprelu",
        [lw.float_arg(node, _one_input(lw, node))],
        shift_in=lw.tensor(f"{name}.shift_in", m.shift_in),
        weight=lw.tensor(f"{name}.weight", m.weight),
        shift_out=lw.tensor(f"{name}.shift_out", m.shift_out),
    )


@exports("leaky_relu", modules=(nn.LeakyReLU,), functions=(F.leaky_relu,))
def _leaky_relu(lw, node):
    m = lw.module(node)
    if m is not None:
        x, slope = _one_input(lw, node), m.negative_slope
    else:
        x, slope = fuse.bound(node, "input", "negative_slope")
    return lw.add("leaky_relu", [lw.float_arg(node, x)], negative_slope=float(slope))


def _is_flatten(node):
    if node.op in ("call_function", "call_method") and node.target in (torch.flatten, "flatten"):
        args = list(node.args[1:]) + [
            node.kwargs.get(k) for k in ("start_dim", "end_dim") if k in node.kwargs
        ]
        return args in ([1], [1, -1])
    return False


@exports(
    "global_avg_pool",
    "adaptive_avg_pool2d",
    modules=(nn.AdaptiveAvgPool2d,),
    functions=(F.adaptive_avg_pool2d,),
)
def _adaptive_avg_pool2d(lw, node):
    """Adaptive average pool; a global one whose one reader is a flatten is one
    global_avg_pool node with it."""
    m = lw.module(node)
    if m is not None:
        x, size = _one_input(lw, node), m.output_size
    else:
        x, size = fuse.bound(node, "input", "output_size")
    if size is None or (not isinstance(size, int) and None in size):
        lw.fail(node, f"output_size {size}: give every output size")
    size = _pair(size)
    if size == [1, 1] and len(node.users) == 1:
        (reader,) = node.users
        if _is_flatten(reader) or _is_batch_view(lw, reader):
            lw.plan[reader] = ("alias", node)
            return lw.add("global_avg_pool", [lw.float_arg(node, x)])
    return lw.add("adaptive_avg_pool2d", [lw.float_arg(node, x)], output_size=size)


def _is_batch_size(lw, node, x):
    """node is x.size(0) or x.shape[0]."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_method" and node.target == "size":
        return node.args[:1] == (x,) and (node.args[1:] == (0,) or node.kwargs == {"dim": 0})
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]
        return (
            isinstance(src, torch.fx.Node)
            and src.op == "call_function"
            and src.target is getattr
            and src.args == (x, "shape")
        )
    return False


def _is_batch_view(lw, node):
    """x.view(x.size(0), -1) / x.reshape(x.shape[0], -1): a flatten from dim 1."""
    if node.op != "call_method" or node.target not in ("view", "reshape") or node.kwargs:
        return False
    args = node.args[1:]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = tuple(args[0])
    return len(args) == 2 and args[1] == -1 and _is_batch_size(lw, args[0], node.args[0])


@exports(
    "flatten",
    modules=(nn.Flatten,),
    functions=(torch.flatten,),
    methods=("flatten", "view", "reshape"),
)
def _flatten(lw, node):
    m = lw.module(node)
    if m is not None:
        if (m.start_dim, m.end_dim) != (1, -1):
            lw.fail(node, "flatten other than from dim 1 to the end")
    elif node.target in ("view", "reshape"):
        if not _is_batch_view(lw, node):
            lw.fail(
                node,
                f"only x.{node.target}(x.size(0), -1) runs (a flatten from dim 1; "
                "or use x.flatten(1))",
            )
    elif not _is_flatten(node):
        lw.fail(node, "flatten other than from dim 1 to the end")
    return lw.add("flatten", [lw.float_arg(node, node.args[0])])


@exports("linear", modules=(nn.Linear,))
def _linear(lw, node):
    m, name = lw.module(node), node.target
    return lw.add(
        "linear",
        [lw.float_arg(node, _one_input(lw, node))],
        weight=lw.tensor(f"{name}.weight", m.weight),
        bias=lw.tensor(f"{name}.bias", m.bias) if m.bias is not None else None,
    )


# ------------------------------------------------------------ the walk
def _is_shape_value(node):
    """x.size(...), x.shape, x.shape[i]: integers the view rule reads, no node."""
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return True
    return (
        node.op == "call_function"
        and node.target is operator.getitem
        and isinstance(node.args[0], torch.fx.Node)
        and _is_shape_value(node.args[0])
    )


class Lowering:
    """Walks the fx graph in order, calling fuse's planning and the export
    functions; collects the artifact's nodes and tensors."""

    def __init__(self, model, graph):
        self.model, self.graph = model, graph
        self.modules = dict(model.named_modules())
        self.nodes, self.tensors = [], {}
        self.env = {}  # fx node -> artifact value name
        self.packed = set()
        self.plan = {}  # fx node -> what to do there instead of lowering it alone
        self._n = 0

    def fail(self, node, why):
        raise ExportError(f"{what(node, self.modules)}{where(node)}: {why}")

    def module(self, node):
        return self.modules[node.target] if node.op == "call_module" else None

    def value(self):
        self._n += 1
        return f"v{self._n}"

    def add(self, op, inputs, **attrs):
        out = self.value()
        self.nodes.append({"op": op, "in": list(inputs), "out": out, **attrs})
        return out

    def tensor(self, name, t):
        self.tensors[name] = (
            t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).contiguous()
        )
        return name

    def arg(self, node, a):
        if not isinstance(a, torch.fx.Node):
            self.fail(node, f"takes a constant ({a!r}) where the runtime needs a tensor")
        if a not in self.env:
            self.fail(node, f"reads {a.name}, which was not lowered")
        if self.env[a] is None:
            self.fail(node, f"reads {a.name}, a size, where the runtime needs a tensor")
        return self.env[a]

    def float_arg(self, node, a):
        value = self.arg(node, a)
        if value in self.packed:
            self.fail(node, "reads packed bits (internal: a packed output with a float reader)")
        return value

    def lower(self):
        nodes = list(self.graph.nodes)
        self.calls = collections.Counter(n.target for n in nodes if n.op == "call_module")
        fuse.check_in_place(self, nodes)
        for node in nodes:
            m = self.module(node)
            if isinstance(m, QConv2d):
                fuse.plan_binary_conv(self, node)
            elif isinstance(m, RSign):
                fuse.plan_rsign(self, node)
            elif (
                fuse.is_hardtanh(node, self.modules)
                and node.users
                and all(fuse.is_binary_conv(self, u) for u in node.users)
            ):
                # only signs are read: sign(hardtanh(y)) == sign(y)
                self.plan.setdefault(node, ("alias", node.args[0]))
            elif _is_shape_value(node):
                self.plan[node] = ("shape",)
        if len([n for n in nodes if n.op == "placeholder"]) != 1:
            raise ExportError(
                f"the model's forward must take one input (the images), takes "
                f"{len([n for n in nodes if n.op == 'placeholder'])}"
            )
        for node in nodes:
            action = self.plan.get(node)
            if action is None:
                self.env[node] = self.lower_node(node)
            elif action[0] == "binary_conv":
                self.env[node] = fuse.emit_binary_conv(self, node, action[1])
            elif action[0] == "alias":
                self.env[node] = self.env[action[1]]
            elif action[0] == "shape":
                self.env[node] = None
        return self.nodes, self.tensors

    def lower_node(self, node):
        if node.op == "placeholder":
            return "input"
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, torch.fx.Node):
                self.fail(node, "the model must return one tensor (the logits)")
            self.nodes.append(
                {"op": "output", "in": [self.float_arg(node, result)], "out": "output"}
            )
            return "output"
        if node.op == "call_module":
            m = self.module(node)
            if isinstance(m, PASS):
                if len(node.args) != 1 or node.kwargs:
                    self.fail(node, "layers must take one tensor")
                return self.arg(node, node.args[0])
            if isinstance(m, QLinear):
                self.fail(
                    node,
                    "binary linear layers do not run in the runtime: keep the last "
                    "linear full precision (ctmq.nn.convert(keep_last=True))",
                )
            rule = MODULE_RULES.get(type(m))
        elif node.op == "call_function":
            rule = FUNCTION_RULES.get(node.target)
        elif node.op == "call_method":
            rule = METHOD_RULES.get(node.target)
        else:
            self.fail(node, "a tensor used outside a layer: the runtime cannot execute it")
        if rule is None:
            self.fail(
                node, f"not in the runtime's vocabulary ({EXPORTS}; Identity and Dropout vanish)"
            )
        return rule(self, node)
