"""Is a cut loss pick (`adapt --select-len N`) as good as the whole one, and how much faster?

On every bbh/ and near/ task whose 5 examples the cut shortens enough to pay for its finalists
(`search.cut_pays`; on the others the two runs are the same run, forward for forward:
tests/test_adapt.py), `adapt` twice in one process,
alternating which goes first: the default loss pick on whole examples, and the library
ranked on each example's last N own tokens with its best 3 scored whole. Each run's
seconds, forwards and final loss; where the two end on different weights, both are written
back (the adapt default, int4) and evaluated on the task's test file; where they end on the
same weights, the model is the same and is evaluated once. Resumable per task.

    python bench/select_len.py [--len 64] [--tasks a,b] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import time

from common import DATA, RESULTS, cut_tasks, paired_row, paired_summary, save

from edgelora.bundle import Bundle, home
from edgelora.examples import load_examples
from edgelora.search import adapt


def run(bundle: Bundle, path, select_len: int) -> tuple[dict, object]:
    t0 = time.perf_counter()
    res = adapt(path, bundle, select_len=select_len, warn=lambda m: None)
    return {"adapt_s": time.perf_counter() - t0, "forwards": res.settings["forwards"],
            "selection_forwards": res.settings["selection_forwards"], "loss": [res.start_loss, res.loss],
            "stop": res.stop, "weights": dict(zip(res.loras, res.weights.round(4).tolist()))}, res.merged()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--len", type=int, default=64)
    ap.add_argument("--tasks")
    ap.add_argument("--limit", type=int)
    args = ap.parse_args()
    bundle = Bundle.open()
    name = f"select_len_{args.len}"
    last = json.loads((RESULTS / f"{name}.json").read_text()) if (RESULTS / f"{name}.json").exists() else {}
    rows = {r["task"]: r for r in last.get("tasks", [])} if last.get("limit") == args.limit else {}
    for i, (ratio, suite, task, f) in enumerate(cut_tasks(bundle, args.len, args.tasks)):
        if task in rows:
            continue
        test = load_examples(DATA / suite / f"{task}.test.jsonl")[: args.limit]
        order = (0, args.len) if i % 2 == 0 else (args.len, 0)
        runs = {n: run(bundle, f, n) for n in order}
        runs = {"whole": runs[0], "cut": runs[args.len]}
        row = {"suite": suite, "task": task, "token_ratio": ratio, "order": list(order),
               **paired_row(bundle, runs, "whole", "cut", test, home() / "bench" / "select_len" / task)}
        same = row["same_weights"]
        rows[task] = row
        print(f"[{task}] tokens x{ratio:.2f}: adapt {row['whole']['adapt_s']:.0f}s -> {row['cut']['adapt_s']:.0f}s "
              f"(x{row['time_ratio']:.2f}), forwards {row['whole']['forwards']} -> {row['cut']['forwards']}, "
              f"loss {row['whole']['loss'][1]:.4f} -> {row['cut']['loss'][1]:.4f}, exact {row['whole']['exact']} -> "
              f"{row['cut']['exact']}, options {row['whole']['options']} -> {row['cut']['options']}"
              f"{' (same weights)' if same else ''}", flush=True)
        save(name, {"len": args.len, "limit": args.limit, "tasks": list(rows.values()),
                    "summary": paired_summary(list(rows.values()), "whole", "cut")})


if __name__ == "__main__":
    main()
