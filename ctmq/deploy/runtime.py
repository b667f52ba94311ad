"""Execute an exported binarized network (the format: ctmq.artifact).

At load, every node of the artifact is checked (its inputs, attributes and
tensors) and lowered to a prepared call; a bad node is an ArtifactError
naming it. Running walks the prepared calls: binary convolutions run on ctmq's
XNOR-popcount kernels (C++ on the CPU; on CUDA the kernel chosen with
ctmq.binary.use_kernel: Triton or the tensor-core kernel) with the folded
scale/bias in their epilogue, and pass packed activations to each other where
the graph allows, with the residual add of a shortcut fused into their
epilogue; the full-precision stem, shortcuts and FC run as the same
torch functions the trained model calls, so the logits agree with the model's
eval-mode logits. On CUDA, each (batch size, binary kernel) is captured once
as a CUDA graph so that small batches are not launch-bound.
"""
import contextlib
import numbers
import time
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .. import _backend, binary, ops
from ..artifact import ArtifactError, check_graph, read_artifact

def _max_pool2d(x, kernel, stride, padding):
    """F.max_pool2d's values, fast on the CPU too: torch's NCHW CPU pool is about
    15x slower than oneDNN's (3.2 vs 0.2 ms for ResNet-18's stem pool at batch 1
    on a 2-core AVX-512 VM, conversions included). A max is exact in any order;
    oneDNN may keep the other zero where +0.0 and -0.0 tie (no later layer can
    tell: sign() maps both to +1, adding either to a nonzero value gives the
    same), and it ignores NaN, which is why the CPU runtime refuses NaN input."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return F.max_pool2d(x, kernel, stride, padding)
    if torch.backends.mkldnn.is_available():
        k, s, p = ([v, v] if isinstance(v, int) else list(v) for v in (kernel, stride, padding))
        return torch.mkldnn_max_pool2d(x.to_mkldnn(), k, s, p).to_dense()
    return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel, stride,
                        padding).contiguous()


@contextlib.contextmanager
def _ieee_fp32():
    """Float32 convs and matmuls in IEEE float32 on CUDA: cuDNN runs float32
    convs in TF32 by default (10-bit mantissa), which would move the FP stem's
    output enough to flip binary activations after it, so CUDA logits would
    drift from the CPU's (and from an fp32 model's). The user's settings are
    restored after."""
    cudnn = torch.backends.cudnn
    saved = cudnn.allow_tf32, torch.get_float32_matmul_precision()
    try:
        cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        cudnn.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def load(path, device="cpu"):
    """The runtime of an artifact on `device` ("cpu" or "cuda")."""
    header, tensors = read_artifact(path)
    return Runtime(header, tensors, device)


class _Step(NamedTuple):
    op: str
    fn: Callable
    inputs: list
    out: str


class _Node:
    """A node's attributes and tensors, read with checks: a missing or
    mistyped one is an ArtifactError naming the node."""

    def __init__(self, node, tensors):
        self.node, self.tensors = node, tensors

    def fail(self, message):
        raise ArtifactError(f"{self.node['op']} node {self.node['out']!r}: {message}")

    def attr(self, key, kind, default=None):
        value = self.node.get(key, default)
        ok = {"int": isinstance(value, numbers.Integral) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "bool": isinstance(value, bool),
              "str": isinstance(value, str)}[kind]
        if not ok:
            self.fail(f"{key} must be {'an' if kind == 'int' else 'a'} {kind}, got {value!r}")
        return value

    def pair(self, key, low, default=None):
        value = self.node.get(key, default)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        try:
            return binary._pair(key, value, low)
        except (TypeError, ValueError) as e:
            self.fail(str(e))

    def tensor(self, key, dims, optional=False, dtype=torch.float32, length=None):
        name = self.node.get(key)
        if name is None and optional:
            return None
        if not isinstance(name, str) or name not in self.tensors:
            self.fail(f"{key} names no tensor of the file: {name!r}")
        t = self.tensors[name]
        if t.dtype != dtype or t.dim() != dims or (length is not None and t.shape[0] != length):
            want = f"{dims}-D {dtype}" + (f" of length {length}" if length is not None else "")
            self.fail(f"{key} ({name}) must be {want}, got {t.dtype} {tuple(t.shape)}")
        return t


def _lower_conv2d(n):
    w = n.tensor("weight", 4)
    b = n.tensor("bias", 1, optional=True, length=w.shape[0])
    stride, padding, dilation = n.pair("stride", 1), n.pair("padding", 0), n.pair("dilation", 1)
    groups = n.attr("groups", "int", 1)
    if groups < 1 or w.shape[0] % groups:
        n.fail(f"groups {groups} does not divide the {w.shape[0]} output channels")
    return lambda x: F.conv2d(x, w, b, stride, padding, dilation, groups)


def _lower_batch_norm(n):
    w = n.tensor("weight", 1)
    b, mean, var = (n.tensor(k, 1, length=w.shape[0]) for k in ("bias", "mean", "var"))
    eps = n.attr("eps", "float")
    return lambda x: F.batch_norm(x, mean, var, w, b, False, 0.0, eps)


def _lower_max_pool2d(n):
    kernel, stride, padding = n.pair("kernel", 1), n.pair("stride", 1), n.pair("padding", 0, 0)
    return lambda x: _max_pool2d(x, kernel, stride, padding)


def _lower_avg_pool2d(n):
    kernel, stride, padding = n.pair("kernel", 1), n.pair("stride", 1), n.pair("padding", 0, 0)
    ceil_mode = n.attr("ceil_mode", "bool", False)
    count_include_pad = n.attr("count_include_pad", "bool", False)
    return lambda x: F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad)


def _lower_binary_conv(n):
    bits = n.tensor("weight", 4, dtype=torch.int32)
    in_channels = n.attr("in_channels", "int")
    if in_channels < 1 or bits.shape[3] != (in_channels + 31) // 32:
        n.fail(f"weight {tuple(bits.shape)} is not packed for {in_channels} input channels")
    weight = binary.PackedWeight(bits, in_channels)
    scale = n.tensor("scale", 1, length=weight.out_channels)
    bias = n.tensor("bias", 1, length=weight.out_channels)
    stride, padding, dilation = n.pair("stride", 1), n.pair("padding", 0), n.pair("dilation", 1)
    output = n.attr("output", "str")
    if output not in ("float", "packed"):
        n.fail(f"output must be 'float' or 'packed', got {output!r}")
    packed = output == "packed"
    input_bias = n.tensor("input_bias", 1, optional=True, length=in_channels)
    if input_bias is not None:
        input_bias = input_bias.view(1, -1, 1, 1)
    spare = in_channels % 32
    if spare:  # the kernels count every bit: clear those past in_channels (no host sync)
        bits = bits.clone()
        bits[..., -1] &= (1 << spare) - 1
        weight = binary.PackedWeight(bits, in_channels)
    name = n.node["out"]
    # inference on tensors of one device: the ops' kernels without the dispatcher
    pack_bits = ops.device_kernel(ops.pack_bits, bits.device.type)
    conv = ops.device_kernel(ops.binary_conv2d, bits.device.type)

    def run(x, residual=None):
        channels = x.channels if isinstance(x, binary.PackedActivation) else x.shape[1]
        if channels != in_channels:  # same word count, other channels: wrong values otherwise
            raise ValueError(f"binary_conv node {name!r} expects {in_channels} input channels, "
                             f"got {channels}")
        if input_bias is not None:  # RSign: the sign of x + bias (the model's own expression)
            if isinstance(x, binary.PackedActivation):
                raise ValueError(f"binary_conv node {name!r} has an input_bias, so it needs "
                                 "float input, got packed bits")
            x = x + input_bias
        xb = x.bits if isinstance(x, binary.PackedActivation) else pack_bits(x)
        gemm, tap_popc = weight.layout_for(bits, ops.binary_backend(xb))
        y = conv(xb, in_channels, bits, gemm, tap_popc, stride, padding, dilation, scale, bias,
                 residual, packed)
        return binary.PackedActivation(y, weight.out_channels) if packed else y
    return run


def _lower_hardtanh(n):
    low, high = n.attr("min_val", "float", -1.0), n.attr("max_val", "float", 1.0)
    if not low < high:
        n.fail(f"min_val ({low}) must be below max_val ({high})")
    return lambda x: F.hardtanh(x, low, high)


def _lower_prelu(n):
    w = n.tensor("weight", 1)
    return lambda x: F.prelu(x, w)


def _lower_rprelu(n):
    """ctmq.nn.RPReLU's forward: prelu(x + shift_in) + shift_out, per channel."""
    w = n.tensor("weight", 1)
    shift_in, shift_out = (n.tensor(k, 1, length=w.shape[0]).view(1, -1, 1, 1)
                           for k in ("shift_in", "shift_out"))
    return lambda x: F.prelu(x + shift_in, w) + shift_out


def _lower_adaptive_avg_pool2d(n):
    size = n.pair("output_size", 1)
    return lambda x: F.adaptive_avg_pool2d(x, size)


def _lower_linear(n):
    w = n.tensor("weight", 2)
    b = n.tensor("bias", 1, optional=True, length=w.shape[0])
    return lambda x: F.linear(x, w, b)


_LOWER = {
    "conv2d": _lower_conv2d,
    "batch_norm": _lower_batch_norm,
    "max_pool2d": _lower_max_pool2d,
    "avg_pool2d": _lower_avg_pool2d,
    "binary_conv": _lower_binary_conv,
    "add": lambda n: torch.add,
    "concat": lambda n: lambda *xs: torch.cat(xs, 1),
    "hardtanh": _lower_hardtanh,
    "relu": lambda n: F.relu,
    "prelu": _lower_prelu,
    "rprelu": _lower_rprelu,
    "global_avg_pool": lambda n: lambda x: torch.flatten(F.adaptive_avg_pool2d(x, 1), 1),
    "adaptive_avg_pool2d": _lower_adaptive_avg_pool2d,
    "flatten": lambda n: lambda x: torch.flatten(x, 1),
    "linear": _lower_linear,
    "output": lambda n: lambda x: x,
}


def _check_input_spec(header):
    spec = header.get("input")

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    def numbers_(v):
        return isinstance(v, list) and all(isinstance(f, (int, float)) and not isinstance(f, bool)
                                           for f in v)
    try:
        channels, size, mean, std = spec["channels"], spec["size"], spec["mean"], spec["std"]
        ok = (count(channels) and count(size) and numbers_(mean) and numbers_(std)
              and len(mean) == len(std) == channels and all(v != 0 for v in std))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ArtifactError(f"input must give channels, size and one nonzero std and one mean per "
                            f"channel, got {spec!r}")
    names = header.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
        raise ArtifactError(f"class_names must be a list of strings, got {names!r}")


class Runtime:
    """Callable: runtime(images) -> logits; runtime.predict(images, topk)."""

    def __init__(self, header, tensors, device="cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: no CUDA device is available here")
        check_graph(header)
        _check_input_spec(header)
        self.header = header
        self.class_names = header["class_names"]
        self.input_channels = header["input"]["channels"]
        self.input_size = header["input"]["size"]
        self.mean = torch.tensor(header["input"]["mean"]).view(1, -1, 1, 1)
        self.std = torch.tensor(header["input"]["std"]).view(1, -1, 1, 1)
        self.t = {k: v.to(self.device) for k, v in tensors.items()}
        self.steps = [_Step(node["op"], _LOWER[node["op"]](_Node(node, self.t)), list(node["in"]),
                            node["out"]) for node in header["nodes"]]
        self._graphs = {}
        self._dry_run()

    def _dry_run(self):
        """Run every node once on an input of the declared size, so that nodes
        that do not fit together (shapes, packed bits where floats are read,
        a kernel's limits) fail here, as an ArtifactError naming the node,
        and not at the first call."""
        shape = (1, self.input_channels, self.input_size, self.input_size)
        env = {"input": torch.zeros(shape, device=self.device)}
        with torch.inference_mode(), \
                _ieee_fp32() if self.device.type == "cuda" else contextlib.nullcontext():
            for step in self.steps:
                try:
                    env[step.out] = step.fn(*[env[i] for i in step.inputs])
                except Exception as e:  # any op's own error, with the node named
                    raise ArtifactError(f"{step.op} node {step.out!r} fails on a {shape} input: "
                                        f"{type(e).__name__}: {e}") from e
        out = env["output"]
        want = (1, len(self.class_names))
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.shape != want:
            raise ArtifactError(f"the graph's output on a {shape} input is "
                                f"{getattr(out, 'shape', type(out).__name__)}, expected float "
                                f"logits of shape {want} (one per class name)")

    # -------------------------------------------------------------- running
    def check_images(self, images):
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"images must be a float tensor (N, C, H, W), got "
                            f"{getattr(images, 'dtype', type(images).__name__)}")
        want = (self.input_channels, self.input_size, self.input_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"images must have shape (N, {want[0]}, {want[1]}, {want[2]}) "
                             f"(channels, height, width of the exported model), got {tuple(images.shape)}")

    def run(self, images, trace=False, timings=None):
        """Logits of normalized images; with trace=True also every node's value;
        timings: a dict to add each op type's seconds to (CPU, synchronous)."""
        with _ieee_fp32() if self.device.type == "cuda" else contextlib.nullcontext():
            return self._run(images, trace, timings)

    def _run(self, images, trace, timings):
        env = {"input": images.to(self.device, torch.float32)}
        for step in self.steps:
            start = time.perf_counter() if timings is not None else 0.0
            env[step.out] = step.fn(*[env[i] for i in step.inputs])
            if timings is not None:
                timings[step.op] = timings.get(step.op, 0.0) + time.perf_counter() - start
        return (env["output"], env) if trace else env["output"]

    def __call__(self, images):
        self.check_images(images)
        if self.device.type != "cuda":
            with torch.inference_mode():
                images = images.to(self.device, torch.float32)
                # _max_pool2d's oneDNN pool ignores NaN where torch's propagates it:
                # refuse what could make one (a CUDA runtime skips this: no sync)
                if not bool(torch.isfinite(images).all()):
                    raise ValueError("images contain NaN or infinite values")
                return self.run(images)
        return self._run_graph(images)

    def _run_graph(self, images):
        # one CUDA graph per batch size and binary kernel (use_kernel): static
        # input, replayed for new inputs
        key = (images.shape[0], _backend.cuda_binary_kernel())
        if key not in self._graphs:
            static_in = images.to(self.device, torch.float32).clone()
            with torch.inference_mode():
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up: Triton compilation, allocator
                        self.run(static_in)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self.run(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(images)
        graph.replay()
        return static_out.clone()

    def preprocess(self, pixels):
        """uint8/float pixels in [0, 1] (N, C, H, W) at the model's size -> normalized input."""
        return (pixels.float() - self.mean) / self.std

    def predict(self, images, topk=5):
        """(indices, probabilities) of the top-k classes of each image."""
        probs = torch.softmax(self(images).float(), dim=1)
        k = min(topk, probs.shape[1])
        p, i = probs.topk(k, dim=1)
        return i.cpu(), p.cpu()
