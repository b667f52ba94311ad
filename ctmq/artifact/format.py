"""The artifact file, shared by the exporter (ctmq.export) and the runtime
(ctmq.deploy): one safetensors file whose metadata key "ctmq" holds a JSON
header. Loading it never unpickles anything.

Header:
    format, version   FORMAT, VERSION below
    architecture      what the model was (name and constructor arguments)
    input             {"channels", "size", "mean", "std"}
    class_names       one per output logit
    nodes             the graph, in execution order: {"op", "in": [value
                      names], "out": value name, ...attributes}; "input" is
                      the image batch, the last node is "output"
    checksum          artifact_checksum(header, tensors)

Node ops, their inputs and attributes are the table of ctmq.artifact.vocabulary;
a node's tensor attributes name tensors of the file. Writing and reading
check the same things (check_artifact), so that no artifact is written that
loading refuses.
"""

import hashlib
import json
import math
import os
import struct

import torch

from ..files import atomic_open
from .errors import ArtifactError
from .vocabulary import (
    MAX_CHANNELS,
    MAX_SIDE,
    MAX_VALUE_ELEMENTS,
    OPS,
    infer_shapes,
    required_version,
)

FORMAT = "ctmq-binary"
# 2: relu, prelu, rprelu, concat, flatten, adaptive_avg_pool2d; binary_conv input_bias;
#    conv2d groups; avg_pool2d count_include_pad; hardtanh bounds
# 3: leaky_relu
# A file records the oldest version that reads it: 2, or the newest `since` of its ops.
VERSION = 3
METADATA_KEY = "ctmq"
MAX_CLASSES = 1_000_000
# The native loader's JSON limits (csrc/runtime/json.h), kept here so that no
# artifact is written that one loader reads and the other refuses: each JSON
# text (the safetensors header, the ctmq header in it) at most this long, and
# no value nested this deep (the outermost value is at depth 0).
MAX_HEADER_BYTES = 64 << 20
MAX_HEADER_DEPTH = 64


def _too_deep(value):
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if depth >= MAX_HEADER_DEPTH:
            return True
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
    return False


def artifact_checksum(header, tensors):
    """sha256 over the header (all but its checksum, canonical JSON) and the
    names, dtypes, shapes and bytes of the tensors, in name order."""
    h = hashlib.sha256()
    body = {k: v for k, v in header.items() if k != "checksum"}
    h.update(json.dumps(body, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_artifact(path, header, tensors):
    """Write header (without its checksum) and CPU tensors to `path`, all or
    nothing (temp file + rename), after the checks that reading applies;
    returns the header with its checksum."""
    from safetensors.torch import save

    header = dict(header, format=FORMAT)
    header.pop("checksum", None)
    if _too_deep(header):
        raise ArtifactError(f"the header nests deeper than {MAX_HEADER_DEPTH} levels")
    check_graph(header)
    # never below 2: version 1 readers would ignore attributes that version 2 added
    header["version"] = max(2, required_version(header["nodes"]))
    check_artifact(header, tensors)
    header["checksum"] = artifact_checksum(header, tensors)
    text = json.dumps(header)
    blob = save(tensors, metadata={METADATA_KEY: text})
    (n,) = struct.unpack("<Q", blob[:8])
    if max(n, len(text.encode())) > MAX_HEADER_BYTES:
        raise ArtifactError(
            f"the header is {n} bytes, over the {MAX_HEADER_BYTES} that the loaders read"
        )
    with atomic_open(path, "wb") as f:
        f.write(blob)
    return header


def check_graph(header):
    """The header's graph is well formed: known ops with the right number of
    inputs, every input defined before use, each value defined once, and one
    output node, last. Node attributes are checked where they are used (the
    runtime's lowering)."""
    nodes = header.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise ArtifactError("the header has no node list")
    defined = {"input"}
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise ArtifactError(f"node {i} is not an object")
        op, out, inputs = node.get("op"), node.get("out"), node.get("in")
        where = f"node {i} ({op!r} -> {out!r})"
        if not isinstance(op, str) or op not in OPS:
            raise ArtifactError(f"{where}: unknown layer type {op!r}; known: {sorted(OPS)}")
        if not isinstance(out, str) or out in defined:
            raise ArtifactError(f"{where}: its output must be a new value name")
        if OPS[op].since > header.get("version", VERSION):
            raise ArtifactError(
                f"{where}: {op} needs format version {OPS[op].since}, the file "
                f"says {header.get('version')}"
            )
        low, high = OPS[op].inputs
        if (
            not isinstance(inputs, list)
            or not low <= len(inputs) <= high
            or not all(isinstance(v, str) for v in inputs)
        ):
            raise ArtifactError(f"{where}: needs {low}..{high} input names, got {inputs!r}")
        undefined = [v for v in inputs if v not in defined]
        if undefined:
            raise ArtifactError(f"{where}: reads {undefined}, not defined by an earlier node")
        if (op == "output") != (i == len(nodes) - 1):
            raise ArtifactError(f"{where}: the graph must end with its one 'output' node")
        if op == "output" and out != "output":
            raise ArtifactError(f"{where}: the output node's value must be named 'output'")
        defined.add(out)


def _count(v, high):
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= high


def _numbers(v):
    return isinstance(v, list) and all(
        isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) for f in v
    )


def check_header(header):
    """The header's input description and class names are usable: channels,
    size, one finite mean and one finite nonzero std per channel, a sensible
    input size (bounded before anything is allocated), class names as strings."""
    spec = header.get("input")
    try:
        channels, size, mean, std = spec["channels"], spec["size"], spec["mean"], spec["std"]
        ok = (
            _count(channels, MAX_CHANNELS)
            and _count(size, MAX_SIDE)
            and _numbers(mean)
            and _numbers(std)
            and len(mean) == len(std) == channels
            and all(v != 0 for v in std)
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ArtifactError(
            f"input must give channels (1..{MAX_CHANNELS}), size (1..{MAX_SIDE}) "
            f"and one mean and one nonzero std per channel (finite numbers), got "
            f"{_short(spec)}"
        )
    if channels * size * size > MAX_VALUE_ELEMENTS:
        raise ArtifactError(
            f"input {channels}x{size}x{size} is not a plausible image size "
            f"(at most {MAX_VALUE_ELEMENTS} values)"
        )
    names = header.get("class_names")
    if (
        not isinstance(names, list)
        or not 1 <= len(names) <= MAX_CLASSES
        or not all(isinstance(c, str) for c in names)
    ):
        raise ArtifactError(f"class_names must be a list of strings, got {_short(names)}")


def _short(value):
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def check_artifact(header, tensors):
    """Everything loading checks before it runs the graph: the graph, the
    input description and class names, every node's attributes and tensors,
    and that the nodes fit together from the declared input to logits of one
    value per class; returns {value: Value}."""
    check_graph(header)
    check_header(header)
    values = infer_shapes(header, tensors)
    logits = values["output"]
    if logits.packed or logits.shape != (len(header["class_names"]),):
        raise ArtifactError(
            f"the graph's output per image is {logits.shape}"
            f"{' (packed bits)' if logits.packed else ''}, expected "
            f"{len(header['class_names'])} logits (one per class name)"
        )
    return values


def read_artifact(path):
    """(header, tensors) of an artifact, checked: format, version, graph, checksum."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror})") from e
    if len(blob) < 8:
        raise ArtifactError(f"{path}: truncated ({len(blob)} bytes): not a ctmq artifact")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise ArtifactError(
            f"{path}: truncated: its header claims {n} bytes, the file has {len(blob) - 8}"
        )
    try:
        if n > MAX_HEADER_BYTES:
            raise ValueError("longer than the loaders read")
        outer = json.loads(blob[8 : 8 + n])
        text = outer["__metadata__"][METADATA_KEY]
        if len(text.encode()) > MAX_HEADER_BYTES:
            raise ValueError("longer than the loaders read")
        header = json.loads(text)
        if not isinstance(header, dict) or _too_deep(outer) or _too_deep(header):
            raise TypeError("not an object, or nested too deep")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        # (RecursionError: a header nested deeper than Python's parser goes)
        raise ArtifactError(
            f"{path}: no readable ctmq header (corrupt, or not exported by ctmq)"
        ) from None
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{path}: format version {version!r} is not a version number")
    if version > VERSION:
        raise ArtifactError(
            f"{path}: format version {version} is newer than this ctmq reads "
            f"({VERSION}); upgrade ctmq"
        )
    try:
        check_graph(header)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None
    from safetensors.torch import load as load_bytes

    try:
        tensors = load_bytes(blob)
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(f"{path}: corrupt tensor data ({e})") from e
    if artifact_checksum(header, tensors) != header.get("checksum"):
        raise ArtifactError(f"{path}: checksum mismatch: the file was changed or damaged")
    try:
        check_artifact(header, tensors)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None
    return header, tensors
