"""Execute an exported binarized ResNet-18 (see ctmq.export for the format).

The runtime walks the artifact's node list: binary convolutions run on ctmq's
XNOR-popcount kernels (C++ on the CPU, Triton on CUDA) with the folded
scale/bias in their epilogue, and pass packed activations to each other where
the graph allows, with the residual add of a shortcut fused into their
epilogue; the full-precision stem, shortcuts and FC run as the same
torch functions the trained model calls, so the logits agree with the model's
eval-mode logits. On CUDA, each batch size is captured once as a CUDA graph so
that small batches are not launch-bound.
"""
import json
import os
import struct
import time

import torch
import torch.nn.functional as F

from .. import binary
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
        self.weights = {}
        for node in header["nodes"]:
            if node["op"] == "binary_conv":
                bits = self.t[node["weight"]]
                self.weights[node["out"]] = binary.PackedWeight(bits, node["in_channels"])
        self._graphs = {}

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
                # a max is exact in any order: channels_last runs torch's fast CPU kernel
                # (NCHW with padding is about 20x slower there); back to NCHW after
                y = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), node["kernel"],
                                 node["stride"], node["padding"]).contiguous()
            elif op == "avg_pool2d":
                y = F.avg_pool2d(x, node["kernel"], node["stride"], 0, node["ceil_mode"], False)
            elif op == "binary_conv":
                y = binary.binary_conv2d(x, self.weights[node["out"]], node["stride"], node["padding"],
                                         node["dilation"], t[node["scale"]], t[node["bias"]],
                                         out=node["output"], residual=args[1] if len(args) > 1 else None)
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
                return self.run(images)
        return self._run_graph(images)

    def _run_graph(self, images):
        # one CUDA graph per batch size: static input, replayed for new inputs
        n = images.shape[0]
        if n not in self._graphs:
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
            self._graphs[n] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[n]
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
