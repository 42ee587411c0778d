"""The recipe: which model, with or without the examples in its prompt, serves the task best.

A user who adapts from 5 examples has two alternatives that cost no adaptation: the base model
zero-shot, and the base model with the examples as earlier chat turns (ICL). The adapted model,
alone or with the same shots, is worth deploying only where it beats them, and the search's own
loss cannot tell: the weights were fitted to those examples. So every recipe is scored on each
example held out in turn:

- the base recipes need no fit: the held-out example alone (zero-shot), or after the other
  examples (icl);
- the adapted recipes use weights fitted *without* the held-out example: the surrogate search's
  leave-one-out folds (the model fitted on the library's points, minimised on the other
  examples' answer positions in the setting the search chose), so no search is repeated.

Each held-out example is scored as the task will be: by option ranking (summed log-prob of each
option) where it has options, else by greedy exact match, read off one teacher-forced forward (the
answer, or an alias, followed by the stop text, every token the argmax: what greedy decoding
produces; an answer that equals it only after case or a final period is normalised counts as a
miss here). Recipes within one standard error of the most examples right (one of five) count as
tied; among them the held-out answer's cross-entropy decides, and within TIE of the lowest the
recipe with the shorter prompt wins. One forward per held-out example and recipe, over that
example's rows alone, which share its whole prompt: 20 small forwards for 5 examples.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .batch import encode_pairs
from .examples import Example, PromptFormat
from .lora import LoraStack, zero_slots
from .surrogate import Head

if TYPE_CHECKING:  # onnxruntime: `edgelora --help` reads CHOICES without it
    from .scorer import Scorer

# name: (the adapted model, the examples as shots). In cost order: a full tie goes to the first.
RECIPES = {"adapted": (True, False), "zero-shot": (False, False), "adapted+icl": (True, True), "icl": (False, True)}
CHOICES = ("auto", *RECIPES)
TIE = 0.02  # held-out cross-entropies within 2% of the best count as equal


@dataclass
class Held:
    """One example held out, under one recipe."""
    correct: bool
    ce: float           # the held-out answer's mean token cross-entropy
    prompt_tokens: int


def rows(fmt: PromptFormat, encode, ex: Example, shots: list[Example], max_len: int) -> tuple[list[tuple[str, str]], int]:
    """(prompt, target) pairs that score `ex`: each accepted answer with the stop text, then each
    option alone (as eval ranks them); the shots that fit beside the longest target; prompt tokens."""
    targets = [a + fmt.stop for a in ex.answers] + list(ex.options)
    room = max_len - max(len(encode(t)) for t in targets)
    prompt, _ = fmt.fitted(encode, ex.input, shots, room)
    return [(prompt, t) for t in targets], len(encode(prompt))


def judge(ex: Example, loss: np.ndarray, logprob: np.ndarray, exact: np.ndarray, tokens: int) -> Held:
    """`ex` scored from its rows' outputs (answers first, then options)."""
    n = len(ex.answers)
    correct = ex.options[int(np.argmax(logprob[n:]))] == ex.output if ex.options else bool(exact[:n].any())
    return Held(bool(correct), float(loss[0]), tokens)


def score(scorer: Scorer, head: Head, tok, A: dict, B: dict, cases: list[tuple[Example, list[Example]]]) -> list[Held]:
    """Each (example, shots) case under the slot (A, B): one forward per case, whose rows share
    its whole prompt, which the packed batch then runs once (rows of several prompts would share
    only the chat header, and a 4-shot prompt would run once per option)."""
    fmt, max_len = scorer.bundle.prompt_format, scorer.bundle.arch["max_len"]
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids
    out = []
    for ex, shots in cases:
        pairs, tokens = rows(fmt, encode, ex, shots, max_len)
        batch, _ = encode_pairs(tok, pairs, max_len)
        scorer.bind(batch)
        loss, logprob, hidden = scorer.run(A, B, hidden=True)
        mask = batch.target_mask > 0
        hit = head.logits(hidden[mask]).argmax(1) == batch.target_ids[mask]
        row_of = np.nonzero(mask)[0]  # each target token's row
        exact = np.array([hit[row_of == i].all() for i in range(len(pairs))])
        out.append(judge(ex, loss, logprob, exact, tokens))
    return out


def leave_one_out(scorer: Scorer, examples: list[Example], stack: LoraStack | None,
                  folds: list[np.ndarray] | None) -> dict[str, list[Held]]:
    """Each recipe's held-out results, example by example. `folds`: the search's weights without
    each example (None: no adapted recipe can be validated)."""
    bundle = scorer.bundle
    norm, weight, eps = bundle.head()
    head = Head(norm, weight, eps, np.zeros(0, np.int64))
    zero, tok = zero_slots(bundle.targets, bundle.arch["layers"]), bundle.tokenizer()
    others = [examples[:j] + examples[j + 1:] for j in range(len(examples))]
    table: dict[str, list[Held]] = {"zero-shot": score(scorer, head, tok, *zero, [(ex, []) for ex in examples]),
                                    "icl": score(scorer, head, tok, *zero, list(zip(examples, others)))}
    if folds is not None:
        table["adapted"], table["adapted+icl"] = [], []
        for ex, o, w in zip(examples, others, folds):
            alone, shots = score(scorer, head, tok, *stack.merged(np.asarray(w)), [(ex, []), (ex, o)])
            table["adapted"].append(alone)
            table["adapted+icl"].append(shots)
    return table


def summary(table: dict[str, list[Held]]) -> dict[str, dict]:
    return {r: {"correct": sum(h.correct for h in hs), "n": len(hs), "ce": round(float(np.mean([h.ce for h in hs])), 5),
                "prompt_tokens": round(float(np.mean([h.prompt_tokens for h in hs])), 1),
                "held_out": [{"correct": h.correct, "ce": round(h.ce, 5)} for h in hs]}
            for r, hs in ((r, table[r]) for r in RECIPES if r in table)}


def best(rows_: dict[str, dict]) -> str:
    """Among the recipes within noise of the most held-out examples right (`same`), the lowest
    cross-entropy; within TIE of it, the shortest prompt (then the earlier in RECIPES)."""
    top = max(r["correct"] for r in rows_.values())
    cands = [name for name in RECIPES if name in rows_ and rows_[name]["correct"] >= top - same(rows_[name]["n"])]
    low = min(rows_[name]["ce"] for name in cands)
    tied = [name for name in cands if rows_[name]["ce"] <= low * (1 + TIE) + 1e-9]
    return min(tied, key=lambda name: (rows_[name]["prompt_tokens"], list(RECIPES).index(name)))


def same(n: int) -> int:
    """How many held-out examples two recipes may differ by and still count as equal: one standard
    error of an accuracy over n examples, sqrt(n·p(1-p)) at p = 1/2, rounded down (1 of 5; 2 of 16):
    one example in five is a coin's toss, not a better recipe."""
    return int(np.sqrt(n) / 2)


def choose(scorer: Scorer, examples: list[Example], stack: LoraStack, folds: list | None, forced: str = "auto") -> dict:
    """The recipe and its leave-one-out table, as weights.json records it. `forced`: a recipe the
    user named (the table is still computed and shown). Without `folds` (another optimizer than
    the surrogate, or --no-loo) nothing validates the search's result against the alternatives:
    `auto` then keeps the adapted model, and says so, without spending forwards on a table."""
    if forced == "auto" and (folds is None or len(examples) < 2):
        return {"choice": "adapted", "why": "not validated: the recipes are compared by the surrogate search's "
                "leave-one-out (--optimizer surrogate, at least 2 examples)", "table": {}, "seconds": 0.0,
                "shots": []}
    from threadpoolctl import threadpool_limits
    t0 = time.perf_counter()
    with threadpool_limits(1):  # the head's product beside ORT: OpenBLAS's spinning threads slow it (surrogate.py)
        table = summary(leave_one_out(scorer, examples, stack, folds if len(examples) > 1 else None))
    choice, why = (best(table), "leave-one-out") if forced == "auto" else (forced, "--recipe")
    shots = [{"input": e.input, "output": e.output} for e in examples] if RECIPES[choice][1] else []
    return {"choice": choice, "why": why, "table": table, "seconds": round(time.perf_counter() - t0, 2), "shots": shots}


def deployed(recipe: dict | None) -> tuple[bool, list[dict]]:
    """What the written model is and what its prompt carries: (the adapted model, not the base;
    the shots, as edgelora.json records them for generate and eval)."""
    if recipe is None:
        return True, []
    return RECIPES[recipe["choice"]][0], recipe["shots"]


def line(recipe: dict) -> str:
    """The table in one line: each recipe's held-out examples right and cross-entropy."""
    return "leave-one-out: " + " · ".join(
        f"{name} {r['correct']}/{r['n']} (CE {r['ce']:.3f}, {r['prompt_tokens']:.0f} tok)" for name, r in recipe["table"].items())
