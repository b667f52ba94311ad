"""ctmq: cyclic training with multiple quantization steps (arXiv 2206.12794)
for low-bit and binarized CNNs, on fused Triton quantizers and XNOR-popcount
kernels."""
from . import ops, quant
from ._backend import force_triton, has_extension
from .quant import fake_quant_affine, quantize_act, quantize_weight

__version__ = "0.1.0"

__all__ = ["ops", "quant", "force_triton", "has_extension", "fake_quant_affine",
           "quantize_act", "quantize_weight", "__version__"]
