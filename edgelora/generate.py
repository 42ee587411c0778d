"""KV-cache decoding on an ONNX causal-LM graph (optimum's layout): greedy or top-p sampling,
streamed token by token."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort

from .scorer import session_options


class Decoder:
    def __init__(self, model_path: str | Path, eos_ids: list[int], threads: int | None = None):
        self.session = ort.InferenceSession(str(model_path), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.eos = set(eos_ids)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.extra = {n: i for n, i in inputs.items() if n.startswith("lora_")}
        shape = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.use_positions = "position_ids" in inputs
        self.lora_feeds: dict[str, np.ndarray] = {}

    def forward(self, ids: list[int], past: dict[str, np.ndarray] | None, start: int):
        """Logits of the last position and the new cache, for `ids` following `start` cached tokens."""
        if past is None:
            past = {n: np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for n in self.past_names}
        feeds = {"input_ids": np.array([ids], np.int64),
                 "attention_mask": np.ones((1, start + len(ids)), np.int64), **past, **self.lora_feeds}
        if self.use_positions:
            feeds["position_ids"] = np.arange(start, start + len(ids), dtype=np.int64)[None]
        out = self.session.run(["logits", *self.present_names], feeds)
        return out[0][0, -1], dict(zip(self.past_names, out[1:]))

    def stream(self, prompt_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0) -> Iterator[int]:
        rng = np.random.default_rng(seed)
        logits, past = self.forward(prompt_ids, None, 0)
        n = len(prompt_ids)
        for _ in range(max_new_tokens):
            tok = pick(logits, temperature, top_p, rng)
            if tok in self.eos:
                return
            yield tok
            logits, past = self.forward([tok], past, n)
            n += 1


def pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling over the softmax."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))
