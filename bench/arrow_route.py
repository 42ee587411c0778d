"""Arrow routing at inference (`edgelora eval --route arrow`) against the plain base, zero-shot,
on near/ tasks: no examples, no search, the whole library routed per token (top-3, fp32). The
two models score the same first --limit test examples of each task, the routed one in the same
process after the plain one. Writes bench/results/arrow_route_eval.json.

    python bench/arrow_route.py [--tasks a,b] [--limit 50] [--top-k 3]
"""
from __future__ import annotations

import argparse
import time

from common import DATA, save

from edgelora.bundle import Bundle
from edgelora.evaluate import evaluate
from edgelora.examples import load_examples
from edgelora.generate import Model
from edgelora.lora import ArrowRoute

TASKS = "linguistic_mappings_plural_regular_json,unit_conversion_different_systems,color_hex"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--top-k", type=int, default=ArrowRoute.top_k)
    args = ap.parse_args()
    bundle = Bundle.open()
    route = ArrowRoute(top_k=args.top_k)
    models = {"zero-shot": lambda: Model.load(bundle.path), "arrow": lambda: Model.load(bundle.path, route=route)}
    rows = {}
    for task in args.tasks.split(","):
        test = load_examples(DATA / "near" / f"{task}.test.jsonl")[: args.limit]
        rows[task] = {}
        for name, load in models.items():
            t = time.perf_counter()
            r = evaluate(load(), test)
            rows[task][name] = {"exact": r["exact_match"], "options": r["option_accuracy"], "n": r["n"],
                                "seconds": round(time.perf_counter() - t, 1),
                                "answers": [e["generated"] for e in r["examples"][:5]]}
            opts = "-" if r["option_accuracy"] is None else f"{100 * r['option_accuracy']:.1f}%"
            print(f"{task:<45} {name:<10} exact {100 * r['exact_match']:5.1f}%  options {opts}  "
                  f"({rows[task][name]['seconds']} s)", flush=True)
    save("arrow_route_eval", {"limit": args.limit, "route": vars(route), "tasks": rows})


if __name__ == "__main__":
    main()
