"""Test setup: without a GPU, Triton kernels run on CPU tensors in the
interpreter, which must be switched on before triton is first imported."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ctmq  # noqa: E402  (after TRITON_INTERPRET)


def _triton_usable():
    try:
        ctmq.backend.triton_kernels("quant")
        return True
    except RuntimeError:
        return False


@pytest.fixture
def triton_device():
    """Where the Triton kernels run here: CUDA, else CPU under the interpreter."""
    if not _triton_usable():
        pytest.skip("triton is not installed")
    if HAS_CUDA:
        yield "cuda"
        return
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no GPU and TRITON_INTERPRET is off")
    with ctmq.force_triton():
        yield "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
