"""How much of the default library's MBC clustering is the data and how much the k-means seed: the
clusters of `edgelora cluster` for --seed 0..N-1, each seed's inertia, the pairs of LoRAs that
fall together under every seed (and under 80% of them); and what the similarity is made of: the
cosine of the LoRAs' A halves, of their B halves, and of the whole vectors before and after
keeping the largest half.

    python bench/mbc_seeds.py [--seeds 20] [--k 10]
"""
from __future__ import annotations

import argparse

import numpy as np
from common import save
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from edgelora.bundle import Bundle
from edgelora.cluster import cluster_loras, cosine_matrix, flatten, keep_largest, kmeans, name_clusters
from edgelora.lora import load_lora


def off_diagonal(S: np.ndarray) -> dict:
    v = S[~np.eye(len(S), dtype=bool)]
    return {"min": round(float(v.min()), 3), "mean": round(float(v.mean()), 3), "max": round(float(v.max()), 3)}


def inertia(S: np.ndarray, labels: np.ndarray) -> float:
    return float(sum(((S[labels == j] - S[labels == j].mean(0)) ** 2).sum() for j in set(labels.tolist())))


def together(names: list[str], co: np.ndarray, share: float) -> list[list[str]]:
    """Groups of LoRAs linked by pairs that share a cluster under at least `share` of the seeds."""
    n, labels = connected_components(csr_matrix(co >= share - 1e-9))
    groups = [[names[i] for i in range(len(names)) if labels[i] == j] for j in range(n)]
    return [g for g in groups if len(g) > 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    bundle = Bundle.open()
    loras = sorted((load_lora(p) for p in bundle.lora_paths().values()), key=lambda l: l.name)
    c = cluster_loras(loras, args.k, 0)
    S, names = c.similarity, c.names
    co, runs = np.zeros_like(S), []
    for seed in range(args.seeds):
        labels = kmeans(S, args.k, seed)
        co += labels[:, None] == labels[None, :]
        runs.append({"seed": seed, "inertia": round(inertia(S, labels), 4), "clusters": name_clusters(names, labels)})
    co /= args.seeds
    rank = max(l.rank for l in loras)
    halves = {part: np.stack([np.concatenate([getattr(l, part)[m].ravel() for m in sorted(l.A)]) for l in loras])
              for part in ("A", "B")}
    whole = np.stack([flatten(l, rank) for l in loras])
    parts = {"A": off_diagonal(cosine_matrix(halves["A"])), "B": off_diagonal(cosine_matrix(halves["B"])),
             "whole": off_diagonal(cosine_matrix(whole)),
             "largest half kept": off_diagonal(cosine_matrix(np.stack([keep_largest(x) for x in whole])))}
    for name, stats in parts.items():
        print(f"cosine of {name:<18} min {stats['min']:.3f}  mean {stats['mean']:.3f}  max {stats['max']:.3f}")
    for r in runs:
        print(f"seed {r['seed']:>2}: inertia {r['inertia']:.4f}")
    always, mostly = together(names, co, 1.0), together(names, co, 0.8)
    print("together under every seed:", always)
    print("together under 80% of seeds:", mostly)
    save("mbc_seeds", {"k": args.k, "seeds": args.seeds, "n_loras": len(names), "cosine_of": parts,
                       "together_every_seed": always, "together_80pct": mostly, "runs": runs})


if __name__ == "__main__":
    main()
