"""ctmq's torch.library ops.

    schemas.py         each op's schema, argument check, fake and autograd
    cpu.py, cuda.py    the device kernels, registered with the dispatcher
    triton_kernels.py  the Triton kernels (ctmq_kernels) as op implementations
    reference.py       the semantics in plain torch calls, on any device
    selection.py       which binary conv kernel runs (thread-local choices)
    extension.py       fakes of the C++ extension's ops
    shapes.py          output shapes and argument checks shared by all of them

CPU tensors run the C++ kernels where csrc has one (the activation quantizer,
its STE backward, the binary ops) and the references otherwise (cpu.py says
which); CUDA tensors run the Triton kernels (float64: the references), and
for the binary conv the kernel ctmq.binary.use_kernel chose; inside
ctmq.force_triton(), CPU tensors run the Triton kernels under the interpreter.
"""

from . import cpu, cuda, extension  # noqa: F401  (registers the device kernels and fakes)
from .layout import dense, is_dense, pack_mask, restride, unpack_mask
from .reference import (
    approx_sign_grad_ref,
    binary_conv2d_ref,
    ctmq_levels,
    fake_quant_affine_ref,
    masked_grad_ref,
    pack_bits_ref,
    quantize_act_ref,
    quantize_weight_grad_ref,
    quantize_weight_ref,
    tap_popcounts,
)
from .schemas import (
    approx_sign_grad,
    binary_conv2d,
    device_kernel,
    fake_quant_affine,
    pack_bits,
    quantize_act,
    quantize_weight,
    quantize_weight_grad,
    ste_masked_grad,
)
from .selection import (
    BMMA_MIN_CAPABILITY,
    binary_backend,
    binary_cpu_path,
    binary_weight_layout,
    bmma_built,
    check_bmma,
    cuda_capability,
)
from .shapes import STE_MODES, VALID_BITS, check_ste, conv_output_size

__all__ = [
    "fake_quant_affine",
    "ste_masked_grad",
    "quantize_act",
    "approx_sign_grad",
    "quantize_weight",
    "quantize_weight_grad",
    "pack_bits",
    "binary_conv2d",
    "device_kernel",
    "ctmq_levels",
    "fake_quant_affine_ref",
    "masked_grad_ref",
    "quantize_act_ref",
    "approx_sign_grad_ref",
    "quantize_weight_ref",
    "quantize_weight_grad_ref",
    "pack_bits_ref",
    "binary_conv2d_ref",
    "tap_popcounts",
    "binary_backend",
    "binary_weight_layout",
    "binary_cpu_path",
    "bmma_built",
    "check_bmma",
    "cuda_capability",
    "BMMA_MIN_CAPABILITY",
    "dense",
    "is_dense",
    "restride",
    "pack_mask",
    "unpack_mask",
    "VALID_BITS",
    "STE_MODES",
    "check_ste",
    "conv_output_size",
]
