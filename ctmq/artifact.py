"""The artifact format, shared by the exporter (ctmq.export) and the runtime
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

Node ops (NODE_INPUTS) and their attributes are described in docs/design.md;
a node's tensor attributes name tensors of the file.
"""
import hashlib
import json
import os
import struct

import torch

from ._io import atomic_open

FORMAT = "ctmq-binary"
VERSION = 2  # 2: relu, prelu, rprelu, concat, flatten, adaptive_avg_pool2d; binary_conv
              # input_bias; conv2d groups; avg_pool2d count_include_pad; hardtanh bounds
METADATA_KEY = "ctmq"

# op -> (min, max) number of inputs
NODE_INPUTS = {
    "conv2d": (1, 1), "batch_norm": (1, 1), "max_pool2d": (1, 1), "avg_pool2d": (1, 1),
    "binary_conv": (1, 2), "add": (2, 2), "concat": (2, 1024), "hardtanh": (1, 1),
    "relu": (1, 1), "prelu": (1, 1), "rprelu": (1, 1), "global_avg_pool": (1, 1),
    "adaptive_avg_pool2d": (1, 1), "flatten": (1, 1), "linear": (1, 1), "output": (1, 1),
}


class ArtifactError(ValueError):
    """A file that is not a valid, intact ctmq artifact; the message says why."""


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
    nothing (temp file + rename); returns the header with its checksum."""
    from safetensors.torch import save
    header = dict(header, format=FORMAT, version=VERSION)
    header.pop("checksum", None)
    check_graph(header)
    header["checksum"] = artifact_checksum(header, tensors)
    blob = save(tensors, metadata={METADATA_KEY: json.dumps(header)})
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
        if not isinstance(op, str) or op not in NODE_INPUTS:
            raise ArtifactError(f"{where}: unknown layer type {op!r}; known: {sorted(NODE_INPUTS)}")
        if not isinstance(out, str) or out in defined:
            raise ArtifactError(f"{where}: its output must be a new value name")
        low, high = NODE_INPUTS[op]
        if (not isinstance(inputs, list) or not low <= len(inputs) <= high
                or not all(isinstance(v, str) for v in inputs)):
            raise ArtifactError(f"{where}: needs {low}..{high} input names, got {inputs!r}")
        undefined = [v for v in inputs if v not in defined]
        if undefined:
            raise ArtifactError(f"{where}: reads {undefined}, not defined by an earlier node")
        if (op == "output") != (i == len(nodes) - 1):
            raise ArtifactError(f"{where}: the graph must end with its one 'output' node")
        if op == "output" and out != "output":
            raise ArtifactError(f"{where}: the output node's value must be named 'output'")
        defined.add(out)


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
        raise ArtifactError(f"{path}: truncated: its header claims {n} bytes, the file has {len(blob) - 8}")
    try:
        meta = json.loads(blob[8:8 + n]).get("__metadata__", {})
        header = json.loads(meta[METADATA_KEY])
        if not isinstance(header, dict):
            raise TypeError("not an object")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path}: no readable ctmq header (corrupt, or not exported by ctmq)") from e
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{path}: format version {version!r} is not a version number")
    if version > VERSION:
        raise ArtifactError(f"{path}: format version {version} is newer than this ctmq reads "
                            f"({VERSION}); upgrade ctmq")
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
    return header, tensors
