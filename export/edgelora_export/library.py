"""`edgelora-export library`: one adapter per task file (a LoRA+ LoRA, or with `--kind
adaption-prompt` LLaMA-Adapter's prompts), resumable task by task, with a report; with `--clusters`
(what `edgelora cluster` writes: MBC, seed 001), one LoRA per cluster instead, trained on the union
of its tasks' examples.

Output: `<task or cluster>.safetensors` (bundle format, fp16: what ships and what `base` installs),
`peft/<name>/` (PEFT folders, loadable by peft), `report.json` and `report.md`; with `--clusters`,
also `data/<cluster>.jsonl`, the union each cluster LoRA was trained on.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgelora.cluster import read_clusters
from edgelora.errors import UserError
from edgelora.io import atomic_write, atomic_write_json, read_json, read_text
from edgelora import adaption_prompt
from edgelora.lora import from_peft, save_lora
from .base_model import target_shapes
from .console import say
from .train import STOPPING, TrainConfig, check_same_config, load_for_training, rule_changed, stopping, train_adapter

HELD_OUT_SUITES = ("bbh", "near")


def check_trainable(task: Path) -> None:
    """Evaluation data never trains a LoRA: the whole point is to test on unseen tasks."""
    if task.parent.name in HELD_OUT_SUITES or task.name.endswith((".adapt.jsonl", ".test.jsonl")):
        raise UserError(f"{task}: a held-out evaluation task ({task.parent.name}/); never train a LoRA on it")


def export_adapter(peft_dir: Path, out: Path, model, cfg: TrainConfig, name: str, source: str | None = None) -> None:
    """A trained PEFT folder as a bundle file, fp16: a LoRA, or adaption prompts."""
    layers = len(model.model.layers)
    if cfg.kind == "adaption-prompt":
        ap = adaption_prompt.from_peft(peft_dir, {"layers": layers, "hidden": model.config.hidden_size}, name)
        adaption_prompt.save_prompt(out, ap)
        return
    lora = from_peft(peft_dir, target_shapes(model, list(cfg.targets)), layers, name)
    lora.source = source or lora.source
    save_lora(out, lora, np.float16)


def task_files(tasks_dir: Path) -> dict[str, Path]:
    """The folder's task files by name, each one allowed to train a LoRA."""
    tasks = sorted(Path(tasks_dir).glob("*.jsonl"))
    if not tasks:
        raise UserError(f"{tasks_dir}: no *.jsonl task files")
    for t in tasks:
        check_trainable(t)
    return {t.stem: t for t in tasks}


def check_members(clusters: dict[str, list[str]], where: Path, tasks: dict[str, Path], tasks_dir: Path) -> None:
    unknown = sorted({t for members in clusters.values() for t in members} - set(tasks))
    if unknown:
        raise UserError(f"{where}: names tasks with no file in {tasks_dir}: {', '.join(unknown)}")


def cluster_files(clusters: dict[str, list[str]], tasks: dict[str, Path], out: Path) -> dict[str, Path]:
    """Each cluster's training file, `out/data/<cluster>.jsonl`: its tasks' files one after the other
    (the union the paper trains a cluster's LoRA on), so resuming and `train` see the same data."""
    files = {}
    for name, members in clusters.items():
        files[name] = out / "data" / f"{name}.jsonl"
        atomic_write(files[name], "".join(read_text(tasks[t]).rstrip("\r\n") + "\n" for t in members))
    return files


def write_report(out: Path, rows: list[dict], cfg: TrainConfig, clusters: dict | None = None) -> None:
    atomic_write_json(out / "report.json", {"config": asdict(cfg), "tasks": rows,
                                            **({"clusters": clusters} if clusters else {})})
    lines = ["| task | examples | steps | best step | train loss | held-out loss (start → best) | minutes | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['examples']} | {r['steps']} | {r['best_step']} | {r['train_loss']:.3f} | "
                     f"{r['heldout_loss_start']:.3f} → {r['heldout_loss']:.3f} | {r['minutes']:.1f} | {r['peak_rss_mb']} |")
    total = sum(r["minutes"] for r in rows)
    what = "adaption prompts" if cfg.kind == "adaption-prompt" else "LoRAs"
    lines.append(f"\n{len(rows)} {what}, {total:.0f} minutes of training in all.")
    if clusters:
        lines.append("\nMBC clusters (each LoRA trained on the union of its tasks):\n")
        lines += [f"- {name}: {', '.join(members)}" for name, members in clusters.items()]
    atomic_write(out / "report.md", "\n".join(lines) + "\n")


def check_resumable(out: Path, cfg: TrainConfig, clusters: dict | None, log=say) -> dict[str, dict]:
    """The report rows of the LoRAs already trained in `out`, refused if made with other settings
    or other clusters (their LoRAs would not be this run's). Under another stopping rule (patience,
    min_delta) a LoRA is kept when its held-out curve stops at the same step with the same best
    under this one: the weights up to a step do not depend on the rule. The others train again."""
    report = out / "report.json"
    if not report.exists():
        return {}
    saved = read_json(report)
    hint = "pass the same settings to resume this library, or use another -o"
    check_same_config(saved.get("config", {}), cfg, report, hint, ignore=STOPPING)
    if saved.get("clusters") != clusters:
        raise UserError(f"{report}: made with {'other clusters' if saved.get('clusters') else 'one LoRA per task'}; {hint}")
    rows = {r["task"]: r for r in saved.get("tasks", []) if isinstance(r, dict) and "task" in r}
    if not rule_changed(saved.get("config", {}), cfg):
        return rows
    kept = {name: r for name, r in rows.items() if stops_alike(r, cfg)}
    if len(kept) < len(rows):
        log(f"{report}: trained again under this stopping rule: {', '.join(sorted(set(rows) - set(kept)))}")
    return kept


def stops_alike(row: dict, cfg: TrainConfig) -> bool:
    if not row.get("heldout_curve"):
        return False
    best, stop = stopping(row["heldout_curve"], cfg)
    return best == row["best_step"] and (stop or cfg.steps) == row["steps"]


def train_one(task: Path, name: str, out: Path, cfg: TrainConfig, source=None, member_of: list[str] | None = None,
              base=None, threads: int | None = None, log=say) -> dict:
    """One adapter: trained on `task` (resuming from its checkpoint in `out/peft/`), exported as
    `out/<name>.safetensors`. The unit of work, here or in a Ray task (`base` None: loaded here)."""
    if base is None:
        base = load_for_training(source, threads)
    model, tok, fmt, _ = base
    row = train_adapter(model, tok, fmt, task, out / "peft" / name, cfg, log=log)
    source_ = f"MBC cluster of {', '.join(member_of)}" if member_of else None
    export_adapter(out / "peft" / name, out / f"{name}.safetensors", model, cfg, name, source_)
    return row


def _train_remote(task: str, name: str, out: str, cfg: TrainConfig, source, member_of, threads: int) -> dict:
    """train_one in a Ray worker, on `threads` torch threads (its CPUs), writing where every node
    reads (`out`): the checkpoints too, so a retried task resumes where the killed one stopped."""
    return train_one(Path(task), name, Path(out), cfg, source, member_of, threads=threads, log=lambda *_: None)


def train_library(tasks_dir: Path, out: Path, cfg: TrainConfig, source=None, log=say,
                  clusters_file: Path | None = None, ray: str | None = None, cpus_per_task: int = 1,
                  threads: int | None = None) -> list[dict]:
    """One LoRA per task file of `tasks_dir`, or with `clusters_file` one per cluster, on the union
    of its tasks. Resumes LoRA by LoRA: one is done when its file and its report row both exist.
    `ray`: a Ray cluster's address, each LoRA a task there (edgelora.distributed) on `cpus_per_task`
    torch threads; `out` and the task files must then be paths every node reads and writes (one
    machine, or a shared file system). The report lists the LoRAs in task order, however they
    finish. Sequentially, `threads` torch threads (default: every core): a LoRA is the same byte
    for byte at the same thread count, here or on Ray."""
    tasks = task_files(tasks_dir)
    clusters = read_clusters(clusters_file) if clusters_file else None
    if clusters:
        check_members(clusters, clusters_file, tasks, tasks_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = check_resumable(out, cfg, clusters, log)
    if clusters:
        tasks = cluster_files(clusters, tasks, out)
    rows = {name: done[name] for name in tasks if name in done and (out / f"{name}.safetensors").exists()}
    jobs = {name: task for name, task in tasks.items() if name not in rows}

    def finished(name: str, row: dict) -> None:
        rows[name] = row
        write_report(out, [rows[n] for n in tasks if n in rows], cfg, clusters)
        log(f"[{len(rows)}/{len(tasks)}] {name}: {row['steps']} steps, held-out loss "
            f"{row['heldout_loss_start']:.3f} → {row['heldout_loss']:.3f}, {row['minutes'] * 60:.0f}s")

    if ray and jobs:
        from edgelora.distributed import on_ray
        args = {name: (str(task.absolute()), name, str(out.absolute()), cfg, source, clusters[name] if clusters else None,
                       cpus_per_task) for name, task in jobs.items()}
        for name, row in on_ray(ray, _train_remote, args, cpus_per_task):
            finished(name, row)
    elif jobs:
        base = load_for_training(source, threads)
        for name, task in jobs.items():
            finished(name, train_one(task, name, out, cfg, source, clusters[name] if clusters else None, base, log=log))
    write_report(out, [rows[n] for n in tasks], cfg, clusters)
    return [rows[n] for n in tasks]
