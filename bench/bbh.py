"""LoraHub against zero-shot and in-context learning on every bbh/ and near/ task.

Per task (5 `adapt` examples, the `test` file): zero-shot, 5-shot ICL (the same 5 examples as
earlier chat turns), Arrow zero-shot (`eval --route arrow`: the library routed per token, top-3,
fp32, no example seen), LoraHub (20 LoRAs, budget 40, --seeds seeds: mean ± std), LoraHub on the
20 LoRAs that fit the 5 examples best alone (`adapt --select loss`, the search starting at the
best LoRA; one run), today's default `adapt` (whatever AdaptConfig says, re-run when it changes,
so a candidate default shows beside the loss-picked column; with its adapt seconds), LoraHub on the 20 with the most
Arrow routing mass (`adapt --select arrow`, one run, with its adapt seconds), the best single
LoRA (oracle: the LoRA under which the first --oracle-n test answers are likeliest — picked
on the test set, an upper reference), and the uniform average of all LoRAs. Exact match on
generated answers and option-ranking accuracy, with prompt tokens per example. Writes
bench/results/bbh.md and bbh.json after every task.

Adapted models are written back as `adapt` writes them (`--writeback merged`, the default: the LoRA
merged, int4 with its targets at 8 bits, fused q/k/v), so every column measures what a user gets;
results go to bench/results/bbh-shipped.{md,json}. bbh.json's rows were written back as int4 + an
unmerged fp32 LoRA, the adapt default when that run began (`--writeback unmerged --name bbh`
resumes it as it was).

Resumable: a re-run with the same settings (and the same base and LoRA library) keeps the
tasks already in bench/results/bbh.json and runs the rest, so the run can go on in the
background, across sessions and machines.

    python bench/bbh.py [--suites bbh,near] [--tasks a,b] [--limit N] [--seeds 5] [--quant int8] [--name bbh]
                        [--library per-task|mbc|prompts]   # mbc: every LoraHub column over the cluster LoRAs
                        [--ray [ADDRESS] [--cpus-per-task 1]]

`--ray`: each task not yet done is a Ray task (edgelora.distributed; `pip install '.[ray]'`), on a
cluster whose nodes share this checkout, the data and EDGELORA_HOME; rows are saved as tasks end,
in the same JSON and markdown, in task order.

With `--library mbc` the zero-shot and ICL columns (the base alone) are taken from bbh.json's
rows, and LoraHub's seeds, which all sample the whole 10-LoRA library, are one COBYLA run.
With `--library prompts` (the bundle's adaption-prompt library: `adapt --kind adaption-prompt`)
only the default adapt and the oracle (the best single prompt) run beside them, and the mixed
search (`--columns mixed`): the default adapt over the LoRAs and the prompts together.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from common import DATA, RESULTS, save

from edgelora.bundle import Bundle, home
from edgelora.io import atomic_write, atomic_write_json
from edgelora.evaluate import evaluate
from edgelora.batch import encode_pairs, keep_ends
from edgelora.examples import load_examples
from edgelora.generate import Model
from edgelora.arrow import ArrowRoute
from edgelora.adaption_prompt import PromptStack
from edgelora.lora import Lora, LoraStack, zero_slots
from edgelora.scorer import Scorer
from edgelora.search import (FINALISTS, AdaptConfig, Objective, _Stop, adapt, choose_loras, cut_pays, load_adapters,
                             rank_by_loss, run_optimizer, stacked)
from edgelora.outputs import DEFAULT_QUANT, model_slots
from edgelora.writeback import write_model


def score(model_dir: Path, test, shots=(), out: Path | None = None, route: ArrowRoute | None = None) -> dict:
    """Accuracy for bbh.json; every answer to `out` (default: beside the model), so a claim
    about what a model said can be checked without committing 250 answers per variant."""
    r = evaluate(Model.load(model_dir, route=route), test, shots)
    atomic_write_json(out or model_dir / "eval.json", r)
    return {"exact": r["exact_match"], "options": r["option_accuracy"], "prompt_tokens": r["prompt_tokens_mean"],
            "shots": r["shots_mean"]}


def log(task: str, step: str, r: dict, t0: float) -> None:
    """One line per finished step: a task takes half an hour on 2 cores."""
    print(f"[{task}] {step}: exact {pct(r.get('exact'))}, options {pct(r.get('options'))} "
          f"({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)


def oracle_lora(bundle: Bundle, adapters, test, cfg: AdaptConfig) -> str:
    """The single adapter under which the test answers are likeliest (summed log-prob through the
    scoring graph): one sequence per example instead of one per option, so 39 adapters stay cheap."""
    fmt, tok = bundle.prompt_format, bundle.tokenizer()
    scorer = Scorer(bundle)
    pairs = fmt.pairs(test)
    nll = np.zeros(len(adapters))
    for i in range(0, len(pairs), 16):
        scorer.bind(encode_pairs(tok, pairs[i: i + 16], bundle.arch["max_len"])[0])
        nll += rank_by_loss(scorer, 1.0, adapters, bundle, cfg)  # each adapter's summed -log-prob on this batch
    return adapters[int(np.argmin(nll))].name


def library_config(args) -> dict:
    """AdaptConfig's fields that pick args.library: a LoRA library, or the adaption prompts."""
    return {"kind": "adaption-prompt"} if args.library == "prompts" else {"library": args.library}


def write_adapted(bundle: Bundle, composed, out: Path, args) -> None:
    """An adapt result's composed adapter written back as adapt writes it (outputs.model_slots): a
    LoRA merged (or beside, --writeback unmerged), an adaption prompt in the decoder."""
    A, B, prompt = model_slots(bundle, composed)
    write_model(bundle, A, B, out, args.quant, merged=args.writeback == "merged", prompt=prompt)


def inputs(suite: str, task: str, args):
    adapt_file = DATA / suite / f"{task}.adapt.jsonl"
    test = load_examples(DATA / suite / f"{task}.test.jsonl")[: args.limit]
    return adapt_file, test, home() / "bench" / args.name / task  # each run's models and answers apart


def lorahub_selected(bundle: Bundle, suite: str, task: str, args) -> dict:
    """`adapt --select loss`: the 20 LoRAs that fit the 5 examples best alone, the search starting
    at the best one. Deterministic (COBYLA from a fixed start), so one run."""
    adapt_file, test, work = inputs(suite, task, args)
    t0 = time.perf_counter()
    res = adapt(adapt_file, bundle, budget=args.budget, select="loss", library=args.library, warn=lambda m: None)
    write_adapted(bundle, res.merged(), work / "select-loss", args)
    row = {**score(work / "select-loss", test), "loss": [res.start_loss, res.loss],
           "weights": dict(zip(res.loras, res.weights.round(4).tolist()))}
    log(task, "LoraHub, loss-picked", row, t0)
    return row


def arrow_zero_shot(bundle: Bundle, suite: str, task: str, args) -> dict:
    """`eval --route arrow` on the bundle: the library routed per token (top-3), no example seen."""
    _, test, work = inputs(suite, task, args)
    t0 = time.perf_counter()
    r = score(bundle.path, test, out=work / "arrow-zs.eval.json", route=ArrowRoute(library=args.library))
    log(task, "Arrow zero-shot", r, t0)
    return r


def timed_adapt(bundle: Bundle, suite: str, task: str, args, key: str, label: str, **overrides) -> dict:
    """`edgelora adapt` with AdaptConfig's defaults but `overrides`, timed as a user waits for it:
    the adapt call (session, selection, search), then the write-back apart. Written back as the
    other columns are, so they compare; the row keeps the config it ran with."""
    adapt_file, test, work = inputs(suite, task, args)
    t0 = time.perf_counter()
    res = adapt(adapt_file, bundle, warn=lambda m: None, **overrides)
    adapt_s = time.perf_counter() - t0
    write_adapted(bundle, res.merged(), work / key, args)
    row = {**score(work / key, test), "loss": [res.start_loss, res.loss], "adapt_s": adapt_s,
           "writeback_s": time.perf_counter() - t0 - adapt_s, "forwards": res.settings["forwards"],
           "stop": res.stop, "config": run_config(**overrides),
           "weights": dict(zip(res.loras, res.weights.round(4).tolist()))}
    log(task, f"{label} ({adapt_s:.0f}s)", row, t0)
    return row


class MixedStack:
    """#28's mixed search, prototyped here before it is built: LoRAs and adaption prompts composed
    together, w over both in the order given; the LoRAs by LoraHub's composition (adapt's default),
    the prompts by PromptStack's sums, both in the one forward (the scoring graph has both slots)."""

    def __init__(self, adapters: list, bundle: Bundle):
        self.names = [a.name for a in adapters]
        self.li = [i for i, a in enumerate(adapters) if isinstance(a, Lora)]
        self.pi = [i for i, a in enumerate(adapters) if not isinstance(a, Lora)]
        self.lora = LoraStack([adapters[i] for i in self.li], list(bundle.targets)) if self.li else None
        self.prompt = PromptStack([adapters[i] for i in self.pi]) if self.pi else None
        self.bundle = bundle

    def slots(self, w):
        w = np.asarray(w)
        A, B, _ = self.lora.slots(w[self.li]) if self.lora else (None, None, None)
        return A, B, self.prompt.compose(w[self.pi]) if self.prompt else None

    def merged(self, w):
        """(A, B, prompt) for write_model: a zero LoRA where none is composed (its targets at 8 bits)."""
        w = np.asarray(w)
        A, B = self.lora.merged(w[self.li]) if self.lora else zero_slots(self.bundle.targets, self.bundle.arch["layers"])
        return A, B, self.prompt.compose(w[self.pi]) if self.prompt else None


def mixed_adapt(bundle: Bundle, suite: str, task: str, args) -> dict:
    """The default adapt over both libraries at once (39 LoRAs + 39 adaption prompts): both ranked
    by loss alone on the cut examples as adapt ranks one library (its FINALISTS scored whole, the
    best the start), the best n_loras of the two together composed, COBYLA at the default budget.
    Written back as adapt writes a model: the LoRA merged, the prompt in the decoder."""
    adapt_file, test, work = inputs(suite, task, args)
    t0 = time.perf_counter()
    cfg, cfg_p = AdaptConfig(), AdaptConfig(kind="adaption-prompt")
    examples = load_examples(adapt_file)
    whole, _ = encode_pairs(bundle.tokenizer(), bundle.prompt_format.pairs(examples), bundle.arch["max_len"])
    scorer = Scorer(bundle)
    n_tokens = float(whole.target_mask.sum())
    loras = load_adapters(list(bundle.library("per-task").values()), bundle, "lora")
    prompts = load_adapters(list(bundle.library("prompts").values()), bundle, "adaption-prompt")
    adapters = loras + prompts
    cut = keep_ends(whole, cfg.select_len)
    ranked_on = cut if cut_pays(len(adapters), cut.n_tokens, whole.n_tokens) else whole
    scorer.bind(ranked_on)
    t = float(ranked_on.target_mask.sum())
    losses = np.concatenate([rank_by_loss(scorer, t, loras, bundle, cfg), rank_by_loss(scorer, t, prompts, bundle, cfg_p)])
    scorer.bind(whole)
    order = list(np.argsort(losses, kind="stable"))
    top = order[:FINALISTS] if ranked_on is cut else order[:1]
    finalists = {i: float(losses[i]) for i in top} if ranked_on is whole else {
        i: float(rank_by_loss(scorer, n_tokens, [adapters[i]], bundle, cfg_p if i >= len(loras) else cfg)[0]) for i in top}
    best = min(finalists, key=finalists.get)
    keep = ([best] + [i for i in order if i != best])[: cfg.n_loras]
    stack = MixedStack([adapters[i] for i in keep], bundle)
    f = Objective(scorer, stack, n_tokens, cfg)
    eye = np.eye(len(keep))
    try:
        f(np.zeros(len(keep)))
        for i, loss in sorted(finalists.items(), key=lambda kv: -kv[1]):
            f.record(eye[keep.index(i)], loss, 0.0)
        stop = run_optimizer(cfg.optimizer, f, eye[0], cfg.seed)
    except _Stop as e:
        stop = e.reason
    adapt_s = time.perf_counter() - t0
    w = np.array(f.best.weights)
    A, B, prompt = stack.merged(w)
    write_model(bundle, A, B, work / "mixed", args.quant, prompt=prompt)
    row = {**score(work / "mixed", test), "loss": [f.seen(np.zeros(len(keep))).loss, f.best.loss], "adapt_s": adapt_s,
           "writeback_s": time.perf_counter() - t0 - adapt_s, "forwards": len(adapters) + len(top) * (ranked_on is cut) + f.forwards,
           "stop": stop, "prompts_kept": len(stack.pi), "weights": dict(zip(stack.names, w.round(4).tolist()))}
    log(task, f"mixed ({adapt_s:.0f}s, {len(stack.pi)} of {len(keep)} prompts)", row, t0)
    return row


def run_config(**overrides) -> dict:
    return asdict(replace(AdaptConfig(), **overrides))


# Timed adapt columns: key, header, AdaptConfig overrides. "default" is re-run whenever
# AdaptConfig's defaults change, so it is always today's default.
TIMED = (("default", "default adapt", {}), ("arrow", "LoraHub, Arrow-picked", {"select": "arrow"}))
COLUMNS = ("arrow-zs", "lorahub", "lorahub-loss", "default", "arrow", "oracle", "uniform", "mixed")


def wanted(args, key: str) -> bool:
    """Over a library no larger than the 20 a search composes, every pick composes all of it and
    differs only in the start: loss-picked is the default adapt (where its cut does not pay) and
    Arrow-picked is LoraHub's w = 0 start, so those two columns are left to the per-task library,
    as are the oracle and uniform references (half a long task's time; the issue compares the
    libraries on Arrow zero-shot, LoraHub and the default adapt). The adaption prompts: the
    default adapt and the oracle, beside the LoRA rows (Arrow routes LoRAs only), and the mixed search
    over both libraries (`mixed_adapt`)."""
    if args.library == "prompts":
        return key in args.columns and key in ("default", "oracle", "mixed")
    return key in args.columns and key != "mixed" and (args.library == "per-task" or key not in ("lorahub-loss", "arrow", "oracle", "uniform"))


def lorahub_seeds(bundle: Bundle, adapt_file: Path, test, work: Path, task: str, args) -> dict:
    """LoraHub as the paper runs it: a random 20 LoRAs per seed; mean ± std over the seeds."""
    runs, samples = [], []
    for seed in range(args.seeds):
        samples.append(choose_loras(bundle, None, AdaptConfig.n_loras, seed, args.library))
        if samples.index(samples[-1]) < seed and AdaptConfig.optimizer == "cobyla":
            # Same LoRAs, same deterministic search: the same run (a library of <= 20 is sampled whole).
            runs.append({**runs[samples.index(samples[-1])], "same_as_seed": samples.index(samples[-1])})
            continue
        t0 = time.perf_counter()
        res = adapt(adapt_file, bundle, budget=args.budget, seed=seed, select="random", library=args.library,
                    warn=lambda m: None)
        write_adapted(bundle, res.merged(), work / f"seed{seed}", args)
        runs.append({**score(work / f"seed{seed}", test), "loss": [res.start_loss, res.loss],
                     "weights": dict(zip(res.loras, res.weights.round(4).tolist()))})
        log(task, f"LoraHub seed {seed}", runs[-1], t0)
    agg = lambda k: [r[k] for r in runs if r[k] is not None]
    return {"runs": runs, **{f"{k}_mean": statistics.mean(agg(k)) if agg(k) else None for k in ("exact", "options")},
            **{f"{k}_std": statistics.pstdev(agg(k)) if agg(k) else None for k in ("exact", "options")},
            "prompt_tokens": runs[0]["prompt_tokens"]}


def run_task(bundle: Bundle, suite: str, task: str, args) -> dict:
    adapt_file, test, work = inputs(suite, task, args)
    shots = load_examples(adapt_file)
    row = {"suite": suite, "task": task, "n_test": len(test)}
    base_row = args.base_rows.get((suite, task), {})
    for key, label, k in (("zero-shot", "zero-shot", ()), ("icl", "ICL", shots)):
        if key in base_row:  # the base model's columns depend on neither the library nor the write-back
            row[key] = base_row[key]
            continue
        t0 = time.perf_counter()
        row[key] = score(bundle.path, test, k, out=work / f"{key}.eval.json")
        log(task, label, row[key], t0)
    if "arrow-zs" in base_row and args.library == "per-task":  # the same base and library: the same routing
        row["arrow-zs"] = base_row["arrow-zs"]
    elif wanted(args, "arrow-zs"):
        row["arrow-zs"] = arrow_zero_shot(bundle, suite, task, args)
    if wanted(args, "lorahub"):
        row["lorahub"] = lorahub_seeds(bundle, adapt_file, test, work, task, args)
    if wanted(args, "lorahub-loss"):
        row["lorahub-loss"] = lorahub_selected(bundle, suite, task, args)
    for key, label, overrides in TIMED:
        if wanted(args, key):
            row[key] = timed_adapt(bundle, suite, task, args, key, label, **overrides, **library_config(args))
    if wanted(args, "mixed"):
        row["mixed"] = mixed_adapt(bundle, suite, task, args)
    if not wanted(args, "oracle"):
        return row
    cfg = AdaptConfig(**library_config(args))
    library = load_adapters(list(bundle.library(args.library).values()), bundle, cfg.kind)
    t0 = time.perf_counter()
    name = oracle_lora(bundle, library, test[: args.oracle_n], cfg)
    best = next(a for a in library if a.name == name)
    write_adapted(bundle, stacked([best], bundle, cfg).merged(np.ones(1)), work / "oracle", args)
    row["oracle"] = {"lora": name, **score(work / "oracle", test)}
    log(task, f"oracle ({name})", row["oracle"], t0)
    if not wanted(args, "uniform"):
        return row
    t0 = time.perf_counter()
    A, B = LoraStack(library, list(bundle.targets)).compose(np.full(len(library), 1 / len(library)))
    write_model(bundle, A, B, work / "uniform", args.quant, merged=args.writeback == "merged")
    row["uniform"] = score(work / "uniform", test)
    log(task, "uniform", row["uniform"], t0)
    return row


def task_row(suite: str, task: str, args) -> dict:
    """run_task in a Ray worker: its own bundle, onnxruntime on its CPUs."""
    import os
    os.environ["EDGELORA_THREADS"] = str(args.cpus_per_task)
    return run_task(Bundle.open(args.bundle), suite, task, args)


def pct(v):
    return "–" if v is None else f"{100 * v:.1f}"


def timed_cell(row, key, k) -> str:
    d = row.get(key)
    return "–" if d is None else f"{pct(d[k])} ({d['adapt_s']:.0f})"


def oracle_cell(row, k) -> str:
    d = row.get("oracle")
    return "–" if d is None else f"{pct(d[k])} ({d['lora']})"


def shot_note(row) -> str:
    """ICL's mean shot count, where some prompts had to drop shots to fit the model."""
    k = row["icl"].get("shots", 5)
    return f" ({k:.1f} shots)" if k < 5 else ""


def table(rows: list[dict]) -> str:
    """One table per metric (exact match on every task, option ranking where a task has
    options), LoraHub as mean ± std over seeds, and each suite's mean."""
    out = []
    for k, title in (("exact", "Exact match on the generated answer (%)"), ("options", "Option-ranking accuracy (%)")):
        rs = [r for r in rows if r["zero-shot"][k] is not None]
        if not rs:
            continue
        out += [f"**{title}**", "",
                "| suite | task | n | zero-shot | ICL | Arrow zero-shot (top-3) | LoraHub (mean ± std) | LoraHub, loss-picked | default adapt (adapt s) | LoraHub, Arrow-picked (adapt s) | oracle LoRA | uniform | mixed LoRAs + prompts (adapt s) | prompt tokens (0-shot / ICL) |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            lh = r.get("lorahub")
            lh = f"{pct(lh[k + '_mean'])} ± {pct(lh[k + '_std'])}" if lh else "–"
            out.append(f"| {r['suite']} | {r['task']} | {r['n_test']} | {pct(r['zero-shot'][k])} | {pct(r['icl'][k])} | "
                       f"{pct(r.get('arrow-zs', {}).get(k))} | {lh} | {pct(r.get('lorahub-loss', {}).get(k))} | "
                       f"{timed_cell(r, 'default', k)} | {timed_cell(r, 'arrow', k)} | "
                       f"{oracle_cell(r, k)} | "
                       f"{pct(r.get('uniform', {}).get(k))} | {timed_cell(r, 'mixed', k)} | {r['zero-shot']['prompt_tokens']:.0f} / {r['icl']['prompt_tokens']:.0f}{shot_note(r)} |")
        for suite in sorted({r["suite"] for r in rs}):
            ss = [r for r in rs if r["suite"] == suite]
            m = lambda f: pct(statistics.mean(f(r) for r in ss))
            sel = pct(statistics.mean(r["lorahub-loss"][k] for r in ss)) if all("lorahub-loss" in r for r in ss) else "–"
            col = lambda key: pct(statistics.mean(r[key][k] for r in ss)) if all(key in r for r in ss) else "–"
            out.append(f"| {suite} | **mean of {len(ss)}** | | {m(lambda r: r['zero-shot'][k])} | {m(lambda r: r['icl'][k])} | {col('arrow-zs')} | "
                       f"{m(lambda r: r['lorahub'][k + '_mean']) if all('lorahub' in r for r in ss) else '–'} | {sel} | {col('default')} | {col('arrow')} | {col('oracle')} | "
                       f"{col('uniform')} | {col('mixed')} | |")
        out.append("")
    return "\n".join(out)


def resume(name: str, settings: dict) -> dict[tuple[str, str], dict]:
    """The rows of the last run (bench/results/NAME.json, committed) when it used these settings."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return {}
    last = json.loads(path.read_text())
    if any(last.get(k) != v for k, v in settings.items()):
        return {}
    return {(r["suite"], r["task"]): r for r in last["tasks"]}


def write(done: dict, todo: list, bundle: Bundle, settings: dict, args, row: dict) -> None:
    """bbh.md and bbh.json after each task, rows in task order (as a sequential run writes them,
    however Ray's tasks finish)."""
    rows = [done[k] for k in todo if k in done] + [r for k, r in done.items() if k not in todo]
    print(table([row]), flush=True)
    n_lib = len(bundle.library(args.library))
    sampled = (f"20 of {n_lib}" if n_lib > AdaptConfig.n_loras else
               f"all {n_lib} (every seed samples the whole library and COBYLA is deterministic, so the seeds are one run)")
    reused = "" if not args.base_rows else ("zero-shot, ICL" + (" and Arrow zero-shot" if args.library == "per-task" else "")
                                            + " taken from bench/results/bbh.json (the base alone); ")
    ran = "" if args.columns == list(COLUMNS) else f"columns run: {', '.join(args.columns)}; "
    note = (ran + (f"LoraHub: {args.seeds} seeds, budget {args.budget}, {sampled} {args.library} LoRAs; "
                   if wanted(args, "lorahub") else "") + reused +
            f"models written back as {args.quant} + " + ("the LoRA merged, its targets at 8 bits (as adapt writes them)"
            if args.writeback == "merged" else "an unmerged fp32 LoRA") + "; zero-shot and ICL run on the "
            f"bundle's fp32 base; test examples per task: "
            f"{args.limit or 'all'}; tasks done: {len(rows)}.\n\n")
    atomic_write(RESULTS / f"{args.name}.md", note + table(rows) + "\n")
    save(args.name, {**settings, "tasks": rows})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suites", default="bbh,near")
    ap.add_argument("--tasks", help="only these tasks (comma-separated)")
    ap.add_argument("--limit", type=int, help="first N test examples per task (default: all)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--quant", default=DEFAULT_QUANT)
    ap.add_argument("--writeback", choices=("merged", "unmerged"), default="merged",
                    help="merged: as adapt writes the model (default); unmerged: int4 + an fp32 LoRA beside it, "
                         "as bbh.json's rows were written")
    ap.add_argument("--name", help="results file name (bench/results/NAME.md/.json; default bbh, or bbh-mbc)")
    ap.add_argument("--library", default="per-task",
                    help="the bundle's library to compose: per-task | mbc (LoRAs) | prompts (adaption prompts)")
    ap.add_argument("--oracle-n", type=int, default=50, help="test examples the oracle LoRA is picked on")
    ap.add_argument("--no-arrow", action="store_true", help="do not add the Arrow columns to finished rows")
    ap.add_argument("--columns", default=",".join(COLUMNS),
                    help="the columns to run (default all); zero-shot and ICL are always there, taken from bbh.json's "
                         "rows where it has them (the base alone: no library, no write-back)")
    ap.add_argument("--base-from", help="other runs (names, comma-separated) whose zero-shot and ICL rows to reuse where "
                                        "they scored the same test examples (the base alone: no library, no write-back)")
    ap.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                    help="the tasks not yet done as Ray tasks ('auto': the running cluster; 'local': one started here)")
    ap.add_argument("--cpus-per-task", type=int, default=1, help="--ray: CPUs (onnxruntime threads) per task")
    args = ap.parse_args()
    args.columns = args.columns.split(",")
    if set(args.columns) - set(COLUMNS):
        ap.error(f"--columns: choose from {', '.join(COLUMNS)}")
    args.name = args.name or ("bbh-shipped" if args.writeback == "merged" else "bbh") + (
        "" if args.library == "per-task" else f"-{args.library}")
    bundle = Bundle.open()
    settings = {"limit": args.limit, "oracle_n": args.oracle_n, "seeds": args.seeds, "budget": args.budget,
                "quant": args.quant, "base": bundle.manifest["base"]["name"], "loras": sorted(bundle.library(args.library)),
                **({"writeback": "merged"} if args.writeback == "merged" else {}),
                **({"columns": args.columns} if args.columns != list(COLUMNS) else {})}
    todo = [(suite, f.name.removesuffix(".adapt.jsonl")) for suite in args.suites.split(",")
            for f in sorted((DATA / suite).glob("*.adapt.jsonl"))]
    todo = [(s, t) for s, t in todo if not args.tasks or t in args.tasks.split(",")]
    done = resume(args.name, settings)
    # Any other run (another library, another write-back): bbh.json's base-model rows are reused.
    args.base_rows = {} if args.name == "bbh" else resume("bbh", {**{k: v for k, v in settings.items()
                                                                    if k not in ("writeback", "columns")},
                                                                 "loras": sorted(bundle.library("per-task"))})
    for name in args.base_from.split(",") if args.base_from else []:  # the base alone, on the same test examples
        for key, r in resume(name, {"limit": args.limit, "base": settings["base"]}).items():
            args.base_rows.setdefault(key, {}).update({k: r[k] for k in ("zero-shot", "icl") if k not in args.base_rows.get(key, {})})
    fresh = [(s, t) for s, t in todo if (s, t) not in done]
    if args.ray and fresh:
        from edgelora.distributed import on_ray
        args.bundle = str(bundle.path)
        jobs = {f"{s}/{t}": (s, t, args) for s, t in fresh}
        for key, row in on_ray(args.ray, task_row, jobs, args.cpus_per_task):
            done[tuple(key.split("/"))] = row
            write(done, todo, bundle, settings, args, row)
    for suite, task in todo:
        if (suite, task) not in done:
            done[suite, task] = run_task(bundle, suite, task, args)
        else:  # a row from before a column was added: run just that column
            if "lorahub-loss" not in done[suite, task] and wanted(args, "lorahub-loss"):
                done[suite, task]["lorahub-loss"] = lorahub_selected(bundle, suite, task, args)
            if "arrow-zs" not in done[suite, task] and wanted(args, "arrow-zs") and not args.no_arrow:
                done[suite, task]["arrow-zs"] = arrow_zero_shot(bundle, suite, task, args)
            for key, label, overrides in TIMED:
                overrides = {**overrides, **library_config(args)}
                stale = done[suite, task].get(key, {}).get("config") != run_config(**overrides)
                if wanted(args, key) and (key == "default" and stale or key not in done[suite, task] and not args.no_arrow):
                    done[suite, task][key] = timed_adapt(bundle, suite, task, args, key, label, **overrides)
        write(done, todo, bundle, settings, args, done[suite, task])
    print(table(list(done.values())))


if __name__ == "__main__":
    main()
