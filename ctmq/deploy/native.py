"""The native runtime from Python: the C API of csrc/native/ctmq_runtime.h
through ctypes, on NumPy arrays, without torch.

The library is ctmq/_native (built with the package), or the file that the
environment variable CTMQ_NATIVE_LIBRARY names (a libctmq_runtime.so built
with CMake, see the README)."""

import ctypes
import importlib.util
import os

import numpy as np

from ..artifact.errors import ArtifactError

LIBRARY_ENV = "CTMQ_NATIVE_LIBRARY"
_lib = None


def check_image_shape(shape, channels, size):
    """The ValueError of every engine for images not (N, channels, size, size)."""
    want = (channels, size, size)
    if len(shape) != 4 or tuple(shape[1:]) != want:
        raise ValueError(
            f"images must have shape (N, {want[0]}, {want[1]}, {want[2]}) "
            f"(channels, height, width of the exported model), got {tuple(shape)}"
        )


class _Options(ctypes.Structure):
    _fields_ = [("threads", ctypes.c_int), ("cpu_path", ctypes.c_char_p)]


def _library():
    global _lib
    if _lib is not None:
        return _lib
    path = os.environ.get(LIBRARY_ENV)
    if not path:
        spec = importlib.util.find_spec("ctmq._native")
        if spec is None or not spec.origin:
            raise RuntimeError(
                "ctmq's native runtime is not built: reinstall ctmq (it builds "
                f"ctmq/_native), or set {LIBRARY_ENV} to a libctmq_runtime.so"
            )
        path = spec.origin
    lib = ctypes.CDLL(path)
    p, i, f, c = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_char_p
    sigs = {
        "ctmq_version": (c, []),
        "ctmq_open": (p, [c, ctypes.POINTER(_Options), ctypes.c_char_p, ctypes.c_size_t]),
        "ctmq_close": (None, [p]),
        "ctmq_input_channels": (i, [p]),
        "ctmq_input_size": (i, [p]),
        "ctmq_input_mean": (f, [p]),
        "ctmq_input_std": (f, [p]),
        "ctmq_num_classes": (i, [p]),
        "ctmq_class_name": (c, [p, i]),
        "ctmq_cpu_path": (c, [p]),
        "ctmq_run": (i, [p, f, i, f, ctypes.c_char_p, ctypes.c_size_t]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    _lib = lib
    return lib


def _floats(a):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


class NativeRuntime:
    """Callable: runtime(images) -> logits, both NumPy float32; as
    ctmq.deploy.Runtime, with predict() and preprocess()."""

    def __init__(self, path, threads=0, cpu_path="auto"):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads must be an int >= 0 (0: every core), got {threads!r}")
        self._lib = _library()
        err = ctypes.create_string_buffer(1024)
        options = _Options(threads, cpu_path.encode())
        handle = self._lib.ctmq_open(os.fsencode(path), ctypes.byref(options), err, len(err))
        if not handle:
            raise ArtifactError(err.value.decode(errors="replace"))
        self._handle = handle
        lib = self._lib
        self.input_channels = lib.ctmq_input_channels(handle)
        self.input_size = lib.ctmq_input_size(handle)
        self.class_names = [
            lib.ctmq_class_name(handle, k).decode() for k in range(lib.ctmq_num_classes(handle))
        ]
        c = self.input_channels
        self.mean = (
            np.ctypeslib.as_array(lib.ctmq_input_mean(handle), (c,)).copy().reshape(1, c, 1, 1)
        )
        self.std = (
            np.ctypeslib.as_array(lib.ctmq_input_std(handle), (c,)).copy().reshape(1, c, 1, 1)
        )
        self.cpu_path = lib.ctmq_cpu_path(handle).decode()
        self.device = "cpu"
        self.engine = "native"

    def __del__(self):
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self._lib.ctmq_close(handle)

    def check_images(self, images):
        if not isinstance(images, np.ndarray) or not np.issubdtype(images.dtype, np.floating):
            raise TypeError(
                f"images must be a float NumPy array (N, C, H, W), got "
                f"{getattr(images, 'dtype', type(images).__name__)}"
            )
        check_image_shape(images.shape, self.input_channels, self.input_size)

    def __call__(self, images):
        self.check_images(images)
        x = np.ascontiguousarray(images, dtype=np.float32)
        logits = np.empty((x.shape[0], len(self.class_names)), np.float32)
        err = ctypes.create_string_buffer(1024)
        if self._lib.ctmq_run(self._handle, _floats(x), x.shape[0], _floats(logits), err, len(err)):
            raise ValueError(err.value.decode(errors="replace"))
        return logits

    def preprocess(self, pixels):
        """Float pixels in [0, 1] (N, C, H, W) at the model's size -> the normalized input."""
        return ((np.asarray(pixels, np.float32) - self.mean) / self.std).astype(np.float32)

    def predict(self, images, topk=5):
        """(indices, probabilities) of the top-k classes of each image."""
        logits = self(images).astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(topk, probs.shape[1])
        idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return idx, np.take_along_axis(probs, idx, axis=1).astype(np.float32)
