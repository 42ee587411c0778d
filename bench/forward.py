"""One scoring call on the real SmolLM2 bundle, 5 BBH examples: the graph with LoRA slots
fed vs the same graph exported without slots vs torch eager (with slots), side by side.

Target (issue 3): slots cost <= 15% over no slots.
    python bench/forward.py [--task date_understanding] [--rounds 7]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import DATA, alternate, base_source, median, save

from edgelora.bundle import Bundle, default_bundle_path, home
from edgelora.examples import encode_pairs, load_examples
from edgelora.lora import zero_slots
from edgelora.scorer import Scorer


def session_sweep(bundle, batch, A, B, rounds) -> dict:
    """The scorer's session options, chosen by this measurement: threads, graph level, arena."""
    import onnxruntime as ort
    from edgelora.scorer import session_options
    variants = {}
    for threads in (1, 2):
        for level in ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
            so = session_options(threads)
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            variants[f"threads={threads} {level}"] = so
    so = session_options(2)
    so.enable_cpu_mem_arena = False
    variants["threads=2 ORT_ENABLE_ALL no-arena"] = so
    scorers = {k: Scorer(bundle, options=so) for k, so in variants.items()}
    for s in scorers.values():
        s.bind(batch)
    times = alternate({k: (lambda s=s: s.losses(A, B)) for k, s in scorers.items()}, rounds)
    med = {k: median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:<40} {v * 1000:8.1f} ms")
    return {"median_s": med, "seconds": times}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=default_bundle_path())
    ap.add_argument("--task", default="date_understanding")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sweep", action="store_true", help="also time session options (threads, graph level, arena)")
    args = ap.parse_args()
    import torch
    from edgelora_export.base import export_scoring
    from edgelora_export.model import ScoringModel, load_base

    bundle = Bundle.open(args.bundle)
    examples = load_examples(DATA / "bbh" / f"{args.task}.adapt.jsonl")
    fmt = bundle.prompt_format
    batch, _ = encode_pairs(bundle.tokenizer(), [(fmt.prompt(e.input), e.output + fmt.stop) for e in examples],
                            bundle.arch["max_len"])
    print(f"{len(examples)} examples, {batch.n_tokens} tokens packed ({batch.padded_tokens} padded)")

    # The same graph without slots: exported once into the cache.
    plain = home() / "bench" / "scoring-noslots-packed.onnx"
    if not plain.exists():
        plain.parent.mkdir(parents=True, exist_ok=True)
        model, _, _ = load_base(base_source(bundle))
        export_scoring(model, {}, plain)
    rng = np.random.default_rng(0)
    L = bundle.arch["layers"]
    A = {m: (rng.normal(0, 0.02, (L, args.rank, t["in"]))).astype(np.float32) for m, t in bundle.targets.items()}
    B = {m: (rng.normal(0, 0.02, (L, t["out"], args.rank))).astype(np.float32) for m, t in bundle.targets.items()}

    slots = Scorer(bundle)
    slots.bind(batch)
    import onnxruntime as ort
    from edgelora.scorer import session_options
    noslot = ort.InferenceSession(str(plain), session_options(), providers=["CPUExecutionProvider"])
    feeds = batch.feeds()

    model, _, _ = load_base(base_source(bundle))
    from edgelora_export.model import target_shapes
    eager = ScoringModel(model, target_shapes(model, list(bundle.targets))).eval()
    torch.set_num_threads(slots.session.get_session_options().intra_op_num_threads)
    t_in = [torch.from_numpy(feeds[k]) for k in batch.FEEDS]
    t_lora = [torch.from_numpy(x) for m in bundle.targets for x in (A[m], B[m])]

    def run_eager():
        with torch.no_grad():
            return eager(*t_in, *t_lora)

    # parity first: what we time must compute the same thing
    l_slots = slots.losses(A, B)
    l_zero = slots.losses(*zero_slots(bundle.targets, L))
    l_plain = noslot.run(["loss"], feeds)[0]
    l_eager = run_eager()[0].numpy()
    print("loss slots", l_slots.round(4), "eager", l_eager.round(4), "| zero slots", l_zero.round(4), "plain", l_plain.round(4))
    times = alternate({"ort_slots": lambda: slots.losses(A, B), "ort_noslots": lambda: noslot.run(["loss"], feeds),
                       "torch_eager_slots": run_eager}, args.rounds)
    med = {k: median(v) for k, v in times.items()}
    ratios = {"slots_over_noslots": med["ort_slots"] / med["ort_noslots"],
              "torch_over_ort_slots": med["torch_eager_slots"] / med["ort_slots"]}
    for k, v in med.items():
        print(f"{k:<20} median {v * 1000:8.1f} ms   (min {min(times[k]) * 1000:.1f}, max {max(times[k]) * 1000:.1f})")
    print(f"slots / no slots: {ratios['slots_over_noslots']:.3f}  (target <= 1.15)")
    print(f"torch eager / ORT slots: {ratios['torch_over_ort_slots']:.3f}")
    sweep = session_sweep(bundle, batch, A, B, args.rounds) if args.sweep else None
    save(f"forward_{args.task}", {"session_sweep": sweep,
        "task": args.task, "examples": len(examples), "tokens": batch.n_tokens, "padded_tokens": batch.padded_tokens,
        "rank": args.rank, "rounds": args.rounds, "seconds": times, "median_s": med, "ratios": ratios,
        "parity": {"max_abs_slots_vs_eager": float(np.abs(l_slots - l_eager).max()),
                   "max_abs_zero_vs_plain": float(np.abs(l_zero - l_plain).max())},
        "target": "slots_over_noslots <= 1.15"})


if __name__ == "__main__":
    main()
