"""Mutation testing of the exporter, the artifact format, the runtime and the
training engine: does a test notice when the code it guards breaks?

    python tests/mutation.py [--per-file 12] [--seed 0] [--area NAME] [--only PATH] [--json out.json]

Mutants are made from each file's syntax tree, spread over the file by a
seeded draw (the same mutants every run for the same sources):
  * `raise`: an `if` whose body raises loses its body (a refusal removed);
  * `compare`: a comparison flipped (< <=, > >=, == !=, in / not in, is / is not);
  * `bool`: `and` <-> `or`;
  * `number`: an integer constant off by one;
  * `call`: a call made as a statement dropped (a write, a check, a flush);
  * `return`: a function returning a value returns None.
Each mutant replaces its file (written back whole afterwards, also on SIGTERM)
and runs the area's fast tests (`-m "not slow" -x`) with a time limit; a
mutant is killed when they fail or run past the limit (counted apart). The
area's tests must pass on the unmutated sources first. Mutants that change
nothing observable (equivalent ones) count as survivors; the report lists
every survivor with its line so that each can be read.
"""

import argparse
import ast
import copy
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# area -> (source files, the tests that guard them)
AREAS = {
    "export": (
        [
            "ctmq/export/__init__.py",
            "ctmq/export/trace.py",
            "ctmq/export/fuse.py",
            "ctmq/export/lower.py",
        ],
        [
            "tests/test_vocabulary.py",
            "tests/test_fit_export.py",
            "tests/test_deploy.py",
            "tests/test_executor.py",
        ],
    ),
    "artifact": (
        ["ctmq/artifact/format.py", "ctmq/artifact/vocabulary.py"],
        ["tests/test_vocabulary.py", "tests/test_deploy.py", "tests/test_native.py"],
    ),
    "deploy": (
        [
            "ctmq/deploy/__init__.py",
            "ctmq/deploy/runtime.py",
            "ctmq/deploy/ops.py",
            "ctmq/deploy/native.py",
        ],
        [
            "tests/test_deploy.py",
            "tests/test_executor.py",
            "tests/test_native.py",
            "tests/test_vocabulary.py",
        ],
    ),
    "engine": (
        [
            "ctmq/engine/schedule.py",
            "ctmq/engine/fit.py",
            "ctmq/engine/trainer.py",
            "ctmq/engine/checkpoint.py",
            "ctmq/engine/rundir.py",
            "ctmq/engine/config.py",
            "ctmq/engine/report.py",
            "ctmq/engine/run.py",
            "ctmq/engine/study.py",
        ],
        [
            "tests/test_engine.py",
            "tests/test_rundir.py",
            "tests/test_train_options.py",
            "tests/test_study.py",
            "tests/test_fit_export.py",
            "tests/test_cli_errors.py",
        ],
    ),
}
FLIP = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}


def sites(tree):
    """(kind, node index in ast.walk order, line) of every mutation site."""
    out = []
    for i, node in enumerate(ast.walk(tree)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.If) and any(isinstance(s, ast.Raise) for s in node.body):
            out.append(("raise", i, line))
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in FLIP:
            out.append(("compare", i, line))
        elif isinstance(node, ast.BoolOp):
            out.append(("bool", i, line))
        elif (
            isinstance(node, ast.Constant)
            and type(node.value) is int
            and not isinstance(node.value, bool)
        ):
            out.append(("number", i, line))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            out.append(("call", i, line))
        elif isinstance(node, ast.Return) and node.value is not None:
            if not (isinstance(node.value, ast.Constant) and node.value.value is None):
                out.append(("return", i, line))
    return out


def mutate(tree, kind, index):
    tree = copy.deepcopy(tree)
    node = list(ast.walk(tree))[index]
    if kind == "raise":
        node.body = [ast.Pass()]
    elif kind == "compare":
        node.ops[0] = FLIP[type(node.ops[0])]()
    elif kind == "bool":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif kind == "number":
        node.value += 1
    elif kind == "call":
        node.value = ast.Constant(None)
    elif kind == "return":
        node.value = None
    return ast.unparse(ast.fix_missing_locations(tree))


def run_tests(tests, timeout):
    # PYTHONPATH: subprocesses the tests start (the CLI, workers) import the
    # mutated tree, whatever ctmq the environment has installed
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-m",
        "not slow",
        "-p",
        "no:cacheprovider",
        *tests,
    ]
    try:
        res = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    return "killed" if res.returncode != 0 else "survived"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-file", type=int, default=12, help="mutants drawn per file (default 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="mutate this file only")
    p.add_argument("--area", choices=sorted(AREAS), action="append", help="these areas only")
    p.add_argument("--timeout", type=float, default=300, help="seconds per mutant's test run")
    p.add_argument("--json", help="write every mutant and its fate here")
    a = p.parse_args(argv)
    # SIGTERM (a CI timeout, kill) unwinds through the `finally` that puts the
    # original source back
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = []
    for area, (files, tests) in AREAS.items():
        if a.area and area not in a.area:
            continue
        files = [rel for rel in files if not a.only or rel == a.only]
        if not files:
            continue
        # the unmutated sources must pass, or every mutant would count as killed
        baseline = run_tests(tests, a.timeout)
        if baseline != "survived":
            sys.exit(f"{area}: the tests fail ({baseline}) before any mutation")
        for rel in files:
            path = ROOT / rel
            original = path.read_text()
            tree = ast.parse(original)
            found = sites(tree)
            rng = random.Random(f"{a.seed}:{rel}")
            chosen = sorted(rng.sample(found, min(a.per_file, len(found))), key=lambda s: s[2])
            try:
                for kind, index, line in chosen:
                    path.write_text(mutate(tree, kind, index))
                    t0 = time.time()
                    fate = run_tests(tests, a.timeout)
                    rows.append(
                        {
                            "area": area,
                            "file": rel,
                            "line": line,
                            "kind": kind,
                            "fate": fate,
                            "seconds": time.time() - t0,
                        }
                    )
                    print(f"{area:9s} {rel}:{line} {kind:8s} {fate}", flush=True)
            finally:
                path.write_text(original)
    print()
    for area in AREAS:
        mine = [r for r in rows if r["area"] == area]
        if mine:
            killed = sum(r["fate"] != "survived" for r in mine)
            timeouts = sum(r["fate"] == "timeout" for r in mine)
            print(
                f"{area:9s} {killed}/{len(mine)} killed ({100 * killed / len(mine):.0f}%; "
                f"{timeouts} of them by the time limit)"
            )
    killed = sum(r["fate"] != "survived" for r in rows)
    if rows:
        print(f"{'all':9s} {killed}/{len(rows)} killed ({100 * killed / len(rows):.0f}%)")
    for r in rows:
        if r["fate"] == "survived":
            print(f"survived: {r['file']}:{r['line']} {r['kind']}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
