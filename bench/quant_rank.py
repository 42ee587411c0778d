"""Does cheaper arithmetic keep the search's ranking? The points of one real default search
(`adapt`, fp32) on each task are scored again by the scoring graph with its base MatMuls
quantized, and the two losses per point are compared: Spearman over the points (the issue's
bar: >= 0.98), whether the best point stays the best, and the forward's time beside fp32's
(alternated). Variants: onnxruntime's dynamic int8 (MatMulInteger, per-tensor activations) on
every base MatMul but the LM head, and the same without the MLP's down projection (whose inputs
carry the outlier channels); and weight-only 8-bit MatMulNBits (block 32, accuracy_level 4: int8
activations inside the kernel) on every base MatMul, bench/forward.py's graph.
The LoRA slots' MatMuls take graph inputs as weights and stay fp32 in every variant.

    python bench/quant_rank.py [--tasks date_understanding,navigate] [--rounds 3]
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
import onnx
from common import DATA, alternate, examples_batch, median, save
from forward import quantized
from scipy.stats import spearmanr

from edgelora.bundle import Bundle, home
from edgelora.scorer import Scorer
from edgelora.search import adapt, pooled_loss


def weight_shape(node, inits: dict, producers: dict):
    """The shape of a MatMul's constant weight as [in, out] (through a Transpose), or None."""
    w = node.input[1]
    if w in inits:
        return tuple(inits[w].dims)
    p = producers.get(w)
    if p is not None and p.op_type == "Transpose" and p.input[0] in inits:
        return tuple(inits[p.input[0]].dims)[::-1]
    return None


def dynamic_int8(bundle: Bundle, name: str, skip_down: bool) -> str:
    """The scoring graph through quantize_dynamic (QInt8 weights), made once into the cache."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    sha = bundle.manifest["files"]["scoring.onnx"]["sha256"][:12]
    path = home() / "bench" / f"scoring-{name}-{sha}.onnx"
    if not path.exists():
        m = onnx.load(str(bundle.scoring_path), load_external_data=False)
        inits = {i.name: i for i in m.graph.initializer}
        producers = {o: n for n in m.graph.node for o in n.output}
        exclude = []
        for n in m.graph.node:
            s = weight_shape(n, inits, producers) if n.op_type == "MatMul" else None
            if s is None:
                continue
            if max(s) > 8 * min(s):  # the LM head [hidden, vocab]
                exclude.append(n.name)
            elif skip_down and s[0] > s[1] and s[0] > 2 * min(s):  # down_proj [intermediate, hidden]
                exclude.append(n.name)
        logging.getLogger().setLevel(logging.ERROR)
        path.parent.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(str(bundle.scoring_path), str(path), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude,
                         extra_options={"MatMulConstBOnly": True})
    return str(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="date_understanding,navigate")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    bundle = Bundle.open()
    graphs = {"int8_dynamic": dynamic_int8(bundle, "dyn8", False),
              "int8_dynamic_no_down": dynamic_int8(bundle, "dyn8-nodown", True),
              "nbits8_weight_only": str(quantized(bundle, 8))}
    rows = {}
    for task in args.tasks.split(","):
        suite = next(s for s in ("bbh", "near") if (DATA / s / f"{task}.adapt.jsonl").exists())
        res = adapt(DATA / suite / f"{task}.adapt.jsonl", bundle, warn=lambda m: None)
        fp32 = np.array([e.loss for e in res.history])
        batch = examples_batch(bundle, DATA / suite / f"{task}.adapt.jsonl")
        n_tokens = float(batch.target_mask.sum())
        row = {"points": len(fp32), "variants": {}}
        scorers = {"fp32": Scorer(bundle), **{name: Scorer(bundle, graph=g) for name, g in graphs.items()}}
        for s in scorers.values():
            s.bind(batch)
        for name in graphs:
            losses = np.array([pooled_loss(scorers[name].run(*res.stack.compose(np.array(e.weights)))[1], n_tokens)
                               for e in res.history])
            rho = float(spearmanr(fp32, losses).statistic)
            row["variants"][name] = {"spearman": rho, "best_kept": int(np.argmin(losses)) == int(np.argmin(fp32)),
                                     "max_abs_loss_diff": float(np.abs(losses - fp32).max())}
        A, B = res.merged()
        fns = {name: (lambda s=s: s.run(A, B)) for name, s in scorers.items()}
        med = {k: median(v) for k, v in alternate(fns, args.rounds).items()}
        for name in graphs:
            row["variants"][name]["time_over_fp32"] = med[name] / med["fp32"]
        rows[task] = row
        print(f"{task}: {len(fp32)} points of a default search")
        for name, v in row["variants"].items():
            print(f"  {name:<22} Spearman {v['spearman']:.3f}  best kept {v['best_kept']}  "
                  f"max |dloss| {v['max_abs_loss_diff']:.3f}  time {v['time_over_fp32']:.2f}x fp32")
    save("quant_rank", {"rounds": args.rounds, "tasks": rows, "target": "Spearman >= 0.98 and faster than fp32"})


if __name__ == "__main__":
    main()
