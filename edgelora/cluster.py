"""MBC, model-based clustering of a LoRA library (seed 001; mttl's `MBCWithCosSimTransform`).

Each LoRA becomes one vector (every layer's and module's A and B, flattened), of which only the
largest-magnitude half is kept; the vectors are reduced by a truncated SVD (64 dimensions, or as
many as there are LoRAs), L2-normalised, and compared by cosine similarity; k-means (k-means++
starts, the best of 10) then groups the rows of that similarity matrix. The paper trains one LoRA
per cluster on the union of its tasks: LoRAs whose parameters point the same way come from tasks
that gain from being trained together.

numpy and scipy only (the runtime side): no sklearn, whose TruncatedSVD and KMeans mttl uses.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.cluster.vq import vq

from .errors import UserError
from .io import read_json
from .lora import Lora, check_name, pad_rank

FORMAT = "edgelora-clusters"
KEEP = 0.5      # the share of each LoRA's parameters kept, by magnitude (mttl zeroes a sparsity_threshold share, 0.8 by default)
DIMS = 64       # truncated SVD components (mttl's n_components)
N_INIT = 10     # k-means runs from different k-means++ starts; the lowest inertia is kept (sklearn's n_init)
MAX_ITER = 300  # Lloyd iterations per run at most (sklearn's max_iter)
# What marks a heat map as edgelora's, so the next run may replace it: the description it carries
# (and, before it did, the title `edgelora cluster` gave it).
HEATMAP_MARKS = ("<desc>edgelora cluster heat map</desc>", ">MBC: cosine similarity of ")


def flatten(lora: Lora, rank: int) -> np.ndarray:
    """All of a LoRA's parameters as one vector: per module (sorted), A then B, their rank
    zero-padded to `rank` so that every LoRA of a library gives a vector of the same length and
    the same entry means the same parameter. The parameters as trained: mttl flattens them
    without the alpha/r scale."""
    parts = []
    for m in sorted(lora.A):
        A, B = pad_rank(lora.A[m], lora.B[m], rank)
        parts += [A.ravel(), B.ravel()]
    return np.concatenate(parts).astype(np.float32)


def keep_largest(x: np.ndarray, keep: float = KEEP) -> np.ndarray:
    """`x` with all but its `keep` share of largest-magnitude entries set to 0: floor(keep·size)
    of them, as mttl's quantile threshold keeps, but exactly that many (ties at the threshold
    are broken by position, not all kept or all dropped)."""
    n = int(keep * x.size)
    out = np.zeros_like(x)
    if n:
        top = np.argpartition(-np.abs(x), n - 1)[:n]
        out[top] = x[top]
    return out


def reduce(X: np.ndarray, dims: int = DIMS) -> np.ndarray:
    """The rows of X ([n, D]) on their first `dims` left singular directions, scaled by the
    singular values (what TruncatedSVD.fit_transform returns: no centring). Computed from the
    n×n Gram matrix X·Xᵀ, whose eigenpairs are those singular pairs, so the D-wide right factor
    is never formed. With no more rows than `dims` nothing is cut, and cosines equal those of
    the sparsified vectors themselves."""
    X = X.astype(np.float64)
    w, U = np.linalg.eigh(X @ X.T)
    order = np.argsort(-w, kind="stable")[:dims]
    return U[:, order] * np.sqrt(np.clip(w[order], 0, None))


def cosine_matrix(E: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of rows (a zero row is similar to nothing)."""
    norm = np.linalg.norm(E, axis=1, keepdims=True)
    E = E / np.where(norm > 0, norm, 1)
    return np.clip(E @ E.T, -1.0, 1.0)


def plus_plus(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ starts: each next centre drawn with probability ∝ squared distance to the nearest."""
    centres = [X[rng.integers(len(X))]]
    for _ in range(1, k):
        d2 = vq(X, np.array(centres))[1] ** 2
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(X), 1 / len(X))
        centres.append(X[rng.choice(len(X), p=p)])
    return np.array(centres)


def lloyd(X: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, float]:
    """Lloyd's iterations to a fixed point: (labels, inertia). A centre left without points
    moves to the point farthest from its own centre rather than staying empty."""
    for _ in range(MAX_ITER):
        labels, dist = vq(X, centres)
        new = np.array([X[labels == j].mean(0) if (labels == j).any() else X[dist.argmax()]
                        for j in range(len(centres))])
        if np.allclose(new, centres, rtol=0, atol=1e-12):
            break
        centres = new
    labels, dist = vq(X, centres)
    return labels, float((dist ** 2).sum())


def kmeans(X: np.ndarray, k: int, seed: int, n_init: int = N_INIT) -> np.ndarray:
    """Labels of the best of `n_init` k-means runs (lowest inertia), each from k-means++ starts
    drawn from one generator seeded with `seed`: the same seed, the same labels."""
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, float] | None = None
    for _ in range(n_init):
        labels, inertia = lloyd(X, plus_plus(X, k, rng))
        if best is None or inertia < best[1] - 1e-12:
            best = (labels, inertia)
    return best[0]


@dataclass
class Clustering:
    names: list[str]              # the LoRAs, sorted by name
    similarity: np.ndarray        # [n, n] cosine similarity of their reduced vectors
    clusters: dict[str, list[str]]  # cluster_0, cluster_1, ... in order of their first LoRA by name
    dims: int

    def order(self) -> list[int]:
        """The LoRAs' indices cluster by cluster: the heat map's axis."""
        at = {n: i for i, n in enumerate(self.names)}
        return [at[n] for members in self.clusters.values() for n in members]

    def within(self, members: list[str]) -> float | None:
        """Mean cosine similarity over a cluster's distinct pairs (None for a LoRA alone)."""
        idx = [self.names.index(n) for n in members]
        if len(idx) < 2:
            return None
        S = self.similarity[np.ix_(idx, idx)]
        return float((S.sum() - np.trace(S)) / (len(idx) * (len(idx) - 1)))

    def to_json(self) -> dict:
        """The clusters, each one's mean similarity, and the matrix in heat-map order."""
        order = self.order()
        within = {name: self.within(m) for name, m in self.clusters.items()}
        return {"clusters": self.clusters,
                "within_similarity": {k: None if v is None else round(v, 4) for k, v in within.items()},
                "order": [self.names[i] for i in order],
                "similarity": np.round(self.similarity[np.ix_(order, order)], 4).tolist()}


def name_clusters(names: list[str], labels: np.ndarray) -> dict[str, list[str]]:
    """k-means numbers its clusters arbitrarily: renumber them by their first member (names
    sorted), so the same grouping always gets the same ids."""
    firsts = list(dict.fromkeys(int(l) for l in labels))
    return {f"cluster_{i}": [n for n, l in zip(names, labels) if l == lab] for i, lab in enumerate(firsts)}


def cluster_loras(loras: list[Lora], k: int, seed: int = 0, keep: float = KEEP, dims: int = DIMS,
                  where: str = "the library") -> Clustering:
    """MBC on `loras`: sparsify, reduce, normalise, cosine similarity, k-means on its rows.
    `where` names the LoRAs' origin in the error for a k they cannot fill."""
    if not 1 <= k <= len(loras):
        raise UserError(f"--k {k}: must be between 1 and the number of LoRAs ({where} has {len(loras)})")
    loras = sorted(loras, key=lambda l: l.name)
    rank = max(l.rank for l in loras)
    X = np.stack([keep_largest(flatten(l, rank), keep) for l in loras])
    E = reduce(X, min(dims, len(loras)))
    S = cosine_matrix(E)
    names = [l.name for l in loras]
    return Clustering(names, S, name_clusters(names, kmeans(S, k, seed)), E.shape[1])


def read_clusters(path: Path) -> dict[str, list[str]]:
    """A clusters file's `clusters` (cluster name -> task names), refused with one line naming the
    file unless every cluster has a file-safe name and tasks, and no task is in two clusters."""
    obj = read_json(path)
    clusters = obj.get("clusters")
    if not isinstance(clusters, dict) or not clusters:
        raise UserError(f"{path}: needs \"clusters\": an object of cluster name -> list of task names "
                        f"(what `edgelora cluster` writes)")
    seen: dict[str, str] = {}
    for name, tasks in clusters.items():
        check_name(name, f"{path}: cluster name")  # a cluster's name is its LoRA's file name
        if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) and t for t in tasks)):
            raise UserError(f"{path}: cluster {name} must list one or more task names")
        for t in tasks:
            if t in seen:
                raise UserError(f"{path}: task {t} is in both {seen[t]} and {name}")
            seen[t] = name
    return clusters


def color(t: float) -> str:
    """White at 0 to dark red at 1."""
    t = min(max(t, 0.0), 1.0)
    return "#%02x%02x%02x" % tuple(round(255 + (c - 255) * t) for c in (165, 15, 21))


def heatmap_svg(c: Clustering, title: str, cell: int = 14) -> str:
    """The similarity matrix with the LoRAs ordered by cluster, each cluster boxed on the
    diagonal and named on the right, LoRA names on both axes; a cell's tooltip gives its pair.
    The colours span the off-diagonal values, lowest to highest (the diagonal, 1, saturates):
    LoRAs trained from one seed share most of A, so all pairs are alike and a -1..1 scale
    would show one colour."""
    order = c.order()
    names = [html.escape(c.names[i]) for i in order]
    n = len(order)
    off = c.similarity[~np.eye(n, dtype=bool)] if n > 1 else c.similarity.ravel()
    lo, hi = float(off.min()), float(off.max())
    shade = lambda v: color((v - lo) / (hi - lo) if hi > lo else 1.0)
    label = round(5.5 * max(len(x) for x in names)) + 12  # ~5.5 px a character at font size 10
    x0, y0 = label, label + 30
    grid = n * cell
    width, height = x0 + grid + 110, y0 + grid + 50
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
             HEATMAP_MARKS[0], '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{html.escape(title)}</text>']
    for a, i in enumerate(order):
        y = y0 + a * cell
        parts.append(f'<text x="{x0 - 4}" y="{y + cell - 3}" text-anchor="end" font-size="10">{names[a]}</text>')
        parts.append(f'<text transform="translate({x0 + a * cell + cell - 3},{y0 - 4}) rotate(-90)" '
                     f'font-size="10">{names[a]}</text>')
        for b, j in enumerate(order):
            v = float(c.similarity[i, j])
            parts.append(f'<rect x="{x0 + b * cell}" y="{y}" width="{cell}" height="{cell}" fill="{shade(v)}">'
                         f'<title>{names[a]} · {names[b]}: {v:.3f}</title></rect>')
    start = 0
    for name, members in c.clusters.items():
        x, size = x0 + start * cell, len(members) * cell
        parts.append(f'<rect x="{x}" y="{y0 + start * cell}" width="{size}" height="{size}" fill="none" '
                     f'stroke="black" stroke-width="1.5"/>')
        parts.append(f'<text x="{x0 + grid + 6}" y="{y0 + start * cell + size / 2 + 4}" font-size="10">'
                     f'{html.escape(name)}</text>')
        start += len(members)
    for s in range(5):  # the colour scale
        x, v = x0 + s * 48, lo + (hi - lo) * s / 4
        parts.append(f'<rect x="{x}" y="{y0 + grid + 12}" width="48" height="10" fill="{shade(v)}" stroke="#888"/>'
                     f'<text x="{x + 24}" y="{y0 + grid + 34}" text-anchor="middle" font-size="10">{v:.2f}</text>')
    parts.append("</svg>\n")
    return "".join(parts)


def is_own_clusters(path: Path) -> bool:
    """Whether `path` is a clusters file `edgelora cluster` wrote (which a new run may replace)."""
    try:
        return read_json(path).get("format") == FORMAT
    except UserError:
        return False


def is_own_heatmap(path: Path) -> bool:
    """Whether `path` is a heat map `edgelora cluster` wrote."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    return head.startswith("<svg") and any(m in head for m in HEATMAP_MARKS)
