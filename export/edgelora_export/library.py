"""`edgelora-export library`: one LoRA+ LoRA per task file, resumable task by task, with a report.

Output: `<task>.safetensors` (bundle format, fp16: what ships and what `base` installs),
`peft/<task>/` (PEFT folders, loadable by peft), `report.json` and `report.md`.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgelora.errors import UserError
from edgelora.io import atomic_write, atomic_write_json, read_json
from edgelora.lora import from_peft, save_lora
from .model import target_shapes
from .train import TrainConfig, check_same_config, load_for_training, train_lora

HELD_OUT_SUITES = ("bbh", "near")


def check_trainable(task: Path) -> None:
    """Evaluation data never trains a LoRA: the whole point is to test on unseen tasks."""
    if task.parent.name in HELD_OUT_SUITES or task.name.endswith((".adapt.jsonl", ".test.jsonl")):
        raise UserError(f"{task}: a held-out evaluation task ({task.parent.name}/); never train a LoRA on it")


def export_lora(peft_dir: Path, out: Path, shapes: dict, layers: int, name: str) -> None:
    save_lora(out, from_peft(peft_dir, shapes, layers, name), np.float16)


def write_report(out: Path, rows: list[dict], cfg: TrainConfig) -> None:
    atomic_write_json(out / "report.json", {"config": asdict(cfg), "tasks": rows})
    lines = ["| task | examples | steps | best step | train loss | held-out loss (start → best) | minutes | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['examples']} | {r['steps']} | {r['best_step']} | {r['train_loss']:.3f} | "
                     f"{r['heldout_loss_start']:.3f} → {r['heldout_loss']:.3f} | {r['minutes']:.1f} | {r['peak_rss_mb']} |")
    total = sum(r["minutes"] for r in rows)
    lines.append(f"\n{len(rows)} LoRAs, {total:.0f} minutes of training in all.")
    atomic_write(out / "report.md", "\n".join(lines) + "\n")


def train_library(tasks_dir: Path, out: Path, cfg: TrainConfig, source=None, log=print) -> list[dict]:
    tasks = sorted(Path(tasks_dir).glob("*.jsonl"))
    if not tasks:
        raise UserError(f"{tasks_dir}: no *.jsonl task files")
    for t in tasks:
        check_trainable(t)
    out.mkdir(parents=True, exist_ok=True)
    # Resume task by task: a task is done when its LoRA file and its report row both exist.
    report = out / "report.json"
    done = {}
    if report.exists():
        saved = read_json(report)
        check_same_config(saved.get("config", {}), cfg, report,
                          "pass the same settings to resume this library, or use another -o")
        done = {r["task"]: r for r in saved.get("tasks", []) if isinstance(r, dict) and "task" in r}
    base, tok, fmt, _ = load_for_training(source)
    shapes = target_shapes(base, list(cfg.targets))
    layers = len(base.model.layers)
    rows = []
    for i, task in enumerate(tasks, 1):
        if task.stem in done and (out / f"{task.stem}.safetensors").exists():
            rows.append(done[task.stem])
            continue
        t0 = time.time()
        row = train_lora(base, tok, fmt, task, out / "peft" / task.stem, cfg, log=log)
        export_lora(out / "peft" / task.stem, out / f"{task.stem}.safetensors", shapes, layers, task.stem)
        rows.append(row)
        write_report(out, rows, cfg)
        log(f"[{i}/{len(tasks)}] {task.stem}: {row['steps']} steps, held-out loss "
            f"{row['heldout_loss_start']:.3f} → {row['heldout_loss']:.3f}, {time.time() - t0:.0f}s")
    write_report(out, rows, cfg)
    return rows
