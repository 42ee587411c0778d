"""`edgelora --help` starts without onnxruntime or onnx: a CLI should answer in well under a second,
and its parser needs only the commands' choices, not the libraries that run them (the commands
import those themselves)."""
from __future__ import annotations

import ast
import subprocess
import sys

PROBE = ("import sys, edgelora.cli as c; c.parser(); "
         "print(sorted(m for m in ('onnxruntime','onnx','scipy','tokenizers') if m in sys.modules))")


def test_the_parser_imports_neither_onnxruntime_nor_onnx():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    loaded = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    assert "onnxruntime" not in loaded and "onnx" not in loaded, loaded
