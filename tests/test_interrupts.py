"""Killed at any moment, stopped by SIGINT or SIGTERM, or run twice: `adapt`'s output folder is
always absent, a complete previous output or a complete new one, and the same inputs and seed
give the same weights."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_adapt import PROMPTS, library  # noqa: F401  (library: a fixture)

from edgelora.outputs import check_model


def adapt_cmd(bundle: Path, examples: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgelora.cli", "adapt", str(examples), "--bundle", str(bundle), "--out", str(out),
            *extra]


def examples_file(folder: Path, n: int = 1) -> Path:
    f = folder / "ex.jsonl"
    f.write_text("".join(json.dumps({"input": f"{p} {i}", "output": "yes"}) + "\n" for i in range(n) for p in PROMPTS))
    return f


RESULT = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "loss_curve.svg", "weights.json"]


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def assert_complete(out: Path, expected: list[str], result_only: bool = False) -> None:
    """Every file of an output, weights.json whole, and the model the one made from it; with
    `result_only`, the search's result without a model (the write-back swapped in second) passes too."""
    assert files(out) == expected or (result_only and files(out) == RESULT), files(out)
    data = json.loads((out / "weights.json").read_text())
    assert data["evaluations"] == len(data["history"]) > 0
    if "edgelora.json" in files(out):
        check_model(out)


def test_kill_at_random_moments_leaves_a_whole_output(library, tmp_path):  # noqa: F811
    bundle, _ = library
    out = tmp_path / "out"
    cmd = adapt_cmd(bundle.path, examples_file(tmp_path), out, "--budget", "6", "--quant", "int8", "--json")
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    full = time.monotonic() - t0
    expected = files(out)
    assert {"weights.json", "edgelora.json", "model.onnx", "adapter/adapter_model.safetensors"} <= set(expected)
    rng = random.Random(15)
    for start_empty in [True] * 3 + [False] * 12:
        if start_empty:
            subprocess.run(["rm", "-rf", str(out)], check=True)
        had_output = out.exists() or any(tmp_path.glob(".out.*.old"))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, full * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            assert_complete(out, expected, result_only=True)
        else:  # only a kill between a swap's two renames leaves it absent: the output it held is kept beside
            aside = list(tmp_path.glob(".out.*.old"))
            assert aside or not had_output, "the previous output was lost"
            for old in aside:
                assert_complete(old, expected, result_only=True)
    subprocess.run(cmd, check=True, capture_output=True)  # and the folders killed runs left beside are removed
    assert_complete(out, expected)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def start_long_search(bundle: Path, tmp_path: Path) -> tuple[subprocess.Popen, list[str], Path]:
    """An adapt with a budget it will not finish, once its progress bar shows 3 evaluations."""
    out = tmp_path / "out"
    proc = subprocess.Popen(adapt_cmd(bundle, examples_file(tmp_path, 40), out, "--budget", "1000000", "--l1", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, err = threading.Event(), []

    def read():
        buf = ""
        while ch := proc.stderr.read(1):
            buf += ch
            if "3/1000000" in buf:
                seen.set()
        err.append(buf)

    reader = threading.Thread(target=read)
    reader.start()
    assert seen.wait(120), "the search never showed progress"
    proc.reader, proc.err = reader, err
    return proc, err, out


def test_cli_ctrl_c_exits_130_with_weights(library, tmp_path):  # noqa: F811
    """SIGINT once the progress bar shows a few evaluations: the best weights are written."""
    bundle, _ = library
    proc, err, out = start_long_search(bundle.path, tmp_path)
    proc.send_signal(signal.SIGINT)
    stdout = proc.stdout.read()
    proc.wait(60)
    proc.reader.join(10)
    assert proc.returncode == 130, err
    data = json.loads((out / "weights.json").read_text())
    assert data["interrupted"] and data["evaluations"] >= 3
    assert "interrupted" in err[0] and "weights.json" in err[0]
    assert "LoRA" in stdout  # the summary table is still printed


def test_sigterm_writes_the_best_weights_and_exits_143(library, tmp_path):  # noqa: F811
    bundle, _ = library
    proc, err, out = start_long_search(bundle.path, tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    proc.wait(60)
    proc.reader.join(10)
    assert proc.returncode == 143, err
    data = json.loads((out / "weights.json").read_text())
    assert data["interrupted"] and data["evaluations"] >= 3
    assert "Traceback" not in err[0] and "interrupted" in err[0]


def test_second_ctrl_c_ends_at_once_and_leaves_a_whole_output(library, tmp_path):  # noqa: F811
    bundle, _ = library
    proc, err, out = start_long_search(bundle.path, tmp_path)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.stdout.read()
    proc.wait(60)
    proc.reader.join(10)
    assert proc.returncode in (130, -signal.SIGINT), err
    if out.exists():
        assert_complete(out, RESULT)


def test_after_the_first_signal_the_next_one_kills(tmp_path):
    """However long the saving takes, a second signal is not caught: its default action ends the
    process (the shell shows 130 or 143)."""
    script = (
        "import os, signal, time\n"
        "from edgelora.errors import run_command\n"
        "def work():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)\n"
        "    except KeyboardInterrupt:\n"
        "        print('saving', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(30)\n"
        "    print('not stopped', flush=True)\n"
        "run_command('x', work)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGINT and r.stdout == "saving\n", (r.returncode, r.stdout, r.stderr)


def test_same_inputs_and_seed_give_identical_outputs(library, tmp_path):  # noqa: F811
    bundle, _ = library
    f = examples_file(tmp_path)
    runs = []
    for name in ("a", "b"):
        cmd = adapt_cmd(bundle.path, f, tmp_path / name, "--budget", "8", "--seed", "3", "--quant", "int8", "--json")
        subprocess.run(cmd, check=True, capture_output=True)
        runs.append(tmp_path / name)

    def without_timings(obj):
        if isinstance(obj, dict):
            return {k: without_timings(v) for k, v in obj.items() if k not in ("seconds", "timings")}
        return [without_timings(v) for v in obj] if isinstance(obj, list) else obj

    a, b = (without_timings(json.loads((r / "weights.json").read_text())) for r in runs)
    assert a == b
    for name in ("adapter/adapter_model.safetensors", "model.onnx", "loss_curve.svg"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name



@pytest.mark.parametrize("stop,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), ("disk full", 2),
                                       ("bug", None)])
def test_a_failed_write_back_keeps_the_search_result(library, tmp_path, monkeypatch, capsys, stop, code):  # noqa: F811
    """Ctrl-C, SIGTERM, a full disk or a bug while the adapted model is written: `--out` holds the
    new search's whole result (weights.json, adapter/, loss curve) without a model, the run says
    so, and generate/eval on the folder say in one line that it has no model."""
    from edgelora import writeback
    from edgelora.cli import main
    bundle, _ = library
    out, f = tmp_path / "out", examples_file(tmp_path)
    argv = ["adapt", str(f), "--bundle", str(bundle.path), "--out", str(out), "--budget", "3", "--quant", "int8"]
    assert main(argv) == 0  # a previous complete output, which the new result replaces
    old = json.loads((out / "weights.json").read_text())
    real = writeback.write_model

    def write_model(*a, **kw):
        real(*a, **kw)  # the model's files are in the folder being built, not yet swapped in
        if stop == "disk full":
            raise OSError(28, "No space left on device")
        if stop == "bug":
            raise RuntimeError("a bug in the write-back")
        os.kill(os.getpid(), stop)
        time.sleep(10)

    monkeypatch.setattr(writeback, "write_model", write_model)
    capsys.readouterr()
    argv[argv.index("--budget") + 1] = "4"
    if code is None:
        with pytest.raises(RuntimeError, match="a bug"):
            main(argv)
    else:
        assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert "without a model" in err[-1] and str(out) in err[-1], err
    assert files(out) == RESULT
    new = json.loads((out / "weights.json").read_text())
    assert new["settings"]["budget"] == 4 != old["settings"]["budget"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
    for cmd in (["generate", str(out), "hi"], ["eval", str(f), "--model", str(out)]):
        assert main(cmd) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "has no model" in lines[0] and "re-run edgelora adapt" in lines[0], lines
