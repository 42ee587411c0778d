"""ADAPT: LoraHub's gradient-free search for the weights of a LoRA composition.

Objective (the reference's): the examples' mean token cross-entropy under the composed
LoRA plus α·mean|w|, minimised from w = 0 in a box with a hard budget of evaluations.
Every evaluation is one COMPOSE into reused buffers and one ORT forward; the best point so
far is kept, so a budget stop or Ctrl-C still returns the best weights found.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .bundle import Bundle
from .errors import UserError
from .examples import Example, check_batch_size, encode_pairs, load_examples
from .lora import LoraStack, check_compatible, load_lora
from .scorer import Scorer

OPTIMIZERS = ("cobyla", "nelder-mead", "powell", "cma")
DEFAULT_OPTIMIZER = "cobyla"  # what NGOpt (the reference's) picks at this budget; see bench/optimizers.py
# How the n LoRAs are drawn from the library: the n that fit the examples best alone (one forward
# pass per library LoRA, on top of the budget; the default: bench/results/bbh.md), or LoraHub's
# random sample (the paper's protocol, with the seed).
SELECTS = ("loss", "random")


class _Stop(Exception):
    """Raised inside the objective to end a search: budget spent or interrupted."""


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
    stack: LoraStack | None = field(default=None, repr=False)

    def merged(self) -> tuple[dict, dict]:
        """The composed A and B (scale folded into B) at the best weights."""
        A, B = self.stack.compose(self.weights)
        return {m: a.copy() for m, a in A.items()}, {m: b.copy() for m, b in B.items()}


def choose_loras(bundle: Bundle, loras: list[str] | str | Path | None, n: int, seed: int) -> list[Path]:
    """Named LoRAs, a folder of them, or `n` sampled from the bundle's library with the seed."""
    library = bundle.lora_paths()
    if loras is None:
        names = sorted(library)
        if not names:
            raise UserError(f"{bundle.path}: the bundle has no LoRAs; add some with edgelora-export lora")
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
            raise UserError(f"--loras: no LoRA named {name} in {bundle.path} "
                            f"(have: {', '.join(sorted(library)[:8])}{', ...' if len(library) > 8 else ''})")
    return out


def pooled_loss(scorer: Scorer, A: dict, B: dict, n_tokens: float) -> float:
    """Token-pooled mean cross-entropy over the bound examples, as the reference's batch loss."""
    _, logprob = scorer.run(A, B)
    return float(-logprob.sum() / n_tokens)


class Objective:
    """loss(w) + α·mean|w|, counting evaluations and keeping the best point."""

    def __init__(self, scorer: Scorer, stack: LoraStack, n_tokens: float, l1: float, budget: int,
                 bounds: float, on_eval: Callable[[int, Evaluation, Evaluation], None] | None = None):
        self.scorer, self.stack, self.n_tokens, self.l1 = scorer, stack, n_tokens, l1
        self.budget, self.bounds, self.on_eval = budget, bounds, on_eval
        self.history: list[Evaluation] = []
        self.best: Evaluation | None = None

    def loss(self, w: np.ndarray) -> float:
        return pooled_loss(self.scorer, *self.stack.compose(w), self.n_tokens)

    def __call__(self, w) -> float:
        if len(self.history) >= self.budget:
            raise _Stop
        w = np.clip(np.asarray(w, np.float64), -self.bounds, self.bounds)
        t0 = time.perf_counter()
        loss = self.loss(w)
        ev = Evaluation(loss, loss + self.l1 * float(np.abs(w).mean()), w.tolist(), time.perf_counter() - t0)
        self.history.append(ev)
        if self.best is None or ev.objective < self.best.objective:
            self.best = ev
        if self.on_eval:
            self.on_eval(len(self.history), ev, self.best)
        return ev.objective


def rank_by_loss(scorer: Scorer, n_tokens: float, loras: list, modules: list[str],
                 on_rank: Callable[[int, int], None] | None = None) -> list[int]:
    """Indices of `loras`, best first, by each one's loss alone at weight 1 on the bound examples.
    `on_rank(done, total)` after each: the whole library takes a minute on a laptop."""
    losses = []
    for lora in loras:
        losses.append(pooled_loss(scorer, *LoraStack([lora], modules).compose(np.ones(1)), n_tokens))
        if on_rank:
            on_rank(len(losses), len(loras))
    return sorted(range(len(loras)), key=losses.__getitem__)


def run_optimizer(name: str, f: Objective, x0: np.ndarray, seed: int) -> None:
    from scipy.optimize import minimize  # here, not at the top: the CLI reads this module's choices at start-up
    dim = len(x0)
    box = [(-f.bounds, f.bounds)] * dim
    if name == "cobyla":
        # Linear models from n+1 points, then trust-region steps: a 40-evaluation budget in
        # 20 dimensions is spent descending, where Nelder-Mead spends half of it on its simplex.
        # (COBYLA wants at least n+2 evaluations; the objective's own budget stops it sooner.)
        minimize(f, x0, method="COBYLA", bounds=box, options={"maxiter": max(f.budget, dim + 2), "rhobeg": 0.5,
                                                              "tol": 1e-4})
    elif name == "nelder-mead":
        # scipy's default simplex around 0 is 0.00025 wide: useless; step half a unit instead.
        simplex = np.vstack([x0, x0 + 0.5 * np.eye(dim)])
        minimize(f, x0, method="Nelder-Mead", bounds=box,
                 options={"maxfev": f.budget, "initial_simplex": simplex, "xatol": 1e-4, "fatol": 1e-6})
    elif name == "powell":
        minimize(f, x0, method="Powell", bounds=box, options={"maxfev": f.budget, "xtol": 1e-3, "ftol": 1e-6})
    elif name == "cma":
        try:
            import cma
        except ImportError:
            raise UserError("--optimizer cma needs the cma package: pip install 'edgelora[cma]'") from None
        es = cma.CMAEvolutionStrategy(x0, 0.5, {"bounds": [-f.bounds, f.bounds], "seed": seed + 1,
                                                "maxfevals": f.budget, "verbose": -9})
        while not es.stop():
            xs = es.ask()
            es.tell(xs, [f(x) for x in xs])
    else:
        raise UserError(f"--optimizer {name}: choose one of {', '.join(OPTIMIZERS)}")


def adapt(examples: str | Path | list[Example], bundle: Bundle | str | Path | None = None,
          loras: list[str] | str | Path | None = None, budget: int = 40, optimizer: str = DEFAULT_OPTIMIZER,
          l1: float = 0.05, seed: int = 0, bounds: float = 1.5, n_loras: int = 20, select: str = SELECTS[0],
          on_eval=None, on_rank=None, warn=print) -> AdaptResult:
    """Find LoRA weights for `examples`. The objective and search are LoraHub's (budget 40,
    α 0.05, box ±1.5, 20 LoRAs), so results compare with the reference. Which 20: by default
    (`select="loss"`) the library LoRAs with the lowest loss alone, the search starting at the
    best of them, so it ends no worse than that single LoRA; LoraHub samples them at random with
    the seed and starts at 0 (`select="random"`), which scored lower on bbh/ and near/."""
    t_start = time.time()
    if optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer {optimizer}: choose one of {', '.join(OPTIMIZERS)}")
    if budget < 1:
        raise UserError(f"--budget {budget}: must be at least 1")
    if bounds <= 0:
        raise UserError(f"--bounds {bounds}: must be positive")
    if select not in SELECTS:
        raise UserError(f"--select {select}: choose one of {', '.join(SELECTS)}")
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    source = str(examples) if not isinstance(examples, list) else "<list>"
    if not isinstance(examples, list):
        examples = load_examples(examples, warn=warn)
    fmt = bundle.prompt_format
    pairs = [(fmt.prompt(e.input), e.output + fmt.stop) for e in examples]
    batch, truncated = encode_pairs(bundle.tokenizer(), pairs, bundle.arch["max_len"], bundle.manifest["pad_id"])
    for i in truncated:
        warn(f"warning: {examples[i].where or f'example {i + 1}'}: longer than the bundle's "
             f"{bundle.arch['max_len']} tokens; the start of its prompt was cut")
    check_batch_size(len(examples), batch.input_ids.size, source)
    rank = select == "loss" and loras is None
    paths = choose_loras(bundle, loras, len(bundle.lora_paths()) if rank else n_loras, seed)
    loras = [load_lora(p) for p in paths]
    for lora, p in zip(loras, paths):
        check_compatible(lora, bundle.targets, bundle.arch["layers"], str(p))
    scorer = Scorer(bundle)  # after every input is checked: building the session takes seconds
    scorer.bind(batch)
    n_tokens = float(batch.target_mask.sum())
    selection_evals = 0
    if rank:
        keep = rank_by_loss(scorer, n_tokens, loras, list(bundle.targets), on_rank)[:n_loras]
        selection_evals = len(loras)
        paths, loras = [paths[i] for i in keep], [loras[i] for i in keep]
    stack = LoraStack(loras, list(bundle.targets))
    x0 = np.zeros(len(paths))
    if rank:
        x0[0] = min(1.0, bounds)  # the best LoRA alone
    f = Objective(scorer, stack, n_tokens, l1, budget, bounds, on_eval)
    interrupted = False
    try:
        f(np.zeros(len(paths)))  # the start point: the base model's loss, evaluation 1
        run_optimizer(optimizer, f, x0, seed)
    except _Stop:
        pass
    except KeyboardInterrupt:
        interrupted = True
    best = f.best
    if best is None:
        raise KeyboardInterrupt  # stopped before a single evaluation: nothing to keep
    settings = {"examples": source, "n_examples": len(examples), "tokens": batch.n_tokens,
                "target_tokens": int(batch.target_mask.sum()), "budget": budget, "optimizer": optimizer,
                "l1": l1, "seed": seed, "bounds": bounds, "n_loras": len(paths), "select": select,
                "selection_evals": selection_evals}
    return AdaptResult([p.stem for p in paths], np.array(best.weights), best.loss, best.objective,
                       f.history[0].loss, f.history, settings, interrupted, time.time() - t_start, stack)
