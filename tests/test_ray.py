"""`edgelora-export library --ray` on a local Ray cluster started in the test (2 CPUs, no network):
the same adapters and report as the sequential run, and a worker killed mid-LoRA retried from its
checkpoint, the library still complete."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray  # the export side's ray extra: README's test command installs it
from safetensors.numpy import load_file

from helpers import assert_refused
from test_adapt import library  # noqa: F401  (the fixture)

from edgelora_export.library import train_library
from edgelora_export.train import TrainConfig

NAMES = ["red", "green", "blue", "orange", "purple", "white", "black"]
TIMING = ("minutes", "peak_rss_mb")  # a report's only fields that depend on the run, not the result


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 2**20)
    yield
    ray.shutdown()


def tasks(folder: Path, n: int = 2) -> Path:
    folder.mkdir()
    for k in range(n):
        lines = [{"input": f"Task {k}: what is colour {i}?", "output": NAMES[(i + k) % 7]} for i in range(40)]
        (folder / f"t{k}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def quiet(*_):
    pass


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_library_on_ray_gives_the_sequential_adapters_and_report(cluster, tiny_hf, tmp_path):
    cfg = TrainConfig(rank=4, alpha=8, steps=4, batch=4, eval_every=2, max_len=64)
    src = tasks(tmp_path / "tasks")
    seq = train_library(src, tmp_path / "seq", cfg, str(tiny_hf), log=quiet)
    par = train_library(src, tmp_path / "ray", cfg, str(tiny_hf), log=quiet, ray="auto")
    assert without_timing(par) == without_timing(seq)
    for name in ("t0", "t1"):
        a, b = load_file(tmp_path / "seq" / f"{name}.safetensors"), load_file(tmp_path / "ray" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    report = json.loads((tmp_path / "ray" / "report.json").read_text())
    assert [r["task"] for r in report["tasks"]] == ["t0", "t1"]  # task order, however they finished


def ray_workers() -> list[int]:
    """The pids of processes running a Ray task of ours (their title: ray::_train_remote)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"ray::_train_remote" in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_a_worker_killed_mid_lora_is_retried_and_the_library_completes(cluster, tiny_hf, tmp_path):
    """SIGKILL to the worker once its first checkpoint is written: Ray runs the task again, which
    resumes from the checkpoint (the output folder is shared), to the sequential run's weights."""
    cfg = TrainConfig(rank=4, alpha=8, steps=30, batch=4, eval_every=2, patience=1000, max_len=64)
    src = tasks(tmp_path / "tasks", n=1)
    seq = train_library(src, tmp_path / "seq", cfg, str(tiny_hf), log=quiet)
    out = tmp_path / "ray"
    result = {}
    run = threading.Thread(target=lambda: result.update(rows=train_library(src, out, cfg, str(tiny_hf), log=quiet,
                                                                           ray="auto")))
    run.start()
    ckpt = out / "peft" / "t0.ckpt.json"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert ckpt.exists() and ray_workers()
    step = json.loads(ckpt.read_text())["step"]
    for pid in ray_workers():
        os.kill(pid, signal.SIGKILL)
    run.join(timeout=300)
    assert not run.is_alive() and "rows" in result
    assert step < cfg.steps  # killed mid-LoRA
    assert without_timing(result["rows"])[0]["steps"] == seq[0]["steps"]
    a, b = load_file(tmp_path / "seq" / "t0.safetensors"), load_file(out / "t0.safetensors")
    for k in a:
        np.testing.assert_allclose(b[k].astype(np.float32), a[k].astype(np.float32), rtol=1e-3, atol=1e-4)


def test_adapt_of_several_files_on_ray_writes_what_one_after_the_other_writes(cluster, library, tmp_path, monkeypatch):
    """`edgelora adapt a.jsonl b.jsonl --ray`: each file a Ray task, into its own <examples>-adapted/,
    with the weights the sequential run finds (the search is deterministic)."""
    from edgelora.cli import main
    bundle, _ = library
    files = []
    for k, answers in enumerate((["5", "yes", "red"], ["7", "no", "blue"])):
        f = tmp_path / f"task{k}.jsonl"
        f.write_text("".join(json.dumps({"input": f"Question {i} of task {k}?", "output": a}) + "\n"
                             for i, a in enumerate(answers)))
        files.append(str(f))
    weights = {}
    for mode, extra in (("seq", []), ("ray", ["--ray"])):
        (tmp_path / mode).mkdir()
        monkeypatch.chdir(tmp_path / mode)
        assert main(["adapt", *files, "--bundle", str(bundle.path), "--budget", "6", "--no-model", "--json", *extra]) == 0
        weights[mode] = {k: json.loads((tmp_path / mode / f"task{k}-adapted" / "weights.json").read_text())["weights"]
                         for k in range(2)}
    assert weights["ray"] == weights["seq"]


def test_several_files_are_all_checked_before_the_first_search(library, tmp_path, capsys, monkeypatch):
    from helpers import cli_here
    bundle, _ = library
    monkeypatch.chdir(tmp_path)
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    bad.write_text("{not json\n")
    r = cli_here(capsys, "edgelora.cli", "adapt", str(good), str(bad), "--bundle", str(bundle.path))
    assert_refused(r, "bad.jsonl:1")
    assert not (tmp_path / "good-adapted").exists()
    r = cli_here(capsys, "edgelora.cli", "adapt", str(good), str(good), "--bundle", str(bundle.path), "--out", "x")
    assert_refused(r, "--out names one folder")
