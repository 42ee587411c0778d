"""ADAPT: LoraHub's gradient-free search for the weights of a LoRA composition (or, with
`kind="adaption-prompt"`, of a composition of LLaMA-Adapter's adaption prompts).

Objective (the reference's): the examples' mean token cross-entropy under the composed
LoRA plus α·mean|w|, minimised in a box with a hard budget of forward passes. Every
evaluation is one COMPOSE into reused buffers and one ORT forward over the packed examples;
a point is never scored twice (the selection's forward is the search's first point), and the
best point so far is kept, so a budget stop, a converged optimizer or Ctrl-C still returns
the best weights found.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .arrow import load_prototypes, rank_by_arrow
from .batch import check_batch_size, encode_pairs, keep_ends
from .adaption_prompt import AdaptionPrompt, PromptStack, load_checked_prompts
from .bundle import KINDS, LORA_LIBRARIES, Bundle
from .errors import UserError
from .examples import Example, load_examples
from .lora import COMPOSITIONS, Lora, LoraStack, load_checked
from .recipe import CHOICES, choose
from .surrogate import MISPREDICTING, RADIUS, Head, Point, Setting, Trace, choose_setting, trust_region

if TYPE_CHECKING:  # onnxruntime: imported where adapt builds the session, so the CLI starts without it
    from .scorer import Scorer

# "surrogate" models the hidden states every forward returns and spends forwards only to correct
# the model (surrogate.py); the others are scipy's / cma's, which see one number per forward.
OPTIMIZERS = ("cobyla", "nelder-mead", "powell", "cma", "surrogate")
# How the n LoRAs are drawn from the library: by Arrow routing mass on the examples (one forward,
# which is also the search's first point), by each one's loss alone (one forward per library
# LoRA), or LoraHub's random sample (the paper's protocol, with the seed).
SELECTS = ("loss", "arrow", "random")


@dataclass(frozen=True)
class AdaptConfig:
    """Every setting of `adapt`: the CLI's defaults and weights.json's `settings` come from here.
    LoraHub's defaults (budget 40, α 0.05, box ±1.5, 20 LoRAs), except where a measurement chose
    otherwise: the optimizer (bench/README.md, "COBYLA against Nelder-Mead") and the selection
    (bench/bbh.py)."""

    budget: int = 40           # points scored (forward passes over the examples), the start included
    optimizer: str = "cobyla"  # what NGOpt (the reference's) picks at this budget
    l1: float = 0.05           # weight of mean|w| in the objective
    bounds: float = 1.5        # search box [-b, b]
    n_loras: int = 20          # LoRAs composed
    select: str = "loss"       # which n of the library: loss | arrow | random (see SELECTS, bench/bbh.py)
    select_len: int = 64       # >0: the loss pick ranks on each example's last N own tokens, then scores its best 3 whole
    seed: int = 0              # for select=random and optimizer=cma
    top_k: int = 3             # Arrow routing: LoRAs kept per token (peft's default)
    patience: int = 10         # after the first n + 1 points, stop once the best gained < 1e-4 over this many (0: never)
    library: str = "per-task"  # the bundle's library to compose: per-task (a LoRA per upstream task) | mbc (per cluster)
    compose: str = "lorahub"   # lorahub: A = Σ wA, B = Σ wB (the paper's) | cat: the exact Σ w·s·BA (peft's cat)
    loo: bool = True           # surrogate: choose its span and radius by leave-one-out (else --n-loras, radius 0.5)
    recipe: str = "auto"       # auto: adapted, adapted+icl, icl or zero-shot by leave-one-out (recipe.py), or the one named
    kind: str = "lora"         # what is composed: lora (--library's LoRAs) | adaption-prompt (the bundle's prompt library)

    @property
    def adapters(self) -> str:
        """The bundle library composed: --library's LoRAs, or the adaption prompts."""
        return "prompts" if self.kind == "adaption-prompt" else self.library

    def check(self) -> "AdaptConfig":
        if self.kind not in KINDS:
            raise UserError(f"--kind {self.kind}: choose one of {', '.join(KINDS)}")
        if self.kind == "adaption-prompt":
            for flag, value, lora_only in (("--optimizer", self.optimizer, "surrogate"), ("--select", self.select, "arrow"),
                                           ("--library", self.library, "mbc"), ("--compose", self.compose, "cat")):
                if value == lora_only:
                    raise UserError(f"{flag} {value} works on LoRAs only: --kind adaption-prompt composes the bundle's "
                                    f"adaption-prompt library")
        if self.compose not in COMPOSITIONS:
            raise UserError(f"--compose {self.compose}: choose one of {', '.join(COMPOSITIONS)}")
        if self.optimizer == "surrogate" and self.compose != "cat":
            raise UserError("--optimizer surrogate models the exact composition: use it with --compose cat")
        if self.optimizer == "surrogate" and self.bounds < 1:
            raise UserError(f"--bounds {self.bounds}: --optimizer surrogate starts from each LoRA alone at weight 1, "
                            f"so the box must hold 1")
        if self.optimizer == "surrogate" and self.select != "loss":
            raise UserError("--optimizer surrogate starts from the library ranking's points: use it with --select loss")
        if self.recipe not in CHOICES:
            raise UserError(f"--recipe {self.recipe}: choose one of {', '.join(CHOICES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer {self.optimizer}: choose one of {', '.join(OPTIMIZERS)}")
        if self.select not in SELECTS:
            raise UserError(f"--select {self.select}: choose one of {', '.join(SELECTS)}")
        if self.library not in LORA_LIBRARIES:
            raise UserError(f"--library {self.library}: choose one of {', '.join(LORA_LIBRARIES)}")
        if self.select_len < 0:
            raise UserError(f"--select-len {self.select_len}: must be 0 (whole examples) or more")
        for name in ("budget", "n_loras", "top_k"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not (np.isfinite(self.bounds) and self.bounds > 0):
            raise UserError(f"--bounds {self.bounds}: must be a finite positive number")
        if not (np.isfinite(self.l1) and self.l1 >= 0):
            raise UserError(f"--l1 {self.l1}: must be a finite number, 0 or more")
        if self.seed < 0:
            raise UserError(f"--seed {self.seed}: must be 0 or more")
        if self.patience < 0:
            raise UserError(f"--patience {self.patience}: must be 0 (never stop early) or more")
        return self


class _Stop(Exception):
    """Raised inside the objective to end a search; `reason` goes into weights.json."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Evaluation:
    loss: float
    objective: float
    weights: list[float]
    seconds: float


@dataclass
class AdaptResult:
    loras: list[str]
    weights: np.ndarray
    loss: float                 # the examples' loss at the best point (without the L1 term)
    objective: float
    start_loss: float           # loss with every weight 0: the base model
    history: list[Evaluation]
    settings: dict
    interrupted: bool = False
    seconds: float = 0.0
    stop: str = "budget"        # why the search ended: budget, converged, no gain, interrupted
    timings: dict = field(default_factory=dict)  # seconds per phase (bench/profile_adapt.py)
    stack: LoraStack | PromptStack | None = field(default=None, repr=False)
    surrogate: dict | None = None  # the surrogate search's leave-one-out table and per-forward trace
    recipe: dict | None = None     # recipe.choose's: the choice, why, the leave-one-out table

    def merged(self) -> tuple[dict, dict] | AdaptionPrompt:
        """The composed adapter at the best weights: A and B (scale folded into B), or the prompt."""
        return self.stack.merged(self.weights)


def choose_loras(bundle: Bundle, loras: list[str] | str | Path | None, n: int, seed: int,
                 library_name: str = "per-task") -> list[Path]:
    """Named LoRAs, a folder of them, or `n` sampled from the bundle's library with the seed."""
    library = bundle.lora_paths(library_name)
    if loras is None:
        names = sorted(bundle.library(library_name))
        if len(names) > n:
            names = sorted(np.random.default_rng(seed).choice(names, n, replace=False).tolist())
        return [library[k] for k in names]
    if isinstance(loras, (str, Path)) and Path(loras).is_dir():
        paths = sorted(Path(loras).glob("*.safetensors"))
        if not paths:
            raise UserError(f"{loras}: no .safetensors LoRAs in this folder")
        return paths
    names = [loras] if isinstance(loras, (str, Path)) else list(loras)
    out = []
    for name in names:
        p = Path(name)
        if p.suffix == ".safetensors" and p.is_file():
            out.append(p)
        elif str(name) in library:
            out.append(library[str(name)])
        else:
            raise UserError(f"--loras: no LoRA named {name} in {bundle.path}'s {library_name} library "
                            f"(have: {', '.join(sorted(library)[:8])}{', ...' if len(library) > 8 else ''})")
    return out


def pooled_loss(logprob: np.ndarray, n_tokens: float) -> float:
    """Token-pooled mean cross-entropy over the bound examples, as the reference's batch loss."""
    return float(-logprob.sum() / n_tokens)


class Objective:
    """loss(w) + α·mean|w|: scores each distinct point once, counts them against the budget,
    keeps the best, and stops a search that has stopped gaining."""

    def __init__(self, scorer: Scorer, stack: LoraStack | PromptStack, n_tokens: float, cfg: AdaptConfig,
                 on_eval: Callable[[int, Evaluation, Evaluation], None] | None = None, hidden: bool = False):
        self.scorer, self.stack, self.n_tokens, self.cfg, self.on_eval = scorer, stack, n_tokens, cfg, on_eval
        self.hidden = hidden  # keep every forward's answer-position hidden states (the surrogate's points)
        self.points: list[Point] = []
        self._points: dict[bytes, Point] = {}
        self.history: list[Evaluation] = []
        self.best: Evaluation | None = None
        self._seen: dict[bytes, Evaluation] = {}
        self._best_at: list[float] = []  # best objective after each point, for the patience window
        self.forwards = 0  # forward passes this objective ran (recorded points may come from elsewhere)
        self.seconds = {"compose": 0.0, "forward": 0.0}

    def clip(self, w) -> np.ndarray:
        return np.clip(np.asarray(w, np.float64), -self.cfg.bounds, self.cfg.bounds)

    def penalised(self, w: np.ndarray, loss: float) -> float:
        """The objective: loss + α·mean|w|."""
        return loss + self.cfg.l1 * float(np.abs(w).mean())

    def record(self, w: np.ndarray, loss: float, seconds: float) -> Evaluation:
        """A scored point: into the history, the cache and the best so far."""
        w = self.clip(w)
        ev = Evaluation(loss, self.penalised(w, loss), w.tolist(), seconds)
        self.history.append(ev)
        self._seen[w.tobytes()] = ev
        if self.best is None or ev.objective < self.best.objective:
            self.best = ev
        self._best_at.append(self.best.objective)
        if self.on_eval:
            self.on_eval(len(self.history), ev, self.best)
        return ev

    def seen(self, w) -> Evaluation | None:
        return self._seen.get(self.clip(w).tobytes())

    def objective(self, p: Point) -> float:
        return self.penalised(p.w, pooled_loss(p.logprob, self.n_tokens))

    def add_point(self, w: np.ndarray, out: tuple) -> Point:
        """A forward's outputs (loss, logprob, hidden) as a surrogate point: hidden at the real targets."""
        p = Point(np.asarray(w, np.float64), out[2][self.scorer.batch.target_mask > 0], out[1])
        self.points.append(p)
        self._points[p.w.tobytes()] = p
        return p

    def point(self, w) -> Point:
        """The surrogate's evaluation: scores w (or looks it up) and returns its Point."""
        w = self.clip(w)
        self(w)
        return self._points[w.tobytes()]

    def __call__(self, w) -> float:
        w = self.clip(w)
        if (ev := self.seen(w)) is not None:
            return ev.objective
        if len(self.history) >= self.cfg.budget:
            raise _Stop("budget")
        t0 = time.perf_counter()
        A, B, prompt = self.stack.slots(w)
        t1 = time.perf_counter()
        out = self.scorer.run(A, B, hidden=self.hidden, prompt=prompt)
        logprob = out[1]
        if self.hidden:
            self.add_point(w, out)
        t2 = time.perf_counter()
        self.forwards += 1
        self.seconds["compose"] += t1 - t0
        self.seconds["forward"] += t2 - t1
        ev = self.record(w, pooled_loss(logprob, self.n_tokens), t2 - t0)
        # The window opens only after the optimizer's own start design (n + 1 points: COBYLA's
        # simplex probes every LoRA once), which must not be cut short by a flat start.
        p, start = self.cfg.patience, len(w) + 1
        if p and len(self._best_at) >= start + p and self._best_at[-p - 1] - self._best_at[-1] < 1e-4:
            raise _Stop(f"no gain over {p} points")
        return ev.objective


def load_adapters(paths: list[Path], bundle: Bundle, kind: str) -> list[Lora] | list[AdaptionPrompt]:
    """The adapters at `paths`, each refused with one line unless the bundle can take it."""
    return load_checked_prompts(paths, bundle.arch) if kind == "adaption-prompt" else load_checked(paths, bundle)


def stacked(adapters: list, bundle: Bundle, cfg: AdaptConfig) -> LoraStack | PromptStack:
    """The adapters stacked for composing, by their kind."""
    if cfg.kind == "adaption-prompt":
        return PromptStack(adapters)
    return LoraStack(adapters, list(bundle.targets), cfg.compose)


def rank_by_loss(scorer: Scorer, n_tokens: float, adapters: list, bundle: Bundle, cfg: AdaptConfig,
                 on_rank: Callable[[int, int], None] | None = None, outputs: list | None = None) -> np.ndarray:
    """Each adapter's loss alone at weight 1 on the bound examples (one forward each); with `outputs`,
    each forward's (loss, logprob, hidden) is appended there (the surrogate's first points).
    `on_rank(done, total)` after each: the whole library takes a minute on a laptop."""
    losses = []
    for adapter in adapters:
        A, B, prompt = stacked([adapter], bundle, cfg).slots(np.ones(1))
        out = scorer.run(A, B, hidden=outputs is not None, prompt=prompt)
        losses.append(pooled_loss(out[1], n_tokens))
        if outputs is not None:
            outputs.append(out)
        if on_rank:
            on_rank(len(losses), len(adapters))
    return np.array(losses)


def run_optimizer(name: str, f: Objective, x0: np.ndarray, seed: int) -> str:
    """Runs until the objective raises _Stop (budget, no gain) or the optimizer ends on its own:
    returns why ("converged", or the optimizer's own message). The optimizers' call limits are
    set far above the budget, so that the objective, which does not count repeated points, is
    what stops a search."""
    from scipy.optimize import minimize  # here, not at the top: the CLI reads this module's choices at start-up
    dim = len(x0)
    bounds, calls = f.cfg.bounds, 10 * (f.cfg.budget + dim + 2)
    box = [(-bounds, bounds)] * dim
    if name == "cobyla":
        # Linear models from n+1 points, then trust-region steps: a 40-evaluation budget in
        # 20 dimensions is spent descending, where Nelder-Mead spends half of it on its simplex.
        # (A simplex of each LoRA alone at weight 1 around 0, the loss pick's own points, would cost
        # no forward, but it searched worse: README, "Adapting".)
        r = minimize(f, x0, method="COBYLA", bounds=box, options={"maxiter": calls, "rhobeg": 0.5, "tol": 1e-4})
    elif name == "nelder-mead":
        # scipy's default simplex around 0 is 0.00025 wide: useless; step half a unit instead.
        simplex = np.vstack([x0, x0 + 0.5 * np.eye(dim)])
        r = minimize(f, x0, method="Nelder-Mead", bounds=box,
                     options={"maxfev": calls, "initial_simplex": simplex, "xatol": 1e-4, "fatol": 1e-6})
    elif name == "powell":
        r = minimize(f, x0, method="Powell", bounds=box, options={"maxfev": calls, "xtol": 1e-3, "ftol": 1e-6})
    elif name == "cma":
        try:
            import cma
        except ImportError:
            raise UserError("--optimizer cma needs the cma package: pip install 'edgelora[cma]'") from None
        es = cma.CMAEvolutionStrategy(x0, 0.5, {"bounds": [-bounds, bounds], "seed": seed + 1,
                                                "maxfevals": calls, "verbose": -9})
        while not es.stop():
            xs = es.ask()
            es.tell(xs, [f(x) for x in xs])
        return "converged: " + ", ".join(es.stop())
    else:
        raise UserError(f"--optimizer {name}: choose one of {', '.join(OPTIMIZERS)}")
    return "converged" if r.success else f"optimizer stopped: {r.message}"


def run_surrogate(f: Objective, bundle: Bundle, trace: Trace) -> str:
    """Leave-one-out picks what the search may do (how many of the ranked LoRAs it spans, how far
    it may step; the best single LoRA, no search, is one choice), then the trust-region search
    runs with it. The spans tried: 5, --n-loras and the whole library."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):  # the model's small products: OpenBLAS's threads spinning beside ORT's cost 4x
        return _run_surrogate(f, bundle, trace)


def _run_surrogate(f: Objective, bundle: Bundle, trace: Trace) -> str:
    cfg, batch = f.cfg, f.scorer.batch
    mask = batch.target_mask > 0
    norm, weight, eps = bundle.head()
    head = Head(norm, weight, eps, batch.target_ids[mask])
    N = len(f.stack.names)
    if not cfg.loo:
        setting = Setting(min(cfg.n_loras, N), RADIUS)
        trace.setting = setting.label()
    else:
        setting = choose_setting(f.point, f.points, head, np.nonzero(mask)[0], batch.target_mask.sum(1),
                                 loo_settings(N, cfg), cfg.bounds, cfg.l1, trace)
    if setting.span == 1:
        return "leave-one-out chose the best single LoRA"
    return with_fallback(f, trust_region(f.point, f.points, head, f.objective, setting, cfg.bounds, cfg.l1, trace),
                         setting.span)


def loo_settings(N: int, cfg: AdaptConfig) -> list[Setting]:
    """What leave-one-out chooses among: the best single LoRA, or a search spanning the best 5,
    --n-loras or all N ranked LoRAs, with a largest step of 0.5 or the whole box."""
    spans = sorted({k for k in (5, cfg.n_loras, N) if 1 < k <= N})
    return [Setting(1, 0.0)] + [Setting(k, r) for k in spans for r in sorted({RADIUS, cfg.bounds})]


def with_fallback(f: Objective, stop: str, span: int) -> str:
    """Where the model kept mispredicting (its slopes are secants between far points, not the local
    ones), COBYLA takes over from the best true point, over the same span, with what is left of
    the budget: its first steps probe each direction locally, which the model could not."""
    if not stop.startswith(MISPREDICTING):
        return stop
    best = np.asarray(f.best.weights)
    rest = lambda x: f(np.concatenate([x, best[span:]]))
    from scipy.optimize import minimize
    box = [(-f.cfg.bounds, f.cfg.bounds)] * span
    try:
        r = minimize(rest, best[:span], method="COBYLA", bounds=box,
                     options={"maxiter": 10 * (f.cfg.budget + span + 2), "rhobeg": 0.25, "tol": 1e-4})
    except _Stop as e:
        return f"{stop}; then COBYLA: {e.reason}"
    return f"{stop}; then COBYLA: " + ("converged" if r.success else str(r.message))


@dataclass
class Selection:
    """The LoRAs a search composes, and the points the selection already scored (w over them,
    loss, seconds), which the search takes as its first points instead of scoring them again."""

    paths: list[Path]
    loras: list[Lora]
    known: list[tuple[np.ndarray, float, float]] = field(default_factory=list)
    forwards: int = 0
    ranking_tokens: int | None = None  # packed tokens per ranking forward (fewer than the batch's when cut)
    outputs: list[tuple[np.ndarray, tuple]] = field(default_factory=list)  # (w, forward outputs): surrogate points


# With a cut ranking, the best few by it are scored on the whole examples and the best of those
# starts the search: the cut ranking keeps the library's order (Spearman 0.90-0.95) but not
# always its first place (bench/results/select_truncated.json).
FINALISTS = 3


def cut_pays(n_library: int, cut_tokens: int, whole_tokens: int, finalists: int = FINALISTS) -> bool:
    """A cut ranking is worth its finalists only where its forwards save more tokens than the
    finalists' extra whole forwards cost (a forward's time is about its tokens): otherwise, or
    where nothing is cut, the library is ranked whole, forward for forward the plain loss pick."""
    return n_library * (whole_tokens - cut_tokens) > (finalists - 1) * whole_tokens


# The surrogate on a cut ranking: the LoRAs then scored whole, which its model spans. A cut forward's
# hidden states do not stand in for whole ones (the secant h(eᵢ) − h(0) on the cut examples has
# cosine ~0.65 with the whole one on date_understanding), so the model spans only whole points.
SHORTLIST = 10


def select_for_surrogate(cfg: AdaptConfig, scorer: Scorer, bundle: Bundle, paths: list[Path], n_tokens: float,
                         on_rank=None) -> Selection:
    """The surrogate's LoRAs, in order of their whole-example loss alone, and each one's forward as
    a point of its model: the whole library ranked on the whole examples; or, where a cut ranking
    pays (`cut_pays` with SHORTLIST finalists), the SHORTLIST best by the cut, then scored whole."""
    loras, whole = load_checked(paths, bundle), scorer.batch
    cut = keep_ends(whole, cfg.select_len) if cfg.select_len else whole
    short, forwards, ranked_on = list(range(len(loras))), 0, whole
    if cut_pays(len(loras), cut.n_tokens, whole.n_tokens, SHORTLIST):
        scorer.bind(cut)
        cut_losses = rank_by_loss(scorer, float(cut.target_mask.sum()), loras, bundle, cfg, on_rank)
        scorer.bind(whole)
        short, forwards, ranked_on = list(np.argsort(cut_losses, kind="stable")[:SHORTLIST]), len(loras), cut
    outs: list = []
    losses = rank_by_loss(scorer, n_tokens, [loras[i] for i in short], bundle, cfg, None if forwards else on_rank, outs)
    order = list(np.argsort(losses, kind="stable"))
    keep, eye = [short[i] for i in order], np.eye(len(order))
    return Selection([paths[i] for i in keep], [loras[i] for i in keep], [(eye[0], float(losses[order[0]]), 0.0)],
                     forwards + len(short), ranked_on.n_tokens, [(eye[k], outs[i]) for k, i in enumerate(order)])


def select_loras(cfg: AdaptConfig, scorer: Scorer, bundle: Bundle, paths: list[Path], n_tokens: float,
                 on_rank=None) -> Selection:
    """The library's `cfg.n_loras` by `cfg.select`: "arrow" from one base forward, which is the
    point w = 0; "loss" from one forward per LoRA, the best LoRA alone being the search's start.
    The loss pick ranks on the examples cut to `cfg.select_len` own tokens each where that is
    shorter, then scores its FINALISTS whole; those points are the search's, not thrown away."""
    n = min(cfg.n_loras, len(paths))
    if cfg.optimizer == "surrogate":
        return select_for_surrogate(cfg, scorer, bundle, paths, n_tokens, on_rank)
    if cfg.select == "arrow":
        mass, logprob, secs = rank_by_arrow(scorer, [load_prototypes(p) for p in paths], bundle, cfg.top_k)
        paths = [paths[i] for i in np.argsort(-mass, kind="stable")[:n]]
        return Selection(paths, load_checked(paths, bundle), [(np.zeros(n), pooled_loss(logprob, n_tokens), secs)], 1)
    loras, whole = load_adapters(paths, bundle, cfg.kind), scorer.batch
    cut = keep_ends(whole, cfg.select_len) if cfg.select_len else whole
    if not cut_pays(len(loras), cut.n_tokens, whole.n_tokens):
        losses = rank_by_loss(scorer, n_tokens, loras, bundle, cfg, on_rank)
        order = list(np.argsort(losses, kind="stable"))
        finalists, forwards, ranked_on = {order[0]: float(losses[order[0]])}, len(loras), whole
    else:
        scorer.bind(cut)
        cut_losses = rank_by_loss(scorer, float(cut.target_mask.sum()), loras, bundle, cfg, on_rank)
        scorer.bind(whole)
        order = list(np.argsort(cut_losses, kind="stable"))
        top = order[:FINALISTS]
        finalists = dict(zip(top, rank_by_loss(scorer, n_tokens, [loras[i] for i in top], bundle, cfg).tolist()))
        forwards, ranked_on = len(loras) + len(top), cut
        best = min(finalists, key=finalists.get)
        order = [best] + [i for i in order if i != best]
    keep = order[:n]
    # each finalist alone at weight 1, the best last: the search starts from the last known point;
    # a box that does not hold weight 1 holds none of them, and the search starts at 0
    known = [(np.eye(n)[keep.index(i)], loss, 0.0)
             for i, loss in sorted(finalists.items(), key=lambda kv: -kv[1]) if i in keep and cfg.bounds >= 1]
    return Selection([paths[i] for i in keep], [loras[i] for i in keep], known, forwards, ranked_on.n_tokens)


def adapt(examples: str | Path | list[Example], bundle: Bundle | str | Path | None = None,
          loras: list[str] | str | Path | None = None, config: AdaptConfig | None = None, *,
          on_eval=None, on_rank=None, warn=print, **overrides) -> AdaptResult:
    """Find LoRA weights for `examples`. `config` (or keyword overrides of its fields) holds every
    setting. Which n LoRAs: those named by `loras`; else by default (`select="loss"`) the library's n
    with the lowest loss alone (a forward each), the search starting at the best, so it ends no worse
    than that LoRA; `select="arrow"`, the n with the most Arrow routing mass on the examples, from
    one forward that also scores the start point w = 0 (about half the time, fewer points on
    bench/bbh.py); `select="random"`, LoraHub's seeded sample."""
    t_start = time.perf_counter()
    cfg = replace(config or AdaptConfig(), **overrides).check()
    timings: dict[str, float] = {}
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    source = str(examples) if not isinstance(examples, list) else "<list>"
    if not isinstance(examples, list):
        examples = load_examples(examples, warn=warn)
    fmt = bundle.prompt_format
    t0 = time.perf_counter()
    pairs = fmt.pairs(examples)
    batch, truncated = encode_pairs(bundle.tokenizer(), pairs, bundle.arch["max_len"])
    for i in truncated:
        warn(f"warning: {examples[i].where or f'example {i + 1}'}: longer than the bundle's "
             f"{bundle.arch['max_len']} tokens; the start of its prompt was cut")
    check_batch_size(len(examples), batch.padded_tokens, source)
    timings["tokenise"] = time.perf_counter() - t0
    if cfg.adapters != "per-task":
        bundle.library(cfg.adapters)  # a library the bundle lacks is one line, whatever --loras names
    # the loss pick ranks the library; the surrogate ranks whatever it composes (its model's first points)
    ranked = cfg.select != "random" and loras is None or cfg.optimizer == "surrogate"
    paths = choose_loras(bundle, loras, len(bundle.lora_paths(cfg.adapters)) if ranked else cfg.n_loras, cfg.seed,
                         cfg.adapters)
    loras_ = [] if ranked else load_adapters(paths, bundle, cfg.kind)  # named or sampled: checked before the session is built
    from .scorer import Scorer
    t0 = time.perf_counter()
    scorer = Scorer(bundle)
    scorer.bind(batch)
    timings["session"] = time.perf_counter() - t0
    n_tokens = float(batch.target_mask.sum())
    t0 = time.perf_counter()
    sel = select_loras(cfg, scorer, bundle, paths, n_tokens, on_rank) if ranked else Selection(paths, loras_)
    timings["select"] = time.perf_counter() - t0
    paths, loras_, n = sel.paths, sel.loras, len(sel.paths)
    stack = stacked(loras_, bundle, cfg)
    f = Objective(scorer, stack, n_tokens, cfg, on_eval, hidden=cfg.optimizer == "surrogate")
    for w, out in sel.outputs:
        f.add_point(w, out)
    trace = Trace()
    interrupted = False
    t0 = time.perf_counter()
    try:
        # w = 0 first, so the start loss is known however small the budget (the arrow pick's
        # forward is that point); then the selection's other points, which the budget counts
        for w, loss, secs in sel.known:
            if not np.any(w):
                f.record(w, loss, secs)
        f(np.zeros(n))
        for w, loss, secs in sel.known:
            if np.any(w):
                f.record(w, loss, secs)
        if cfg.optimizer == "surrogate":
            stop = run_surrogate(f, bundle, trace)
        else:
            stop = run_optimizer(cfg.optimizer, f, sel.known[-1][0] if sel.known else np.zeros(n), cfg.seed)
    except _Stop as e:
        stop = e.reason
    except KeyboardInterrupt:
        interrupted, stop = True, "interrupted"
    timings["search"] = time.perf_counter() - t0
    timings.update({f"search_{k}": v for k, v in f.seconds.items()})
    best = f.best
    if best is None:
        raise KeyboardInterrupt  # stopped before a single evaluation: nothing to keep
    recipe = None
    if not interrupted:
        t0 = time.perf_counter()
        try:
            recipe = choose(scorer, examples, stack, trace.folds or None, cfg.recipe)
        except KeyboardInterrupt:  # the search's result stands; the model is not written
            interrupted, stop = True, "interrupted while choosing the recipe"
        timings["recipe"] = time.perf_counter() - t0
    settings = {**asdict(cfg), "examples": source, "n_examples": len(examples), "tokens": batch.n_tokens,
                "padded_tokens": batch.padded_tokens, "prefix_tokens": batch.prefix_len,
                "target_tokens": int(n_tokens), "n_loras": len(paths), "select": "given" if loras is not None else
                cfg.select if ranked else "random", "selection_forwards": sel.forwards,
                "ranking_tokens": sel.ranking_tokens,
                "forwards": sel.forwards + f.forwards}
    zero = f.seen(np.zeros(n))
    return AdaptResult([p.stem for p in paths], np.array(best.weights), best.loss, best.objective,
                       zero.loss if zero else float("nan"), f.history, settings, interrupted,
                       time.perf_counter() - t_start, stop, timings, stack,
                       asdict(trace) if cfg.optimizer == "surrogate" else None, recipe)
