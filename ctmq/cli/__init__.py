"""The `ctmq` command line: train (and study) -> export -> infer, and bench.

Every expected error (a bad flag value, a missing file, a run directory that
does not fit) is one line on stderr, `ctmq <command>: error: ...`, and exit
status 2; `ctmq infer` exits 1 when some of its inputs could not be read and
the others were classified.
"""

import argparse
import sys

from .common import CliError

__all__ = ["CliError", "build_parser", "main"]


def _version():
    from .. import __version__

    return __version__


def build_parser():
    from . import bench, deploy, train

    p = argparse.ArgumentParser(
        prog="ctmq",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"ctmq {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.add_commands(sub)
    deploy.add_commands(sub)
    bench.add_commands(sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except CliError as e:
        print(f"ctmq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctmq {args.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0
