"""A faithful port of sail-sg/lorahub's search loop (PyPI `lorahub` 0.1.0, lorahub/algorithm.py)
to a causal LM, so edgelora can be timed against the reference on the same base and LoRAs.

Upstream only drives `AutoModelForSeq2SeqLM`; everything else is kept as it is there: the
LoRAs are PEFT state dicts held in a cache, every evaluation sums them with the weights
(`get_final_weights`), loads the sum into the torch PEFT model with `set_peft_model_state_dict`,
and runs the model on the whole batch with labels; objective = loss + 0.05·mean|w|, minimised
by nevergrad's NGOpt in [-1.5, 1.5]^n from 0 with `optimizer.minimize`. What changed, and why:
- causal LM: input = prompt + target tokens, labels -100 on the prompt and the padding (the
  seq2seq version puts the target in the decoder instead);
- the per-LoRA cache is read with `load_peft_weights`: the same tensors that upstream gets from
  `get_peft_model_state_dict(PeftModel.from_pretrained(base, id))`, without injecting LoRA layers
  into the one base model 20 more times (upstream does that only to read the weights back);
- upstream's last step, `merge_and_unload` (write-back), is left out: edgelora's adapt has none;
- no `datasets`/DataLoader: one batch of tensors is what upstream's loader yields for 5 examples
  with batch_size=None;
- upstream's `default_get_loss` divides the batch's mean token loss by the number of examples
  (weakening the loss 5x against the L1 term); `divide_by_examples=False` (the default here)
  drops that, so the objective is the one edgelora minimises (README.md, "Adapting").
Needs nevergrad, a bench-only dependency: pip install nevergrad
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy
import torch


def load_base_model_and_lora_modules(base_model, lora_folders: list[Path]):
    """The first LoRA wraps the base into a PeftModel; every LoRA's state dict goes to the cache."""
    from peft import PeftModel
    from peft.utils import load_peft_weights
    peft_model = PeftModel.from_pretrained(base_model, str(lora_folders[0]))
    peft_model.eval()
    cache: dict[str, dict[str, torch.Tensor]] = {}
    first = None
    for folder in lora_folders:
        cache[str(folder)] = load_peft_weights(str(folder), device="cpu")
        first = first or cache[str(folder)]
        for key in first:  # upstream's check that the LoRAs can be merged
            if first[key].shape != cache[str(folder)][key].shape:
                raise ValueError(f"LoRA {folder} cannot be merged: it has a different arch (e.g. rank)")
    return peft_model, cache


def encode(tokenizer, prompts: list[str], targets: list[str], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt and target tokenised apart (as edgelora does), right-padded, labels only on the target."""
    rows = [(tokenizer.encode(p, add_special_tokens=False), tokenizer.encode(t, add_special_tokens=False))
            for p, t in zip(prompts, targets)]
    T = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        mask[i, : len(p) + len(t)] = 1
        labels[i, len(p): len(p) + len(t)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def get_loss(batch: dict[str, torch.Tensor], model, divide_by: int = 1) -> float:
    """The model's mean token cross-entropy over the batch's labels (upstream: divided by len(dataset))."""
    with torch.no_grad():
        return float(model(**batch).loss.detach().float()) / divide_by


def l1_regularization(weights) -> float:
    return 0.05 * sum(abs(x) for x in weights) / len(weights)


def get_final_weights(weights, lora_module_list: list[str], cache: dict) -> dict[str, torch.Tensor]:
    """Σ wᵢ·(state dict)ᵢ key by key: A and B summed apart, as upstream."""
    final_state_dict = {}
    keys = cache[lora_module_list[0]].keys()
    for i, peft_model_id in enumerate(lora_module_list):
        lora_state_dict = cache[peft_model_id]
        for key in keys:
            term = weights[i] * lora_state_dict[key]
            final_state_dict[key] = term if i == 0 else final_state_dict[key] + term
    return final_state_dict


def lorahub_learning(peft_model, cache: dict, batch: dict[str, torch.Tensor], max_inference_step: int,
                     seed: int = 42, divide_by_examples: bool = False):
    """Upstream's lorahub_learning from the point where model, cache and dataset exist.
    Returns (recommended weights, history of (loss, objective, weights, seconds), optimizer name)."""
    import nevergrad as ng
    from peft.utils.save_and_load import set_peft_model_state_dict
    random.seed(seed)
    numpy.random.seed(seed)
    lora_module_list = list(cache)
    n = len(lora_module_list)
    divide_by = batch["input_ids"].shape[0] if divide_by_examples else 1
    history: list[tuple[float, float, list[float], float]] = []

    def get_score(weights) -> float:
        t = time.perf_counter()
        set_peft_model_state_dict(peft_model, get_final_weights(weights, lora_module_list, cache))
        loss = get_loss(batch, peft_model, divide_by)
        metric_val = loss + l1_regularization(weights)
        history.append((loss, metric_val, [float(x) for x in weights], time.perf_counter() - t))
        return metric_val

    instrum = ng.p.Array(init=[0] * n, upper=[1.5] * n, lower=[-1.5] * n)
    optimizer = ng.optimizers.NGOpt(parametrization=instrum, budget=max_inference_step)
    recommendation = optimizer.minimize(get_score, verbosity=1)
    set_peft_model_state_dict(peft_model, get_final_weights(recommendation.value, lora_module_list, cache))
    name = getattr(optimizer.optim, "name", type(optimizer.optim).__name__)
    return numpy.asarray(recommendation.value, dtype=numpy.float64), history, name
