"""`edgelora-export` prints one line per step; what torch.onnx, onnxscript / onnx_ir, transformers,
warnings and the onnxruntime-genai builder print goes to a log file named in the last line."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import assert_refused, cli_here

STEP = re.compile(r"\((\d+\.\d)s\)$")


def test_export_base_prints_only_its_steps_and_logs_the_rest(tiny_hf, tmp_path):
    home, out = tmp_path / "home", tmp_path / "bundle"
    r = subprocess.run([sys.executable, "-m", "edgelora_export.cli", "base", str(tiny_hf), "-o", str(out),
                        "--targets", "q_proj,v_proj"], capture_output=True, text=True,
                       env={**os.environ, "EDGELORA_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert [l.split(",")[0].split(" (")[0] for l in lines[:4]] == [
        f"loaded {tiny_hf.name}", "decoder graph exported", "scoring graph exported", "files hashed"], r.stdout
    assert all(STEP.search(l) for l in lines[:4]), r.stdout
    assert re.fullmatch(rf"bundle written to {re.escape(str(out))} in \d+s", lines[4]), r.stdout
    assert lines[5].startswith("log: ") and len(lines) == 6, r.stdout
    log = Path(lines[5][len("log: "):])
    assert log.parent == home / "logs" and log.is_file()
    text = log.read_text()
    for third_party in ("Reading decoder layer",         # the genai builder's print()s
                        "[torch.onnx] Translate the graph into ONNX",  # torch.onnx's progress
                        "[INFO] - "):                    # onnxscript / onnx_ir logging
        assert third_party in text, third_party
    assert "bundle written to" in text  # the steps too, for context
    from edgelora.bundle import Bundle
    assert Bundle.open(out).verify() == []


def test_a_refusal_is_one_line_naming_the_file_and_the_log(tmp_path, capsys):
    r = cli_here(capsys, "edgelora_export.cli", "base", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "b"))
    assert_refused(r, "nope.gguf", "no such file", "(log: ")
    assert r.stdout == ""
    log = Path(r.stderr.split("(log: ")[1].strip().rstrip(")"))
    assert "nope.gguf: no such file" in log.read_text()
    r = cli_here(capsys, "edgelora_export.cli", "base", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "b"),
                 "--verbose")
    assert_refused(r, "nope.gguf", "no such file")
    assert "log" not in r.stderr


CAPTURED = """
import logging, sys, warnings
from edgelora_export.console import captured, say
logger = logging.getLogger("a_library")
before = logging.StreamHandler(sys.stderr)  # attached before, as torch's are
logger.addHandler(before)
with captured("test") as path:
    say("step one (0.1s)")
    print("a library's print")
    logger.warning("a library's log record")
    warnings.warn("a library's warning")
    made = logging.StreamHandler()  # made meanwhile, as a basicConfig would be
    logger.addHandler(made)
assert before.stream is sys.stderr and made.stream is sys.stderr, (before.stream, made.stream)
logger.removeHandler(made)
logger.warning("after")
"""


def test_captured_output_goes_to_the_log_and_is_given_back(tmp_path):
    """A handler attached before (as torch's are) writes to the log meanwhile and to the terminal
    afterwards; print()s, warnings and handlers made meanwhile go to the log."""
    r = subprocess.run([sys.executable, "-c", CAPTURED], capture_output=True, text=True,
                       env={**os.environ, "EDGELORA_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stderr == "after\n"
    step, last = r.stdout.splitlines()
    assert step == "step one (0.1s)" and last.startswith("log: "), r.stdout
    text = Path(last[len("log: "):]).read_text()
    for s in ("step one", "a library's print", "a library's log record", "a library's warning"):
        assert s in text, s
    assert "after" not in text
