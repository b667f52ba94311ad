"""setup.py's compiler flags, read without running setup.py, for the tests that
compile C++/CUDA sources themselves: they build with the same standard and
options as the extension (C++20: torch 2.14 and newer need it)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_list(name):
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


CXX_FLAGS = _setup_list("CXX_FLAGS")
NVCC_FLAGS = _setup_list("NVCC_FLAGS")
CXX_STD = next(f for f in CXX_FLAGS if f.startswith("-std="))
NVCC_STD = next(f for f in NVCC_FLAGS if f.startswith("-std="))
