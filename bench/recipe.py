"""The per-task recipe (adapt --recipe auto) against its candidates and today's default, on every
bbh/ and near/ task.

Per task, on the first --limit test examples, exact match and option accuracy of generated answers
from models written back as `adapt` writes them (int4, the LoRA's targets at 8 bits, merged):
- `zero-shot`, `icl`: the base model written back the same way (what adapt writes for those
  recipes), alone or with the 5 adapt examples as earlier chat turns;
- `adapted`, `adapted+icl`: `adapt --optimizer surrogate --compose cat`'s model, alone or with
  the 5 examples as shots;
- `chosen`: the recipe its leave-one-out picks (`--recipe auto`, recipe.best on the row's table),
  which is one of the four: the folder adapt writes holds that model (the same write_model call)
  and those shots (the same examples, in file order), so its column is the candidate's;
- `strict`: the rule first run (the most held-out examples right, then cross-entropy, then the
  shorter prompt), kept beside it: the tie within one example of five was adopted after this
  bench's second task (arithmetic_3_digit_addition) showed a one-example win picking the worst
  recipe, so both columns are reported;
- `today`: today's default adapt (COBYLA, LoraHub's composition), taken from
  bench/results/surrogate.json, measured the same way on the same examples (its `cobyla` rows).
Also `zero-shot fp32` and `icl fp32`: the bundle's base as it is (the dequantised fp32 model that
bench/results/bbh.md's zero-shot and ICL columns ran), since a user who skips adapt may deploy it;
the int4 base lost much of its ICL accuracy on some tasks. And the leave-one-out table, and its
seconds (what the recipe choice adds to an adapt).
Resumable: finished tasks in bench/results/NAME.json are kept.

    python bench/recipe.py [--tasks a,b] [--limit 100]
    python bench/recipe.py --report
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from common import DATA, RESULTS, by_suite, dev_args, report_md, dev_tasks, save

from edgelora.bundle import Bundle
from edgelora.evaluate import evaluate
from edgelora.examples import load_examples
from edgelora.generate import Model
from edgelora.io import atomic_write
from edgelora.lora import zero_slots
from edgelora.recipe import RECIPES, TIE, best
from edgelora.search import adapt
from edgelora.writeback import write_model

CANDIDATE = {"optimizer": "surrogate", "compose": "cat", "recipe": "auto"}
COLUMNS = ("zero-shot", "icl", "adapted", "adapted+icl", "chosen", "strict", "today", "zero-shot fp32", "icl fp32")


def scored(model: Model, test, shots) -> dict:
    r = evaluate(model, test, shots)
    return {"exact": r["exact_match"], "options": r["option_accuracy"]}


def run_task(bundle: Bundle, base: Model, suite: str, task: str, limit: int, work: Path, today: dict) -> dict:
    adapt_file = DATA / suite / f"{task}.adapt.jsonl"
    test = load_examples(DATA / suite / f"{task}.test.jsonl")[:limit]
    shots = load_examples(adapt_file)
    row = {"suite": suite, "task": task, "n_test": len(test)}
    t0 = time.perf_counter()
    res = adapt(adapt_file, bundle, warn=lambda m: None, **CANDIDATE)
    row["adapt_s"], row["recipe_s"] = round(time.perf_counter() - t0, 1), round(res.timings["recipe"], 2)
    row["recipe"] = {k: res.recipe[k] for k in ("choice", "why", "table")}
    row["setting"] = res.surrogate["setting"]
    write_model(bundle, *res.merged(), work / "adapted")
    adapted = Model.load(work / "adapted")
    for name, (use_adapted, with_shots) in RECIPES.items():
        row[name] = scored(adapted if use_adapted else base, test, shots if with_shots else [])
        print(f"[{task}] {name}: exact {row[name]['exact']:.2f}, options {row[name]['options']}", flush=True)
    row["today"] = {k: today[task][k] for k in ("exact", "options")}
    print(f"[{task}] chose {best(row['recipe']['table'])} (adapt {row['adapt_s']:.0f} s, of which leave-one-out "
          f"{row['recipe_s']:.1f} s)", flush=True)
    return row


def strict(table: dict) -> str:
    """The first rule: the most held-out examples right, then the lowest cross-entropy, then (within
    recipe.TIE) the shorter prompt."""
    top = max(r["correct"] for r in table.values())
    cands = [n for n in RECIPES if n in table and table[n]["correct"] == top]
    low = min(table[n]["ce"] for n in cands)
    tied = [n for n in cands if table[n]["ce"] <= low * (1 + TIE) + 1e-9]
    return min(tied, key=lambda n: (table[n]["prompt_tokens"], list(RECIPES).index(n)))


def with_choices(r: dict) -> dict:
    """The row with its `chosen` (today's rule) and `strict` columns, from its leave-one-out table."""
    t = r["recipe"]["table"]
    return {**r, "choice": best(t), "strict_choice": strict(t), "chosen": r[best(t)], "strict": r[strict(t)]}


def fp32_columns(row: dict, bundle_model: Model, limit: int) -> dict:
    """The row with the bundle's fp32 base, zero-shot and with the 5 shots (a second pass, which
    rows measured before these columns existed get on a re-run)."""
    test = load_examples(DATA / row["suite"] / f"{row['task']}.test.jsonl")[:limit]
    shots = load_examples(DATA / row["suite"] / f"{row['task']}.adapt.jsonl")
    out = {**row, "zero-shot fp32": scored(bundle_model, test, []), "icl fp32": scored(bundle_model, test, shots)}
    print(f"[{row['task']}] fp32 base: zero-shot {out['zero-shot fp32']}, icl {out['icl fp32']}", flush=True)
    return out


def metric(r: dict, col: str) -> float:
    """Option accuracy where the task has options, else exact match: what the task is scored by."""
    d = r[col]
    return d["options"] if d["options"] is not None else d["exact"]


def summary(rows: list[dict]) -> dict:
    rows = [with_choices(r) for r in rows]
    out = {}
    for suite, rs in by_suite(rows):
        s = {"tasks": len(rs)}
        for col in (c for c in COLUMNS if all(c in r for r in rs)):
            for k in ("exact", "options"):
                vals = [r[col][k] for r in rs if r[col][k] is not None]
                if vals:
                    s[f"{col}_{k}"] = round(statistics.mean(vals), 4)
            s[f"{col}_task_metric"] = round(statistics.mean(metric(r, col) for r in rs), 4)
        # the bar: the chosen recipe within 5 points of the better of zero-shot and ICL
        for col in ("chosen", "strict"):
            s[f"{col}_within_5_of_better_alternative"] = sum(
                metric(r, col) >= max(metric(r, "zero-shot"), metric(r, "icl")) - 0.05 for r in rs)
        s["recipe_s_median"] = statistics.median(r["recipe_s"] for r in rs)
        s["recipe_s_max"] = max(r["recipe_s"] for r in rs)
        s["choices"] = {c: sum(r["choice"] == c for r in rs) for c in RECIPES}
        out[suite] = s
    return out


def suite_line(suite: str, m: dict) -> str:
    """One suite's means, in one line of the report."""
    have = [c for c in COLUMNS if f"{c}_task_metric" in m]
    cols = ", ".join(f"{c} {100 * m[f'{c}_task_metric']:.1f}" for c in have)
    return (f"- {suite} ({m['tasks']} tasks), mean of each task's metric (options where it has them, else "
            f"exact): {cols}; exact: " + ", ".join(f"{c} {100 * m[f'{c}_exact']:.1f}" for c in have)
            + f"; within 5 points of the better of zero-shot and ICL: chosen on "
            f"{m['chosen_within_5_of_better_alternative']}/{m['tasks']}, strict rule on "
            f"{m['strict_within_5_of_better_alternative']}/{m['tasks']}; leave-one-out seconds median "
            f"{m['recipe_s_median']:.1f}, max {m['recipe_s_max']:.1f}; choices {m['choices']}")


def table(rows: list[dict], summ: dict) -> str:
    rows = [with_choices(r) for r in rows]
    pct = lambda v: "–" if v is None else f"{100 * v:.0f}"
    head = ("| suite | task | zero-shot | ICL | adapted | adapted+ICL | **chosen** (recipe) | strict rule | today's default | "
            "zero-shot / ICL, fp32 base | leave-one-out (right of 5: adapted / zero-shot / adapted+ICL / ICL) | LOO s |")
    lines = ["Exact match / option accuracy (%), first 100 test examples; models int4 as adapt writes them.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cell = lambda c: f"{pct(r[c]['exact'])} / {pct(r[c]['options'])}" if c in r else "–"
        t = r["recipe"]["table"]
        loo = " / ".join(str(t[c]["correct"]) if c in t else "–" for c in RECIPES)
        lines.append(f"| {r['suite']} | {r['task']} | {cell('zero-shot')} | {cell('icl')} | {cell('adapted')} | "
                     f"{cell('adapted+icl')} | **{cell('chosen')}** ({r['choice']}) | {cell('strict')} ({r['strict_choice']}) | "
                     f"{cell('today')} | {cell('zero-shot fp32')} · {cell('icl fp32')} | "
                     f"{loo} | {r['recipe_s']:.1f} |")
    return report_md(lines, summ, suite_line)


def main():
    """Every task's row (resumed where NAME.json has it), then the fp32 base's columns where missing."""
    args, done = dev_args(__doc__, name="recipe", report=lambda rows: table(rows, summary(rows)))
    prior = json.loads((RESULTS / "surrogate.json").read_text())
    if prior["limit"] != args.limit and not args.tasks:
        raise SystemExit(f"today's default column comes from surrogate.json, measured on {prior['limit']} examples")
    today = {r["task"]: r["cobyla"] for r in prior["tasks"]}
    bundle = Bundle.open()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # the base as adapt writes it for zero-shot / icl: a zero LoRA merged, so q/v at 8 bits (outputs.py)
        write_model(bundle, *zero_slots(bundle.targets, bundle.arch["layers"]), Path(tmp) / "base")
        base = Model.load(Path(tmp) / "base")
        for suite, task in dev_tasks(args.tasks):
            rows.append(done.get(task) or run_task(bundle, base, suite, task, args.limit, Path(tmp) / task, today))
            save(args.name, {"limit": args.limit, "candidate": CANDIDATE,
                             "summary": summary(rows), "tasks": rows})
            atomic_write(RESULTS / f"{args.name}.md", table(rows, summary(rows)))
        bundle_model = Model.load(bundle.path)
        for i, row in enumerate(rows):
            if "icl fp32" not in row:
                rows[i] = fp32_columns(row, bundle_model, args.limit)
                save(args.name, {"limit": args.limit, "candidate": CANDIDATE, "summary": summary(rows), "tasks": rows})
                atomic_write(RESULTS / f"{args.name}.md", table(rows, summary(rows)))


if __name__ == "__main__":
    main()
