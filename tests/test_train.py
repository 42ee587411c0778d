"""LoRA+ training on the tiny model: B learns λ times faster, the loss covers answer tokens
only, an interrupted run resumes to the same weights (its minutes counting the first run's), and
held-out tasks are refused."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_refused, cli_here

from edgelora.errors import UserError
from edgelora.io import user_mode
from edgelora_export import train as train_mod
from edgelora_export.library import check_trainable
from edgelora_export.train import TrainConfig, train_adapter

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
    row = train_adapter(*train_base[:3], colors, tmp_path / "out", CFG, log=lambda *a: None)
    a = {n: lr for n, lr in seen.items() if "lora_A" in n}
    b = {n: lr for n, lr in seen.items() if "lora_B" in n}
    assert a and b and set(a.values()) == {CFG.lr} and set(b.values()) == {CFG.lr * CFG.loraplus_ratio}
    assert row["heldout_loss"] < row["heldout_loss_start"]
    assert (tmp_path / "out" / "adapter_config.json").exists()
    # the base model is restored for the next task
    assert not any("lora" in n for n, _ in train_base[0].named_parameters())


def test_loss_covers_answer_tokens_only(train_base):
    """target_loss on a padded batch of examples of different lengths is the mean cross-entropy of
    the answer tokens alone, each example run by itself with full logits (an independent path)."""
    import torch
    model, tok, fmt, _ = train_base
    E = lambda i, o: type("E", (), {"input": i, "output": o})()
    rows = train_mod.tokenize([E("hi", "red"), E("What is 2 plus 3? " * 3, "the answer is 5")], tok, fmt, 64)
    assert len({len(p) + len(t) for p, t in rows}) == 2  # one row is padded
    shim = type("Peft", (), {"get_base_model": lambda self: model})()  # target_loss reads the base through peft's API
    with torch.no_grad():
        got = train_mod.target_loss(shim, *train_mod.collate(rows, tok.pad_token_id)).item()
        nll = []
        for p, t in rows:
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + t])).logits[0].float(), -1)
            nll += [-logp[len(p) - 1 + k, tok_id].item() for k, tok_id in enumerate(t)]
    assert got == pytest.approx(float(np.mean(nll)), rel=1e-5)


@pytest.mark.parametrize("cfg", [CFG, TrainConfig(kind="adaption-prompt", adapter_len=4, adapter_layers=2, steps=6, batch=4,
                                                eval_every=2, heldout=8, patience=100)], ids=["lora", "adaption-prompt"])
def test_interrupted_training_resumes_to_same_weights(train_base, colors, tmp_path, monkeypatch, cfg):
    full = tmp_path / "full"
    train_adapter(*train_base[:3], colors, full, cfg, log=lambda *a: None)
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
        train_adapter(*train_base[:3], colors, part, cfg, log=lambda *a: None)
    ckpt = part.with_name("part.ckpt.safetensors")
    assert stat.S_IMODE(ckpt.stat().st_mode) == user_mode()  # the user's mode, not a temp file's 0600
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    assert meta["seconds"] > 0
    ckpt.with_suffix(".json").write_text(json.dumps({**meta, "seconds": 600.0}))  # as if the first run took 10 min
    logs = []
    row = train_adapter(*train_base[:3], colors, part, cfg, log=logs.append)
    assert any("resuming" in l and "step 4" in l for l in logs)
    assert 10 <= row["minutes"] < 15  # the report's minutes count the runs it resumed
    wf, wp = lora_weights(full), lora_weights(part)
    for k in wf:
        np.testing.assert_allclose(wp[k], wf[k], rtol=1e-5, atol=1e-7)


def test_held_out_tasks_are_refused(tmp_path, capsys):
    for path in (tmp_path / "bbh" / "navigate.jsonl", tmp_path / "x" / "navigate.adapt.jsonl"):
        with pytest.raises(UserError, match="never train"):
            check_trainable(path)
    bbh = tmp_path / "near"
    bbh.mkdir()
    (bbh / "t.jsonl").write_text('{"input": "a", "output": "b"}\n')
    r = cli_here(capsys, "edgelora_export.cli", "train", str(bbh / "t.jsonl"), "-o", str(tmp_path / "o"))
    assert_refused(r, "never train")


def test_threads_below_one_are_refused(tmp_path, capsys, colors):
    for cmd, src in (("train", colors), ("library", colors.parent)):
        r = cli_here(capsys, "edgelora_export.cli", cmd, str(src), "-o", str(tmp_path / "o"), "--threads", "0")
        assert_refused(r, "--threads 0: must be at least 1")
