"""Execute an exported binarized network (the format: ctmq.artifact).

At load, the artifact is checked whole (ctmq.artifact.check_artifact: every
node's inputs, attributes and tensors, and the shapes from the declared input
to the logits, bounded before anything is allocated) and every node is
lowered to a prepared call (ctmq.deploy.ops); a bad node is an ArtifactError
naming it. Running walks the prepared calls: binary convolutions pass packed
activations to each other where the graph allows, with the residual add of a
shortcut fused into their epilogue; the full-precision stem, shortcuts and FC
run as the same torch functions the trained model calls, so the logits agree
with the model's eval-mode logits. On CUDA, each (batch size, binary kernel)
is captured once as a CUDA graph so that small batches are not launch-bound.
"""

import contextlib
import json
import time
from typing import Callable, NamedTuple

import torch

from .. import backend
from ..artifact import ArtifactError, check_artifact, read_artifact, read_attrs
from ..artifact.vocabulary import OPS
from .native import check_image_shape
from .ops import LOWER


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


ENGINES = ("auto", "executor", "python")


def load(path, device="cpu", engine="auto"):
    """The torch runtime of an artifact on `device` ("cpu" or "cuda").
    engine: on the CPU, "executor" runs the compiled executor of ctmq._C
    (one C++ call per forward), "python" the node-by-node torch calls;
    "auto" the executor where ctmq._C has it. Both give the same logits, bit
    for bit."""
    header, tensors = read_artifact(path)
    return Runtime(header, tensors, device, engine)


class _Step(NamedTuple):
    op: str
    fn: Callable
    inputs: list
    out: str


class Runtime:
    """Callable: runtime(images) -> logits; runtime.predict(images, topk)."""

    def __init__(self, header, tensors, device="cpu", engine="auto"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: no CUDA device is available here")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        check_artifact(header, tensors)
        self.header = header
        self.class_names = header["class_names"]
        self.input_channels = header["input"]["channels"]
        self.input_size = header["input"]["size"]
        self.mean = torch.tensor(header["input"]["mean"]).view(1, -1, 1, 1)
        self.std = torch.tensor(header["input"]["std"]).view(1, -1, 1, 1)
        self.t = {k: v.to(self.device) for k, v in tensors.items()}
        self.steps = [
            _Step(
                node["op"],
                LOWER[node["op"]](read_attrs(OPS[node["op"]], node, self.t), node["out"]),
                list(node["in"]),
                node["out"],
            )
            for node in header["nodes"]
        ]
        self._graphs = {}
        self._dry_run()
        self.executor = self._make_executor(header, tensors, engine)
        self.engine = "executor" if self.executor is not None else "python"  # the one that runs

    def _make_executor(self, header, tensors, engine):
        """The compiled executor (CPU), or None for the node-by-node path."""
        if self.device.type != "cpu" or engine == "python":
            return None
        module = backend.extension_or_none()
        if module is None or not hasattr(module, "Executor"):
            if engine == "executor":
                backend.extension()  # the error that says what is missing
                raise RuntimeError("ctmq._C has no Executor: rebuild ctmq")
            return None
        try:
            return module.Executor(
                json.dumps(header), {k: v.contiguous() for k, v in tensors.items()}
            )
        except ValueError as e:
            raise ArtifactError(str(e)) from e

    def _dry_run(self):
        """Run every node once on an input of the declared size, so that nodes
        that do not fit together (shapes, packed bits where floats are read,
        a kernel's limits) fail here, as an ArtifactError naming the node,
        and not at the first call."""
        shape = (1, self.input_channels, self.input_size, self.input_size)
        env = {"input": torch.zeros(shape, device=self.device)}
        with (
            torch.inference_mode(),
            _ieee_fp32() if self.device.type == "cuda" else contextlib.nullcontext(),
        ):
            for step in self.steps:
                try:
                    env[step.out] = step.fn(*[env[i] for i in step.inputs])
                except Exception as e:  # any op's own error, with the node named
                    raise ArtifactError(
                        f"{step.op} node {step.out!r} fails on a {shape} input: "
                        f"{type(e).__name__}: {e}"
                    ) from e
        out = env["output"]
        want = (1, len(self.class_names))
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.shape != want:
            raise ArtifactError(
                f"the graph's output on a {shape} input is "
                f"{getattr(out, 'shape', type(out).__name__)}, expected float "
                f"logits of shape {want} (one per class name)"
            )

    # -------------------------------------------------------------- running
    def check_images(self, images):
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(
                f"images must be a float tensor (N, C, H, W), got "
                f"{getattr(images, 'dtype', type(images).__name__)}"
            )
        check_image_shape(images.shape, self.input_channels, self.input_size)

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
                # the CPU max pools ignore NaN where torch's propagates it: refuse
                # what could make one (a CUDA runtime skips this: no sync)
                if not bool(torch.isfinite(images).all()):
                    raise ValueError("images contain NaN or infinite values")
                if self.executor is not None:
                    return self.executor.run(images.contiguous())
                return self.run(images)
        return self._run_graph(images)

    def profile(self, images, per_node=False):
        """(logits, {op: seconds}) of one CPU forward through the executor:
        where the time goes, per op (the planned layout conversions as
        to_nhwc/to_nchw, packing as pack). per_node=True: (logits,
        [(node, op, seconds)]) per step in the order run, a node named by its
        output (a planned conversion by the value it converts)."""
        if self.executor is None:
            raise RuntimeError("profile() needs the compiled executor (CPU, engine executor)")
        self.check_images(images)
        logits, by_op, steps = self.executor.profile(images.to(torch.float32).contiguous())
        return (logits, steps) if per_node else (logits, by_op)

    def _run_graph(self, images):
        # one CUDA graph per batch size and binary kernel (use_kernel): static
        # input, replayed for new inputs
        key = (images.shape[0], backend.cuda_binary_kernel())
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
        """Float pixels in [0, 1] (N, C, H, W) at the model's size, on any
        device -> the normalized input, on the pixels' device."""
        return (pixels.float() - self.mean.to(pixels.device)) / self.std.to(pixels.device)

    def predict(self, images, topk=5):
        """(indices, probabilities) of the top-k classes of each image."""
        probs = torch.softmax(self(images).float(), dim=1)
        k = min(topk, probs.shape[1])
        p, i = probs.topk(k, dim=1)
        return i.cpu(), p.cpu()
