"""The surrogate search: keep what each forward computes, and spend forwards only to correct a model.

Every forward of the scoring graph returns the residual stream before the final norm at the
examples' answer positions, h [P, d], not just a loss. Under the exact composition ("cat") the
LoRA weights enter the network linearly, so near a point h(w) ≈ h_c + J·(w − w_c); J is fitted by
weighted least squares over every point scored so far, and the library ranking gives the first
n + 1 for free (w = 0 and each LoRA alone: there the fit interpolates). Given h, the model's loss is
exact: the final RMSNorm, the LM head on each position's likeliest tokens at the centre (the rest
of the vocabulary's log-sum-exp held at its value there), cross-entropy at the answer tokens, and
the L1 term. scipy's L-BFGS-B minimises it in a ball around the centre, within the box; one true
forward at the model's optimum checks it, and the radius grows or shrinks with the agreement, as
the trust-region methods of DFO-LS and POUNDERS do for residual vectors. The search returns the
best *true* point it saw, whatever the model predicted.

The same model makes leave-one-out nearly free: fit the weights on 4 examples' answer positions,
predict the 5th's loss, for each candidate setting (LoRAs spanned, trust radius), in milliseconds;
the best setting is then checked with true forwards before it is trusted (`choose_setting`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# scipy (half a second to import) is imported where it is used, as in search.py: the CLI reads the
# search's choices at start-up, and that import reaches this module.

SMOOTH = 1e-3        # |w| ≈ sqrt(w² + SMOOTH²) inside the model, so L-BFGS-B sees a smooth L1 term
RADIUS = 0.5         # first trust radius: a box of half-width 0.75 mispredicted 20× in a prototype
MIN_RADIUS = 0.02    # below this the model has failed: the search stops
TOL = 1e-4           # a predicted gain below this ends the search (converged)
MISPREDICTING = "the model kept mispredicting"


@dataclass
class Point:
    """A true forward: the weights over the stack, the answer positions' hidden states [P, d] and
    each example's summed target log-prob (for leave-one-out)."""
    w: np.ndarray
    hidden: np.ndarray
    logprob: np.ndarray


class Head:
    """The final RMSNorm and the LM head in numpy, at the answer positions (targets [P])."""

    def __init__(self, norm: np.ndarray, weight: np.ndarray, eps: float, targets: np.ndarray):
        self.g = np.asarray(norm, np.float32)
        self.W = np.ascontiguousarray(weight, np.float32)  # [V, d]: read once from the memory map
        self.eps, self.y = eps, np.asarray(targets)

    def normed(self, H: np.ndarray) -> np.ndarray:
        return H * (self.g / np.sqrt((H.astype(np.float64) ** 2).mean(-1, keepdims=True) + self.eps)).astype(np.float32)

    def logits(self, H: np.ndarray) -> np.ndarray:
        return self.normed(H) @ self.W.T

    def ce(self, H: np.ndarray) -> np.ndarray:
        """Each position's exact cross-entropy [P] (the graph's own, up to float error)."""
        from scipy.special import logsumexp
        z = self.logits(H).astype(np.float64)
        return logsumexp(z, axis=1) - z[np.arange(len(z)), self.y]


class Model:
    """h(w) ≈ c + J·(w − w_c) at the answer positions, pushed through the head. Each position keeps
    its K likeliest tokens at the centre (and its target); the others' log-sum-exp is a constant."""

    def __init__(self, head: Head, centre: Point, J: np.ndarray, k: int | None = None):
        from scipy.special import logsumexp
        P, d = centre.hidden.shape
        n = J.shape[-1]
        k = min(k or int(np.clip(4e6 / (P * d), 32, 128)), head.W.shape[0])
        z = head.logits(centre.hidden).astype(np.float64)
        cand = np.argpartition(-z, k - 1, axis=1)[:, :k]
        y = head.y
        has = (cand == y[:, None]).any(1)
        cand[~has, -1] = y[~has]  # the target is always modelled exactly
        rest = z.copy()
        rest[np.arange(P)[:, None], cand] = -np.inf
        with np.errstate(divide="ignore"):  # every token kept: no rest
            self.R = logsumexp(rest, axis=1)  # [P] the other tokens' log-sum-exp at the centre
        self.ty = np.argmax(cand == y[:, None], axis=1)
        Wg = head.W[cand] * head.g  # [P, k, d]
        c = centre.hidden.astype(np.float32)
        self.wc, self.d, self.eps, self.n = centre.w.astype(np.float64), d, head.eps, n
        self.zc = np.matmul(Wg, c[:, :, None])[:, :, 0].astype(np.float64)
        self.ZJ = np.matmul(Wg, J.astype(np.float32)).astype(np.float64)  # [P, k, n], batched GEMM
        c, J = c.astype(np.float64), J.astype(np.float64)
        self.a = (c * c).sum(1)
        self.b = np.matmul(c[:, None, :], J)[:, 0]
        self.Q = np.matmul(J.transpose(0, 2, 1), J)

    def ce(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each position's modelled cross-entropy [P] at w, and its gradient in w [P, n]."""
        s = np.asarray(w, np.float64) - self.wc
        v = self.zc + self.ZJ @ s
        Qs = self.Q @ s
        r2 = (self.a + 2 * self.b @ s + Qs @ s) / self.d + self.eps
        r = np.sqrt(r2)
        z = v / r[:, None]
        top = z.max(1)
        e = np.exp(z - top[:, None])
        lse = np.logaddexp(top + np.log(e.sum(1)), self.R)
        idx = np.arange(len(z))
        ce = lse - z[idx, self.ty]
        delta = e * np.exp(top - lse)[:, None]
        delta[idx, self.ty] -= 1.0
        dr = (self.b + Qs) / (self.d * r[:, None])
        grad = np.matmul(delta[:, None, :], self.ZJ)[:, 0] / r[:, None] - ((delta * v).sum(1) / r2)[:, None] * dr
        return ce, grad


def fit_jacobian(points: list[Point], centre: Point, tau: float) -> np.ndarray:
    """J [P, d, n] by least squares on every point's difference from the centre, the near ones
    weighted up (1 / (1 + (dist/tau)²)) and gently pulled (ridge) to the plain fit over all points,
    which keeps the directions that no near point probes."""
    others = [p for p in points if p is not centre]
    Dw = np.stack([p.w - centre.w for p in others]).astype(np.float64)  # [m, n]
    Dh = np.stack([(p.hidden - centre.hidden).ravel() for p in others]).astype(np.float64)  # [m, P·d]
    J0 = np.linalg.lstsq(Dw, Dh, rcond=None)[0]  # [n, P·d], min-norm where underdetermined
    alpha = 1.0 / (1.0 + (np.linalg.norm(Dw, axis=1) / tau) ** 2)
    G = (Dw * alpha[:, None]).T @ Dw
    lam = 1e-3 * np.trace(G) / len(G) + 1e-12
    J = np.linalg.solve(G + lam * np.eye(len(G)), (Dw * alpha[:, None]).T @ Dh + lam * J0)
    P, d = centre.hidden.shape
    return J.T.reshape(P, d, -1).astype(np.float32)


@dataclass
class Setting:
    """What the search may do: how many LoRAs it spans (the first `span` of the stack, which is in
    ranking order; 1 is the best single LoRA, no search) and its largest trust radius."""
    span: int
    radius: float

    def label(self) -> str:
        return "best single LoRA" if self.span == 1 else f"{self.span} LoRAs, radius {self.radius:g}"


def minimise(model: Model, x0: np.ndarray, span: int, radius: float, bounds: float, l1: float,
             pos_weight: np.ndarray) -> tuple[np.ndarray, float]:
    """argmin over w (the first `span` coordinates free, the rest 0) of Σ pos_weight·CE + l1·mean|w|
    in the ball |w − x0| ≤ radius within the box; returns (w, modelled objective with exact |w|).
    L-BFGS-B on the box with the ball as a steep quadratic penalty, then projected onto it: a few
    milliseconds in 39 dimensions, where SLSQP's constrained subproblems took a second."""
    from scipy.optimize import minimize
    n = model.n
    centre = np.asarray(x0, np.float64)[:span]
    mu = 1e3

    def full(x):
        w = np.zeros(n)
        w[:span] = x
        return w

    def fun(x):
        ce, grad = model.ce(full(x))
        sm = np.sqrt(x * x + SMOOTH ** 2)
        out = radius ** 2 - ((x - centre) ** 2).sum()
        pen = max(0.0, -out)
        f = float(pos_weight @ ce + l1 * sm.sum() / n + mu * pen ** 2)
        return f, (pos_weight @ grad)[:span] + l1 * x / sm / n + 4 * mu * pen * (x - centre)

    r = minimize(fun, centre, jac=True, method="L-BFGS-B", bounds=[(-bounds, bounds)] * span,
                 options={"maxiter": 200, "ftol": 1e-10, "gtol": 1e-7})
    x = r.x if np.isfinite(r.fun) else centre
    step = x - centre
    if np.linalg.norm(step) > radius:
        x = centre + step * (radius / np.linalg.norm(step))
    w = full(np.clip(x, -bounds, bounds))
    return w, float(pos_weight @ model.ce(w)[0] + l1 * np.abs(w).mean())


@dataclass
class Trace:
    """What weights.json records of a surrogate search."""
    steps: list[dict] = field(default_factory=list)  # per true forward: radius, predicted, true, ratio
    loo: list[dict] = field(default_factory=list)    # the leave-one-out table
    setting: str = ""
    folds: list[list[float]] = field(default_factory=list)  # the chosen setting's weights without each example


def trust_region(evaluate, points: list[Point], head: Head, objective, setting: Setting, bounds: float,
                 l1: float, trace: Trace) -> str:
    """The search proper: from the best true point, minimise the model in the trust region, score
    the model's optimum with one true forward (`evaluate(w) -> Point`; it raises to stop the
    search at the budget or on Ctrl-C), refit, and move the radius with the agreement. Returns why
    it stopped."""
    radius = min(RADIUS, setting.radius)
    P = len(head.y)
    pos_weight = np.full(P, 1.0 / P)
    while True:
        centre = min(points, key=objective)
        model = Model(head, centre, fit_jacobian(points, centre, max(radius, 0.1)))
        f_c = objective(centre)
        w, pred = minimise(model, centre.w, setting.span, radius, bounds, l1, pos_weight)
        gain = f_c - pred
        if gain < TOL:
            return f"converged: the model predicts a gain under {TOL:g}"
        new = evaluate(w)  # appends the point to `points`
        true = objective(new)
        ratio = (f_c - true) / gain
        step = float(np.linalg.norm(w - centre.w))
        trace.steps.append({"radius": round(radius, 4), "step": round(step, 4), "predicted": round(pred, 6),
                            "true": round(true, 6), "ratio": round(float(ratio), 3)})
        if ratio < 0.1:
            radius = 0.5 * min(radius, step)
        elif ratio > 0.7 and step > 0.9 * radius:
            radius = min(2 * radius, setting.radius)
        if radius < MIN_RADIUS:
            return f"{MISPREDICTING} (trust radius below {MIN_RADIUS})"


def loo_table(points: list[Point], head: Head, ex_of: np.ndarray, n_tokens: np.ndarray, settings: list[Setting],
              bounds: float, l1: float) -> list[dict]:
    """Leave-one-out through the model: for each setting and each example j, the weights fitted on
    the other examples' answer positions, and j's modelled loss there. The best single LoRA's
    folds need no model: each fold picks the single LoRA best on the others, from true forwards.
    One model serves every fold: fitted on w = 0 and the single LoRAs it interpolates them, so it is
    the same affine model whichever of them is its centre; each fold starts from its own pick."""
    n_ex = len(n_tokens)
    singles = [p for p in points if np.count_nonzero(p.w) <= 1]
    best = max(singles, key=lambda p: p.logprob.sum())
    model = Model(head, best, fit_jacobian(points, best, RADIUS))
    # each fold's best single LoRA on the other examples: the span-1 fit, and every setting's start
    picks = [max(singles, key=lambda p: p.logprob.sum() - p.logprob[j]) for j in range(n_ex)]
    rows = []
    for s in settings:
        held, fits = [], []
        for j, pick in enumerate(picks):
            if s.span == 1:
                held.append(-pick.logprob[j])
                fits.append(pick.w)
                continue
            mask = ex_of != j
            w, _ = minimise(model, pick.w, s.span, s.radius, bounds, l1, mask / mask.sum())
            held.append(model.ce(w)[0][ex_of == j].sum())
            fits.append(w)
        rows.append({"setting": s, "modelled": float(sum(held) / n_tokens.sum()), "folds": fits})
    return rows


def choose_setting(evaluate, points: list[Point], head: Head, ex_of: np.ndarray, n_tokens: np.ndarray,
                   settings: list[Setting], bounds: float, l1: float, trace: Trace) -> Setting:
    """The setting with the best leave-one-out loss. The model's held-out losses are predictions,
    so the best modelled setting is checked with true forwards at its folds' weights (one forward
    per example, each appended to `points` by `evaluate`, where they then serve the search) and
    kept only if its true leave-one-out loss beats the best single LoRA's, which is exact."""
    rows = loo_table(points, head, ex_of, n_tokens, settings, bounds, l1)
    single = next(r for r in rows if r["setting"].span == 1)
    single["true"] = single["modelled"]
    best = min((r for r in rows if r["setting"].span > 1), key=lambda r: r["modelled"], default=None)
    if best is not None and best["modelled"] < single["true"]:
        held = []
        for j, w in enumerate(best["folds"]):
            p = evaluate(w)
            held.append(-p.logprob[j])
        best["true"] = float(sum(held) / n_tokens.sum())
    chosen = min((r for r in rows if "true" in r), key=lambda r: r["true"])
    trace.loo = [{"setting": r["setting"].label(), "modelled": round(r["modelled"], 5),
                  **({"true": round(r["true"], 5)} if "true" in r else {})} for r in rows]
    trace.setting = chosen["setting"].label()
    trace.folds = [np.round(w, 6).tolist() for w in chosen["folds"]]  # what the recipe's leave-one-out scores
    return chosen["setting"]
