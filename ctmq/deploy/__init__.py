"""Runtime for binarized networks exported by ctmq.export: reads only the
artifact (safetensors + JSON header, never a pickle) and ctmq's binary ops."""
from ..artifact import ArtifactError, read_artifact
from .runtime import Runtime, load

__all__ = ["ArtifactError", "Runtime", "load", "read_artifact"]
