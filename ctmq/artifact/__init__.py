"""The deployable artifact: its file (format.py), its op vocabulary
(vocabulary.py) and its error type. Exported by ctmq.export, run by
ctmq.deploy (and by the native runtime, which reads the same file). The
error type loads without torch; the rest on first use."""

import importlib

from .errors import ArtifactError

_FORMAT = (
    "FORMAT",
    "METADATA_KEY",
    "VERSION",
    "artifact_checksum",
    "check_artifact",
    "check_graph",
    "check_header",
    "read_artifact",
    "write_artifact",
)
_VOCABULARY = ("NODE_INPUTS", "OPS", "OpDef", "Value", "infer_shapes", "read_attrs")

__all__ = ["ArtifactError", *_FORMAT, *_VOCABULARY]


def __getattr__(name):
    if name in _FORMAT:
        module = importlib.import_module(".format", __name__)
    elif name in _VOCABULARY:
        module = importlib.import_module(".vocabulary", __name__)
    else:
        raise AttributeError(f"module 'ctmq.artifact' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value
