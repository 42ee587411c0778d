"""Only data formats: no source file may deserialise with pickle, run text as code, or let a
file decide what code runs (SECURITY.md). Read from the syntax tree, so comments and strings
do not count."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "edgelora").rglob("*.py"), *(ROOT / "export" / "edgelora_export").rglob("*.py"),
                  *(ROOT / "bench").glob("*.py")])
CODE_MODULES = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}
BUILTIN_CODE_CALLS = {"eval", "exec", "compile", "__import__"}  # model.eval() is a method, not these
CUSTOM_OPS = "register_custom_ops_library"  # onnxruntime loading native code named by a caller
RUNTIME_NEVER_IMPORTS = {"torch", "transformers", "peft", "optimum"}


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def problems(path: Path, runtime: bool | None = None) -> list[str]:
    """What `path` does that SECURITY.md forbids; `runtime`: whether it is runtime code, which may not
    import torch and its kin (default: whether it lies in edgelora/)."""
    runtime = path.is_relative_to(ROOT / "edgelora") if runtime is None else runtime
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            out += [f"{where}: imports {n}" for n in names if n.split(".")[0] in CODE_MODULES]
            if runtime:
                out += [f"{where}: the runtime imports {n}" for n in names if n.split(".")[0] in RUNTIME_NEVER_IMPORTS]
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if (isinstance(f, ast.Name) and name in BUILTIN_CODE_CALLS) or name == CUSTOM_OPS:
            out.append(f"{where}: calls {name}")
        if name == "load" and isinstance(f, ast.Attribute) and getattr(f.value, "id", "") == "torch" \
                and not is_true(keyword(node, "weights_only")):
            out.append(f"{where}: torch.load without weights_only=True")
        if is_true(keyword(node, "allow_pickle")) or is_true(keyword(node, "trust_remote_code")):
            out.append(f"{where}: allow_pickle or trust_remote_code")
    return out


def test_the_scan_sees_what_it_forbids(tmp_path):
    """The probe lies in tmp_path, never in the source tree (a run killed here would leave it there)."""
    bad = tmp_path / "_scan_probe.py"
    bad.write_text("import pickle\nimport torch\ntorch.load('x')\neval('1')\nnp.load('a', allow_pickle=True)\n")
    assert len(problems(bad, runtime=True)) == 5
    assert len(problems(bad, runtime=False)) == 4  # torch is allowed on the workstation side


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_only_data_formats(path):
    assert problems(path) == []
