"""One InferenceSession on the scoring graph: loss(A, B) per example, or loss(adaption prompt).

The session is built once; the token arrays are fixed once (`bind`); each call only feeds
the merged A and B and the adaption prompt (none: the base's). The graph computes the LM head at
target positions only.
"""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from .adaption_prompt import AdaptionPrompt, slot_feeds
from .bundle import Bundle
from .batch import Batch
from .lora import zero_slots


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One thread per core: a 2-core laptop gains nothing from oversubscription, and
    # inter-op parallelism only adds scheduling cost for a sequential decoder.
    so.intra_op_num_threads = threads or int(os.environ.get("EDGELORA_THREADS", 0)) or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


class Scorer:
    def __init__(self, bundle: Bundle, threads: int | None = None, options: ort.SessionOptions | None = None):
        self.bundle = bundle
        self.session = ort.InferenceSession(str(bundle.scoring_path), options or session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.modules = list(bundle.targets)
        self.feeds: dict[str, np.ndarray] = {}
        self.no_prompt = slot_feeds(None, bundle.arch)  # made once: most forwards carry no prompt
        self.no_lora = zero_slots(bundle.targets, bundle.arch["layers"])  # and a prompt's carry no LoRA

    def bind(self, batch: Batch) -> None:
        self.batch = batch
        self.feeds = batch.feeds()

    def run(self, A: dict[str, np.ndarray] | None, B: dict[str, np.ndarray] | None, xa: bool = False,
            hidden: bool = False, prompt: AdaptionPrompt | None = None) -> tuple[np.ndarray, ...]:
        """Per-example (mean target-token loss, summed target log-prob) for the bound batch, under
        the LoRA A, B (None: none) and the adaption prompt `prompt` (None: none); with `hidden`, then the residual
        stream before the final norm at the target positions [n, K, d] (what the surrogate search
        models); with `xa`, then x·Aᵀ [L, T, r] per target module (Arrow routing scores when A holds
        prototypes)."""
        self.feeds.update(self.no_prompt if prompt is None else slot_feeds(prompt, self.bundle.arch))
        if A is None:
            A, B = self.no_lora
        for m in self.modules:
            self.feeds[f"lora_A_{m}"] = A[m]
            self.feeds[f"lora_B_{m}"] = B[m]
        names = ["loss", "logprob", *(["hidden"] if hidden else []), *(f"xa_{m}" for m in self.modules if xa)]
        return tuple(self.session.run(names, self.feeds))

    def losses(self, A, B) -> np.ndarray:
        return self.run(A, B)[0]
