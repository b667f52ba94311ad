"""What the commands share: the error type, argument types, the device choice."""

import argparse


class CliError(Exception):
    """An expected error: printed as one line, exit status 2, no traceback."""


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


DEVICES = ("auto", "cpu", "cuda")


def add_device(parser, what="run on"):
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help=f"device to {what} (default: auto, cuda when available)",
    )


def resolve_device(name):
    """'auto' -> cuda when available, else cpu; 'cuda' without one is a CliError."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available here")
    return name
