"""LoraHub against zero-shot and in-context learning on every bbh/ and near/ task.

Per task (5 `adapt` examples, the `test` file): zero-shot, 5-shot ICL (the same 5 examples as
earlier chat turns), LoraHub (20 LoRAs, budget 40, --seeds seeds: mean ± std), the best single
LoRA (oracle: picked on the test set by option accuracy, or by target likelihood where a task
has no options — an upper reference), and the uniform average of all LoRAs. Exact match on
generated answers and option-ranking accuracy, with prompt tokens per example. Writes
bench/results/bbh.md and bbh.json.

    python bench/bbh.py [--suites bbh,near] [--tasks a,b] [--limit N] [--seeds 5] [--quant int8]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from common import DATA, RESULTS, save

from edgelora.bundle import Bundle, home
from edgelora.evaluate import evaluate
from edgelora.examples import encode_pairs, load_examples
from edgelora.generate import Model
from edgelora.lora import LoraStack, load_lora
from edgelora.scorer import Scorer
from edgelora.search import adapt
from edgelora.writeback import DEFAULT_QUANT, write_model


def score(model_dir: Path, test, shots=()) -> dict:
    r = evaluate(Model.load(model_dir), test, shots)
    return {"exact": r["exact_match"], "options": r["option_accuracy"], "prompt_tokens": r["prompt_tokens_mean"]}


def oracle_lora(bundle: Bundle, loras, test) -> str:
    """The single LoRA that does best on the test set, judged through the scoring graph."""
    fmt, tok, pad = bundle.prompt_format, bundle.tokenizer(), bundle.manifest["pad_id"]
    scorer = Scorer(bundle)
    with_opts = all(e.options for e in test)
    pairs = ([(fmt.prompt(e.input), o) for e in test for o in e.options] if with_opts
             else [(fmt.prompt(e.input), e.output + fmt.stop) for e in test])
    best, best_val = None, -np.inf
    for lora in loras:
        A, B = LoraStack([lora], list(bundle.targets)).compose(np.ones(1))
        lps = []
        for i in range(0, len(pairs), 16):
            batch, _ = encode_pairs(tok, pairs[i: i + 16], bundle.arch["max_len"], pad)
            scorer.bind(batch)
            lps += scorer.run(A, B)[1].tolist()
        if with_opts:
            k, val = 0, 0
            for e in test:
                n = len(e.options)
                val += e.options[int(np.argmax(lps[k: k + n]))] == e.output
                k += n
        else:
            val = sum(lps)
        if val > best_val:
            best, best_val = lora.name, val
    return best


def run_task(bundle: Bundle, suite: str, task: str, args) -> dict:
    adapt_file = DATA / suite / f"{task}.adapt.jsonl"
    shots = load_examples(adapt_file)
    test = load_examples(DATA / suite / f"{task}.test.jsonl")[: args.limit]
    work = home() / "bench" / "bbh" / task
    row = {"suite": suite, "task": task, "n_test": len(test)}
    row["zero-shot"] = score(bundle.path, test)
    row["icl"] = score(bundle.path, test, shots)
    runs = []
    for seed in range(args.seeds):
        res = adapt(adapt_file, bundle, budget=args.budget, seed=seed, warn=lambda m: None)
        write_model(bundle, *res.merged(), work / f"seed{seed}", args.quant)
        runs.append({**score(work / f"seed{seed}", test), "loss": [res.start_loss, res.loss],
                     "weights": dict(zip(res.loras, res.weights.round(4).tolist()))})
    agg = lambda k: [r[k] for r in runs if r[k] is not None]
    row["lorahub"] = {"runs": runs, **{f"{k}_mean": statistics.mean(agg(k)) if agg(k) else None for k in ("exact", "options")},
                      **{f"{k}_std": statistics.pstdev(agg(k)) if agg(k) else None for k in ("exact", "options")},
                      "prompt_tokens": runs[0]["prompt_tokens"]}
    library = [load_lora(p) for p in bundle.lora_paths().values()]
    name = oracle_lora(bundle, library, test)
    lora = next(l for l in library if l.name == name)
    write_model(bundle, *LoraStack([lora], list(bundle.targets)).compose(np.ones(1)), work / "oracle", args.quant)
    row["oracle"] = {"lora": name, **score(work / "oracle", test)}
    A, B = LoraStack(library, list(bundle.targets)).compose(np.full(len(library), 1 / len(library)))
    write_model(bundle, A, B, work / "uniform", args.quant)
    row["uniform"] = score(work / "uniform", test)
    return row


def pct(v):
    return "–" if v is None else f"{100 * v:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| suite | task | n | zero-shot | ICL | LoraHub (mean ± std) | oracle LoRA | uniform | prompt tokens (0-shot / ICL) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        k = "options" if r["zero-shot"]["options"] is not None else "exact"
        lh = r["lorahub"]
        lines.append(f"| {r['suite']} | {r['task']} ({k}) | {r['n_test']} | {pct(r['zero-shot'][k])} | {pct(r['icl'][k])} | "
                     f"{pct(lh[k + '_mean'])} ± {pct(lh[k + '_std'])} | {pct(r['oracle'][k])} | {pct(r['uniform'][k])} | "
                     f"{r['zero-shot']['prompt_tokens']:.0f} / {r['icl']['prompt_tokens']:.0f} |")
    for suite in sorted({r["suite"] for r in rows}):
        rs = [r for r in rows if r["suite"] == suite]
        m = lambda f: statistics.mean(f(r) for r in rs)
        key = lambda r: "options" if r["zero-shot"]["options"] is not None else "exact"
        lines.append(f"| {suite} | **mean** | | {pct(m(lambda r: r['zero-shot'][key(r)]))} | {pct(m(lambda r: r['icl'][key(r)]))} | "
                     f"{pct(m(lambda r: r['lorahub'][key(r) + '_mean']))} | {pct(m(lambda r: r['oracle'][key(r)]))} | "
                     f"{pct(m(lambda r: r['uniform'][key(r)]))} | |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suites", default="bbh,near")
    ap.add_argument("--tasks", help="only these tasks (comma-separated)")
    ap.add_argument("--limit", type=int, help="first N test examples per task (default: all)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--quant", default=DEFAULT_QUANT)
    args = ap.parse_args()
    bundle = Bundle.open()
    rows = []
    for suite in args.suites.split(","):
        for f in sorted((DATA / suite).glob("*.adapt.jsonl")):
            task = f.name.removesuffix(".adapt.jsonl")
            if args.tasks and task not in args.tasks.split(","):
                continue
            rows.append(run_task(bundle, suite, task, args))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    md = table(rows)
    print(md)
    note = (f"LoraHub: {args.seeds} seeds, budget {args.budget}, 20 of {len(bundle.lora_paths())} LoRAs; "
            f"models written back as {args.quant}; test examples per task: {args.limit or 'all'}.\n\n")
    (RESULTS / "bbh.md").write_text(note + md + "\n")
    save("bbh", {"seeds": args.seeds, "budget": args.budget, "quant": args.quant, "limit": args.limit, "tasks": rows})


if __name__ == "__main__":
    main()
