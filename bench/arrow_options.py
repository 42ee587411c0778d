"""Arrow zero-shot's option ranking: the options' own tokens routed, or the prompt only.

Arrow routing teaches the library's answer form, and ranking given options scores the options'
own tokens under the same routing: on held-out tasks it lowered option accuracy (57 → 23 on one).
Per bbh/ and near/ task with options, on the first --limit test examples, the option accuracy
(each option's summed log-prob after the prompt, as `edgelora eval` ranks them) of:
- `zero-shot`: the bundle's base (fp32);
- `routed`: Arrow top-3 over the per-task library, the options' tokens routed (before this change);
- `prompt`: the same routed prompt, the options' own tokens run with the routing off
  (`arrow_gate` 0; ArrowRoute.options = "prompt").
Exact match is not measured here: generation routes every token either way, so its column is
bench/results/bbh.md's Arrow zero-shot one.

    python bench/arrow_options.py [--tasks a,b] [--limit 100]
    python bench/arrow_options.py --report
"""
from __future__ import annotations

import statistics

from common import DATA, RESULTS, by_suite, dev_args, dev_tasks, report_md, save

from edgelora.arrow import ArrowRoute
from edgelora.bundle import Bundle
from edgelora.evaluate import prompt_ids
from edgelora.examples import load_examples
from edgelora.generate import Model
from edgelora.io import atomic_write

VARIANTS = ("zero-shot", "routed", "prompt")


def option_accuracy(model: Model, test) -> float:
    right = 0
    for ex in test:
        ids, _ = prompt_ids(model, ex, [])
        lps = model.decoder.option_logprobs(ids, [model.encode(o) for o in ex.options], gate=model.option_gate)
        right += ex.options[max(range(len(lps)), key=lps.__getitem__)] == ex.output
    return right / len(test)


def summary(rows: list[dict]) -> dict:
    out = {}
    for suite, rs in by_suite(rows):
        out[suite] = {"tasks": len(rs), **{v: round(statistics.mean(r[v] for r in rs), 4) for v in VARIANTS},
                      "prompt_not_below_zero_shot_minus_5": sum(r["prompt"] >= r["zero-shot"] - 0.05 for r in rs),
                      "routed_not_below_zero_shot_minus_5": sum(r["routed"] >= r["zero-shot"] - 0.05 for r in rs)}
    return out


def table(rows: list[dict], summ: dict) -> str:
    lines = ["Option accuracy (%), first 100 test examples, fp32.", "",
             "| suite | task | zero-shot | Arrow, options routed | Arrow, prompt only |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['suite']} | {r['task']} | {100 * r['zero-shot']:.0f} | {100 * r['routed']:.0f} | "
              f"{100 * r['prompt']:.0f} |" for r in rows]
    return report_md(lines, summ, lambda suite, m: (
        f"- {suite} ({m['tasks']} tasks): zero-shot {100 * m['zero-shot']:.1f}, options routed {100 * m['routed']:.1f}, "
        f"prompt only {100 * m['prompt']:.1f}; within 5 points of zero-shot or above: routed on "
        f"{m['routed_not_below_zero_shot_minus_5']}, prompt only on {m['prompt_not_below_zero_shot_minus_5']}"))


def main():
    args, done = dev_args(__doc__, "arrow_options", lambda rows: table(rows, summary(rows)))
    bundle = Bundle.open()
    models = {"zero-shot": Model.load(bundle.path), "routed": Model.load(bundle.path, route=ArrowRoute(options="routed")),
              "prompt": Model.load(bundle.path, route=ArrowRoute(options="prompt"))}
    rows = []
    for suite, task in dev_tasks(args.tasks):
        test = load_examples(DATA / suite / f"{task}.test.jsonl")[: args.limit]
        if not all(ex.options for ex in test):
            continue
        row = done.get(task) or {"suite": suite, "task": task, "n_test": len(test),
                                 **{v: option_accuracy(m, test) for v, m in models.items()}}
        print(f"[{task}] " + ", ".join(f"{v} {row[v]:.2f}" for v in VARIANTS), flush=True)
        rows.append(row)
        save(args.name, {"limit": args.limit, "summary": summary(rows), "tasks": rows})
        atomic_write(RESULTS / f"{args.name}.md", table(rows, summary(rows)))


if __name__ == "__main__":
    main()
