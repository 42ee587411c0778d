"""The per-task library (39 LoRAs, one per upstream task) against the MBC library (10, one per
cluster) in one table, from bench/bbh.py's two result files: bbh.json and bbh-mbc.json (the
same tasks, test examples and seeds). Per task and per suite mean: Arrow zero-shot, LoraHub
(random sample; over MBC all 10, one run) and the default adapt over each library, beside the
base's zero-shot and ICL and the per-task library's oracle LoRA and uniform average (bbh.py
leaves those two to the per-task library). Only tasks both files hold.

    python bench/libraries.py   # writes bench/results/libraries.md and libraries.json
"""
from __future__ import annotations

import json
import statistics

from common import RESULTS, atomic_write, save

COLUMNS = (("arrow-zs", "Arrow zero-shot"), ("lorahub", "LoraHub"), ("default", "default adapt"))
REFERENCES = (("oracle", "oracle LoRA (per-task)"), ("uniform", "uniform (per-task)"))


def value(row: dict, key: str, k: str):
    d = row.get(key)
    if d is None:
        return None
    return d.get(f"{k}_mean") if key == "lorahub" else d.get(k)


def rows(per_task: dict, mbc: dict, k: str) -> list[dict]:
    out = []
    for (suite, task), r in per_task.items():
        m = mbc.get((suite, task))
        if m is None or r["zero-shot"][k] is None:
            continue
        out.append({"suite": suite, "task": task, "zero-shot": r["zero-shot"][k], "icl": r["icl"][k],
                    **{f"{key}/{lib}": value(src, key, k) for key, _ in COLUMNS
                       for lib, src in (("per-task", r), ("mbc", m))},
                    **{key: value(r, key, k) for key, _ in REFERENCES}})
    return out


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def table(rs: list[dict], title: str) -> tuple[str, dict]:
    keys = (["zero-shot", "icl"] + [f"{key}/{lib}" for key, _ in COLUMNS for lib in ("per-task", "mbc")]
            + [key for key, _ in REFERENCES])
    head = (["zero-shot", "ICL"] + [f"{label} ({lib})" for _, label in COLUMNS for lib in ("per-task", "MBC")]
            + [label for _, label in REFERENCES])
    lines = [f"**{title}**", "", "| suite | task | " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(keys)]
    for r in rs:
        lines.append(f"| {r['suite']} | {r['task']} | " + " | ".join(pct(r[c]) for c in keys) + " |")
    means = {}
    for suite in sorted({r["suite"] for r in rs}):
        ss = [r for r in rs if r["suite"] == suite]
        means[suite] = {c: statistics.mean(r[c] for r in ss) if all(r[c] is not None for r in ss) else None for c in keys}
        lines.append(f"| {suite} | **mean of {len(ss)}** | " + " | ".join(pct(means[suite][c]) for c in keys) + " |")
    return "\n".join(lines) + "\n", means


def load(name: str) -> dict:
    return {(r["suite"], r["task"]): r for r in json.loads((RESULTS / f"{name}.json").read_text())["tasks"]}


def main():
    per_task, mbc = load("bbh"), load("bbh-mbc")
    md, summary = [], {}
    for k, title in (("exact", "Exact match on the generated answer (%)"), ("options", "Option-ranking accuracy (%)")):
        rs = rows(per_task, mbc, k)
        if rs:
            text, summary[k] = table(rs, title)
            md.append(text)
    n = len([t for t in per_task if t in mbc])
    note = (f"Per-task library (39 LoRAs) against the MBC library (10 cluster LoRAs) on the {n} tasks both "
            "bench/bbh.py runs have finished (bbh.json, bbh-mbc.json); zero-shot and ICL are the base alone.\n\n")
    atomic_write(RESULTS / "libraries.md", note + "\n".join(md))
    save("libraries", {"tasks": n, "means": summary})
    print(note + "\n".join(md))


if __name__ == "__main__":
    main()
