"""Which binary conv kernel runs for a tensor, from its device and the
thread-local choices of ctmq.backend: ctmq.force_triton() (CPU tensors run
the Triton kernels under the interpreter) and ctmq.binary.use_kernel()
(CUDA tensors run the Triton kernel or the binary tensor-core one)."""

from typing import Optional

import torch
from torch import Tensor

from .. import backend
from .reference import tap_popcounts

BMMA_MIN_CAPABILITY = (8, 0)  # mma.sync with b1 operands and .and.popc: Ampere and later
_bmma_built = None
_capability = {}


def bmma_built() -> bool:
    """True when ctmq._C holds the binary tensor-core kernel for CUDA (built
    with nvcc against a CUDA build of torch)."""
    global _bmma_built
    if _bmma_built is None:
        _bmma_built = (
            backend.has_extension()
            and hasattr(torch.ops.ctmq, "binary_conv2d_bmma")
            and torch._C._dispatch_has_kernel_for_dispatch_key("ctmq::binary_conv2d_bmma", "CUDA")
        )
    return _bmma_built


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device, asked once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capability:
        _capability[index] = tuple(torch.cuda.get_device_capability(index))
    return _capability[index]


def check_bmma(device: torch.device):
    """A clear RuntimeError when the tensor-core kernel cannot run on device."""
    if not bmma_built():
        raise RuntimeError(
            "ctmq binary kernel 'bmma' was chosen, but ctmq._C was built without its "
            "CUDA kernels: rebuild with nvcc and a CUDA build of torch (and "
            "CTMQ_SKIP_CUDA_BUILD unset), or use ctmq.binary.use_kernel('triton')"
        )
    capability = cuda_capability(device)
    if capability < BMMA_MIN_CAPABILITY:
        raise RuntimeError(
            f"ctmq binary kernel 'bmma' needs a GPU of compute capability "
            f"{BMMA_MIN_CAPABILITY[0]}.{BMMA_MIN_CAPABILITY[1]} or newer (binary "
            f"tensor cores); {device} is {capability[0]}.{capability[1]}: use "
            f"ctmq.binary.use_kernel('triton')"
        )


def binary_backend(t: Tensor) -> str:
    """ "bmma", "triton" or "cpp": which binary conv kernel runs for tensors on
    t's device. CUDA: the kernel chosen by ctmq.binary.use_kernel (default
    CTMQ_BINARY_KERNEL, else "triton"), checked to run on this device."""
    if t.device.type == "cuda":
        kernel = backend.cuda_binary_kernel()
        if kernel == "bmma":
            check_bmma(t.device)
        return kernel
    if t.device.type == "cpu" and backend.triton_forced():
        return "triton"
    if t.device.type != "cpu":
        raise NotImplementedError(
            f"ctmq's binary kernels run on CPU and CUDA tensors, got a {t.device.type} tensor"
        )
    backend.extension()  # a clear error when ctmq._C is not built
    return "cpp"


def binary_weight_layout(bits: Tensor, backend: str) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(gemm, tap_popc): the weight in the form `backend`'s kernel reads besides
    the bits, made once per weight: the C++ kernel's prepared weight (16
    output channels interleaved per 32-bit word column, and tap popcounts;
    csrc/cpu/binary_conv.h) for "cpp", (None, tap popcounts) for "bmma", (None, None)
    for "triton"."""
    if backend == "cpp":
        return torch.ops.ctmq.binary_weight_gemm(bits.contiguous())
    if backend == "bmma":
        return None, tap_popcounts(bits)
    return None, None


def binary_cpu_path(request: str = "") -> str:
    """The CPU binary kernels' code path: "avx512-vpopcntdq", "avx2" or
    "scalar" on x86-64, "neon" or "scalar" on aarch64. A request caps it
    ("avx2"/"scalar" on x86-64, "neon"/"scalar" on aarch64), "auto" restores
    run-time detection, "" only asks."""
    backend.extension()
    return torch.ops.ctmq.set_cpu_path(request)
