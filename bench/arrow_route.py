"""Arrow routing at inference (`edgelora eval --route arrow`) against the plain base, zero-shot,
on the near/ tasks (or --suites near,bbh): no examples, no search, the whole library routed per
token (top-3, fp32). The two models score the same first --limit test examples of each task, the
routed one in the same process after the plain one. Writes bench/results/arrow_route_eval.json
after every task; a re-run with the same settings keeps the tasks done and runs the rest.

    python bench/arrow_route.py [--suites near] [--tasks a,b] [--limit 50] [--top-k 3] [--library per-task|mbc]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from common import DATA, RESULTS, machine, save

from edgelora.bundle import Bundle
from edgelora.evaluate import evaluate
from edgelora.examples import load_examples
from edgelora.generate import Model
from edgelora.lora import ArrowRoute


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suites", default="near")
    ap.add_argument("--tasks", help="only these tasks (comma-separated)")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--top-k", type=int, default=ArrowRoute.top_k)
    ap.add_argument("--library", default=ArrowRoute.library)
    ap.add_argument("--name", default="arrow_route_eval")
    args = ap.parse_args()
    bundle = Bundle.open()
    route = ArrowRoute(top_k=args.top_k, library=args.library)
    models = {"zero-shot": lambda: Model.load(bundle.path), "arrow": lambda: Model.load(bundle.path, route=route)}
    settings = json.loads(json.dumps({"limit": args.limit, "route": vars(route), "loras": sorted(bundle.library(args.library))}))
    last = RESULTS / f"{args.name}.json"
    last = json.loads(last.read_text()) if last.exists() else {}
    rows = last.get("tasks", {}) if all(last.get(k) == v for k, v in settings.items()) else {}
    todo = [(suite, f.name.removesuffix(".test.jsonl")) for suite in args.suites.split(",")
            for f in sorted((DATA / suite).glob("*.test.jsonl"))]
    for suite, task in todo:
        if args.tasks and task not in args.tasks.split(",") or task in rows:
            continue
        test = load_examples(DATA / suite / f"{task}.test.jsonl")[: args.limit]
        rows[task] = {"suite": suite, "machine": machine()}
        for name, load in models.items():
            t = time.perf_counter()
            r = evaluate(load(), test)
            rows[task][name] = {"exact": r["exact_match"], "options": r["option_accuracy"], "n": r["n"],
                                "seconds": round(time.perf_counter() - t, 1),
                                "answers": [e["generated"] for e in r["examples"][:5]]}
            opts = "-" if r["option_accuracy"] is None else f"{100 * r['option_accuracy']:.1f}%"
            print(f"{task:<45} {name:<10} exact {100 * r['exact_match']:5.1f}%  options {opts}  "
                  f"({rows[task][name]['seconds']} s)", flush=True)
        means = {suite: {name: statistics.mean(r[name]["exact"] for r in rows.values() if r["suite"] == suite)
                         for name in models} for suite in {r["suite"] for r in rows.values()}}
        save(args.name, {**settings, "tasks": rows, "exact_mean": means})


if __name__ == "__main__":
    main()
