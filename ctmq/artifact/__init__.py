"""The deployable artifact: its file (format.py), its op vocabulary
(vocabulary.py) and its error type. Exported by ctmq.export, run by
ctmq.deploy (and by the native runtime, which reads the same file)."""
from .errors import ArtifactError
from .format import (FORMAT, METADATA_KEY, VERSION, artifact_checksum, check_artifact, check_graph,
                     check_header, read_artifact, write_artifact)
from .vocabulary import NODE_INPUTS, OPS, OpDef, Value, infer_shapes, read_attrs

__all__ = ["ArtifactError", "FORMAT", "METADATA_KEY", "NODE_INPUTS", "OPS", "OpDef", "VERSION",
           "Value", "artifact_checksum", "check_artifact", "check_graph", "check_header",
           "infer_shapes", "read_artifact", "read_attrs", "write_artifact"]
