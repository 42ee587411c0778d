"""LoRA+ training on the tiny model: B learns λ times faster, the loss covers answer tokens
only, an interrupted run resumes to the same weights, and held-out tasks are refused."""
from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgelora.errors import UserError
from edgelora.io import user_mode
from edgelora_export import train as train_mod
from edgelora_export.library import check_trainable
from edgelora_export.train import TrainConfig, train_lora

CFG = TrainConfig(rank=4, alpha=8, steps=6, batch=4, eval_every=2, heldout=8, patience=100, lr=1e-3)


def lora_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(folder / "adapter_model.safetensors")


def test_loraplus_groups_and_training_lowers_heldout(train_base, colors, tmp_path, monkeypatch):
    seen = {}
    from peft.optimizers import create_loraplus_optimizer as real

    def spy(model, **kw):
        opt = real(model, **kw)
        names = {id(p): n for n, p in model.named_parameters()}
        for g in opt.param_groups:
            for p in g["params"]:
                seen[names[id(p)]] = g["lr"]
        return opt

    monkeypatch.setattr("peft.optimizers.create_loraplus_optimizer", spy)
    row = train_lora(*train_base[:3], colors, tmp_path / "out", CFG, log=lambda *a: None)
    a = {n: lr for n, lr in seen.items() if "lora_A" in n}
    b = {n: lr for n, lr in seen.items() if "lora_B" in n}
    assert a and b and set(a.values()) == {CFG.lr} and set(b.values()) == {CFG.lr * CFG.loraplus_ratio}
    assert row["heldout_loss"] < row["heldout_loss_start"]
    assert (tmp_path / "out" / "adapter_config.json").exists()
    # the base model is restored for the next task
    assert not any("lora" in n for n, _ in train_base[0].named_parameters())


def test_loss_covers_answer_tokens_only(train_base):
    model, tok, fmt, _ = train_base
    rows = train_mod.tokenize([type("E", (), {"input": "hi", "output": "red"})()], tok, fmt, 64)
    ids, mask, pos, tgt = train_mod.collate(rows, 0)
    p, t = rows[0]
    assert tgt.tolist() == t and pos[:, 1].tolist() == list(range(len(p) - 1, len(p) + len(t) - 1))


def test_interrupted_training_resumes_to_same_weights(train_base, colors, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train_lora(*train_base[:3], colors, full, CFG, log=lambda *a: None)
    calls = []
    real_save = train_mod.save_checkpoint

    def save_then_die(*a, **kw):
        real_save(*a, **kw)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    part = tmp_path / "new" / "part"  # a folder that does not exist yet
    with pytest.raises(KeyboardInterrupt):
        train_lora(*train_base[:3], colors, part, CFG, log=lambda *a: None)
    ckpt = part.with_name("part.ckpt.safetensors")
    assert stat.S_IMODE(ckpt.stat().st_mode) == user_mode()  # the user's mode, not a temp file's 0600
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    logs = []
    train_lora(*train_base[:3], colors, part, CFG, log=logs.append)
    assert any("resuming" in l and "step 4" in l for l in logs)
    wf, wp = lora_weights(full), lora_weights(part)
    for k in wf:
        np.testing.assert_allclose(wp[k], wf[k], rtol=1e-5, atol=1e-7)


def test_held_out_tasks_are_refused(tmp_path):
    for path in (tmp_path / "bbh" / "navigate.jsonl", tmp_path / "x" / "navigate.adapt.jsonl"):
        with pytest.raises(UserError, match="never train"):
            check_trainable(path)
    bbh = tmp_path / "near"
    bbh.mkdir()
    (bbh / "t.jsonl").write_text('{"input": "a", "output": "b"}\n')
    r = subprocess.run([sys.executable, "-m", "edgelora_export.cli", "train", str(bbh / "t.jsonl"), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "never train" in r.stderr and "Traceback" not in r.stderr
