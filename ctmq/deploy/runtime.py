"""Execute an exported binarized ResNet-18 (see ctmq.export for the format).

The runtime walks the artifact's node list: binary convolutions run on ctmq's
XNOR-popcount kernels (C++ on the CPU; on CUDA the kernel chosen with
ctmq.binary.use_kernel: Triton or the tensor-core kernel) with the folded
scale/bias in their epilogue, and pass packed activations to each other where
the graph allows, with the residual add of a shortcut fused into their
epilogue; the full-precision stem, shortcuts and FC run as the same
torch functions the trained model calls, so the logits agree with the model's
eval-mode logits. On CUDA, each batch size is captured once as a CUDA graph so
that small batches are not launch-bound.
"""
import contextlib
import json
import os
import struct
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import _backend, binary, ops
from ..export import FORMAT, VERSION, artifact_checksum

KNOWN_OPS = {"conv2d", "batch_norm", "max_pool2d", "avg_pool2d", "binary_conv", "add", "hardtanh",
             "global_avg_pool", "linear", "output"}


class ArtifactError(ValueError):
    """A file that is not a valid, intact ctmq artifact; the message says why."""


def read_artifact(path):
    """(header, tensors) of an artifact, checked: format, version, nodes, checksum."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror})") from e
    if len(blob) < 8:
        raise ArtifactError(f"{path}: truncated ({len(blob)} bytes): not a ctmq artifact")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise ArtifactError(f"{path}: truncated: its header claims {n} bytes, the file has {len(blob) - 8}")
    try:
        meta = json.loads(blob[8:8 + n]).get("__metadata__", {})
        header = json.loads(meta["ctmq"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path}: no readable ctmq header (corrupt, or not exported by ctmq)") from e
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    version = header.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ArtifactError(f"{path}: format version {version} is newer than this ctmq reads "
                            f"({VERSION}); upgrade ctmq")
    unknown = sorted({nd.get("op") for nd in header.get("nodes", [])} - KNOWN_OPS)
    if unknown:
        raise ArtifactError(f"{path}: unknown layer type(s) {unknown}; known: {sorted(KNOWN_OPS)}")
    from safetensors.torch import load as load_bytes
    try:
        tensors = load_bytes(blob)
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(f"{path}: corrupt tensor data ({e})") from e
    if artifact_checksum(header, tensors) != header.get("checksum"):
        raise ArtifactError(f"{path}: checksum mismatch: the file was changed or damaged")
    return header, tensors


class _BinaryNode(NamedTuple):
    weight: binary.PackedWeight
    stride: list
    padding: list
    dilation: list
    scale: torch.Tensor
    bias: torch.Tensor
    packed: bool


def _max_pool2d(x, kernel, stride, padding):
    """F.max_pool2d's values, fast on the CPU too: torch's NCHW CPU pool is about
    15x slower than oneDNN's (3.2 vs 0.2 ms for ResNet-18's stem pool at batch 1
    on a 2-core AVX-512 VM, conversions included). A max is exact in any order;
    oneDNN may keep the other zero where +0.0 and -0.0 tie (no later layer can
    tell: sign() maps both to +1, adding either to a nonzero value gives the
    same), and it ignores NaN, which is why the CPU runtime refuses NaN input.
    A home-made NCHW pool in torch's exact order was tried: 2x slower than this."""
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


class Runtime:
    """Callable: runtime(images) -> logits; runtime.predict(images, topk)."""

    def __init__(self, header, tensors, device="cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: no CUDA device is available here")
        self.header = header
        self.class_names = header["class_names"]
        self.input_channels = header["input"]["channels"]
        self.input_size = header["input"]["size"]
        self.mean = torch.tensor(header["input"]["mean"]).view(1, -1, 1, 1)
        self.std = torch.tensor(header["input"]["std"]).view(1, -1, 1, 1)
        self.t = {k: v.to(self.device) for k, v in tensors.items()}
        self.binary_nodes = {node["out"]: self._prepare_binary(node) for node in header["nodes"]
                             if node["op"] == "binary_conv"}
        self._graphs = {}

    def _prepare_binary(self, node):
        """A binary conv node's arguments, checked once here so that run() can
        call the kernel without per-call checks (about 14 us a layer on a CPU)."""
        try:
            bits = self.t[node["weight"]]
            weight = binary.PackedWeight(bits, int(node["in_channels"]))
            if bits.dtype != torch.int32 or bits.dim() != 4 or bits.shape[3] != (weight.in_channels + 31) // 32:
                raise ValueError(f"weight {tuple(bits.shape)} {bits.dtype} is not packed for "
                                 f"{weight.in_channels} input channels")
            scale, bias = self.t[node["scale"]], self.t[node["bias"]]
            for name, v in (("scale", scale), ("bias", bias)):
                if v.dtype != torch.float32 or tuple(v.shape) != (weight.out_channels,):
                    raise ValueError(f"{name} must be float32 ({weight.out_channels},), got "
                                     f"{v.dtype} {tuple(v.shape)}")
            if node["output"] not in ("float", "packed"):
                raise ValueError(f"output must be 'float' or 'packed', got {node['output']!r}")
            return _BinaryNode(weight, binary._pair("stride", node["stride"], 1),
                               binary._pair("padding", node["padding"], 0),
                               binary._pair("dilation", node["dilation"], 1), scale, bias,
                               node["output"] == "packed")
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"binary_conv node {node.get('out')!r}: {e}") from e

    @staticmethod
    def _binary_conv(spec, x, residual):
        xb = x.bits if isinstance(x, binary.PackedActivation) else ops.pack_bits(x)
        w = spec.weight
        gemm, tap_popc = w.layout_for(w.bits, ops.binary_backend(xb))
        if residual is not None:
            residual = residual.contiguous()
        y = ops.binary_conv2d(xb, w.in_channels, w.bits, gemm, tap_popc, spec.stride, spec.padding,
                              spec.dilation, spec.scale, spec.bias, residual, spec.packed)
        return binary.PackedActivation(y, w.out_channels) if spec.packed else y

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
        t = self.t
        for node in self.header["nodes"]:
            start = time.perf_counter() if timings is not None else 0.0
            op, args = node["op"], [env[i] for i in node["in"]]
            x = args[0]
            if op == "conv2d":
                y = F.conv2d(x, t[node["weight"]], t[node["bias"]] if node["bias"] else None,
                             node["stride"], node["padding"], node["dilation"])
            elif op == "batch_norm":
                y = F.batch_norm(x, t[node["mean"]], t[node["var"]], t[node["weight"]],
                                 t[node["bias"]], False, 0.0, node["eps"])
            elif op == "max_pool2d":
                y = _max_pool2d(x, node["kernel"], node["stride"], node["padding"])
            elif op == "avg_pool2d":
                y = F.avg_pool2d(x, node["kernel"], node["stride"], 0, node["ceil_mode"], False)
            elif op == "binary_conv":
                y = self._binary_conv(self.binary_nodes[node["out"]], x,
                                      args[1] if len(args) > 1 else None)
            elif op == "add":
                y = x + args[1]
            elif op == "hardtanh":
                y = F.hardtanh(x)
            elif op == "global_avg_pool":
                y = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
            elif op == "linear":
                y = F.linear(x, t[node["weight"]], t[node["bias"]])
            else:  # output
                y = x
            env[node["out"]] = y
            if timings is not None:
                timings[op] = timings.get(op, 0.0) + time.perf_counter() - start
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
