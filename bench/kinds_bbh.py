"""The adapter kinds side by side on the 18 dev tasks: the default adapt over the LoRA library,
over the adaption-prompt library, and over both at once (the mixed search), with the base's
zero-shot and ICL and the best single prompt (the oracle, picked on the test set: an upper
reference), on the same first N test examples of each task, every model written back as adapt
writes it. The oracle's suite means are over the tasks it has run on, and say how many.

The prompt and mixed columns are `bench/bbh.py --library prompts --columns default,mixed --limit N`'s
(bench/results/bbh-prompts.json, or several such runs of the same settings, say one per suite run
side by side: `--runs bbh-prompts,bbh-prompts-near`). The LoRA column is the `bench/bbh.py` run of
bench/results/bbh-shipped.json (every test example): its answers, one per example in
EDGELORA_HOME/bench/bbh-shipped/TASK/default/eval.json, are read back and cut to the first N, and
only if they are that run's (their count and accuracy equal the committed row's). No model is
re-run here.

    python bench/kinds_bbh.py [--runs bbh-prompts]   # writes bench/results/kinds_bbh.md and kinds_bbh.json
"""
from __future__ import annotations

import argparse
import json
import statistics

from common import RESULTS, atomic_write, save, shipped_default

COLUMNS = (("zero-shot", "zero-shot"), ("icl", "ICL"), ("lora", "LoRA default"), ("prompts", "prompt default"),
           ("mixed", "mixed"), ("oracle", "prompt oracle"))


def read(names: str) -> list[dict]:
    """bench/bbh.py's results, one per name (comma-separated)."""
    return [json.loads((RESULTS / f"{name}.json").read_text()) for name in names.split(",")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="bbh-prompts", help="bench/bbh.py results (names, comma-separated) to read rows from")
    ap.add_argument("--oracle", default="bbh-prompts-oracle",
                    help="bench/bbh.py --library prompts --columns oracle runs at the same --limit (the best single prompt)")
    args = ap.parse_args()
    runs, oracle_runs = read(args.runs), read(args.oracle)
    if len({r["limit"] for r in runs + oracle_runs}) > 1 or len({json.dumps(r.get("columns")) for r in runs}) > 1:
        raise SystemExit("--runs, --oracle: the runs differ in their test examples or columns")
    oracle = {(r["suite"], r["task"]): r["oracle"] for run in oracle_runs for r in run["tasks"] if "oracle" in r}
    shipped = {r["task"]: r for r in json.loads((RESULTS / "bbh-shipped.json").read_text())["tasks"]}
    n = runs[0]["limit"]
    rows = []
    for r in [row for run in runs for row in run["tasks"]]:
        if "mixed" not in r or "default" not in r:
            continue
        rows.append({"suite": r["suite"], "task": r["task"], "n": min(n, r["n_test"]),
                     "zero-shot": r["zero-shot"], "icl": r["icl"], "lora": shipped_default(shipped[r["task"]], n),
                     "prompts": r["default"], "mixed": r["mixed"], "oracle": oracle.get((r["suite"], r["task"])),
                     "forwards": {"lora": shipped[r["task"]]["default"]["forwards"], "prompts": r["default"]["forwards"],
                                  "mixed": r["mixed"]["forwards"]},
                     "prompts_in_mixed": r["mixed"]["prompts_kept"]})
    lines = [f"Exact / option accuracy (%), first {n} test examples of each task, models written back as adapt writes "
             f"them (int4, targets at 8 bits; a prompt in the decoder); forwards per adapt in the last columns.", "",
             "| suite | task | " + " | ".join(h for _, h in COLUMNS) + " | forwards: LoRA / prompt / mixed | prompts among mixed's 20 |",
             "|---|---|" + "---:|" * (len(COLUMNS) + 2)]
    pct = lambda v: "–" if v is None else f"{100 * v:.0f}"
    cell = lambda d: "–" if d is None else f"{pct(d['exact'])} / {pct(d['options'])}"
    for r in rows:
        f = r["forwards"]
        lines.append(f"| {r['suite']} | {r['task']} | " + " | ".join(cell(r[k]) for k, _ in COLUMNS)
                     + f" | {f['lora']} / {f['prompts']} / {f['mixed']} | {r['prompts_in_mixed']} |")
    lines.append("")
    metric = lambda d: d["options"] if d["options"] is not None else d["exact"]
    means = {}
    for suite in ("bbh", "near", "all"):
        ss = [r for r in rows if suite in (r["suite"], "all")]
        if not ss:
            continue
        means[suite] = {k: {"tasks": len(have), "exact": statistics.mean(r[k]["exact"] for r in have),
                            "metric": statistics.mean(metric(r[k]) for r in have)}
                        for k, _ in COLUMNS if (have := [r for r in ss if r[k] is not None])}
        label = lambda k, h: h + ("" if means[suite][k]["tasks"] == len(ss) else f" (of {means[suite][k]['tasks']})")
        lines.append(f"- {suite} ({len(ss)} tasks), exact: " + ", ".join(f"{label(k, h)} {100 * means[suite][k]['exact']:.1f}"
                                                                         for k, h in COLUMNS if k in means[suite])
                     + "; option accuracy where a task has options, else exact: "
                     + ", ".join(f"{label(k, h)} {100 * means[suite][k]['metric']:.1f}" for k, h in COLUMNS if k in means[suite]))
    atomic_write(RESULTS / "kinds_bbh.md", "\n".join(lines) + "\n")
    save("kinds_bbh", {"limit": n, "tasks": rows, "means": means})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
