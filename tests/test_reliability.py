"""Issue 15, items 1-4 and files as people save them: each test failed on the code before it."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_refused, cli, cli_here, make_peft_lora
from test_adapt import PROMPTS, library  # noqa: F401  (library: a fixture)

from edgelora.errors import UserError
from edgelora.examples import Example, load_examples
from edgelora.search import adapt


def task_file(folder: Path, name: str = "task.jsonl") -> Path:
    f = folder / name
    f.write_text("".join(json.dumps({"input": p, "output": "yes"}) + "\n" for p in PROMPTS))
    return f


# -- 1. data loss ---------------------------------------------------------------------------
def test_export_base_refuses_a_folder_that_is_not_a_bundle(tiny_hf, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    r = cli_here(capsys, "edgelora_export.cli", "base", str(tiny_hf), "-o", str(mine), "--force")
    assert_refused(r, str(mine), "not an edgelora output")
    assert (mine / "thesis.tex").read_text() == "years of work" and len(list(tmp_path.iterdir())) == 1


def test_force_rebuilds_a_bundle_by_swapping_it(tiny_hf, tiny_bundle):
    from edgelora.bundle import Bundle
    from edgelora_export.base import export_base
    (tiny_bundle / "loras" / "stale.txt").write_text("from the old bundle")
    export_base(tiny_hf, tiny_bundle, ["q_proj", "v_proj"], force=True, log=lambda *a: None)
    assert not (tiny_bundle / "loras" / "stale.txt").exists() and Bundle.open(tiny_bundle).verify() == []
    assert [p.name for p in tiny_bundle.parent.iterdir()] == [tiny_bundle.name]


def test_replace_dir_swaps_a_folder_whole(tmp_path):
    from edgelora.io import replace_dir
    dst, new = tmp_path / "out", tmp_path / "new"
    dst.mkdir(), new.mkdir()
    (dst / "old.txt").write_text("old")
    (new / "new.txt").write_text("new")
    replace_dir(new, dst)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in dst.iterdir()] == ["new.txt"]


def test_a_folder_put_aside_is_whole_until_it_is_renamed_for_deletion(tmp_path, monkeypatch):
    """replace_dir renames the old folder .gone before deleting it: a kill inside the deletion never
    leaves a half-deleted .old, which the next run would put back as the output."""
    import shutil
    from edgelora import io
    dst, new = tmp_path / "out", tmp_path / "new"
    dst.mkdir(), new.mkdir()
    (dst / "a.txt").write_text("old")
    (new / "b.txt").write_text("new")
    seen, rmtree = [], shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **kw: seen.append(Path(p).name) or rmtree(p, *a, **kw))
    io.replace_dir(new, dst)
    assert len(seen) == 1 and seen[0].endswith(".gone")


def test_what_killed_runs_left_is_tidied(tmp_path):
    """A killed run's temporary folder is deleted unless a live run holds it; a previous output
    renamed aside just before a kill is put back; one a run was deleting (.gone) is deleted."""
    from edgelora.io import _locked, tidy_beside
    dst = tmp_path / "out"
    for name in (".out.dead.tmp", ".out.live.tmp", ".out.prev.old", ".out.half.gone"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.json").write_text(name)
    live = _locked(tmp_path / ".out.live.tmp")
    try:
        tidy_beside(dst)
    finally:
        os.close(live)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.live.tmp", "out"]
    assert (dst / "weights.json").read_text() == ".out.prev.old"


# -- 2. stale model -------------------------------------------------------------------------
def test_no_model_run_leaves_no_stale_model(library, tmp_path):  # noqa: F811
    bundle, _ = library
    f, out = task_file(tmp_path), tmp_path / "out"
    base = ["edgelora.cli", "adapt", str(f), "--bundle", str(bundle.path), "--out", str(out), "--budget", "3"]
    assert cli(*base, "--quant", "int8").returncode == 0
    assert cli("edgelora.cli", "generate", str(out), "hi", "--max-new-tokens", "2").returncode == 0
    r = cli(*base, "--no-model", "--l1", "0.5")  # other weights, no model
    assert r.returncode == 0, r.stderr
    assert_refused(cli("edgelora.cli", "generate", str(out), "hi"), str(out), "no model")


def test_model_beside_other_weights_is_refused(library, tmp_path):  # noqa: F811
    bundle, _ = library
    f, out = task_file(tmp_path), tmp_path / "out"
    r = cli("edgelora.cli", "adapt", str(f), "--bundle", str(bundle.path), "--out", str(out), "--budget", "3",
            "--quant", "int8")
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "weights.json").read_text())
    data["weights"] = {k: 1.0 for k in data["weights"]}
    (out / "weights.json").write_text(json.dumps(data))
    assert_refused(cli("edgelora.cli", "generate", str(out), "hi"), "model.onnx", "other weights", "weights.json")
    assert_refused(cli("edgelora.cli", "eval", str(f), "--model", str(out)), "other weights")


def test_adapt_refuses_an_out_folder_that_is_not_an_output(library, tmp_path):  # noqa: F811
    bundle, _ = library
    f = task_file(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = cli("edgelora.cli", "adapt", str(f), "--bundle", str(bundle.path), "--out", str(tmp_path / "mine"),
            "--budget", "2", "--no-model")
    assert_refused(r, "mine", "not an edgelora output")
    assert "search" not in r.stderr and [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


# -- 3. tracebacks for user mistakes ----------------------------------------------------------
def test_lora_on_some_targets_only_adapts(tiny_bundle, tiny_hf, tmp_path):
    from edgelora_export.lora import add_lora
    add_lora(make_peft_lora(tiny_hf, tmp_path / "q", seed=4, targets=("q_proj",)), tiny_bundle, "q_only")
    add_lora(make_peft_lora(tiny_hf, tmp_path / "qv", seed=5), tiny_bundle, "both")
    r = cli("edgelora.cli", "adapt", str(task_file(tmp_path)), "--bundle", str(tiny_bundle), "--out",
            str(tmp_path / "out"), "--budget", "3", "--no-model")
    assert r.returncode == 0, r.stderr


def test_arrow_routing_over_fewer_loras_than_top_k():
    from edgelora.arrow import arrow_weights
    w = arrow_weights(np.array([[1.0, -2.0]]), top_k=3)
    np.testing.assert_allclose(w.sum(-1), 1.0)
    assert (w > 0).all()


def test_eval_limit_zero_is_refused(library, tmp_path):  # noqa: F811
    bundle, _ = library
    assert_refused(cli("edgelora.cli", "eval", str(task_file(tmp_path)), "--model", str(bundle.path), "--limit", "0"),
                   "--limit 0")


def test_corrupt_model_metadata_is_one_line(library, tmp_path):  # noqa: F811
    bundle, _ = library
    out = tmp_path / "out"
    r = cli("edgelora.cli", "adapt", str(task_file(tmp_path)), "--bundle", str(bundle.path), "--out", str(out),
            "--budget", "2", "--quant", "int8")
    assert r.returncode == 0, r.stderr
    (out / "edgelora.json").write_text('{"base": "x",\n "quant": ')
    assert_refused(cli("edgelora.cli", "generate", str(out), "hi"), "edgelora.json:2", "not valid JSON")


@pytest.mark.parametrize("name,command", [("scoring.onnx", "adapt"), ("decoder/model.onnx", "generate")])
def test_same_size_damage_to_an_onnx_file_is_caught_before_onnxruntime(tiny_bundle, tmp_path, name, command):
    path = tiny_bundle / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    args = {"adapt": ["adapt", str(task_file(tmp_path)), "--bundle", str(tiny_bundle), "--budget", "2"],
            "generate": ["generate", str(tiny_bundle), "hi"]}[command]
    assert_refused(cli("edgelora.cli", *args, cwd=tmp_path), name, "sha256")


@pytest.mark.parametrize("bad,message", [("nope", "no LoRA named nope"),
                                         ("junk.safetensors", "not a readable safetensors file")])
def test_bad_loras_are_reported_before_the_scoring_session_is_built(library, monkeypatch, tmp_path, bad,  # noqa: F811
                                                                    message):
    from edgelora import scorer

    def no_session(*a, **kw):
        raise AssertionError("the scoring session was built before --loras was checked")

    monkeypatch.setattr(scorer, "Scorer", no_session)
    if bad.endswith(".safetensors"):
        bad = tmp_path / bad
        bad.write_bytes(b"\x10" * 64)
    with pytest.raises(UserError, match=message):
        adapt([Example(PROMPTS[0], "yes")], library[0], loras=[str(bad)])


def test_verify_lists_every_damaged_file(tiny_bundle):
    for name in ("tokenizer.json", "decoder/config.json"):
        data = bytearray((tiny_bundle / name).read_bytes())
        data[5] ^= 1
        (tiny_bundle / name).write_bytes(bytes(data))
    assert_refused(cli("edgelora.cli", "verify", "--bundle", str(tiny_bundle)), "decoder/config.json, tokenizer.json")


def test_bundle_hashes_are_cached_by_size_and_mtime(tiny_bundle, monkeypatch):
    from edgelora import bundle as bundle_mod
    bundle_mod.Bundle.open(tiny_bundle)
    hashed = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    bundle_mod.Bundle.open(tiny_bundle)
    assert hashed == []
    (tiny_bundle / "tokenizer.json").touch()  # a new mtime: hashed again
    bundle_mod.Bundle.open(tiny_bundle)
    assert hashed == ["tokenizer.json"]


# -- 4. training resume ---------------------------------------------------------------------
def test_resume_saves_the_best_steps_weights(train_base, colors, tmp_path, monkeypatch):
    """The best held-out loss is at step 2; an interrupted run resumed after step 4 must still
    save step 2's weights, as the uninterrupted run does."""
    from safetensors.numpy import load_file
    from edgelora_export import train as train_mod
    from edgelora_export.train import TrainConfig, train_adapter
    cfg = TrainConfig(rank=4, alpha=8, steps=6, batch=4, eval_every=2, heldout=8, patience=100, lr=1e-2)
    def fake_eval(model, rows, pad_id, batch):
        return next(held)

    monkeypatch.setattr(train_mod, "evaluate", fake_eval)
    held = iter([5.0, 1.0, 2.0, 3.0])  # steps 0, 2, 4, 6
    full = train_adapter(*train_base[:3], colors, tmp_path / "full", cfg, log=lambda *a: None)
    assert full["best_step"] == 2
    real_save, saves = train_mod.save_checkpoint, []

    def save_then_die(*a, **kw):
        real_save(*a, **kw)
        saves.append(1)
        if len(saves) == 2:  # after step 4's checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    held = iter([5.0, 1.0, 2.0])
    with pytest.raises(KeyboardInterrupt):
        train_adapter(*train_base[:3], colors, tmp_path / "part", cfg, log=lambda *a: None)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    held = iter([3.0])
    part = train_adapter(*train_base[:3], colors, tmp_path / "part", cfg, log=lambda *a: None)
    assert part["best_step"] == 2
    wf, wp = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("full", "part"))
    for k in wf:
        np.testing.assert_allclose(wp[k], wf[k], rtol=1e-5, atol=1e-7)


def test_early_stopping_can_fire_with_the_defaults(train_base, colors, tmp_path, monkeypatch):
    from edgelora_export import train as train_mod
    from edgelora_export.train import TrainConfig, train_adapter
    cfg = dataclasses.replace(TrainConfig(), rank=4, alpha=8, batch=4, heldout=8)
    assert cfg.patience * cfg.eval_every < cfg.steps
    monkeypatch.setattr(train_mod, "evaluate", lambda *a: 1.0)  # never better than before training
    row = train_adapter(*train_base[:3], colors, tmp_path / "o", cfg, log=lambda *a: None)
    assert row["steps"] == cfg.patience * cfg.eval_every < cfg.steps and row["best_step"] == 0


def test_resume_refuses_a_changed_configuration(train_base, colors, tmp_path, monkeypatch):
    from edgelora_export import train as train_mod
    from edgelora_export.train import TrainConfig, train_adapter
    cfg = TrainConfig(rank=4, alpha=8, steps=4, batch=4, eval_every=2, heldout=8, patience=100)

    def die(*a, **kw):
        raise KeyboardInterrupt

    real_save = train_mod.save_checkpoint
    monkeypatch.setattr(train_mod, "save_checkpoint", lambda *a, **kw: real_save(*a, **kw) or die())
    with pytest.raises(KeyboardInterrupt):
        train_adapter(*train_base[:3], colors, tmp_path / "o", cfg, log=lambda *a: None)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    with pytest.raises(UserError, match=r"o.ckpt.json: made with other settings \(lr 0.0003 → 0.001\)"):
        train_adapter(*train_base[:3], colors, tmp_path / "o", dataclasses.replace(cfg, lr=1e-3), log=lambda *a: None)


def test_library_refuses_a_report_made_with_other_settings(tmp_path, colors):
    from edgelora_export.library import train_library
    from edgelora_export.train import TrainConfig
    out = tmp_path / "lib"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"config": {**json.loads(json.dumps(dataclasses.asdict(TrainConfig()))),
                                                            "rank": 4, "patience": 3}, "tasks": []}))
    with pytest.raises(UserError, match=r"report.json: made with other settings \(rank 4 → 8\)"):  # patience: below
        train_library(colors.parent, out, TrainConfig(), source="unused")


def test_a_library_resumed_under_another_stopping_rule_keeps_the_loras_it_would_train_alike(tmp_path):
    """The LoRA whose held-out curve stops at the same step with the same best under the new rule is
    kept; the one that gained 1e-4 an evaluation to the step limit is trained again."""
    from edgelora_export.library import check_resumable
    from edgelora_export.train import TrainConfig
    old = TrainConfig(steps=50, eval_every=10, patience=2)
    clear = {"task": "clear", "steps": 40, "best_step": 20,
             "heldout_curve": [[0, 2.0], [10, 0.5], [20, 0.3], [30, 0.4], [40, 0.35]]}
    creeping = {"task": "creeping", "steps": 50, "best_step": 50,
                "heldout_curve": [[0, 2.0], [10, 0.01], [20, 0.0099], [30, 0.0098], [40, 0.0097], [50, 0.0096]]}
    (tmp_path / "report.json").write_text(json.dumps({"config": dataclasses.asdict(old), "tasks": [clear, creeping]}))
    assert set(check_resumable(tmp_path, old, None)) == {"clear", "creeping"}
    logs = []
    kept = check_resumable(tmp_path, dataclasses.replace(old, min_delta=1e-3), None, logs.append)
    assert set(kept) == {"clear"} and "trained again under this stopping rule: creeping" in logs[0]


def test_a_run_resumed_under_another_stopping_rule(train_base, colors, tmp_path, monkeypatch):
    """It goes on where its best step is the same under the new rule, ends at once where the new
    rule has already stopped it, and is refused where its best would be a step whose weights it
    does not hold."""
    import shutil
    from edgelora_export import train as train_mod
    from edgelora_export.train import TrainConfig, train_adapter
    cfg = TrainConfig(rank=4, alpha=8, batch=4, heldout=8, steps=12, eval_every=2, patience=100)
    real_save = train_mod.save_checkpoint

    def save_then_die_at_step_4(*a, **kw):
        real_save(*a, **kw)
        if a[3]["step"] == 4:
            raise KeyboardInterrupt

    def interrupted(out, losses):
        held = iter(losses)
        monkeypatch.setattr(train_mod, "evaluate", lambda *a: next(held))
        monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            train_adapter(*train_base[:3], colors, out, cfg, log=lambda *a: None)
        monkeypatch.setattr(train_mod, "save_checkpoint", real_save)

    def resumed(out, rule, losses=()):
        held = iter(losses)
        monkeypatch.setattr(train_mod, "evaluate", lambda *a: next(held))
        return train_adapter(*train_base[:3], colors, out, dataclasses.replace(cfg, **rule), log=lambda *a: None)

    interrupted(tmp_path / "a" / "o", [1.0, 0.6, 0.5])
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    row = resumed(tmp_path / "a" / "o", {"patience": 1}, [0.7])  # best step 4 either way: goes on to step 6, stops
    assert (row["steps"], row["best_step"]) == (6, 4)
    with pytest.raises(UserError, match=r"under this stopping rule its best held-out step is 2, whose weights it does "
                                         r"not hold \(it holds step 4's\)"):
        resumed(tmp_path / "copy" / "o", {"min_delta": 0.2})
    interrupted(tmp_path / "b", [1.0, 0.5, 0.6])
    row = resumed(tmp_path / "b", {"patience": 1})  # already stopped under it: ends at once, no evaluation
    assert (row["steps"], row["best_step"]) == (4, 2)


def test_min_delta_stops_a_run_that_gains_too_little(train_base, colors, tmp_path, monkeypatch):
    from edgelora_export import train as train_mod
    from edgelora_export.train import TrainConfig, stopping, train_adapter
    cfg = TrainConfig(rank=4, alpha=8, batch=4, heldout=8, steps=12, eval_every=2, patience=2)
    curve = [[0, 1.0], [2, 0.5], [4, 0.4995], [6, 0.499], [8, 0.4985], [10, 0.498], [12, 0.4975]]
    assert stopping(curve, cfg) == (12, None) and stopping(curve, dataclasses.replace(cfg, min_delta=1e-3)) == (2, 6)
    for min_delta, steps, best in ((0.0, 12, 12), (1e-3, 6, 2)):  # a real run, fed the curve as its held-out losses
        losses = iter(loss for _, loss in curve)
        monkeypatch.setattr(train_mod, "evaluate", lambda *a: next(losses))
        row = train_adapter(*train_base[:3], colors, tmp_path / str(min_delta),
                            dataclasses.replace(cfg, min_delta=min_delta), log=lambda *a: None)
        assert (row["steps"], row["best_step"]) == (steps, best)
    with pytest.raises(UserError, match="--min-delta -1.0: must be at least 0"):
        TrainConfig(min_delta=-1.0)


# -- files as people save them ----------------------------------------------------------------
def test_bom_and_windows_line_ends_adapt_exactly_alike(library, tmp_path):  # noqa: F811
    bundle, _ = library
    lines = [json.dumps({"input": p, "output": "yes"}) for p in PROMPTS]
    plain, excel = tmp_path / "plain.jsonl", tmp_path / "excel.jsonl"
    plain.write_bytes(("\n".join(lines) + "\n").encode())
    excel.write_bytes("\ufeff".encode() + ("\r\n".join(lines) + "\r\n").encode())
    assert load_examples(excel) == load_examples(plain)
    a, b = adapt(plain, bundle, budget=4), adapt(excel, bundle, budget=4)
    assert a.loras == b.loras and np.array_equal(a.weights, b.weights) and a.loss == b.loss


def test_a_killed_export_base_is_tidied_by_the_next(tiny_hf, tiny_bundle, tmp_path):
    """kill -9 during `edgelora-export base --force` leaves its temporary folder (.NAME.xxxxxxxx)
    beside the bundle; the next run deletes it, and no other folder, hidden or not."""
    import signal
    import subprocess
    import sys
    import time
    from edgelora.bundle import Bundle
    proc = subprocess.Popen([sys.executable, "-m", "edgelora_export.cli", "base", str(tiny_hf), "-o", str(tiny_bundle),
                             "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(p.is_dir() for p in tmp_path.glob(".bundle.*/hf")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [p for p in tmp_path.glob(".bundle.*") if p.is_dir()]
    assert left, "the export ended before the kill: nothing to tidy"
    theirs = [tmp_path / ".bundle.notes", tmp_path / ".bundle.abcd1234"]  # not a temporary folder of ours
    for p in theirs:
        p.mkdir()
        (p / "keep.txt").write_text("keep")
    r = cli("edgelora_export.cli", "base", str(tiny_hf), "-o", str(tiny_bundle))  # the bundle is there: kept
    assert r.returncode == 0, r.stderr
    assert not any(p.exists() for p in left)
    assert all((p / "keep.txt").read_text() == "keep" for p in theirs)
    assert Bundle.open(tiny_bundle).verify() == []


def test_a_live_export_base_is_not_tidied_away(tiny_hf, tiny_bundle, tmp_path, capsys):
    """While one `edgelora-export base` writes a bundle (it holds the bundle's lock), a second one
    for the same bundle is refused in one line and deletes nothing."""
    from edgelora_export.cli import export_lock
    live = tmp_path / ".bundle.live0000"
    (live / "hf").mkdir(parents=True)
    with export_lock(tiny_bundle):
        r = cli_here(capsys, "edgelora_export.cli", "base", str(tiny_hf), "-o", str(tiny_bundle), "--force")
    assert_refused(r, str(tiny_bundle), "another edgelora-export base")
    assert live.is_dir()
