"""How well Arrow's one-forward ranking of the library matches the loss pick (one forward per
LoRA), on every bbh/ and near/ task's 5 adapt examples. Scorings of the routing mass: over the
answer positions (where the loss is measured) or over every token but the shared chat header,
each with peft's top-k routing (k = 3) or with the raw mean |x·v| (no top-k). Per task: the
overlap of the two top-20 sets, where the loss pick's best LoRA lands in the Arrow ranking, and
the Spearman correlation over the library; and the seconds of each ranking.

    python bench/arrow_select.py [--suites bbh,near] [--tasks a,b]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from common import DATA, save
from scipy.stats import spearmanr

from edgelora.bundle import Bundle
from edgelora.examples import encode_pairs, load_examples
from edgelora.lora import load_lora, load_prototypes, routing_slots
from edgelora.scorer import Scorer
from edgelora.search import ARROW_TOKENS, arrow_mass, rank_by_loss

N = 20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suites", default="bbh,near")
    ap.add_argument("--tasks")
    args = ap.parse_args()
    bundle = Bundle.open()
    paths = list(bundle.lora_paths().values())
    protos = [load_prototypes(p) for p in paths]
    loras = [load_lora(p) for p in paths]
    scorer = Scorer(bundle)
    fmt = bundle.prompt_format
    scorings = [(t, k) for t in ARROW_TOKENS for k in (3, len(paths))]  # k = N: no top-k, all LoRAs kept
    rows = []
    for suite in args.suites.split(","):
        for f in sorted((DATA / suite).glob("*.adapt.jsonl")):
            task = f.name.removesuffix(".adapt.jsonl")
            if args.tasks and task not in args.tasks.split(","):
                continue
            ex = load_examples(f)
            batch, _ = encode_pairs(bundle.tokenizer(), fmt.pairs(ex),
                                    bundle.arch["max_len"])
            scorer.bind(batch)
            t0 = time.perf_counter()
            _, _, *xa = scorer.run(*routing_slots(protos, bundle.targets, bundle.arch["layers"]), xa=True)
            masses = {f"{t}/top{k}": arrow_mass(xa, batch, k, t) for t, k in scorings}
            arrow_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            losses = rank_by_loss(scorer, float(batch.target_mask.sum()), loras, list(bundle.targets))
            loss_s = time.perf_counter() - t0
            top_loss = set(np.argsort(losses)[:N])
            best = int(np.argmin(losses))
            row = {"suite": suite, "task": task, "arrow_s": arrow_s, "loss_s": loss_s, "tokens": batch.n_tokens,
                   "loss_best": paths[best].stem, "scorings": {}}
            for name, mass in masses.items():
                order = np.argsort(-mass, kind="stable")
                row["scorings"][name] = {
                    "overlap_top20": len(top_loss & set(order[:N].tolist())) / N,
                    "loss_best_rank": int(np.where(order == best)[0][0]) + 1,
                    "spearman": float(spearmanr(-mass, losses).statistic), "arrow_best": paths[order[0]].stem}
            rows.append(row)
            print(task, f"arrow {arrow_s:.1f}s, loss {loss_s:.1f}s", {k: (v["overlap_top20"], v["loss_best_rank"],
                  round(v["spearman"], 2)) for k, v in row["scorings"].items()}, flush=True)
    summary = {name: {"overlap_top20_mean": statistics.mean(r["scorings"][name]["overlap_top20"] for r in rows),
                      "loss_best_in_top20": sum(r["scorings"][name]["loss_best_rank"] <= N for r in rows),
                      "loss_best_rank_median": statistics.median(r["scorings"][name]["loss_best_rank"] for r in rows),
                      "spearman_mean": statistics.mean(r["scorings"][name]["spearman"] for r in rows)}
               for name in rows[0]["scorings"]}
    for k, v in summary.items():
        print(f"{k:<14} overlap@20 {v['overlap_top20_mean']:.2f}  loss-best in arrow top-20: {v['loss_best_in_top20']}/{len(rows)}"
              f"  its median rank {v['loss_best_rank_median']}  Spearman {v['spearman_mean']:.2f}")
    print(f"time: arrow {statistics.mean(r['arrow_s'] for r in rows):.1f}s vs loss {statistics.mean(r['loss_s'] for r in rows):.1f}s per task")
    save("arrow_select", {"n_library": len(paths), "n": N, "tasks": rows, "summary": summary})


if __name__ == "__main__":
    main()
