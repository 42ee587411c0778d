"""ADAPT end to end, edgelora vs the reference LoraHub loop, in one run on the real SmolLM2 bundle:
20 LoRAs, 5 examples, budget 40, whole process including the write-back (edgelora: the int4 ONNX
model; the reference: its own last step, `merge_and_unload`), each side from its own ready base (edgelora
its bundle, the reference an HF folder made once beforehand: neither one-off export is timed), the
whole-process and the per-evaluation ratios side by side. Each method runs in its own process
so its wall time counts its own imports and setup and its peak RSS is its own; the parent only
orchestrates and compares.

Targets: total time reference / edgelora >= 4; edgelora per evaluation / a plain fp32 forward
over the same examples right-padded (no slots, LM head at the targets) <= 0.7.
    pip install nevergrad        # bench-only: the reference's optimizer
    python bench/adapt.py [--task date_understanding] [--budget 40] [--powell]
If the bundle has fewer LoRAs than --n-loras, seeded random rank-8 LoRAs are made once in
$EDGELORA_HOME/bench/random_loras (bundle format, plus the same LoRAs as PEFT folders).
"""
from __future__ import annotations

import time

T0 = time.perf_counter()  # before the heavy imports: a worker's total time counts them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from common import DATA, alternate, base_source, median, padded_feeds, padded_graph, peak_rss_mb, save  # noqa: E402

from edgelora.bundle import Bundle, default_bundle_path, home  # noqa: E402
from edgelora.batch import encode_pairs  # noqa: E402
from edgelora.examples import load_examples  # noqa: E402
from edgelora.lora import Lora, load_lora, save_lora, to_peft  # noqa: E402
from edgelora.search import AdaptConfig, choose_loras  # noqa: E402

MARK = "RESULT "
RANK = 8
B_STD = 0.1


def cpu_s() -> float:
    """This process's CPU seconds: less swayed than wall time by other jobs on a shared machine."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def task_file(task: str) -> Path:
    p = Path(task)
    return p if p.suffix == ".jsonl" and p.is_file() else DATA / "bbh" / f"{task}.adapt.jsonl"


def lora_files(bundle: Bundle, n: int, seed: int, create: bool = False) -> tuple[list[Path], list[Path]]:
    """(bundle-format LoRA files, the same LoRAs as PEFT folders). The bundle's own LoRAs when it
    has n of them, else seeded random ones: A ~ N(0, 1/sqrt(in)) keeps x·Aᵀ at the scale of x, and
    B ~ N(0, 0.1) moves the 5-example loss by ~+0.04 for one LoRA at weight 1 and ~+0.14 at 1.5
    (B ~ N(0, 0.01) moved it by 0.001: a flat landscape with nothing for a search to do)."""
    if len(bundle.lora_paths()) >= n:
        paths, cache = choose_loras(bundle, None, n, seed), home() / "bench" / "peft_loras"
    else:
        cache = home() / "bench" / "random_loras"
        paths = [cache / f"random_{i:02d}.safetensors" for i in range(n)]
        L = bundle.arch["layers"]
        for i, p in enumerate(paths):
            if not p.exists() and create:
                rng = np.random.default_rng(1000 + i)
                A = {m: rng.normal(0, t["in"] ** -0.5, (L, RANK, t["in"])) for m, t in bundle.targets.items()}
                B = {m: rng.normal(0, B_STD, (L, t["out"], RANK)) for m, t in bundle.targets.items()}
                save_lora(p, Lora(p.stem, RANK, float(RANK), A, B, source="bench/adapt.py random"))
    folders = [cache / "peft" / p.stem for p in paths]
    for p, f in zip(paths, folders):
        if not (f / "adapter_model.safetensors").exists() and create:
            lora = load_lora(p)  # the fp16-rounded values edgelora reads, so both compose the same numbers
            to_peft(f, lora.A, {m: b * lora.scale for m, b in lora.B.items()}, bundle.targets, bundle.manifest["base"]["name"])
    return paths, folders


def reference_base(bundle: Bundle) -> Path:
    """The base as a Hugging Face folder, made once and outside every timing: the reference starts
    from it as edgelora starts from its bundle, so neither side's one-off export (the GGUF's
    dequantisation, the ONNX export) is in its time."""
    from edgelora.io import sha256_file
    src = base_source(bundle)
    if src and Path(src).is_dir():
        return Path(src)
    out = home() / "bench" / f"hf-{sha256_file(bundle.path / 'manifest.json')[:12]}"
    if not (out / "config.json").exists():
        from edgelora_export.base_model import load_base
        model, tok, _ = load_base(src)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


def worker_reference(args, bundle: Bundle) -> dict:
    """The reference loop, timed from process start to its recommendation."""
    import torch
    from edgelora_export.base_model import load_base
    from reference_lorahub import encode, get_loss, load_base_model_and_lora_modules, lorahub_learning
    fmt = bundle.prompt_format
    examples = load_examples(task_file(args.task))
    prompts, targets = map(list, zip(*fmt.pairs(examples)))
    _, folders = lora_files(bundle, args.n_loras, args.seed)
    model, tok, _ = load_base(args.hf)
    peft_model, cache = load_base_model_and_lora_modules(model, folders)
    batch = encode(tok, prompts, targets, bundle.manifest["pad_id"])
    w, history, name = lorahub_learning(peft_model, cache, batch, args.budget, divide_by_examples=args.upstream_loss)
    import copy
    t = time.perf_counter()
    copy.deepcopy(peft_model).merge_and_unload()  # upstream's last step (on a copy: the losses below need the PEFT model)
    merge_s = time.perf_counter() - t
    total_s, cpu, rss = time.perf_counter() - T0, cpu_s(), peak_rss_mb()
    # after the clock: the losses that compare (no L1, not divided), and the token parity
    loss_rec = get_loss(batch, peft_model)
    from peft.utils.save_and_load import set_peft_model_state_dict
    from reference_lorahub import get_final_weights
    set_peft_model_state_dict(peft_model, get_final_weights(np.zeros(len(cache)), list(cache), cache))
    loss_zero = get_loss(batch, peft_model)
    ours, _ = encode_pairs(bundle.tokenizer(), list(zip(prompts, targets)), bundle.arch["max_len"])
    same_tokens = bool(np.array_equal(padded_feeds(ours, bundle.manifest["pad_id"])["input_ids"], batch["input_ids"].numpy()))
    best = min(history, key=lambda h: h[1])
    return {"method": f"reference NGOpt({name})", "total_s": total_s, "cpu_s": cpu, "writeback_s": merge_s,
            "outside_evals_s": total_s - sum(h[3] for h in history), "evals": len(history),
            "eval_s": [h[3] for h in history], "loss": loss_rec, "loss_best_evaluated": best[0],
            "objective_best_evaluated": best[1], "loss_zero": loss_zero, "weights": w.tolist(),
            "peak_rss_mb": rss, "torch_threads": torch.get_num_threads(), "same_tokens_as_edgelora": same_tokens,
            "history_loss_range": [min(h[0] for h in history), max(h[0] for h in history)]}


def worker_edgelora(args, bundle: Bundle) -> dict:
    """edgelora.search.adapt and the default write-back, timed from process start; then, off the
    clock, one evaluation at the best weights alternated with the plain fp32 forward over the same
    examples right-padded, and the reference's weights scored by this scorer."""
    import tempfile
    import onnxruntime as ort
    from edgelora.scorer import Scorer, session_options
    from edgelora.search import adapt
    from edgelora.writeback import write_model
    paths, _ = lora_files(bundle, args.n_loras, args.seed)
    res = adapt(task_file(args.task), bundle, loras=paths, budget=args.budget, optimizer=args.optimizer,
                compose="cat" if args.optimizer == "surrogate" else "lorahub", patience=args.patience,
                warn=lambda m: print(m, file=sys.stderr))
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        write_model(bundle, *res.merged(), Path(out))
    writeback_s = time.perf_counter() - t
    total_s, cpu, rss = time.perf_counter() - T0, cpu_s(), peak_rss_mb()

    fmt = bundle.prompt_format
    examples = load_examples(task_file(args.task))
    batch, _ = encode_pairs(bundle.tokenizer(), fmt.pairs(examples),
                            bundle.arch["max_len"])
    scorer = Scorer(bundle)
    scorer.bind(batch)
    n_tok = float(batch.target_mask.sum())

    def loss_at(w) -> float:
        return float(-scorer.run(*res.stack.compose(w))[1].sum() / n_tok)

    padded = ort.InferenceSession(str(padded_graph(bundle)), session_options(), providers=["CPUExecutionProvider"])
    feeds = padded_feeds(batch, bundle.manifest["pad_id"])
    fns = {"eval": lambda: loss_at(res.weights), "plain_padded": lambda: padded.run(["logprob"], feeds)}
    for fn in fns.values():
        fn()  # warm-up
    times = {k: median(v) for k, v in alternate(fns, args.rounds).items()}
    out = {"method": f"edgelora {args.optimizer}", "total_s": total_s, "cpu_s": cpu, "writeback_s": writeback_s,
           "outside_evals_s": total_s - sum(h.seconds for h in res.history),
           "adapt_s": res.seconds, "evals": len(res.history), "forwards": res.settings["forwards"], "stop": res.stop,
           "eval_s": [h.seconds for h in res.history], "loss": res.loss, "objective": res.objective,
           "loss_zero": res.start_loss, "weights": res.weights.tolist(), "peak_rss_mb": rss,
           "threads": scorer.session.get_session_options().intra_op_num_threads, "timings": res.timings,
           "tokens": batch.n_tokens, "target_tokens": int(n_tok), "padded_tokens": batch.padded_tokens,
           "alternated_median_s": times, "loss_at_best_recheck": loss_at(res.weights),
           "history_loss_range": [min(h.loss for h in res.history), max(h.loss for h in res.history)]}
    if args.ref_weights:
        out["loss_of_reference_weights"] = loss_at(np.array(json.loads(args.ref_weights)))
    return out


def run_worker(kind: str, args, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--bundle", str(args.bundle), "--task", args.task,
           "--budget", str(args.budget), "--n-loras", str(args.n_loras), "--seed", str(args.seed),
           "--rounds", str(args.rounds), "--patience", str(args.patience),
           *(["--upstream-loss"] if args.upstream_loss else []), *extra]
    print(f"-- {kind} {' '.join(extra)}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    lines = [l for l in proc.stdout.splitlines() if l.startswith(MARK)]
    if proc.returncode or not lines:
        sys.exit(f"worker {kind} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    return {**json.loads(lines[-1][len(MARK):]), "process_s": wall, "load_avg_after": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=default_bundle_path())
    ap.add_argument("--task", default="date_understanding", help="a BBH task name or an examples .jsonl file")
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--n-loras", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="picks the bundle's LoRAs when it has enough")
    ap.add_argument("--rounds", type=int, default=7, help="alternated timings of one eval vs the plain forward")
    ap.add_argument("--also", default="", help="other optimizers to run edgelora with (comma-separated)")
    ap.add_argument("--patience", type=int, default=AdaptConfig.patience,
                    help="edgelora's no-gain stop (0: run the whole budget, as the reference does)")
    ap.add_argument("--upstream-loss", action="store_true",
                    help="reference objective divides the batch loss by the number of examples, as upstream does")
    ap.add_argument("--worker", choices=["edgelora", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--optimizer", default=AdaptConfig.optimizer, help=argparse.SUPPRESS)
    ap.add_argument("--ref-weights", help=argparse.SUPPRESS)
    ap.add_argument("--hf", help=argparse.SUPPRESS)
    args = ap.parse_args()
    bundle = Bundle.open(args.bundle)
    if args.worker:
        out = (worker_edgelora if args.worker == "edgelora" else worker_reference)(args, bundle)
        print(MARK + json.dumps(out), flush=True)
        return

    paths, _ = lora_files(bundle, args.n_loras, args.seed, create=True)
    print(f"{len(paths)} LoRAs from {paths[0].parent}, task {task_file(args.task)}, budget {args.budget}", file=sys.stderr)
    ref = run_worker("reference", args, ["--hf", str(reference_base(bundle))])
    runs = [run_worker("edgelora", args, ["--ref-weights", json.dumps(ref["weights"])])]
    for opt in filter(None, args.also.split(",")):
        runs.append(run_worker("edgelora", args, ["--optimizer", opt]))
    runs.append(ref)
    ours = runs[0]

    plain = ours["alternated_median_s"]
    print(f"\n{ours['evals']} points ({ours['forwards']} forwards, stopped: {ours['stop']}), budget {args.budget}, "
          f"{len(paths)} LoRAs, {ours['tokens']} tokens packed ({ours['padded_tokens']} padded, {ours['target_tokens']} target)")
    print(f"{'method':<24}{'total s':>9}{'CPU s':>8}{'write s':>8}{'non-eval s':>11}{'evals':>6}{'ms/eval':>9}"
          f"{'loss':>9}{'objective':>10}{'loss w=0':>10}{'RSS MB':>8}")
    for r in runs:
        print(f"{r['method']:<24}{r['total_s']:>9.1f}{r['cpu_s']:>8.1f}{r['writeback_s']:>8.1f}{r['outside_evals_s']:>11.1f}"
              f"{r['evals']:>6}{median(r['eval_s']) * 1000:>9.0f}{r['loss']:>9.4f}"
              f"{r['loss'] + 0.05 * np.abs(r['weights']).mean():>10.4f}{r['loss_zero']:>10.4f}{r['peak_rss_mb']:>8.0f}")
    ratios = {"total_reference_over_edgelora": ref["total_s"] / ours["total_s"],
              "cpu_reference_over_edgelora": ref["cpu_s"] / ours["cpu_s"],
              "per_eval_reference_over_edgelora": median(ref["eval_s"]) / median(ours["eval_s"]),
              "alternated_eval_over_plain_padded": plain["eval"] / plain["plain_padded"]}
    print(f"alternated medians of {args.rounds}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in plain.items()))
    print(f"reference best weights scored by edgelora: {ours['loss_of_reference_weights']:.4f} "
          f"(torch {ref['loss']:.4f}; its best evaluated point {ref['loss_best_evaluated']:.4f}); loss at w=0: edgelora {ours['loss_zero']:.5f}, torch {ref['loss_zero']:.5f}, "
          f"|diff| {abs(ours['loss_zero'] - ref['loss_zero']):.1e}; same tokens: {ref['same_tokens_as_edgelora']}")
    for k, v in ratios.items():
        print(f"{k:<40}{v:8.3f}")
    print("targets: total_reference_over_edgelora >= 4, alternated_eval_over_plain_padded <= 0.7")
    save(f"adapt_{task_file(args.task).name.split('.')[0]}", {
        "task": str(task_file(args.task)), "budget": args.budget, "n_loras": len(paths), "loras": [str(p) for p in paths],
        "upstream_loss": args.upstream_loss, "runs": runs, "ratios": ratios,
        "parity": {"loss_zero_abs_diff": abs(ours["loss_zero"] - ref["loss_zero"]),
                   "reference_weights_loss_torch_vs_edgelora": [ref["loss"], ours["loss_of_reference_weights"]]},
        "target": "total_reference_over_edgelora >= 4, alternated_eval_over_plain_padded <= 0.7"})


if __name__ == "__main__":
    main()
