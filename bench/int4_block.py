"""Which block size for int4 MatMulNBits (and how int4 compares with int8)? For each: the base
decoder quantized, the mean |Δ log-prob| per target token against fp32 on the 5 adapt
examples of 4 BBH tasks, and decode tok/s.

    python bench/int4_block.py [--sizes 16,32,64,128]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from common import DATA, save

from edgelora.bundle import Bundle, home
from edgelora.examples import load_examples
from edgelora.generate import Decoder, log_softmax
from edgelora.writeback import write_model

TASKS = ("date_understanding", "sports_understanding", "navigate", "boolean_expressions")


def target_logprobs(dec: Decoder, bundle: Bundle, examples) -> np.ndarray:
    tok, fmt = bundle.tokenizer(), bundle.prompt_format
    out = []
    for prompt, target in fmt.pairs(examples):
        p = tok.encode(prompt, add_special_tokens=False).ids
        t = tok.encode(target, add_special_tokens=False).ids
        lp = log_softmax(dec.forward(p + t, 0))
        out += [lp[len(p) - 1 + j, x] for j, x in enumerate(t)]
    return np.array(out)


def decode_speed(dec: Decoder, ids: list[int], n: int = 64) -> float:
    logits = dec.forward(ids, 0)
    t = time.perf_counter()
    for k in range(n):
        logits = dec.forward([int(np.argmax(logits[-1]))], len(ids) + k)
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16,32,64,128")
    args = ap.parse_args()
    bundle = Bundle.open()
    examples = [e for t in TASKS for e in load_examples(DATA / "bbh" / f"{t}.adapt.jsonl")]
    ids = bundle.tokenizer().encode(bundle.prompt_format.prompt(examples[0].input), add_special_tokens=False).ids
    variants = {"fp32": ("none", 32), "int8": ("int8", 32),
                **{f"int4-b{b}": ("int4", int(b)) for b in args.sizes.split(",")}}
    ref, rows = None, {}
    for name, (quant, block) in variants.items():
        out = home() / "bench" / "int4_block" / name
        if not (out / "model.onnx").exists():
            write_model(bundle, None, None, out, quant, block_size=block)
        dec = Decoder(out / "model.onnx", [])
        lp = target_logprobs(dec, bundle, examples)
        ref = lp if ref is None else ref
        speeds = [decode_speed(dec, ids) for _ in range(3)]
        rows[name] = {"mean_abs_dlogprob": float(np.abs(lp - ref).mean()), "mean_logprob": float(lp.mean()),
                      "decode_tok_s": float(np.median(speeds)),
                      "size_mb": round((out / "model.onnx").stat().st_size / 1e6, 1)}
        print(f"{name:<10} |Δlogprob| {rows[name]['mean_abs_dlogprob']:.4f}  mean logprob {lp.mean():.4f}  "
              f"decode {rows[name]['decode_tok_s']:.1f} tok/s  {rows[name]['size_mb']} MB", flush=True)
    save("int4_block", {"tasks": TASKS, "target_tokens": int(len(ref)), "variants": rows})


if __name__ == "__main__":
    main()
