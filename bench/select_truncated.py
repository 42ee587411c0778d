"""Could the loss pick rank the library on shorter prompts? Each library LoRA's loss alone on a
task's 5 examples, once as adapt scores it and once with every example cut to its last
`--max-len` tokens (encode_pairs keeps a prompt's end, where the question is): the Spearman of
the two rankings, the overlap of their top 20, whether the best LoRA stays the best, and the
tokens (the cost of a forward) of each. A cheap ranking would cut the pick's 39 forwards, not
the search's.

    python bench/select_truncated.py [--tasks date_understanding,temporal_sequences] [--max-len 96]
"""
from __future__ import annotations

import argparse

import numpy as np
from common import DATA, save
from scipy.stats import spearmanr

from edgelora.bundle import Bundle
from edgelora.examples import encode_pairs, load_examples
from edgelora.lora import load_lora
from edgelora.scorer import Scorer
from edgelora.search import rank_by_loss

N = 20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="date_understanding,temporal_sequences,penguins_in_a_table")
    ap.add_argument("--max-len", type=int, default=96)
    args = ap.parse_args()
    bundle = Bundle.open()
    loras = [load_lora(p) for p in bundle.lora_paths().values()]
    scorer, fmt, rows = Scorer(bundle), bundle.prompt_format, {}
    for task in args.tasks.split(","):
        suite = next(s for s in ("bbh", "near") if (DATA / s / f"{task}.adapt.jsonl").exists())
        pairs = fmt.pairs(load_examples(DATA / suite / f"{task}.adapt.jsonl"))
        losses, tokens = {}, {}
        for name, max_len in (("full", bundle.arch["max_len"]), ("cut", args.max_len)):
            batch, _ = encode_pairs(bundle.tokenizer(), pairs, max_len)
            scorer.bind(batch)
            losses[name] = rank_by_loss(scorer, float(batch.target_mask.sum()), loras, list(bundle.targets))
            tokens[name] = batch.n_tokens
        top = {k: set(np.argsort(v, kind="stable")[:N]) for k, v in losses.items()}
        rows[task] = {"tokens": tokens, "spearman": float(spearmanr(losses["full"], losses["cut"]).statistic),
                      "overlap_top20": len(top["full"] & top["cut"]) / N,
                      "best_kept": int(np.argmin(losses["full"])) == int(np.argmin(losses["cut"])),
                      "full_best_rank_in_cut": int(np.argsort(np.argsort(losses["cut"]))[np.argmin(losses["full"])]) + 1}
        r = rows[task]
        print(f"{task}: tokens {tokens['full']} -> {tokens['cut']}  Spearman {r['spearman']:.3f}  "
              f"top-20 overlap {r['overlap_top20']:.2f}  best kept {r['best_kept']} (rank {r['full_best_rank_in_cut']})",
              flush=True)
    save("select_truncated", {"max_len": args.max_len, "n": N, "tasks": rows})


if __name__ == "__main__":
    main()
