"""Runtime for binarized networks exported by ctmq.export: reads only the
artifact (safetensors + JSON header, never a pickle) and ctmq's binary ops."""
from .runtime import ArtifactError, Runtime, load, read_artifact

__all__ = ["ArtifactError", "Runtime", "load", "read_artifact"]
