"""Does quantizing after the merge lose the adaptation? On 3 BBH dev tasks: adapt once (the
default search), then score the adapted model written back as fp32, int8 (weight-only), int4
(the LoRA merged, its targets at 8 bits) and int4 + an unmerged fp32 LoRA, and the base fp32
for reference. The default `--quant` follows from it.

    python bench/quant_accuracy.py [--tasks sports_understanding,date_understanding,navigate] [--limit 60]
"""
from __future__ import annotations

import argparse
import time
from unittest import mock

from common import DATA, RESULTS, atomic_write, save

from edgelora.bundle import Bundle, home
from edgelora.evaluate import evaluate
from edgelora.examples import load_examples
from edgelora.generate import Model
from edgelora.outputs import write_outputs
from edgelora.search import adapt
from edgelora.writeback import write_model

VARIANTS = {"fp32": ("none", True), "int8": ("int8", True), "int4": ("int4", True), "int4+lora": ("int4", False),
            "int4-fp32-embedding": ("int4", True),  # int4 as before the 8-bit embedding table
            "int4-unfused-qkv": ("int4", True)}  # int4 as before q, k, v became one MatMul (k at 8 bits with them)


def write_variant(bundle, A, B, out, name: str) -> None:
    quant, merged = VARIANTS[name]
    if name == "int4-fp32-embedding":  # the write-back without its embedding step: what it replaced
        with mock.patch("edgelora.writeback.quantize_embedding", lambda *a, **k: False):
            write_model(bundle, A, B, out, quant, merged=merged)
    elif name == "int4-unfused-qkv":
        with mock.patch("edgelora.writeback.fuse_qkv", lambda *a, **k: {}):
            write_model(bundle, A, B, out, quant, merged=merged)
    else:
        write_model(bundle, A, B, out, quant, merged=merged)


def markdown(table: dict, limit: int) -> str:
    names = ["base-fp32", *(v for v in VARIANTS if any(v in row for row in table.values()))]
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"
    lines = [f"Exact match / option-ranking accuracy (%), first {limit} test examples, adapted with the default "
             "search (budget 40); base-fp32 is the unadapted model.", "",
             "| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for task, row in table.items():
        lines.append(f"| {task} | " + " | ".join(f"{pct(row[n]['exact'])} / {pct(row[n]['options'])}" for n in names) + " |")
    mean = lambda n, k: sum(r[n][k] for r in table.values()) / len(table)
    lines.append("| **mean** | " + " | ".join(f"{pct(mean(n, 'exact'))} / {pct(mean(n, 'options'))}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="sports_understanding,date_understanding,navigate")
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--name", default="quant_accuracy", help="results file name (bench/results/NAME.md/.json)")
    args = ap.parse_args()
    bundle = Bundle.open()
    work = home() / "bench" / "quant_accuracy"
    table = {}
    for task in args.tasks.split(","):
        adapt_file, test = DATA / "bbh" / f"{task}.adapt.jsonl", load_examples(DATA / "bbh" / f"{task}.test.jsonl")
        test = test[: args.limit]
        res = adapt(adapt_file, bundle, budget=args.budget, select="random")  # as when its results were made
        write_outputs(res, bundle, work / task)
        A, B = res.merged()
        row = {"loss": [res.start_loss, res.loss]}
        base = evaluate(Model.load(bundle.path), test)
        row["base-fp32"] = {"exact": base["exact_match"], "options": base["option_accuracy"]}
        for name in args.variants.split(","):
            out = work / task / name
            t = time.time()
            write_variant(bundle, A, B, out, name)
            r = evaluate(Model.load(out), test)
            row[name] = {"exact": r["exact_match"], "options": r["option_accuracy"], "eval_s": r["seconds"],
                         "write_s": round(time.time() - t - r["seconds"], 1),
                         "size_mb": round(sum(f.stat().st_size for f in out.glob("model.onnx*")) / 1e6, 1)}
            opts = "-" if r["option_accuracy"] is None else f"{100 * r['option_accuracy']:.1f}%"
            print(f"{task:<24} {name:<10} exact {100 * r['exact_match']:5.1f}%  options {opts}  "
                  f"({row[name]['size_mb']} MB, {r['seconds']:.0f}s)", flush=True)
        table[task] = row
    md = markdown(table, args.limit)
    atomic_write(RESULTS / f"{args.name}.md", md)
    print(md)
    save(args.name, {"limit": args.limit, "budget": args.budget, "tasks": table})


if __name__ == "__main__":
    main()
