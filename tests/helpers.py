"""Shared test helpers: random PEFT LoRAs on the tiny model, and torch reference losses."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def make_peft_lora(hf_dir: Path, out: Path, seed: int, r: int = 4, alpha: int = 8,
                   targets=("q_proj", "v_proj"), std: float = 0.2) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, std)
    peft_model.save_pretrained(out)
    return out


def torch_losses(model, batch) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean target loss and summed log-prob from full torch logits."""
    import torch
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(batch.input_ids),
                       attention_mask=torch.from_numpy(batch.attention_mask)).logits
    logp = torch.log_softmax(logits.float(), -1).numpy()
    rows = np.arange(len(batch.input_ids))[:, None]
    tok = logp[rows, batch.target_pos, batch.target_ids] * batch.target_mask
    lp = tok.sum(1)
    return -lp / batch.target_mask.sum(1), lp


def encode(bundle, examples):
    from edgelora.examples import encode_pairs
    fmt, tok = bundle.prompt_format, bundle.tokenizer()
    pairs = [(fmt.prompt(e.input), e.output + fmt.stop) for e in examples]
    return encode_pairs(tok, pairs, bundle.arch["max_len"], bundle.manifest["pad_id"])[0]
