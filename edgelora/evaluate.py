"""Scoring a model on a task: exact match on generated answers, and option ranking by summed
log-probability where the task has options. Modes differ only in the prompt: zero-shot, ICL
(k examples as earlier chat turns), adapted (an adapt output, prompted zero-shot)."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .examples import Example
from .io import is_json_with

if TYPE_CHECKING:  # onnxruntime: `edgelora --help` reads MODES without it
    from .generate import Model

MODES = ("zero-shot", "icl", "adapted")
# What every `edgelora eval` results file holds: such a file is replaced by the next eval.
RESULT_KEYS = {"task", "model", "mode", "n", "exact_match", "examples"}


def is_eval_results(path: Path) -> bool:
    return is_json_with(path, RESULT_KEYS)


def normalize(text: str) -> str:
    """First line, case, outer spaces and a final period ignored (the data README's rule)."""
    line = text.strip().split("\n", 1)[0].strip()
    return re.sub(r"\.$", "", line).strip().lower()


def exact_match(generated: str, ex: Example) -> bool:
    return normalize(generated) in {normalize(a) for a in ex.answers}


def prompt_ids(model: Model, ex: Example, shots: list[Example]) -> tuple[list[int], int]:
    """The prompt's tokens and how many shots it holds (`PromptFormat.fitted`: the oldest dropped
    whole while it is longer than the model takes)."""
    prompt, k = model.fmt.fitted(model.encode, ex.input, shots, model.max_len)
    return model.encode(prompt)[-model.max_len:], k


def evaluate(model: Model, examples: list[Example], shots: list[Example] = (), max_new_tokens: int = 32,
             on_example: Callable[[int, dict], None] | None = None) -> dict:
    rows = []
    t0 = time.time()
    for i, ex in enumerate(examples):
        ids, k = prompt_ids(model, ex, shots)
        gen, lps = model.answer(ids, max_new_tokens, ex.options)
        row = {"input": ex.input, "output": ex.output, "generated": gen, "exact": exact_match(gen, ex),
               "prompt_tokens": len(ids), "shots": k, "stopped_at_limit": model.decoder.stopped_at_limit}
        if ex.options:
            row["option_pred"] = ex.options[max(range(len(lps)), key=lps.__getitem__)]
            row["option_correct"] = row["option_pred"] == ex.output
        rows.append(row)
        if on_example:
            on_example(i, row)
    n = len(rows)
    with_opts = [r for r in rows if "option_correct" in r]
    return {"n": n, "exact_match": sum(r["exact"] for r in rows) / n,
            "option_accuracy": sum(r["option_correct"] for r in with_opts) / len(with_opts) if with_opts else None,
            "prompt_tokens_mean": sum(r["prompt_tokens"] for r in rows) / n, "shots_mean": sum(r["shots"] for r in rows) / n,
            "stopped_at_limit": sum(r["stopped_at_limit"] for r in rows),
            "seconds": round(time.time() - t0, 2), "examples": rows}
