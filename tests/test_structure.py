"""The package's layers import downwards only (docs/design.md, section 1):

    ctmq_kernels <- ops <- quant, binary <- nn <- models, export, deploy <- engine <- cli

ctmq_kernels needs nothing of ctmq; the exporter does not know the model
zoo (an artifact records what the caller passes); the runtime reads only the
artifact and the ops; the artifact format knows no layer above it."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# what each part may not import (modules of ctmq, by their dotted name)
FORBIDDEN = {
    "ctmq_kernels": ("ctmq",),
    "ctmq/ops": (
        "ctmq.quant",
        "ctmq.binary",
        "ctmq.nn",
        "ctmq.models",
        "ctmq.export",
        "ctmq.deploy",
        "ctmq.engine",
        "ctmq.cli",
        "ctmq.artifact",
    ),
    "ctmq/artifact": (
        "ctmq.ops",
        "ctmq.nn",
        "ctmq.models",
        "ctmq.export",
        "ctmq.deploy",
        "ctmq.engine",
        "ctmq.cli",
        "ctmq.binary",
    ),
    "ctmq/export": ("ctmq.models", "ctmq.engine", "ctmq.deploy", "ctmq.cli"),
    "ctmq/deploy": (
        "ctmq.export",
        "ctmq.engine",
        "ctmq.models",
        "ctmq.nn",
        "ctmq.cli",
        "ctmq.quant",
    ),
    "ctmq/models": ("ctmq.engine", "ctmq.export", "ctmq.deploy", "ctmq.cli"),
    "ctmq/engine": ("ctmq.cli", "ctmq.export", "ctmq.deploy"),
}


def _imports(path):
    """Absolute dotted names of every module a file imports (relative ones resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names += [module] + [f"{module}.{a.name}" for a in node.names]
    return names


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_layers_import_downwards_only(part):
    files = sorted((ROOT / part).rglob("*.py")) if (ROOT / part).is_dir() else []
    assert files, part
    bad = [
        f"{f.relative_to(ROOT)} imports {name}"
        for f in files
        for name in _imports(f)
        if any(name == x or name.startswith(x + ".") for x in FORBIDDEN[part])
    ]
    assert not bad, bad


def _public_modules():
    """What a user imports: ctmq, its modules and its subpackages (a
    subpackage's own files are its inside)."""
    for path in sorted((ROOT / "ctmq").glob("*.py")) + sorted(
        (ROOT / "ctmq").glob("*/__init__.py")
    ):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] != "__main__":
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("name", list(_public_modules()))
def test_every_public_module_says_what_it_exports(name):
    import importlib

    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), (list, tuple)), f"{name} has no __all__"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"
    assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ repeats a name"
