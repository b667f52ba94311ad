"""Runtime for binarized networks exported by ctmq.export: reads only the
artifact (safetensors + JSON header, never a pickle).

    load(path, device="cpu", engine="auto")

engine "executor" (the compiled executor of ctmq._C, the CPU default) and
"python" (node by node) run on torch and give the trained model's logits bit
for bit; "native" runs the torch-free native runtime (ctmq/_native, the same
library as the C API and ctmq-run) on NumPy arrays, and imports no torch."""

from ..artifact import ArtifactError

ENGINES = ("auto", "executor", "python", "native")

__all__ = ["ArtifactError", "ENGINES", "Runtime", "load", "read_artifact"]


def load(path, device="cpu", engine="auto", **options):
    """The runtime of an artifact on `device` ("cpu" or "cuda"); see the
    module docstring for `engine`. options (native engine): threads,
    cpu_path."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "native":
        if str(device) != "cpu":
            raise ValueError(f"engine 'native' runs on the CPU, got device {device!r}")
        from .native import NativeRuntime

        return NativeRuntime(path, **options)
    if options:
        raise TypeError(f"options {sorted(options)} apply to engine 'native' only")
    from .runtime import load as load_torch

    return load_torch(path, device, engine)


def __getattr__(name):
    if name == "Runtime":
        from .runtime import Runtime

        return Runtime
    if name == "read_artifact":
        from ..artifact import read_artifact

        return read_artifact
    raise AttributeError(f"module 'ctmq.deploy' has no attribute {name!r}")
