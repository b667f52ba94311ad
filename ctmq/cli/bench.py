"""`ctmq bench quant|deploy`: the benchmarks a user runs from the command line,
with shared flags (--device, --json)."""

import argparse

from .common import CliError, add_device, positive_int, resolve_device
from .deploy import add_engine

DTYPES = ("float32", "bfloat16", "float16")


def _quant(args):
    import torch

    from .. import bench

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    numel = args.numel or (64 * 2**20 if device == "cuda" else 4 * 2**20)
    if numel < 4608:
        raise CliError(f"--numel must be >= 4608 (one 512x3x3 weight channel), got {numel}")
    compile_ = args.compile if args.compile is not None else device == "cuda"
    name = bench.device_name(device)
    print(
        f"ctmq bench quant: {numel} elements of {str(dtype).removeprefix('torch.')}, {name}"
        f"{'' if compile_ else ' (without torch.compile baselines; --compile adds them)'}",
        flush=True,
    )
    copy_gbps, rows = bench.run(device, dtype, numel, compile=compile_, only=args.only)
    if not rows:
        raise CliError(f"--only {args.only!r} matches no case")
    print(bench.format_table(copy_gbps, rows, name))
    if args.json:
        bench.write_json(args.json, copy_gbps, rows, name, numel=numel, dtype=str(dtype))
        print(f"wrote {args.json}")


def _deploy(args):
    import torch

    from .. import bench
    from .deploy import load_runtime

    rt = load_runtime(args.model, resolve_device(args.device), args.engine)
    dev = torch.device(rt.device)
    engine = rt.engine
    print(
        f"ctmq bench deploy {args.model}: {bench.device_name(dev)}, engine {engine}, input "
        f"{rt.input_channels}x{rt.input_size}x{rt.input_size}"
    )
    print(f"{'batch':>5s} {'ms/batch':>9s} {'images/s':>9s}")
    rows = bench.JsonRows(args.json, model=args.model, device=bench.device_name(dev), engine=engine)
    for b in args.batch:
        x = torch.randn(b, rt.input_channels, rt.input_size, rt.input_size, device=dev)
        if engine == "native":
            x = x.numpy()
        t = bench.timeit(lambda x=x: rt(x), dev)
        print(f"{b:5d} {t * 1e3:9.3f} {b / t:9.1f}")
        rows.add({"batch": b, "ms": t * 1e3, "images_per_s": b / t})


def add_commands(sub):
    b = sub.add_parser(
        "bench",
        help="benchmarks: fused quantizers (quant), an exported model's runtime (deploy)",
        description="Benchmarks; each prints a table of ratios to a baseline "
        "timed in the same run. The binary conv, deploy-vs-peers and loader "
        "benchmarks with every option are the scripts in benchmarks/.",
    )
    kinds = b.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")

    q = kinds.add_parser(
        "quant",
        help="the fused quantizers (fwd+bwd) against eager torch, "
        "torch.fake_quantize and torch.compile",
    )
    add_device(q)
    q.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    q.add_argument(
        "--numel", type=positive_int, help="elements per tensor (default 64Mi on cuda, 4Mi on cpu)"
    )
    q.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include torch.compile baselines (default: on cuda only)",
    )
    q.add_argument("--only", help="run only cases whose name contains this text")
    q.add_argument("--json", help="also write the results to this JSON file")
    q.set_defaults(func=_quant)

    d = kinds.add_parser("deploy", help="latency and throughput of an exported model's runtime")
    d.add_argument("model", metavar="MODEL.ctmq")
    add_device(d)
    add_engine(d)
    d.add_argument(
        "--batch", type=positive_int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)"
    )
    d.add_argument("--json", help="also write the results to this JSON file")
    d.set_defaults(func=_deploy)
