"""Two LoRA libraries in one table, from two bench/bbh.py runs over the same tasks, test examples
and seeds. By default the per-task library (39 LoRAs, one per upstream task; bbh.json) against
the MBC library (10, one per cluster; bbh-mbc.json); `--runs` names any two, e.g. the shipped
30-step library against one retrained to convergence, each run at the same --limit. Per task and
per suite mean: each library column a run holds on every task (Arrow zero-shot, LoraHub, the
default adapt, the oracle LoRA, the uniform average), beside its counterpart, and the base's
zero-shot and ICL from the first run. Only tasks both runs hold. With --shipped-default, a first
run without the default column takes it from bench/results/bbh-shipped.json's answers cut to the
run's --limit (the shipped library's default adapt, as bench/kinds_bbh.py reads it; nothing re-run).

    python bench/libraries.py   # writes bench/results/libraries.md and libraries.json
    python bench/libraries.py --runs bbh-oracle-100,bbh-converged --labels "30 steps,converged" --shipped-default \
        --reports export/edgelora_export/library/report.json,bench/results/library-converged-report.json --name libraries-converged

`--reports` adds each library's training cost from its `edgelora-export library` report: LoRAs,
minutes, steps (a row written before 2026-12-05 counts only the last run of a resumed LoRA, so
undercounts).
"""
from __future__ import annotations

import argparse
import json
import statistics

from common import RESULTS, ROOT, atomic_write, save, shipped_default

COLUMNS = (("arrow-zs", "Arrow zero-shot"), ("lorahub", "LoraHub"), ("default", "default adapt"),
           ("oracle", "oracle LoRA"), ("uniform", "uniform"))


def value(row: dict, key: str, k: str):
    d = row.get(key)
    if d is None:
        return None
    return d.get(f"{k}_mean") if key == "lorahub" else d.get(k)


def rows(runs: list[dict], labels: list[str], k: str) -> list[dict]:
    out = []
    for (suite, task), r in runs[0].items():
        other = runs[1].get((suite, task))
        if other is None or r["zero-shot"][k] is None:
            continue
        out.append({"suite": suite, "task": task, "zero-shot": r["zero-shot"][k], "icl": r["icl"][k],
                    **{f"{key}/{lib}": value(src, key, k) for key, _ in COLUMNS
                       for lib, src in zip(labels, (r, other))}})
    return out


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def table(rs: list[dict], labels: list[str], title: str) -> tuple[str, dict]:
    cols = [(f"{key}/{lib}", f"{label} ({lib})") for key, label in COLUMNS for lib in labels]
    cols = [("zero-shot", "zero-shot"), ("icl", "ICL")] + [(c, h) for c, h in cols if all(r[c] is not None for r in rs)]
    keys = [c for c, _ in cols]
    lines = [f"**{title}**", "", "| suite | task | " + " | ".join(h for _, h in cols) + " |", "|---|---|" + "---:|" * len(keys)]
    for r in rs:
        lines.append(f"| {r['suite']} | {r['task']} | " + " | ".join(pct(r[c]) for c in keys) + " |")
    means = {}
    for suite in sorted({r["suite"] for r in rs}):
        ss = [r for r in rs if r["suite"] == suite]
        means[suite] = {c: statistics.mean(r[c] for r in ss) if all(r[c] is not None for r in ss) else None for c in keys}
        lines.append(f"| {suite} | **mean of {len(ss)}** | " + " | ".join(pct(means[suite][c]) for c in keys) + " |")
    return "\n".join(lines) + "\n", means


def load(name: str, with_shipped_default: bool = False) -> dict:
    """The run's rows by (suite, task); `with_shipped_default`: each given the shipped library's
    default adapt on the run's first --limit test examples where it has none."""
    run = json.loads((RESULTS / f"{name}.json").read_text())
    rows = {(r["suite"], r["task"]): r for r in run["tasks"]}
    if not with_shipped_default:
        return rows
    if run["limit"] is None:
        raise SystemExit(f"--shipped-default: {name}.json ran on every test example; bbh-shipped.json is that run")
    shipped = {r["task"]: r for r in json.loads((RESULTS / "bbh-shipped.json").read_text())["tasks"]}
    return {key: {**r, "default": r.get("default") or shipped_default(shipped[r["task"]], run["limit"])}
            for key, r in rows.items()}


def training(path: str) -> dict:
    """A library's training cost, from its `edgelora-export library` report."""
    r = json.loads((ROOT / path).read_text())
    steps = [t["steps"] for t in r["tasks"]]
    return {"report": path, "loras": len(steps), "minutes": round(sum(t["minutes"] for t in r["tasks"]), 1),
            "step_limit": r["config"]["steps"], "steps_median": statistics.median(steps), "steps_max": max(steps),
            "at_limit": sum(s >= r["config"]["steps"] for s in steps)}


def training_table(costs: list[dict], labels: list[str]) -> str:
    lines = ["**Training** (`edgelora-export library` reports)", "",
             "| library | LoRAs | minutes | step limit | steps (median / max) | stopped by the limit |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {lib} | {c['loras']} | {c['minutes']} | {c['step_limit']} | {c['steps_median']:g} / {c['steps_max']} | "
              f"{c['at_limit']} |" for lib, c in zip(labels, costs)]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="bbh,bbh-mbc", help="two bench/bbh.py result names (default bbh,bbh-mbc)")
    ap.add_argument("--labels", default="per-task,MBC", help="what each run's library is called in the table")
    ap.add_argument("--shipped-default", action="store_true",
                    help="the first run's default column from bbh-shipped.json's answers, cut to its --limit")
    ap.add_argument("--reports", help="two library reports (paths from the repository root, comma-separated): "
                    "adds each library's training minutes and steps")
    ap.add_argument("--name", default="libraries", help="results file name (default libraries)")
    args = ap.parse_args()
    names, labels = args.runs.split(","), args.labels.split(",")
    reports = args.reports.split(",") if args.reports else []
    if len(names) != 2 or len(labels) != 2 or len(reports) not in (0, 2):
        ap.error("--runs, --labels and --reports: two each")
    runs = [load(names[0], args.shipped_default), load(names[1])]
    md, summary = [], {}
    for k, title in (("exact", "Exact match on the generated answer (%)"), ("options", "Option-ranking accuracy (%)")):
        rs = rows(runs, labels, k)
        if rs:
            text, summary[k] = table(rs, labels, title)
            md.append(text)
    costs = [training(p) for p in reports]
    if costs:
        md.append(training_table(costs, labels))
    n = len([t for t in runs[0] if t in runs[1]])
    note = (f"The {labels[0]} library ({names[0]}.json) against the {labels[1]} library ({names[1]}.json) on the {n} "
            "tasks both bench/bbh.py runs have finished; zero-shot and ICL are the base alone.\n\n")
    atomic_write(RESULTS / f"{args.name}.md", note + "\n".join(md))
    save(args.name, {"runs": names, "labels": labels, "tasks": n, "means": summary,
                     **({"training": dict(zip(labels, costs))} if costs else {})})
    print(note + "\n".join(md))


if __name__ == "__main__":
    main()
