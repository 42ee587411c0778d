"""Shared test helpers: random PEFT LoRAs on the tiny model, torch reference losses, and the
CLI run as a user runs it (a refusal is one line, exit 2, no traceback)."""
from __future__ import annotations

import subprocess
import sys
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
    """Per-example mean target loss and summed log-prob, each example run alone through the
    torch model with full logits: the reference the packed scoring graph must match."""
    import torch
    losses, lps = [], []
    for p, t in batch.rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + t])).logits[0]
        logp = torch.log_softmax(logits.float(), -1).numpy()
        lp = float(sum(logp[len(p) - 1 + k, tok] for k, tok in enumerate(t)))
        losses.append(-lp / len(t))
        lps.append(lp)
    return np.array(losses), np.array(lps)


def encode(bundle, examples):
    from edgelora.batch import encode_pairs
    fmt, tok = bundle.prompt_format, bundle.tokenizer()
    pairs = fmt.pairs(examples)
    return encode_pairs(tok, pairs, bundle.arch["max_len"])[0]


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd)


def cli_here(capsys, module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` run in this process, as `cli` returns it: for the workstation's
    refusals, where a new interpreter would pay torch's import for one line of stderr. An exception
    that is not a UserError escapes, failing the test, as a traceback would."""
    import importlib
    capsys.readouterr()
    try:
        code = importlib.import_module(module).main(list(args))
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess([module, *args], code, out.out, out.err)


def assert_refused(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
