"""Lazy access to the optional backends: Triton kernels and the C++ extension.

`import ctmq` never imports triton nor requires ctmq._C; an op that needs one
of them asks here and gets a RuntimeError that says what is missing and how
to get it.
"""

import contextlib
import importlib
import os
import threading

__all__ = [
    "extension",
    "extension_or_none",
    "has_extension",
    "triton_kernels",
    "force_triton",
    "triton_forced",
    "use_binary_kernel",
    "cuda_binary_kernel",
    "CUDA_BINARY_KERNELS",
    "BINARY_KERNEL_ENV",
]

_state = threading.local()
_cache = {}

# CUDA binary kernels a user can choose (ctmq.binary.use_kernel): the Triton
# XNOR-popcount kernel, or the binary tensor-core (mma.sync b1) kernel of ctmq._C.
CUDA_BINARY_KERNELS = ("triton", "bmma")
BINARY_KERNEL_ENV = "CTMQ_BINARY_KERNEL"
# Read once, at import: the default of use_kernel(); checked when first used.
_ENV_BINARY_KERNEL = os.environ.get(BINARY_KERNEL_ENV, "").strip().lower() or "triton"


def _load(name, hint):
    if name not in _cache:
        try:
            _cache[name] = (importlib.import_module(name), None)
        except Exception as e:  # ImportError, or a broken triton install
            _cache[name] = (None, f"{type(e).__name__}: {e}")
    mod, err = _cache[name]
    if mod is None:
        raise RuntimeError(f"ctmq: this op needs {name}, which failed to import ({err}). {hint}")
    return mod


def triton_kernels(module):
    """ctmq_kernels.<module>, importing triton on first use."""
    return _load(
        f"ctmq_kernels.{module}",
        "Install triton (`pip install triton`); on CPU tensors it runs only "
        "under TRITON_INTERPRET=1, set before triton is first imported.",
    )


def extension():
    """The compiled C++/CUDA extension ctmq._C."""
    return _load(
        "ctmq._C",
        "Build it with `pip install -e .` (needs a C++ compiler and ninja; "
        "CUDA kernels also need nvcc and a CUDA build of torch).",
    )


def extension_or_none():
    """ctmq._C, or None where it is not built."""
    try:
        return extension()
    except RuntimeError:
        return None


def has_extension():
    try:
        extension()
        return True
    except RuntimeError:
        return False


def triton_forced():
    """True when Triton kernels should also run on CPU tensors (interpreter)."""
    forced = getattr(_state, "force_triton", None)
    if forced is None:
        forced = os.environ.get("CTMQ_FORCE_TRITON", "0") not in ("", "0")
    return forced


@contextlib.contextmanager
def force_triton(enabled=True):
    """Run ctmq's Triton kernels on CPU tensors too (needs TRITON_INTERPRET=1).

    The same switch as the environment variable CTMQ_FORCE_TRITON=1; this one
    is scoped to the `with` block and the current thread.
    """
    if enabled and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(
            "force_triton(): Triton runs on CPU tensors only under the "
            "interpreter; set TRITON_INTERPRET=1 before triton is imported"
        )
    with _thread_setting("force_triton", enabled):
        yield


@contextlib.contextmanager
def _thread_setting(name, value):
    """_state.<name> = value for the `with` block, in this thread."""
    previous = getattr(_state, name, None)
    setattr(_state, name, value)
    try:
        yield
    finally:
        setattr(_state, name, previous)


def cuda_binary_kernel():
    """The CUDA binary kernel chosen for this thread: use_kernel()'s, else
    CTMQ_BINARY_KERNEL's value at import, else "triton"."""
    kernel = getattr(_state, "binary_kernel", None) or _ENV_BINARY_KERNEL
    if kernel not in CUDA_BINARY_KERNELS:
        raise ValueError(
            f"{BINARY_KERNEL_ENV} must be one of {CUDA_BINARY_KERNELS}, got {kernel!r}"
        )
    return kernel


def use_binary_kernel(kernel):
    """ctmq.binary.use_kernel's context manager (documented there)."""
    if kernel not in CUDA_BINARY_KERNELS:
        raise ValueError(f"kernel must be one of {CUDA_BINARY_KERNELS}, got {kernel!r}")
    return _thread_setting("binary_kernel", kernel)
