"""The surrogate search against today's default (COBYLA), on every bbh/ and near/ task.

Per task, on its 5 `adapt` examples, three searches:
- `cobyla`: today's default `adapt` (AdaptConfig(): LoraHub's composition, the cut ranking, the best
  20 LoRAs, COBYLA from the best single LoRA, budget 40);
- `surrogate`: `--optimizer surrogate --compose cat` with its leave-one-out choice (the candidate
  default);
- `surrogate_fixed`: the same without leave-one-out (`--no-loo`: the best --n-loras of what it
  ranked whole, radius 0.5, COBYLA taking over where the model keeps mispredicting), budget 12:
  the optimiser alone, to see whether it reaches COBYLA's 40-point objective within 10 points.
For each: the best true objective after 5, 10, 20 and 40 points of its search (the points after
w = 0 and the ranking), its forwards and seconds; at its final weights, the test cross-entropy and
the teacher-forced exact match (every answer token the argmax) over the first --limit test examples,
through the fp32 scoring graph; and for `cobyla` and `surrogate`, exact match and option accuracy
of generated answers from the model written back as `adapt` writes it (int4, targets at 8 bits,
LoRA merged) — what a user gets. The two surrogate runs share their ranking forwards (a forward
cache keyed by the exact inputs: the same forward is never run twice in this process); seconds
are each run's own, as if alone (the cache is cleared between the timed runs).

Resumable: finished tasks in bench/results/surrogate.json are kept.

    python bench/surrogate.py [--tasks a,b] [--limit 100]
    python bench/surrogate.py --report      # bench/results/surrogate.md from the JSON, nothing run
"""
from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import DATA, RESULTS, by_suite, dev_args, report_md, accuracy, dev_tasks, save

from edgelora.bundle import Bundle
from edgelora.io import atomic_write
from edgelora.batch import encode_pairs
from edgelora.examples import load_examples
from edgelora.scorer import Scorer
from edgelora.search import AdaptConfig, adapt
from edgelora.surrogate import Head

CHECKPOINTS = (5, 10, 20, 40)
VARIANTS = {
    "cobyla": {},
    "surrogate": {"optimizer": "surrogate", "compose": "cat"},
    "surrogate_fixed": {"optimizer": "surrogate", "compose": "cat", "loo": False, "budget": 12},
}
GENERATED = ("cobyla", "surrogate")


class ForwardCache:
    """Scorer.run memoised on its exact inputs (the bound tokens and A, B) while the context is
    open, so that the runs of one task can share their ranking forwards (`memo` outlives it)."""

    def __init__(self, memo: dict):
        self.memo, self.orig = memo, Scorer.run

    @staticmethod
    def key(scorer, A, B) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for k in ("input_ids", "target_pos", "target_ids"):
            h.update(scorer.feeds[k].tobytes())
        for m in sorted(A):
            h.update(np.ascontiguousarray(A[m]).tobytes())
            h.update(np.ascontiguousarray(B[m]).tobytes())
        return h.digest()

    def __enter__(self):
        memo, orig = self.memo, self.orig

        def run(scorer, A, B, xa=False, hidden=False):
            if xa:
                return orig(scorer, A, B, xa=xa, hidden=hidden)
            k = ForwardCache.key(scorer, A, B)
            if k not in memo:
                memo[k] = orig(scorer, A, B, hidden=True)
            return memo[k] if hidden else memo[k][:2]
        Scorer.run = run
        return self

    def __exit__(self, *exc):
        Scorer.run = self.orig


def curve(history, objective_of_first: int = 1) -> dict:
    """The best true objective after k points of the search (w = 0, the first point, not counted)."""
    best, out = np.inf, []
    for e in history[objective_of_first:]:
        best = min(best, e.objective)
        out.append(best)
    return {str(k): (round(out[min(k, len(out)) - 1], 5) if out else None) for k in CHECKPOINTS}


def test_scores(bundle: Bundle, res, test) -> dict:
    """Test cross-entropy (token-pooled) and teacher-forced exact match at the result's weights."""
    A, B = res.merged()
    scorer, tok, fmt = Scorer(bundle), bundle.tokenizer(), bundle.prompt_format
    norm, weight, eps = bundle.head()
    nll, n_tok, exact = 0.0, 0, 0
    pairs = fmt.pairs(test)
    for i in range(0, len(pairs), 16):
        batch = encode_pairs(tok, pairs[i: i + 16], bundle.arch["max_len"])[0]
        scorer.bind(batch)
        _, lp, hidden = scorer.run(A, B, hidden=True)
        mask = batch.target_mask > 0
        head = Head(norm, weight, eps, batch.target_ids[mask])
        right = head.logits(hidden[mask]).argmax(1) == head.y
        ex = np.nonzero(mask)[0]
        exact += int(sum(right[ex == j].all() for j in range(len(lp))))
        nll -= float(lp.sum())
        n_tok += int(mask.sum())
    return {"test_ce": round(nll / n_tok, 5), "test_exact_tf": round(exact / len(test), 4)}


def run_task(bundle: Bundle, suite: str, task: str, limit: int, work: Path) -> dict:
    adapt_file = DATA / suite / f"{task}.adapt.jsonl"
    test = load_examples(DATA / suite / f"{task}.test.jsonl")[:limit]
    row = {"suite": suite, "task": task, "n_test": len(test)}
    memo: dict = {}
    for name, over in VARIANTS.items():
        if name != "surrogate_fixed":
            memo.clear()  # the timed runs pay for their own forwards
        with ForwardCache(memo):
            t0 = time.perf_counter()
            res = adapt(adapt_file, bundle, warn=lambda *a: None, **over)
            seconds = time.perf_counter() - t0
        r = {"seconds": round(seconds, 1), "forwards": res.settings["forwards"],
             "search_points": len(res.history) - 1, "start_loss": round(res.start_loss, 5),
             "loss": round(res.loss, 5), "objective": round(res.objective, 5), "stop": res.stop,
             "best_after": curve(res.history),
             "weights": {n: round(float(w), 4) for n, w in zip(res.loras, res.weights) if w}}
        if res.surrogate:
            r.update({k: res.surrogate[k] for k in ("setting", "loo", "steps")})
        r.update(test_scores(bundle, res, test))
        if name in GENERATED:
            r.update(accuracy(bundle, res.merged(), work / name, test))
        row[name] = r
        print(f"[{task}] {name}: loss {r['loss']:.4f}, {r['forwards']} forwards, {r['seconds']:.0f} s, "
              f"test CE {r['test_ce']:.4f}, tf-exact {r['test_exact_tf']:.3f}"
              + (f", exact {r['exact']:.3f}" if "exact" in r else "") + f" ({r['stop']})", flush=True)
    return row


def summary(rows: list[dict]) -> dict:
    out = {}
    for suite, rs in by_suite(rows):
        s = {"tasks": len(rs)}
        for v in VARIANTS:
            for k in ("test_ce", "test_exact_tf", "exact", "options", "seconds", "forwards"):
                vals = [r[v][k] for r in rs if r[v].get(k) is not None]
                if vals:
                    s[f"{v}_{k}_mean"] = round(statistics.mean(vals), 4)
        s["time_ratio_total"] = round(sum(r["surrogate"]["seconds"] for r in rs) / sum(r["cobyla"]["seconds"] for r in rs), 3)
        s["slowest_surrogate_s"] = max(r["surrogate"]["seconds"] for r in rs)
        # the optimiser alone: does the model reach COBYLA's 40-point objective within 10 points?
        s["fixed_within_10_of_cobyla_40"] = sum(
            r["surrogate_fixed"]["best_after"]["10"] <= r["cobyla"]["best_after"]["40"] + 1e-4 for r in rs)
        s["surrogate_exact_minus_cobyla_mean"] = round(statistics.mean(
            r["surrogate"]["exact"] - r["cobyla"]["exact"] for r in rs), 4)
        out[suite] = s
    return out


def table(rows: list[dict], summ: dict) -> str:
    """One line per task: objective after 10 and 40 points, test CE, teacher-forced and generated
    exact match, forwards and seconds, for COBYLA (today's default) and the surrogate."""
    head = ("| suite | task | COBYLA obj@10 / @40 | surrogate obj@10 (setting) | fixed obj@10 | test CE C / S / fixed | "
            "tf-exact C / S / fixed | exact C / S | forwards C / S | seconds C / S |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        c, s, f = r["cobyla"], r["surrogate"], r["surrogate_fixed"]
        lines.append(
            f"| {r['suite']} | {r['task']} | {c['best_after']['10']:.3f} / {c['best_after']['40']:.3f} | "
            f"{s['best_after']['10']:.3f} ({s.get('setting', '')}) | {f['best_after']['10']:.3f} | "
            f"{c['test_ce']:.3f} / {s['test_ce']:.3f} / {f['test_ce']:.3f} | "
            f"{c['test_exact_tf'] * 100:.0f} / {s['test_exact_tf'] * 100:.0f} / {f['test_exact_tf'] * 100:.0f} | "
            f"{c['exact'] * 100:.0f} / {s['exact'] * 100:.0f} | {c['forwards']} / {s['forwards']} | "
            f"{c['seconds']:.0f} / {s['seconds']:.0f} |")

    def suite_line(suite: str, m: dict) -> str:
        return (f"- {suite} ({m['tasks']} tasks): exact {m['cobyla_exact_mean'] * 100:.1f} (COBYLA) vs "
                f"{m['surrogate_exact_mean'] * 100:.1f} (surrogate); test CE {m['cobyla_test_ce_mean']:.3f} vs "
                f"{m['surrogate_test_ce_mean']:.3f} (fixed {m['surrogate_fixed_test_ce_mean']:.3f}); "
                f"time {m['time_ratio_total']:.2f}x, slowest surrogate {m['slowest_surrogate_s']:.0f} s; the optimiser "
                f"alone reached COBYLA's 40-point objective within 10 points on {m['fixed_within_10_of_cobyla_40']}")
    return report_md(lines, summ, suite_line)


def main():
    args, done = dev_args(__doc__, "surrogate", lambda rows: table(rows, summary(rows)))
    bundle = Bundle.open()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for suite, task in dev_tasks(args.tasks):
            rows.append(done.get(task) or run_task(bundle, suite, task, args.limit, Path(tmp) / task))
            save(args.name, {"limit": args.limit, "defaults": AdaptConfig().__dict__, "variants": VARIANTS,
                             "summary": summary(rows), "tasks": rows})
            atomic_write(RESULTS / f"{args.name}.md", table(rows, summary(rows)))


if __name__ == "__main__":
    main()
