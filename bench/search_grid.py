"""Two candidates for the search issue, against today's default on all 18 dev tasks:

- `cobyla_cat`: today's default with the exact composition (`--compose cat`): the issue's first
  item makes cat the default if it measures no worse than LoraHub's;
- `surrogate_searched`: `--optimizer surrogate --compose cat` with leave-one-out choosing only
  among searches (5, 20 or all LoRAs; radius 0.5 or the box), not the best single LoRA alone.
  In `surrogate.json` leave-one-out chose the single LoRA on 6 of 18 tasks, and those 6 account
  for 21 of the 27 exact-match points the surrogate lost to COBYLA.

Both with `--recipe adapted` (the search's model alone, as `surrogate.json` measured it, before the
recipe choice existed). Then:

- `cobyla_budget20`: today's default with half the budget (20 points, the start included): fewer
  forwards, judged on test accuracy.

A resumed task gets the variants it lacks.

Per variant, as bench/surrogate.py measures: the search's objective curve, forwards, seconds, test
cross-entropy and teacher-forced exact on the first --limit test examples (fp32 scoring graph), and
exact match / option accuracy of the model written back as `adapt` writes it. Today's default and
the surrogate's columns are read from `surrogate.json` (the same code path: the default's search is
deterministic and its losses there reproduce `bbh.json`'s), not re-run.

Resumable: finished tasks in bench/results/search_grid.json are kept.

    python bench/search_grid.py [--tasks a,b] [--limit 100]
    python bench/search_grid.py --report
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from common import DATA, RESULTS, accuracy, by_suite, dev_args, dev_tasks, report_md, save
from surrogate import curve, test_scores

import edgelora.surrogate as surrogate
from edgelora.bundle import Bundle
from edgelora.examples import load_examples
from edgelora.io import atomic_write
from edgelora.search import AdaptConfig, adapt

VARIANTS = {
    "cobyla_cat": {"compose": "cat", "recipe": "adapted"},
    "surrogate_searched": {"optimizer": "surrogate", "compose": "cat", "recipe": "adapted"},
    "cobyla_budget20": {"budget": 20},
}
HEADERS = {"cobyla": "COBYLA", "cobyla_cat": "COBYLA cat", "surrogate": "surrogate",
           "surrogate_searched": "surrogate searched", "cobyla_budget20": "COBYLA budget 20"}


NEVER = 1e9  # a held-out loss no setting beats


@contextmanager
def grid_without_single():
    """Leave-one-out that never keeps the best single LoRA (no search): its row is scored as
    NEVER, so the best modelled search is always checked with true forwards and chosen. The
    single LoRA stays the search's start, as before."""
    orig = surrogate.loo_table

    def table(*args, **kw):
        rows = orig(*args, **kw)
        for r in rows:
            if r["setting"].span == 1:
                r["modelled"] = NEVER
        return rows
    surrogate.loo_table = table
    try:
        yield
    finally:
        surrogate.loo_table = orig


def run_task(bundle: Bundle, suite: str, task: str, limit: int, work: Path, old: dict, row: dict | None,
             variants: list[str]) -> dict:
    """The variants `row` (a resumed task's) lacks, added to it."""
    test = load_examples(DATA / suite / f"{task}.test.jsonl")[:limit]
    row = row or {"suite": suite, "task": task, "n_test": len(test),
                  "cobyla": old["cobyla"], "surrogate": old["surrogate"]}
    for name in variants:
        if name in row:
            continue
        over = VARIANTS[name]
        with grid_without_single() if name == "surrogate_searched" else nullcontext():
            t0 = time.perf_counter()
            res = adapt(DATA / suite / f"{task}.adapt.jsonl", bundle, warn=lambda *a: None, **over)
            seconds = time.perf_counter() - t0
        r = {"seconds": round(seconds, 1), "forwards": res.settings["forwards"],
             "search_points": len(res.history) - 1, "loss": round(res.loss, 5),
             "objective": round(res.objective, 5), "stop": res.stop, "best_after": curve(res.history),
             "weights": {n: round(float(w), 4) for n, w in zip(res.loras, res.weights) if w}}
        if res.surrogate:
            r.update({k: res.surrogate[k] for k in ("setting", "loo", "steps")})
        r.update(test_scores(bundle, res, test))
        r.update(accuracy(bundle, res.merged(), work / name, test))
        row[name] = r
        print(f"[{task}] {name}: loss {r['loss']:.4f}, {r['forwards']} forwards, {r['seconds']:.0f} s, "
              f"test CE {r['test_ce']:.4f}, exact {r['exact']:.3f} ({r['stop']})", flush=True)
    return row


def columns(rows: list[dict]) -> list[str]:
    """The variants every row has, in HEADERS' order."""
    return [v for v in HEADERS if all(v in r for r in rows)]


def summary(rows: list[dict]) -> dict:
    out = {}
    for suite, rs in by_suite(rows):
        s = {"tasks": len(rs)}
        for v in columns(rows):
            for k in ("test_ce", "exact", "options", "seconds", "forwards"):
                vals = [r[v][k] for r in rs if r[v].get(k) is not None]
                if vals:
                    s[f"{v}_{k}_mean"] = round(statistics.mean(vals), 4)
        out[suite] = s
    return out


def table(rows: list[dict]) -> str:
    vs = columns(rows)
    names = " / ".join(HEADERS[v] for v in vs)
    setting = "surrogate_searched" in vs
    head = (f"| suite | task | exact: {names} | test CE (same) | forwards (same) |"
            + (" surrogate searched setting |" if setting else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cols = [r[v] for v in vs]
        lines.append(f"| {r['suite']} | {r['task']} | " + " / ".join(f"{c['exact'] * 100:.0f}" for c in cols)
                     + " | " + " / ".join(f"{c['test_ce']:.3f}" for c in cols)
                     + " | " + " / ".join(str(c["forwards"]) for c in cols) + " |"
                     + (f" {r['surrogate_searched'].get('setting', '')} |" if setting else ""))

    def suite_line(suite: str, m: dict) -> str:
        return (f"- {suite} ({m['tasks']} tasks): exact {names}: "
                + " / ".join(f"{m[f'{v}_exact_mean'] * 100:.1f}" for v in vs)
                + "; test CE " + " / ".join(f"{m[f'{v}_test_ce_mean']:.3f}" for v in vs)
                + "; forwards " + " / ".join(f"{m[f'{v}_forwards_mean']:.0f}" for v in vs))
    return report_md(lines, summary(rows), suite_line)


def main():
    args, done = dev_args(__doc__, "search_grid", table)
    old = {r["task"]: r for r in json.loads((RESULTS / "surrogate.json").read_text())["tasks"]}
    bundle = Bundle.open()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for suite, task in dev_tasks(args.tasks):
            rows.append(run_task(bundle, suite, task, args.limit, Path(tmp) / task, old[task], done.get(task),
                                 list(VARIANTS)))
            save(args.name, {"limit": args.limit, "defaults": AdaptConfig().__dict__, "variants": VARIANTS,
                             "summary": summary(rows), "tasks": rows})
            atomic_write(RESULTS / f"{args.name}.md", table(rows))


if __name__ == "__main__":
    main()
