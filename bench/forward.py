"""One evaluation's forward on the real SmolLM2 bundle, 5 BBH examples, side by side: the packed
scoring graph (LoRA slots fed, fp32), the same graph with its base weights quantized weight-only
by onnxruntime's MatMulNBits at 8 and at 4 bits (accuracy_level 4: int8 activations inside the
kernel; the LoRA slots stay fp32), and the plain fp32 forward over the same examples right-padded
(no slots): the yardstick. Where a quantized graph is not faster it is not worth a ranking study.

Also the floor: the packed fp32 forward's MatMul GFLOP/s (its base MatMuls' weight shapes times
its tokens, the LM head's times its target positions) beside numpy's sgemm (OpenBLAS, the same
threads) on one layer's MLP-sized MatMul over as many tokens, alternated: how close one
evaluation already is to what this CPU can multiply, so what is left is fewer tokens.

Target: packed fp32 evaluation / plain padded forward <= 0.7.
    python bench/forward.py [--tasks date_understanding,navigate] [--rounds 5]
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
from common import DATA, alternate, median, padded_feeds, padded_graph, save

from edgelora.adaption_prompt import slot_feeds
from edgelora.bundle import Bundle, home
from edgelora.batch import encode_pairs
from edgelora.examples import load_examples
from edgelora.scorer import session_options


def quantized(bundle: Bundle, bits: int):
    """The scoring graph with every base MatMul at `bits` (block 32), made once into the cache."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    path = home() / "bench" / f"scoring-q{bits}-{bundle.manifest['files']['scoring.onnx']['sha256'][:12]}.onnx"
    if not path.exists():
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        q = MatMulNBitsQuantizer(onnx.load(str(bundle.scoring_path)), bits=bits, block_size=32, is_symmetric=True,
                                 accuracy_level=4)
        q.process()
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(q.model.model, str(path))
    return path


def matmul_flops(bundle: Bundle, tokens: int, targets: int) -> float:
    """2·in·out per token for every base MatMul weight of the scoring graph (the LM head: per target)."""
    import onnx
    m = onnx.load(str(bundle.scoring_path), load_external_data=False)
    dims = [tuple(i.dims) for i in m.graph.initializer if len(i.dims) == 2]
    vocab = bundle.arch["vocab"]
    return sum(2.0 * a * b * (targets if vocab in (a, b) else tokens) for a, b in dims)


def main():
    import onnxruntime as ort
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="date_understanding,navigate")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    bundle = Bundle.open()
    L, fmt = bundle.arch["layers"], bundle.prompt_format
    rng = np.random.default_rng(0)
    lora = {}
    for m, t in bundle.targets.items():
        lora[f"lora_A_{m}"] = rng.normal(0, t["in"] ** -0.5, (L, 8, t["in"])).astype(np.float32)
        lora[f"lora_B_{m}"] = rng.normal(0, 0.01, (L, t["out"], 8)).astype(np.float32)
    new = lambda p: ort.InferenceSession(str(p), session_options(), providers=["CPUExecutionProvider"])
    sessions = {"packed_fp32": new(bundle.scoring_path), "packed_8bit": new(quantized(bundle, 8)),
                "packed_4bit": new(quantized(bundle, 4))}
    plain = new(padded_graph(bundle))
    rows = {}
    for task in args.tasks.split(","):
        ex = load_examples(DATA / "bbh" / f"{task}.adapt.jsonl")
        batch, _ = encode_pairs(bundle.tokenizer(), fmt.pairs(ex),
                                bundle.arch["max_len"])
        feeds, pf = {**batch.feeds(), **slot_feeds(None, bundle.arch), **lora}, padded_feeds(batch, bundle.manifest["pad_id"])
        fns = {k: (lambda s=s: s.run(["logprob"], feeds)[0]) for k, s in sessions.items()}
        fns["plain_padded"] = lambda: plain.run(["logprob"], pf)[0]
        x = rng.standard_normal((batch.n_tokens, bundle.arch["hidden"]), dtype=np.float32)
        w = rng.standard_normal((bundle.arch["hidden"], 1536), dtype=np.float32)
        sgemm_reps = 20
        fns["numpy_sgemm"] = lambda: [x @ w for _ in range(sgemm_reps)]
        out = {k: fn() for k, fn in fns.items()}  # warm-up, and what each computes
        times = alternate(fns, args.rounds)
        med = {k: median(v) for k, v in times.items()}
        sgemm = 2.0 * x.shape[0] * x.shape[1] * w.shape[1] * sgemm_reps / med.pop("numpy_sgemm") / 1e9
        times.pop("numpy_sgemm"), out.pop("numpy_sgemm")
        packed = matmul_flops(bundle, batch.n_tokens, int(batch.target_mask.sum())) / med["packed_fp32"] / 1e9
        rows[task] = {"tokens": batch.n_tokens, "padded_tokens": batch.padded_tokens, "prefix_tokens": batch.prefix_len,
                      "seconds": times, "median_s": med,
                      "over_plain_padded": {k: v / med["plain_padded"] for k, v in med.items()},
                      "logprob_sum": {k: float(v.sum()) for k, v in out.items()},
                      "gflops": {"packed_fp32_matmul": packed, "numpy_sgemm": sgemm, "ratio": packed / sgemm}}
        print(f"{task}: {batch.n_tokens} tokens packed, {batch.padded_tokens} padded (prefix {batch.prefix_len})")
        for k, v in med.items():
            print(f"  {k:<14}{v * 1000:8.0f} ms  {v / med['plain_padded']:5.2f}x plain padded   "
                  f"target log-prob {rows[task]['logprob_sum'][k]:9.3f}")
        print(f"  packed fp32 MatMuls {packed:.0f} GFLOP/s, numpy sgemm {sgemm:.0f} GFLOP/s ({packed / sgemm:.2f}x)")
    save("forward", {"rounds": args.rounds, "tasks": rows, "target": "packed_fp32 / plain_padded <= 0.7"})


if __name__ == "__main__":
    main()
