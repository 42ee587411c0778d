"""Does quantizing after the merge lose the adaptation? On 3 BBH dev tasks: adapt once (the
default search), then score the adapted model fp32 vs merged int8 vs merged int4 vs unmerged
int4 + fp32 LoRA, and the base fp32 for reference. The default `--quant` follows from it.

    python bench/quant_accuracy.py [--tasks sports_understanding,date_understanding,navigate] [--limit 60]
"""
from __future__ import annotations

import argparse
import time

from common import DATA, RESULTS, save

from edgelora.bundle import Bundle, home
from edgelora.evaluate import evaluate
from edgelora.examples import load_examples
from edgelora.generate import Model
from edgelora.outputs import write_outputs
from edgelora.search import adapt
from edgelora.writeback import write_model

VARIANTS = {"fp32": ("none", True), "int8": ("int8", True), "int4": ("int4", True), "int4+lora": ("int4", False)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="sports_understanding,date_understanding,navigate")
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--budget", type=int, default=40)
    args = ap.parse_args()
    bundle = Bundle.open()
    work = home() / "bench" / "quant_accuracy"
    table = {}
    for task in args.tasks.split(","):
        adapt_file, test = DATA / "bbh" / f"{task}.adapt.jsonl", load_examples(DATA / "bbh" / f"{task}.test.jsonl")
        test = test[: args.limit]
        res = adapt(adapt_file, bundle, budget=args.budget)
        write_outputs(res, bundle, work / task)
        A, B = res.merged()
        row = {"loss": [res.start_loss, res.loss]}
        base = evaluate(Model.load(bundle.path), test)
        row["base-fp32"] = {"exact": base["exact_match"], "options": base["option_accuracy"]}
        for name, (quant, merged) in VARIANTS.items():
            out = work / task / name
            t = time.time()
            write_model(bundle, A, B, out, quant, merged=merged)
            r = evaluate(Model.load(out), test)
            row[name] = {"exact": r["exact_match"], "options": r["option_accuracy"], "eval_s": r["seconds"],
                         "write_s": round(time.time() - t - r["seconds"], 1),
                         "size_mb": round((out / "model.onnx").stat().st_size / 1e6, 1)}
            opts = "-" if r["option_accuracy"] is None else f"{100 * r['option_accuracy']:.1f}%"
            print(f"{task:<24} {name:<10} exact {100 * r['exact_match']:5.1f}%  options {opts}  "
                  f"({row[name]['size_mb']} MB, {r['seconds']:.0f}s)", flush=True)
        table[task] = row
    names = ["base-fp32", *VARIANTS]
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for task, row in table.items():
        cell = lambda v: f"{100 * (v['options'] if v['options'] is not None else v['exact']):.1f}"
        lines.append(f"| {task} | " + " | ".join(cell(row[n]) for n in names) + " |")
    print("\n".join(lines))
    (RESULTS / "quant_accuracy.md").write_text("Option-ranking accuracy (exact match where a task has no options), "
                                               f"first {args.limit} test examples.\n\n" + "\n".join(lines) + "\n")
    save("quant_accuracy", {"limit": args.limit, "budget": args.budget, "tasks": table})


if __name__ == "__main__":
    main()
