"""Can the search itself run on the cut examples? A candidate for long examples (issue 14).

The default adapt ranks the library on each example's last `select_len` own tokens but searches
on the whole examples: on a task with ~150-token prompts the 39 search forwards are over half
its time. The candidate searches on the same cut examples (the same budget of points, each a
cut forward), then scores its best `--verify` distinct points on the whole examples and keeps
the best of those and the selection's whole-scored finalists: the result is judged on the
whole examples, as the default's is, and is never worse there than the best single LoRA.

On every bbh/ and near/ task where the cut pays (`search.cut_pays`; elsewhere the default does
not cut at all), both in one process, alternating which goes first: seconds, forwards, the
whole-example loss at the end, and exact match / option accuracy of the written-back model
(the adapt default, int4) on the task's test file. Resumable per task.

    python bench/cut_search.py [--tasks a,b] [--limit N] [--verify 3]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
from common import DATA, RESULTS, cut_tasks, examples_batch, paired_row, paired_summary, save

from edgelora.bundle import Bundle, home
from edgelora.examples import keep_ends, load_examples
from edgelora.lora import LoraStack
from edgelora.scorer import Scorer
from edgelora.search import AdaptConfig, Objective, _Stop, adapt, choose_loras, run_optimizer, select_loras


def default(bundle: Bundle, path) -> tuple[dict, tuple]:
    t0 = time.perf_counter()
    res = adapt(path, bundle, warn=lambda m: None)
    return {"adapt_s": time.perf_counter() - t0, "forwards": res.settings["forwards"], "loss": res.loss,
            "objective": res.objective, "stop": res.stop,
            "weights": dict(zip(res.loras, res.weights.round(4).tolist()))}, res.merged()


def cut_search(bundle: Bundle, path, verify: int) -> tuple[dict, tuple]:
    """The default's selection, then the search on the cut examples and `verify` whole forwards."""
    t0 = time.perf_counter()
    cfg = AdaptConfig()
    batch = examples_batch(bundle, path)
    scorer = Scorer(bundle)
    scorer.bind(batch)
    n_tokens = float(batch.target_mask.sum())
    paths = choose_loras(bundle, None, len(bundle.lora_paths(cfg.library)), cfg.seed, cfg.library)
    sel = select_loras(cfg, scorer, bundle, paths, n_tokens)
    stack = LoraStack(sel.loras, list(bundle.targets))
    cut = keep_ends(batch, cfg.select_len)
    scorer.bind(cut)
    f = Objective(scorer, stack, float(cut.target_mask.sum()), cfg)
    try:
        f(np.zeros(len(sel.loras)))
        for w, _, _ in sel.known:
            f(w)
        stop = run_optimizer(cfg.optimizer, f, sel.known[-1][0], cfg.seed)
    except _Stop as e:
        stop = e.reason
    scorer.bind(batch)
    whole = Objective(scorer, stack, n_tokens, replace(cfg, budget=10**6, patience=0))
    for w, loss, secs in sel.known:
        whole.record(w, loss, secs)
    for ev in sorted(f.history, key=lambda e: e.objective):
        if whole.forwards >= verify:
            break
        whole(ev.weights)
    best = whole.best
    return {"adapt_s": time.perf_counter() - t0, "forwards": sel.forwards + f.forwards + whole.forwards,
            "cut_forwards": f.forwards, "loss": best.loss, "objective": best.objective, "stop": stop,
            "tokens": [cut.n_tokens, batch.n_tokens],
            "weights": dict(zip([p.stem for p in sel.paths], np.round(best.weights, 4).tolist()))}, \
        stack.compose(np.array(best.weights))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--verify", type=int, default=3)
    args = ap.parse_args()
    bundle = Bundle.open()
    name = "cut_search"
    last = json.loads((RESULTS / f"{name}.json").read_text()) if (RESULTS / f"{name}.json").exists() else {}
    keep = last.get("limit") == args.limit and last.get("verify") == args.verify
    rows = {r["task"]: r for r in last.get("tasks", [])} if keep else {}
    for i, (ratio, suite, task, f) in enumerate(cut_tasks(bundle, AdaptConfig().select_len, args.tasks)):
        if task in rows:
            continue
        test = load_examples(DATA / suite / f"{task}.test.jsonl")[: args.limit]
        runs = {}
        for key in (("default", "cut") if i % 2 == 0 else ("cut", "default")):
            runs[key] = default(bundle, f) if key == "default" else cut_search(bundle, f, args.verify)
        row = {"suite": suite, "task": task, "token_ratio": ratio,
               **paired_row(bundle, runs, "default", "cut", test, home() / "bench" / "cut_search" / task)}
        same = row["same_weights"]
        rows[task] = row
        d, c = row["default"], row["cut"]
        print(f"[{task}] tokens x{ratio:.2f}: adapt {d['adapt_s']:.0f}s -> {c['adapt_s']:.0f}s (x{row['time_ratio']:.2f}), "
              f"whole loss {d['loss']:.4f} -> {c['loss']:.4f}, exact {d['exact']} -> {c['exact']}, "
              f"options {d['options']} -> {c['options']}{' (same weights)' if same else ''}", flush=True)
        save(name, {"limit": args.limit, "verify": args.verify, "tasks": list(rows.values()),
                    "summary": paired_summary(list(rows.values()), "default", "cut")})


if __name__ == "__main__":
    main()
