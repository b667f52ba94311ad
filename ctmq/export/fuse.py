"""Fusion of the binary convolutions: the patterns around a W1A1 QConv2d that
become one binary_conv node, and the checks on in-place ops.

* a QConv2d (W1A1, groups=1, numeric zero padding) whose one reader is a
  BatchNorm2d folds with it (ctmq.nn.fold_binary_conv_bn, the function the
  model's own eval path conv_bn uses, so both compute the same values);
* an RSign read by binary convs alone becomes their input_bias;
* where the conv (or its BN) has one reader and it is a two-tensor sum, the
  other operand becomes the residual and the node is emitted at the sum;
* otherwise, where every reader takes the sign again (binary convs, directly
  or through a [-1, 1] hardtanh: sign(hardtanh(y)) == sign(y)), the conv
  writes packed bits and those hardtanh nodes vanish;
* a conv module called more than once gets its folded tensors per call.
"""

import inspect
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .. import binary
from ..nn import QConv2d, RSign, fold_binary_conv_bn
from ..quant import weight_scale
from .trace import what, where

ADD = (operator.add, operator.iadd, torch.add)
ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten)
_IN_PLACE_FUNCTIONS = (F.relu, F.hardtanh, F.relu6, F.leaky_relu)


def bound(node, *names):
    """The values of a call's arguments `names` (positional or keyword, with the
    function's defaults), or None where its signature cannot be read."""
    try:
        sig = inspect.signature(node.target)
        b = sig.bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    b.apply_defaults()
    return [b.arguments.get(n) for n in names]


def is_hardtanh(node, modules):
    """A hardtanh to [-1, 1] (sign-preserving), not in place."""
    if node.op == "call_module":
        m = modules[node.target]
        return type(m) is nn.Hardtanh and (m.min_val, m.max_val) == (-1.0, 1.0) and not m.inplace
    if node.op == "call_function" and node.target is F.hardtanh:
        return bound(node, "min_val", "max_val", "inplace") == [-1.0, 1.0, False]
    return False


def add_operands(node, one):
    """The other operand of `node` if it is a two-tensor sum with `one`."""
    if not (
        (node.op == "call_function" and node.target in ADD)
        or (node.op == "call_method" and node.target in ("add", "add_"))
    ):
        return None
    if (
        len(node.args) != 2
        or node.kwargs
        or not all(isinstance(a, torch.fx.Node) for a in node.args)
    ):
        return None
    a, b = node.args
    if a is one and b is not one:
        return b
    if b is one and a is not one:
        return a
    return None


def in_place_operand(node, modules):
    """The tensor an in-place node writes, else None."""
    if node.op == "call_function" and node.target is operator.iadd:
        return node.args[0]
    if node.op == "call_method" and node.target.endswith("_") and node.args:
        return node.args[0]
    if node.op == "call_module" and getattr(modules[node.target], "inplace", False) is True:
        return node.args[0]
    if node.op == "call_function" and node.target in _IN_PLACE_FUNCTIONS:
        return node.args[0] if bound(node, "inplace") == [True] else None
    return None


def alias_of(node, modules):
    """The tensor that node returns itself or a view of, in eval mode, else None."""
    if node.op == "call_module" and isinstance(modules[node.target], ALIAS_MODULES):
        return node.args[0]
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target in ("flatten", "view", "reshape")
    ):
        return node.args[0]
    return in_place_operand(node, modules)


def check_in_place(lw, nodes):
    """An in-place op (`+=`, add_, an activation with inplace=True) changes
    its operand for every later reader of that tensor, through aliases
    (Identity, Dropout, flatten, views) too; the runtime's nodes write
    new values. Refuse an in-place op whose operand is read after it."""
    order = {n: i for i, n in enumerate(nodes)}
    for node in nodes:
        target = in_place_operand(node, lw.modules)
        if not isinstance(target, torch.fx.Node):
            continue
        root = target
        while isinstance(alias_of(root, lw.modules), torch.fx.Node):
            root = alias_of(root, lw.modules)
        group, stack = set(), [root]
        while stack:  # the root and its aliases, not those made by this node
            value = stack.pop()
            if value in group or value is node:
                continue
            group.add(value)
            stack += [u for u in value.users if alias_of(u, lw.modules) is value]
        late = [u for v in group for u in v.users if u is not node and order[u] > order[node]]
        if late:
            lw.fail(
                node,
                f"writes in place into a tensor that {what(late[0], lw.modules)}"
                f"{where(late[0])} reads later; the runtime does not write in "
                "place: use out = out + y, or inplace=False",
            )


def is_binary_conv(lw, node):
    return isinstance(lw.module(node), QConv2d)


def takes_sign(lw, node):
    """Every reader of node's value takes its sign: binary convs without an
    input bias, directly or through hardtanh."""
    readers = list(node.users)
    if not readers:
        return False
    for r in readers:
        if is_binary_conv(lw, r):
            continue
        if is_hardtanh(r, lw.modules) and r.users and all(is_binary_conv(lw, u) for u in r.users):
            continue
        return False
    return True


def plan_binary_conv(lw, conv_node):
    """Decide what the binary_conv node of `conv_node` fuses (BN, RSign,
    residual, packed output) and where it is emitted; records it in lw.plan."""
    conv = lw.module(conv_node)
    if conv.groups != 1:
        lw.fail(conv_node, f"groups={conv.groups}: binary convs run with groups=1 only")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        lw.fail(
            conv_node,
            f"padding {conv.padding!r} ({conv.padding_mode}): binary convs "
            "take zero padding given as numbers",
        )
    source = conv_node.args[0]
    input_bias = None
    if isinstance(source, torch.fx.Node) and isinstance(lw.module(source), RSign):
        input_bias, source = lw.module(source), source.args[0]
    tail, bn = conv_node, None
    if len(conv_node.users) == 1:
        (reader,) = conv_node.users
        if type(lw.module(reader)) is nn.BatchNorm2d:
            tail, bn = reader, lw.module(reader)
            if not bn.track_running_stats or bn.running_mean is None:
                lw.fail(reader, "BatchNorm without running statistics (track_running_stats=False)")
            lw.plan[reader] = ("skip",)
    # a conv module called more than once folds differently per call
    name = (
        conv_node.target
        if lw.calls[conv_node.target] == 1
        else f"{conv_node.target}.{conv_node.name}"
    )
    plan = {
        "conv": conv,
        "name": name,
        "source": source,
        "input_bias": input_bias,
        "bn": bn,
        "residual": None,
        "output": "float",
        "node": conv_node,
    }
    emit_at = tail
    if len(tail.users) == 1:
        (reader,) = tail.users
        other = add_operands(reader, tail)
        if other is not None and reader not in lw.plan:  # one conv fused per sum
            plan["residual"], emit_at = other, reader
    if plan["residual"] is None and takes_sign(lw, tail):
        plan["output"] = "packed"
        for r in tail.users:
            if is_hardtanh(r, lw.modules):
                lw.plan[r] = ("alias", emit_at)
    lw.plan[conv_node] = ("skip",)
    lw.plan[emit_at] = ("binary_conv", plan)


def plan_rsign(lw, node):
    if not node.users or not all(is_binary_conv(lw, u) for u in node.users):
        lw.fail(node, "its output must go to binary convs only (it becomes their input bias)")
    lw.plan[node] = ("skip",)


def emit_binary_conv(lw, node, plan):
    """The binary_conv node of a plan, its folded scale and bias."""
    conv, bn, name = plan["conv"], plan["bn"], plan["name"]
    if bn is not None:
        scale, bias = fold_binary_conv_bn(conv, bn)
    else:
        scale = weight_scale(conv.weight.detach().float(), 1)
        bias = (
            conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
        )
    pw = binary.pack_weight(conv.weight.detach().float().cpu())
    x = (
        lw.float_arg(node, plan["source"])
        if plan["input_bias"] is not None
        else lw.arg(node, plan["source"])
    )
    inputs = [x]
    if plan["residual"] is not None:
        inputs.append(lw.float_arg(node, plan["residual"]))
    attrs = {}
    rsign = plan["input_bias"]
    if rsign is not None:
        rsign_name = next(n for n, m in lw.modules.items() if m is rsign)
        attrs["input_bias"] = lw.tensor(f"{rsign_name}.bias", rsign.bias)
    out = lw.add(
        "binary_conv",
        inputs,
        weight=lw.tensor(f"{name}.bits", pw.bits),
        scale=lw.tensor(f"{name}.scale", scale),
        bias=lw.tensor(f"{name}.bias", bias),
        in_channels=conv.in_channels,
        stride=list(conv.stride),
        padding=list(conv.padding),
        dilation=list(conv.dilation),
        output=plan["output"],
        **attrs,
    )
    if plan["output"] == "packed":
        lw.packed.add(out)
    return out
