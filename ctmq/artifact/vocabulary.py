"""The deployable op vocabulary: one table (OPS) from which the artifact's
checks, the exporter's error messages, the runtime's dispatch, the shape and
size bounds checked at load and the docs' table all come.

Each op is an OpDef: its inputs, its attributes (kind, bounds, default), the
torch layers and functions the exporter turns into it, what it runs, the
artifact version that introduced it, and its output shape. Adding an op is an
entry here plus its two functions: the exporter's (ctmq/export/lower.py) and
the runtime's (ctmq/deploy/ops.py) (and its step in the C++ executor,
csrc/runtime); tests fail while one side lacks it.

Shapes are per image: (C, H, W) for feature maps, (F,) for flat vectors;
`packed` marks a binary conv's packed sign bits (C channels in 32-bit words).
"""

import dataclasses
import numbers
from typing import Callable, Optional

import torch

from .errors import ArtifactError

REQUIRED = object()
MAX_SIDE = 16384  # no image side or spatial size above this
MAX_CHANNELS = 65536
MAX_VALUE_ELEMENTS = 2**28  # one value of one image: 1 GiB of float32


@dataclasses.dataclass(frozen=True)
class Attr:
    """A node attribute. kind: "int", "float", "bool", "str", "pair" (an int or a
    list of one or two ints), "tensor" (names a tensor of the file)."""

    name: str
    kind: str
    default: object = REQUIRED
    low: Optional[float] = None
    high: Optional[float] = None
    choices: tuple = ()
    dims: int = 0  # tensor rank
    dtype: torch.dtype = torch.float32  # tensor dtype
    length: object = None  # tensor length: ("attr", dim) or an int attr's name
    doc: str = ""

    @property
    def optional(self):
        return self.default is None


@dataclasses.dataclass(frozen=True)
class Value:
    """A value's shape per image; packed: sign bits of a binary conv."""

    shape: tuple
    packed: bool = False

    @property
    def spatial(self):
        return len(self.shape) == 3


@dataclasses.dataclass(frozen=True)
class OpDef:
    name: str
    inputs: tuple  # (min, max)
    attrs: tuple  # of Attr
    runs: str  # what the runtime computes (docs)
    exports: str  # the torch layers/functions that become it (docs, errors)
    shape: Callable  # (attrs, [Value]) -> Value; raises ValueError if they do not fit
    check: Optional[Callable] = None  # (attrs) -> error message or None
    since: int = 1  # the artifact version that introduced it
    packed_input: bool = False  # reads a binary conv's packed bits


def _fail(op, node, message):
    raise ArtifactError(f"{op} node {node.get('out')!r}: {message}")


def _pair(value):
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value), int(value))
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    ):
        return tuple(int(v) for v in value)
    return None


def read_attrs(op, node, tensors):
    """The node's attributes checked against op's table entry: {name: value},
    tensors resolved, pairs as (h, w) tuples; an ArtifactError names the node."""
    out = {}
    for a in op.attrs:
        value = node.get(a.name, None if a.default is REQUIRED else a.default)
        if value is None and a.default is REQUIRED:
            _fail(op.name, node, f"{a.name} is missing")
        if value is None:
            out[a.name] = None
            continue
        if a.kind == "tensor":
            out[a.name] = _read_tensor(op, node, a, value, tensors, out)
            continue
        if a.kind == "pair":
            pair = _pair(value)
            if pair is None:
                _fail(
                    op.name,
                    node,
                    f"{a.name} must be an int or a list of one or two ints, got {value!r}",
                )
            value = pair
        ok = {
            "int": isinstance(value, numbers.Integral) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "pair": True,
        }[a.kind]
        if not ok:
            article = "an" if a.kind == "int" else "a"
            _fail(op.name, node, f"{a.name} must be {article} {a.kind}, got {value!r}")
        if a.choices and value not in a.choices:
            _fail(
                op.name,
                node,
                f"{a.name} must be {' or '.join(map(repr, a.choices))}, got {value!r}",
            )
        for v in value if a.kind == "pair" else (value,):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if a.low is not None and v < a.low:
                _fail(op.name, node, f"{a.name} must be >= {a.low:g}, got {value!r}")
            if a.high is not None and v > a.high:
                _fail(op.name, node, f"{a.name} must be <= {a.high:g}, got {value!r}")
        out[a.name] = value
    if op.check is not None:
        message = op.check(out)
        if message:
            _fail(op.name, node, message)
    return out


def _read_tensor(op, node, a, name, tensors, read):
    if not isinstance(name, str) or name not in tensors:
        _fail(op.name, node, f"{a.name} names no tensor of the file: {name!r}")
    t = tensors[name]
    length = None
    if isinstance(a.length, tuple):
        ref = read.get(a.length[0])
        length = ref.shape[a.length[1]] if isinstance(ref, torch.Tensor) else None
    elif isinstance(a.length, str):
        length = read.get(a.length)
    if t.dtype != a.dtype or t.dim() != a.dims or (length is not None and t.shape[0] != length):
        want = f"{a.dims}-D {a.dtype}" + (f" of length {length}" if length is not None else "")
        _fail(op.name, node, f"{a.name} ({name}) must be {want}, got {t.dtype} {tuple(t.shape)}")
    return t


# --------------------------------------------------------------- shapes
def _spatial(ins, what="a feature map (C, H, W)"):
    v = ins[0]
    if not v.spatial:
        raise ValueError(f"needs {what}, got a value of shape {v.shape}")
    return v.shape


def _float(ins):
    if any(v.packed for v in ins):
        raise ValueError("reads packed bits where it needs floats")


def _window(size, kernel, stride, padding, dilation=1, ceil_mode=False):
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = -(-span // stride) + 1 if ceil_mode else span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:  # torch: the last window starts inside
        out -= 1
    if out < 1:
        raise ValueError(
            f"the window ({kernel}, dilation {dilation}) does not fit the padded "
            f"input ({size} + 2 x {padding})"
        )
    return out


def _conv_shape(a, ins):
    _float(ins)
    c, h, w = _spatial(ins)
    weight = a["weight"]
    if c != weight.shape[1] * a["groups"]:
        raise ValueError(f"weight expects {weight.shape[1] * a['groups']} input channels, got {c}")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        weight.shape[2:],
        a["stride"],
        a["padding"],
        a["dilation"],
    )
    return Value((weight.shape[0], _window(h, kh, sh, ph, dh), _window(w, kw, sw, pw, dw)))


def _per_channel_shape(key):
    def shape(a, ins):
        _float(ins)
        c = ins[0].shape[0]
        if a[key].shape[0] not in (c,):
            raise ValueError(f"{key} has {a[key].shape[0]} values for {c} channels")
        return Value(ins[0].shape)

    return shape


def _pool_shape(a, ins):
    _float(ins)
    c, h, w = _spatial(ins)
    (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
    if ph * 2 > kh or pw * 2 > kw:
        raise ValueError(f"padding {a['padding']} must be at most half the kernel {a['kernel']}")
    ceil = a.get("ceil_mode", False)
    return Value((c, _window(h, kh, sh, ph, 1, ceil), _window(w, kw, sw, pw, 1, ceil)))


def _binary_conv_shape(a, ins):
    c, h, w = _spatial(ins)
    if c != a["in_channels"]:
        raise ValueError(f"expects {a['in_channels']} input channels, got {c}")
    if ins[0].packed and a["input_bias"] is not None:
        raise ValueError("has an input_bias, so it needs float input, got packed bits")
    bits = a["weight"]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        bits.shape[1:3],
        a["stride"],
        a["padding"],
        a["dilation"],
    )
    out = Value(
        (bits.shape[0], _window(h, kh, sh, ph, dh), _window(w, kw, sw, pw, dw)),
        packed=a["output"] == "packed",
    )
    if len(ins) == 2:
        if ins[1].packed or ins[1].shape != out.shape:
            raise ValueError(
                f"residual of shape {ins[1].shape} does not match the output {out.shape}"
            )
        if out.packed:
            raise ValueError("a residual with packed output")
    return out


def _same_shapes(a, ins):
    _float(ins)
    if any(v.shape != ins[0].shape for v in ins):
        raise ValueError(f"inputs of different shapes {[v.shape for v in ins]}")
    return Value(ins[0].shape)


def _concat_shape(a, ins):
    _float(ins)
    shapes = [_spatial([v]) for v in ins]
    if any(s[1:] != shapes[0][1:] for s in shapes):
        raise ValueError(f"inputs of different spatial sizes {shapes}")
    return Value((sum(s[0] for s in shapes), *shapes[0][1:]))


def _same(a, ins):
    _float(ins)
    return Value(ins[0].shape)


def _prelu_shape(a, ins):
    _float(ins)
    n, c = a["weight"].shape[0], ins[0].shape[0]
    if n not in (1, c):
        raise ValueError(f"weight has {n} values for {c} channels (1 or one per channel)")
    return Value(ins[0].shape)


def _global_pool_shape(a, ins):
    _float(ins)
    return Value((_spatial(ins)[0],))


def _adaptive_shape(a, ins):
    _float(ins)
    return Value((_spatial(ins)[0], *a["output_size"]))


def _flatten_shape(a, ins):
    _float(ins)
    n = 1
    for s in ins[0].shape:
        n *= s
    return Value((n,))


def _linear_shape(a, ins):
    _float(ins)
    if len(ins[0].shape) != 1 or ins[0].shape[0] != a["weight"].shape[1]:
        raise ValueError(
            f"weight expects {a['weight'].shape[1]} features, got a value of shape {ins[0].shape}"
        )
    return Value((a["weight"].shape[0],))


# ------------------------------------------------------------ the table
def _pair_attr(name, low, default=REQUIRED, high=MAX_SIDE):
    return Attr(name, "pair", default, low=low, high=high)


def _conv_check(a):
    if a["weight"].shape[0] % a["groups"]:
        return f"groups {a['groups']} does not divide the {a['weight'].shape[0]} output channels"
    return None


def _binary_conv_check(a):
    if a["weight"].shape[3] != (a["in_channels"] + 31) // 32:
        return (
            f"weight {tuple(a['weight'].shape)} is not packed for {a['in_channels']} input channels"
        )
    return None


def _hardtanh_check(a):
    return (
        None
        if a["min_val"] < a["max_val"]
        else f"min_val ({a['min_val']}) must be below max_val ({a['max_val']})"
    )


_WINDOW = (_pair_attr("kernel", 1), _pair_attr("stride", 1), _pair_attr("padding", 0, 0))
_CONV_GEOMETRY = (_pair_attr("stride", 1), _pair_attr("padding", 0), _pair_attr("dilation", 1))

OPS = {
    op.name: op
    for op in (
        OpDef(
            "conv2d",
            (1, 1),
            (
                Attr("weight", "tensor", dims=4),
                Attr("bias", "tensor", None, dims=1, length=("weight", 0)),
                *_CONV_GEOMETRY,
                Attr("groups", "int", 1, low=1, high=MAX_CHANNELS),
            ),
            "F.conv2d",
            "nn.Conv2d",
            _conv_shape,
            _conv_check,
        ),
        OpDef(
            "batch_norm",
            (1, 1),
            (
                Attr("weight", "tensor", dims=1),
                *(Attr(k, "tensor", dims=1, length=("weight", 0)) for k in ("bias", "mean", "var")),
                Attr("eps", "float", low=0),
            ),
            "F.batch_norm, eval",
            "nn.BatchNorm2d (running statistics)",
            _per_channel_shape("weight"),
        ),
        OpDef(
            "max_pool2d",
            (1, 1),
            _WINDOW,
            "max pooling",
            "nn.MaxPool2d, F.max_pool2d, torch.max_pool2d",
            _pool_shape,
        ),
        OpDef(
            "avg_pool2d",
            (1, 1),
            (*_WINDOW, Attr("ceil_mode", "bool", False), Attr("count_include_pad", "bool", False)),
            "F.avg_pool2d",
            "nn.AvgPool2d, F.avg_pool2d",
            _pool_shape,
        ),
        OpDef(
            "binary_conv",
            (1, 2),
            (
                Attr("weight", "tensor", dims=4, dtype=torch.int32),
                Attr("in_channels", "int", low=1, high=MAX_CHANNELS),
                Attr("scale", "tensor", dims=1, length=("weight", 0)),
                Attr("bias", "tensor", dims=1, length=("weight", 0)),
                *_CONV_GEOMETRY,
                Attr("output", "str", choices=("float", "packed")),
                Attr("input_bias", "tensor", None, dims=1, length="in_channels"),
            ),
            "packs its input (plus input_bias), XNOR-popcount conv, * scale + bias (+ the "
            "residual), float or packed sign bits",
            "a W1A1 ctmq.nn.QConv2d (+ BatchNorm2d, + RSign before, + a residual add after)",
            _binary_conv_shape,
            _binary_conv_check,
            packed_input=True,
        ),
        OpDef("add", (2, 2), (), "x + y", "+, torch.add, .add", _same_shapes),
        OpDef(
            "concat",
            (2, 1024),
            (),
            "torch.cat along channels",
            "torch.cat(dim=1)",
            _concat_shape,
            since=2,
        ),
        OpDef(
            "hardtanh",
            (1, 1),
            (Attr("min_val", "float", -1.0), Attr("max_val", "float", 1.0)),
            "F.hardtanh",
            "nn.Hardtanh, F.hardtanh, nn.ReLU6, F.relu6",
            _same,
            _hardtanh_check,
        ),
        OpDef("relu", (1, 1), (), "F.relu", "nn.ReLU, F.relu, torch.relu", _same, since=2),
        OpDef(
            "prelu",
            (1, 1),
            (Attr("weight", "tensor", dims=1),),
            "F.prelu",
            "nn.PReLU",
            _prelu_shape,
            since=2,
        ),
        OpDef(
            "rprelu",
            (1, 1),
            (
                Attr("shift_in", "tensor", dims=1, length=("weight", 0)),
                Attr("weight", "tensor", dims=1),
                Attr("shift_out", "tensor", dims=1, length=("weight", 0)),
            ),
            "F.prelu(x + shift_in, weight) + shift_out, per channel",
            "ctmq.nn.RPReLU",
            _per_channel_shape("weight"),
            since=2,
        ),
        OpDef(
            "leaky_relu",
            (1, 1),
            (Attr("negative_slope", "float", 0.01),),
            "F.leaky_relu",
            "nn.LeakyReLU, F.leaky_relu",
            _same,
            since=3,
        ),
        OpDef(
            "global_avg_pool",
            (1, 1),
            (),
            "adaptive_avg_pool2d(x, 1), flattened",
            "AdaptiveAvgPool2d(1) + flatten",
            _global_pool_shape,
        ),
        OpDef(
            "adaptive_avg_pool2d",
            (1, 1),
            (_pair_attr("output_size", 1, high=4096),),
            "F.adaptive_avg_pool2d",
            "nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d",
            _adaptive_shape,
            since=2,
        ),
        OpDef(
            "flatten",
            (1, 1),
            (),
            "torch.flatten(x, 1)",
            "nn.Flatten, torch.flatten(x, 1), x.flatten(1), x.view/reshape(x.size(0), -1)",
            _flatten_shape,
            since=2,
        ),
        OpDef(
            "linear",
            (1, 1),
            (
                Attr("weight", "tensor", dims=2),
                Attr("bias", "tensor", None, dims=1, length=("weight", 0)),
            ),
            "F.linear",
            "nn.Linear, F.linear",
            _linear_shape,
        ),
        OpDef("output", (1, 1), (), "the logits", "the model's return value", _same),
    )
}

# op -> (min, max) number of inputs
NODE_INPUTS = {name: op.inputs for name, op in OPS.items()}
# what the exporter turns into nodes, for its error messages
EXPORTS = ", ".join(op.exports for op in OPS.values() if op.name != "output")


def required_version(nodes):
    """The oldest artifact version that knows every op of `nodes`."""
    return max(OPS[n["op"]].since for n in nodes)


def infer_shapes(header, tensors, batch=1):
    """Check every node's attributes and that the nodes fit together, from the
    declared input on, and bound every value's size before anything is
    allocated; returns {value name: Value}. An ArtifactError names the node."""
    spec = header["input"]
    values = {"input": Value((spec["channels"], spec["size"], spec["size"]))}
    for node in header["nodes"]:
        op = OPS[node["op"]]
        attrs = read_attrs(op, node, tensors)
        ins = [values[v] for v in node["in"]]
        try:
            out = op.shape(attrs, ins)
        except ValueError as e:
            image = (batch, *values["input"].shape)
            _fail(op.name, node, f"fails on a {image} input: {e}")
        elements = batch
        for s in out.shape:
            elements *= s
        if elements > MAX_VALUE_ELEMENTS or any(s < 1 for s in out.shape):
            _fail(
                op.name,
                node,
                f"its output {out.shape} per image is not a plausible size "
                f"(at most {MAX_VALUE_ELEMENTS} elements)",
            )
        values[node["out"]] = out
    return values


def markdown_table():
    """The vocabulary as the docs' table (docs/design.md holds this text)."""

    def attr(a):
        kind = {"tensor": f"{a.dims}-D {str(a.dtype).removeprefix('torch.')}"}.get(a.kind, a.kind)
        bound = ""
        if a.low is not None:
            bound = (
                f" >= {a.low:g}"
                if a.high in (None, MAX_SIDE, MAX_CHANNELS)
                else f" in [{a.low:g}, {a.high:g}]"
            )
        extra = f" ({'/'.join(a.choices)})" if a.choices else ""
        default = (
            ""
            if a.default is REQUIRED
            else (", optional" if a.default is None else f", default {a.default}")
        )
        return f"`{a.name}` {kind}{bound}{extra}{default}"

    lines = [
        "| op | inputs | attributes | runs | exported from | since |",
        "|---|---|---|---|---|---|",
    ]
    for op in OPS.values():
        low, high = op.inputs
        n = str(low) if low == high else f"{low}-{high}"
        attrs = "; ".join(attr(a) for a in op.attrs) or "none"
        lines.append(f"| `{op.name}` | {n} | {attrs} | {op.runs} | {op.exports} | {op.since} |")
    return "\n".join(lines)


def cpp_table():
    """The table as C++ (csrc/runtime/vocabulary.inc, which the native loader
    checks attributes with); `python -m ctmq.artifact.vocabulary` prints it,
    and a test keeps the file equal to it."""
    kinds = {
        "int": "kInt",
        "float": "kFloat",
        "bool": "kBool",
        "str": "kStr",
        "pair": "kPair",
        "tensor": "kTensor",
    }
    lines = [
        "// The artifact's op vocabulary (ctmq/artifact/vocabulary.py, OPS), generated by",
        "// `python -m ctmq.artifact.vocabulary`; a test keeps it equal. Do not edit.",
        "",
    ]

    def num(v):
        return "NAN" if v is None else repr(float(v))

    def default(a):
        if a.default is REQUIRED:
            return 'Default::kRequired, 0, ""'
        if a.default is None:
            return 'Default::kNone, 0, ""'
        if isinstance(a.default, bool):
            return f'Default::kValue, {int(a.default)}, ""'
        if isinstance(a.default, (int, float)):
            return f'Default::kValue, {float(a.default)!r}, ""'
        return f"Default::kValue, 0, {a.default!r}"

    for op in OPS.values():
        lines.append(f"static const AttrSpec k_{op.name}_attrs[] = {{")
        for a in op.attrs:
            if isinstance(a.length, tuple):
                length = f'"{a.length[0]}", {a.length[1]}'
            elif isinstance(a.length, str):
                length = f'"{a.length}", -1'
            else:
                length = '"", 0'
            choices = "|".join(a.choices)
            dtype = "DType::kInt32" if a.dtype == torch.int32 else "DType::kFloat32"
            lines.append(
                f'    {{"{a.name}", AttrKind::{kinds[a.kind]}, {default(a)}, {num(a.low)}, '
                f'{num(a.high)}, "{choices}", {a.dims}, {dtype}, {length}}},'
            )
        if not op.attrs:
            lines.append(
                '    {"", AttrKind::kNone, Default::kRequired, 0, "", NAN, NAN, "", 0, '
                'DType::kFloat32, "", 0},'
            )
        lines.append("};")
    lines.append("")
    lines.append("static const OpSpec kOps[] = {")
    for op in OPS.values():
        lines.append(
            f'    {{"{op.name}", {op.inputs[0]}, {op.inputs[1]}, k_{op.name}_attrs, '
            f"{len(op.attrs)}, {op.since}}},"
        )
    lines.append("};")
    lines.append(f"static const int kMaxSide = {MAX_SIDE};")
    lines.append(f"static const int kMaxChannels = {MAX_CHANNELS};")
    lines.append(f"static const int64_t kMaxValueElements = {MAX_VALUE_ELEMENTS};")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(cpp_table(), end="")
