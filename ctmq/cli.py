"""The `ctmq` command line: `ctmq bench` (more subcommands arrive with the engine)."""
import argparse
import sys

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CliError(Exception):
    """An expected error: printed as one line, exit status 2, no traceback."""


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bench(args):
    from . import bench

    device = args.device or _default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available here")
    dtype = _DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    numel = args.numel or (64 * 2**20 if device == "cuda" else 4 * 2**20)
    if numel < 4608:
        raise CliError(f"--numel must be >= 4608 (one 512x3x3 weight channel), got {numel}")
    compile_ = args.compile if args.compile is not None else device == "cuda"
    name = bench.device_name(device)
    print(f"ctmq bench: {numel} elements of {args.dtype or dtype}, {name}"
          f"{'' if compile_ else ' (without torch.compile baselines; --compile adds them)'}",
          flush=True)
    copy_gbps, rows = bench.run(device, dtype, numel, compile=compile_, only=args.only)
    if not rows:
        raise CliError(f"--only {args.only!r} matches no case")
    print(bench.format_table(copy_gbps, rows, name))
    if args.json:
        bench.write_json(args.json, copy_gbps, rows, name, numel=numel, dtype=str(dtype))
        print(f"wrote {args.json}")


def build_parser():
    p = argparse.ArgumentParser(prog="ctmq", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmark the fused quantizers (fwd+bwd) against "
                       "eager torch, torch.fake_quantize and torch.compile")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    b.add_argument("--dtype", choices=list(_DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    b.add_argument("--numel", type=int, help="elements per tensor (default 64Mi on cuda, 4Mi on cpu)")
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile baselines (default: on cuda only)")
    b.add_argument("--only", help="run only cases whose name contains this text")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.set_defaults(func=_bench)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CliError as e:
        print(f"ctmq {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
