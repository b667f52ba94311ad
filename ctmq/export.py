"""Export a binarized (W1A1) CNN to one deployable file.

The model's eval-mode graph is captured with torch.fx symbolic tracing, with
ctmq's quantized layers, RSign, RPReLU and torch.nn's modules as leaves, and
lowered to the runtime's node vocabulary (ctmq.artifact.NODE_INPUTS):

* a W1A1 QConv2d and the BatchNorm2d that reads it fold into one binary_conv
  with per-channel scale/bias (ctmq.nn.fold_binary_conv_bn, the function the
  model's own eval path conv_bn uses, so both compute the same values); an
  RSign before it becomes the conv's input bias (added before the sign); an
  add that is the only reader of the result fuses into the conv's epilogue
  as its residual; where every reader takes the sign again (binary convs,
  directly or through hardtanh: sign(hardtanh(y)) == sign(y)) the conv writes
  packed bits; a hardtanh read by binary convs alone is dropped;
* every other layer becomes the node of the same torch function (conv2d,
  batch_norm, linear, pools, add, concat, hardtanh, relu, prelu, rprelu,
  flatten); the runtime calls the same torch functions the model does.

Anything else is an ExportError naming the layer or function and the line of
the model's source that calls it.

Why fx and not torch.export: the lowering needs the modules themselves (a
QConv2d's bit depths and weights, a BatchNorm's running statistics), which fx
keeps as leaf call_module nodes; torch.export traces through them into aten
ops that would have to be matched back into layers.
"""
import collections
import operator
import os

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import binary
from .artifact import write_artifact
from .nn import QConv2d, QLinear, RPReLU, RSign, fold_binary_conv_bn, quantized_layers
from .quant import weight_scale


class ExportError(ValueError):
    """The model cannot be exported; the message names the layer and why."""


_LEAVES = (QConv2d, QLinear, RSign, RPReLU)
_ADD = (operator.add, operator.iadd, torch.add)
_PASS = (nn.Identity, nn.Dropout, nn.Dropout2d)


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
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)

    def proxy(self, node):
        return _Proxy(node, self)


_TORCH_DIR = os.path.dirname(torch.__file__)


def _where(node):
    """` at "file", line N, in f: code` of the model source that made an fx
    node (its innermost frame outside torch and this exporter)."""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    for i in range(len(trace) - 1, -1, -1):
        line = trace[i].strip()
        if line.startswith("File ") and _TORCH_DIR not in line and __file__ not in line:
            code = trace[i + 1].strip() if i + 1 < len(trace) else ""
            return f" at {line[5:]}: {code}"
    return ""


def _what(node, modules):
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} layer {node.target!r}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"{node.op} {node.target}"


class _Lowering:
    def __init__(self, model, graph):
        self.model, self.graph = model, graph
        self.modules = dict(model.named_modules())
        self.nodes, self.tensors = [], {}
        self.env = {}      # fx node -> artifact value name
        self.packed = set()
        self.plan = {}     # fx node -> what to do there instead of lowering it alone
        self._n = 0

    # -------------------------------------------------------------- output
    def fail(self, node, why):
        raise ExportError(f"{_what(node, self.modules)}{_where(node)}: {why}")

    def value(self):
        self._n += 1
        return f"v{self._n}"

    def add(self, op, inputs, **attrs):
        out = self.value()
        self.nodes.append({"op": op, "in": list(inputs), "out": out, **attrs})
        return out

    def tensor(self, name, t):
        self.tensors[name] = t.detach().to("cpu", torch.float32 if t.is_floating_point()
                                           else t.dtype).contiguous()
        return name

    def arg(self, node, a):
        if not isinstance(a, torch.fx.Node):
            self.fail(node, f"takes a constant ({a!r}) where the runtime needs a tensor")
        if a not in self.env:
            self.fail(node, f"reads {a.name}, which was not lowered")
        return self.env[a]

    def float_arg(self, node, a):
        value = self.arg(node, a)
        if value in self.packed:
            self.fail(node, "reads packed bits (internal: a packed output with a float reader)")
        return value

    # --------------------------------------------------------- the binary convs
    def module(self, node):
        return self.modules[node.target] if node.op == "call_module" else None

    def is_binary_conv(self, node):
        return isinstance(self.module(node), QConv2d)

    def takes_sign(self, node):
        """Every reader of node's value takes its sign: binary convs without an
        input bias, directly or through hardtanh."""
        readers = list(node.users)
        if not readers:
            return False
        for r in readers:
            if self.is_binary_conv(r):
                continue
            if _is_hardtanh(r, self.modules) and r.users and all(
                    self.is_binary_conv(u) for u in r.users):
                continue
            return False
        return True

    def plan_binary_conv(self, conv_node):
        conv = self.module(conv_node)
        if conv.groups != 1:
            self.fail(conv_node, f"groups={conv.groups}: binary convs run with groups=1 only")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            self.fail(conv_node, f"padding {conv.padding!r} ({conv.padding_mode}): binary convs "
                                 "take zero padding given as numbers")
        source = conv_node.args[0]
        input_bias = None
        if isinstance(source, torch.fx.Node) and isinstance(self.module(source), RSign):
            input_bias, source = self.module(source), source.args[0]
        tail, bn = conv_node, None
        if len(conv_node.users) == 1:
            (reader,) = conv_node.users
            if type(self.module(reader)) is nn.BatchNorm2d:
                tail, bn = reader, self.module(reader)
                if not bn.track_running_stats or bn.running_mean is None:
                    self.fail(reader, "BatchNorm without running statistics "
                                      "(track_running_stats=False)")
                self.plan[reader] = ("skip",)
        # a conv module called more than once folds differently per call
        name = conv_node.target if self.calls[conv_node.target] == 1 else \
            f"{conv_node.target}.{conv_node.name}"
        plan = {"conv": conv, "name": name, "source": source,
                "input_bias": input_bias, "bn": bn, "residual": None, "output": "float",
                "node": conv_node}
        emit_at = tail
        if len(tail.users) == 1:
            (reader,) = tail.users
            other = _add_operands(reader, tail)
            if other is not None and reader not in self.plan:  # one conv fused per sum
                plan["residual"], emit_at = other, reader
        if plan["residual"] is None and self.takes_sign(tail):
            plan["output"] = "packed"
            for r in tail.users:
                if _is_hardtanh(r, self.modules):
                    self.plan[r] = ("alias", emit_at)
        self.plan[conv_node] = ("skip",)
        self.plan[emit_at] = ("binary_conv", plan)

    def emit_binary_conv(self, node, plan):
        conv, bn = plan["conv"], plan["bn"]
        name = plan["name"]
        if bn is not None:
            scale, bias = fold_binary_conv_bn(conv, bn)
        else:
            scale = weight_scale(conv.weight.detach().float(), 1)
            bias = (conv.bias.detach().float() if conv.bias is not None
                    else torch.zeros(conv.out_channels))
        pw = binary.pack_weight(conv.weight.detach().float().cpu())
        x = self.float_arg(node, plan["source"]) if plan["input_bias"] is not None else \
            self.arg(node, plan["source"])
        inputs = [x]
        if plan["residual"] is not None:
            inputs.append(self.float_arg(node, plan["residual"]))
        attrs = {}
        rsign = plan["input_bias"]
        if rsign is not None:
            rsign_name = next(n for n, m in self.modules.items() if m is rsign)
            attrs["input_bias"] = self.tensor(f"{rsign_name}.bias", rsign.bias)
        out = self.add("binary_conv", inputs, weight=self.tensor(f"{name}.bits", pw.bits),
                       scale=self.tensor(f"{name}.scale", scale),
                       bias=self.tensor(f"{name}.bias", bias), in_channels=conv.in_channels,
                       stride=list(conv.stride), padding=list(conv.padding),
                       dilation=list(conv.dilation), output=plan["output"], **attrs)
        if plan["output"] == "packed":
            self.packed.add(out)
        return out

    # ------------------------------------------------------------- the rest
    def lower(self):
        nodes = list(self.graph.nodes)
        self.calls = collections.Counter(n.target for n in nodes if n.op == "call_module")
        self.check_in_place(nodes)
        for node in nodes:
            if node.op == "call_module":
                m = self.module(node)
                if isinstance(m, QConv2d):
                    self.plan_binary_conv(node)
                elif isinstance(m, RSign):
                    if not node.users or not all(self.is_binary_conv(u) for u in node.users):
                        self.fail(node, "its output must go to binary convs only (it becomes "
                                        "their input bias)")
                    self.plan[node] = ("skip",)
            elif (_is_hardtanh(node, self.modules) and node.users
                  and all(self.is_binary_conv(u) for u in node.users)):
                # only signs are read: sign(hardtanh(y)) == sign(y)
                self.plan.setdefault(node, ("alias", node.args[0]))
        inputs = [n for n in nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise ExportError(f"the model's forward must take one input (the images), "
                              f"takes {len(inputs)}")
        for node in nodes:
            action = self.plan.get(node)
            if action is None:
                self.env[node] = self.lower_node(node)
            elif action[0] == "binary_conv":
                self.env[node] = self.emit_binary_conv(node, action[1])
            elif action[0] == "alias":
                self.env[node] = self.env[action[1]]
        return self.nodes, self.tensors

    def lower_node(self, node):
        if node.op == "placeholder":
            return "input"
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, torch.fx.Node):
                self.fail(node, "the model must return one tensor (the logits)")
            self.nodes.append({"op": "output", "in": [self.float_arg(node, result)],
                               "out": "output"})
            return "output"
        if node.op == "call_module":
            return self.lower_module(node, self.module(node))
        if node.op in ("call_function", "call_method"):
            return self.lower_function(node)
        self.fail(node, "a tensor used outside a layer: the runtime cannot execute it")

    def lower_module(self, node, m):
        x = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs:
            self.fail(node, "layers must take one tensor")
        name = node.target
        if isinstance(m, _PASS):
            return self.arg(node, x)
        if isinstance(m, QLinear):
            self.fail(node, "binary linear layers do not run in the runtime: keep the last "
                            "linear full precision (ctmq.nn.convert(keep_last=True))")
        if type(m) is nn.Conv2d:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                self.fail(node, f"padding {m.padding!r} ({m.padding_mode}): give zero "
                                "padding as numbers")
            return self.add("conv2d", [self.float_arg(node, x)],
                            weight=self.tensor(f"{name}.weight", m.weight),
                            bias=self.tensor(f"{name}.bias", m.bias) if m.bias is not None else None,
                            stride=list(m.stride), padding=list(m.padding),
                            dilation=list(m.dilation), groups=m.groups)
        if type(m) is nn.BatchNorm2d:
            if not m.track_running_stats or m.running_mean is None:
                self.fail(node, "BatchNorm without running statistics (track_running_stats=False)")
            return self.add("batch_norm", [self.float_arg(node, x)],
                            weight=self.tensor(f"{name}.weight", _affine(m, "weight")),
                            bias=self.tensor(f"{name}.bias", _affine(m, "bias")),
                            mean=self.tensor(f"{name}.running_mean", m.running_mean),
                            var=self.tensor(f"{name}.running_var", m.running_var), eps=m.eps)
        if type(m) is nn.Linear:
            return self.add("linear", [self.float_arg(node, x)],
                            weight=self.tensor(f"{name}.weight", m.weight),
                            bias=self.tensor(f"{name}.bias", m.bias) if m.bias is not None else None)
        if type(m) is nn.MaxPool2d:
            if m.return_indices or m.ceil_mode or _pair(m.dilation) != [1, 1]:
                self.fail(node, "max pool with indices, ceil_mode or dilation")
            return self.add("max_pool2d", [self.float_arg(node, x)], kernel=_pair(m.kernel_size),
                            stride=_pair(m.stride), padding=_pair(m.padding))
        if type(m) is nn.AvgPool2d:
            if m.divisor_override is not None:
                self.fail(node, "average pool with divisor_override")
            return self.add("avg_pool2d", [self.float_arg(node, x)], kernel=_pair(m.kernel_size),
                            stride=_pair(m.stride), padding=_pair(m.padding),
                            ceil_mode=bool(m.ceil_mode),
                            count_include_pad=bool(m.count_include_pad))
        if type(m) is nn.AdaptiveAvgPool2d:
            return self.adaptive_pool(node, x, m.output_size)
        if type(m) is nn.Hardtanh:
            return self.add("hardtanh", [self.float_arg(node, x)], min_val=float(m.min_val),
                            max_val=float(m.max_val))
        if type(m) is nn.ReLU:
            return self.add("relu", [self.float_arg(node, x)])
        if type(m) is nn.PReLU:
            return self.add("prelu", [self.float_arg(node, x)],
                            weight=self.tensor(f"{name}.weight", m.weight))
        if type(m) is RPReLU:
            return self.add("rprelu", [self.float_arg(node, x)],
                            shift_in=self.tensor(f"{name}.shift_in", m.shift_in),
                            weight=self.tensor(f"{name}.weight", m.weight),
                            shift_out=self.tensor(f"{name}.shift_out", m.shift_out))
        if type(m) is nn.Flatten:
            if (m.start_dim, m.end_dim) != (1, -1):
                self.fail(node, "flatten other than from dim 1 to the end")
            return self.flatten(node, x)
        self.fail(node, f"not in the runtime's vocabulary ({_VOCABULARY})")

    def lower_function(self, node):
        fn, args, kw = node.target, node.args, node.kwargs
        if fn in _ADD or (node.op == "call_method" and fn in ("add", "add_")):
            if len(args) != 2 or kw or not all(isinstance(a, torch.fx.Node) for a in args):
                self.fail(node, "only the sum of two tensors runs")
            return self.add("add", [self.float_arg(node, a) for a in args])
        if fn is torch.cat:
            tensors = args[0] if args else kw.get("tensors")
            dim = args[1] if len(args) > 1 else kw.get("dim", 0)
            if dim not in (1, -3) or not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
                self.fail(node, "only concatenation of 2+ tensors along channels (dim=1) runs")
            return self.add("concat", [self.float_arg(node, a) for a in tensors])
        if fn in (torch.flatten, "flatten"):
            start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
            if (start, end) != (1, -1):
                self.fail(node, "flatten other than from dim 1 to the end")
            return self.flatten(node, args[0])
        if fn is F.hardtanh:
            x, lo, hi = _bound(node, "input", "min_val", "max_val")
            return self.add("hardtanh", [self.float_arg(node, x)], min_val=float(lo),
                            max_val=float(hi))
        if fn is F.relu:
            (x,) = _bound(node, "input")
            return self.add("relu", [self.float_arg(node, x)])
        if fn in (torch.relu, "relu") and len(args) == 1 and not kw:
            return self.add("relu", [self.float_arg(node, args[0])])
        if fn is F.adaptive_avg_pool2d:
            return self.adaptive_pool(node, *_bound(node, "input", "output_size"))
        self.fail(node, f"not in the runtime's vocabulary ({_VOCABULARY})")

    def check_in_place(self, nodes):
        """An in-place op (`+=`, add_, an activation with inplace=True) changes
        its operand for every later reader of that tensor, through aliases
        (Identity, Dropout, flatten, views) too; the runtime's nodes write
        new values. Refuse an in-place op whose operand is read after it."""
        order = {n: i for i, n in enumerate(nodes)}
        for node in nodes:
            target = _in_place_operand(node, self.modules)
            if not isinstance(target, torch.fx.Node):
                continue
            root = target
            while isinstance(_alias_of(root, self.modules), torch.fx.Node):
                root = _alias_of(root, self.modules)
            group, stack = set(), [root]
            while stack:  # the root and its aliases, not those made by this node
                value = stack.pop()
                if value in group or value is node:
                    continue
                group.add(value)
                stack += [u for u in value.users if _alias_of(u, self.modules) is value]
            late = [u for v in group for u in v.users if u is not node and order[u] > order[node]]
            if late:
                self.fail(node, f"writes in place into a tensor that {_what(late[0], self.modules)}"
                                f"{_where(late[0])} reads later; the runtime does not write in "
                                "place: use out = out + y, or inplace=False")

    def adaptive_pool(self, node, x, size):
        """Adaptive average pool; a global one whose one reader is a flatten
        is one global_avg_pool node with it."""
        if size is None or (not isinstance(size, int) and None in size):
            self.fail(node, f"output_size {size}: give every output size")
        size = _pair(size)
        if size == [1, 1] and len(node.users) == 1:
            (reader,) = node.users
            if _is_flatten(reader):
                self.plan[reader] = ("alias", node)
                return self.add("global_avg_pool", [self.float_arg(node, x)])
        return self.add("adaptive_avg_pool2d", [self.float_arg(node, x)], output_size=size)

    def flatten(self, node, x):
        return self.add("flatten", [self.float_arg(node, x)])


_VOCABULARY = ("binary QConv2d (+BatchNorm2d), Conv2d, BatchNorm2d, Linear, MaxPool2d, AvgPool2d, "
               "AdaptiveAvgPool2d, Hardtanh, ReLU, PReLU, RSign, RPReLU, Flatten, Identity, "
               "Dropout, +, torch.cat(dim=1), torch.flatten(x, 1)")


def _bound(node, *names):
    """The values of a call's arguments `names` (positional or keyword, with the
    function's defaults), or None where its signature cannot be read."""
    import inspect
    try:
        sig = inspect.signature(node.target)
        bound = sig.bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return [bound.arguments.get(n) for n in names]


def _pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def _affine(bn, key):
    t = getattr(bn, key)
    if t is not None:
        return t
    return torch.ones(bn.num_features) if key == "weight" else torch.zeros(bn.num_features)


_ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten)


def _in_place_operand(node, modules):
    """The tensor an in-place node writes, else None."""
    if node.op == "call_function" and node.target is operator.iadd:
        return node.args[0]
    if node.op == "call_method" and node.target.endswith("_") and node.args:
        return node.args[0]
    if node.op == "call_module" and getattr(modules[node.target], "inplace", False) is True:
        return node.args[0]
    if node.op == "call_function" and node.target in (F.relu, F.hardtanh):
        return node.args[0] if _bound(node, "inplace") == [True] else None
    return None


def _alias_of(node, modules):
    """The tensor that node returns itself or a view of, in eval mode, else None."""
    if node.op == "call_module" and isinstance(modules[node.target], _ALIAS_MODULES):
        return node.args[0]
    if ((node.op == "call_function" and node.target is torch.flatten)
            or (node.op == "call_method" and node.target in ("flatten", "view", "reshape"))):
        return node.args[0]
    return _in_place_operand(node, modules)


def _is_hardtanh(node, modules):
    """A hardtanh to [-1, 1] (sign-preserving), not in place."""
    if node.op == "call_module":
        m = modules[node.target]
        return type(m) is nn.Hardtanh and (m.min_val, m.max_val) == (-1.0, 1.0) and not m.inplace
    if node.op == "call_function" and node.target is F.hardtanh:
        return _bound(node, "min_val", "max_val", "inplace") == [-1.0, 1.0, False]
    return False


def _is_flatten(node):
    if node.op in ("call_function", "call_method") and node.target in (torch.flatten, "flatten"):
        args = list(node.args[1:]) + [node.kwargs.get(k) for k in ("start_dim", "end_dim")
                                      if k in node.kwargs]
        return args in ([1], [1, -1])
    return False


def _add_operands(node, one):
    """The other operand of `node` if it is a two-tensor sum with `one`."""
    if not ((node.op == "call_function" and node.target in _ADD) or
            (node.op == "call_method" and node.target in ("add", "add_"))):
        return None
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, torch.fx.Node)
                                                     for a in node.args):
        return None
    a, b = node.args
    if a is one and b is not one:
        return b
    if b is one and a is not one:
        return a
    return None


def trace(model):
    """The fx graph of model's forward, quantized layers kept as leaves."""
    try:
        return _Tracer().trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, ... on what it cannot follow
        raise ExportError(f"cannot capture {type(model).__name__}'s forward with torch.fx "
                          f"({type(e).__name__}: {e}); the forward must not branch on tensor "
                          "values or shapes") from e


def _architecture(model):
    from .models import zoo_name
    name = zoo_name(model)
    return dict(model.config, name=name) if name else {"name": type(model).__name__}


def export_binary(model, path, input_size=None, mean=None, std=None, class_names=None):
    """Write the W1A1 model to `path` (temp file + rename); returns the header.

    input_size: the image side the model expects (default: 224 for a zoo
    model with the imagenet stem, 32 for the cifar stem; required for other
    models); mean/std: the per-channel input normalization; class_names:
    one per class (default "0", "1", ...)."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    quantized = quantized_layers(model)
    if not quantized:
        raise ExportError("the model has no quantized layers (QConv2d); nothing is binarized")
    wrong = [f"{n} (W{m.w_bits}A{m.a_bits})" for n, m in model.named_modules()
             if m in quantized and (m.w_bits, m.a_bits) != (1, 1)]
    if wrong:
        raise ExportError("the model is not binarized: these layers are not W1A1: " + ", ".join(wrong)
                          + " (ctmq.nn.set_bits(model, 1, 1), or export a W1A1 stage checkpoint)")
    config = getattr(model, "config", None) or {}
    if input_size is None:
        stem = config.get("stem")
        if stem is None:
            raise ExportError("input_size: give the image side the model expects (a model "
                              "outside the zoo does not say)")
        input_size = 224 if stem == "imagenet" else 32
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ExportError(f"input_size must be a positive int, got {input_size!r}")
    was_training = model.training
    model.eval()
    try:
        graph = trace(model)
        nodes, tensors = _Lowering(model, graph).lower()
        channels = config.get("in_channels") or _input_channels(model, graph)
        with torch.no_grad():
            device = next(model.parameters()).device
            logits = model(torch.zeros(1, channels, input_size, input_size, device=device))
    finally:
        model.train(was_training)
    num_classes = logits.shape[-1]
    mean = list(mean) if mean is not None else [0.0] * channels
    std = list(std) if std is not None else [1.0] * channels
    if len(mean) != channels or len(std) != channels:
        raise ExportError(f"mean and std need {channels} values (one per input channel)")
    class_names = (list(class_names) if class_names is not None
                   else [str(i) for i in range(num_classes)])
    if len(class_names) != num_classes:
        raise ExportError(f"class_names has {len(class_names)} names for {num_classes} classes")
    header = {"architecture": _architecture(model),
              "input": {"channels": channels, "size": int(input_size),
                        "mean": [float(v) for v in mean], "std": [float(v) for v in std]},
              "class_names": class_names, "nodes": nodes}
    return write_artifact(path, header, tensors)


def _input_channels(model, graph):
    """The input channels the first layer reading the images expects."""
    modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op == "placeholder":
            for reader in node.users:
                m = modules.get(reader.target) if reader.op == "call_module" else None
                if isinstance(m, nn.Conv2d):
                    return m.in_channels
    raise ExportError("cannot tell the input channels: the images must go to a Conv2d first")
