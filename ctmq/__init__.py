"""ctmq: cyclic training with multiple quantization steps (arXiv 2206.12794)
for low-bit and binarized CNNs, on fused Triton quantizers and XNOR-popcount
kernels.

The submodules load on first use: `import ctmq` itself needs nothing but
Python, so that ctmq.deploy.load(path, engine="native") runs where torch is
not installed."""

import importlib

__version__ = "0.1.0"

_LAZY = {  # public name -> (module, attribute or None for the module itself)
    "ops": ("ctmq.ops", None),
    "quant": ("ctmq.quant", None),
    "force_triton": ("ctmq.backend", "force_triton"),
    "has_extension": ("ctmq.backend", "has_extension"),
    "fake_quant_affine": ("ctmq.quant", "fake_quant_affine"),
    "quantize_act": ("ctmq.quant", "quantize_act"),
    "quantize_weight": ("ctmq.quant", "quantize_weight"),
}

__all__ = [
    "ops",
    "quant",
    "force_triton",
    "has_extension",
    "fake_quant_affine",
    "quantize_act",
    "quantize_weight",
    "__version__",
]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'ctmq' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
