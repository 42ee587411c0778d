"""Training cost of the two adapter kinds: LoRA+ against LLaMA-Adapter's adaption prompts.

Three upstream tasks, spread over the sorted list; on each, a LoRA (TrainConfig's defaults) and
an adaption prompt (`--kind adaption-prompt`, its defaults: 10 tokens in the top 8 layers, lr 9e-3)
trained in turn in one process, the same steps, the same held-out split, early stopping off so
the curves run to the end. Per run: the held-out loss curve, trainable parameters, seconds per
step (held-out evaluations included, the same for both) and peak RSS. Writes
bench/results/adapter_kinds.json and a picture of the curves, adapter_kinds.svg.

    python bench/adapter_kinds.py [--steps 30] [--tasks a,b,c]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from common import DATA, RESULTS, atomic_write, save
from safetensors.numpy import load_file

from edgelora_export.train import TrainConfig, load_for_training, train_adapter

KINDS = {"lora": TrainConfig(), "adaption-prompt": TrainConfig(kind="adaption-prompt")}
COLOURS = {"lora": "#c0392b", "adaption-prompt": "#2e86c1"}


def curves_svg(rows: list[dict], width: int = 900, height: int = 320) -> str:
    """One panel per task: held-out loss against step, a line per kind."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    pw, pad = width / len(tasks), 45
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
           '<rect width="100%" height="100%" fill="white"/>']
    for k, task in enumerate(tasks):
        rs = [r for r in rows if r["task"] == task]
        pts = [p for r in rs for p in r["heldout_curve"]]
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        last = max(s for s, _ in pts) or 1
        X = lambda s: k * pw + pad + (pw - 1.5 * pad) * s / last  # noqa: E731
        Y = lambda v: height - pad - (height - 2 * pad) * (v - lo) / (hi - lo or 1)  # noqa: E731
        out.append(f'<text x="{k * pw + pw / 2}" y="20" text-anchor="middle" font-size="12">{task[:34]}</text>')
        out.append(f'<line x1="{X(0)}" y1="{Y(lo)}" x2="{X(last)}" y2="{Y(lo)}" stroke="#444"/>')
        for v in (lo, hi):
            out.append(f'<text x="{X(0) - 4}" y="{Y(v) + 4:.1f}" text-anchor="end" font-size="10">{v:.2f}</text>')
        for r in rs:
            line = " ".join(f"{X(s):.1f},{Y(v):.1f}" for s, v in r["heldout_curve"])
            out.append(f'<polyline points="{line}" fill="none" stroke="{COLOURS[r["kind"]]}" stroke-width="2"/>')
    out += [f'<text x="{20 + 200 * i}" y="{height - 8}" font-size="12" fill="{c}">{kind}: held-out loss by step</text>'
            for i, (kind, c) in enumerate(COLOURS.items())]
    return "".join(out) + "</svg>\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--tasks", help="upstream tasks (default: the 1st, 14th and 27th by name)")
    args = ap.parse_args()
    names = sorted(p.stem for p in (DATA / "upstream").glob("*.jsonl"))
    tasks = args.tasks.split(",") if args.tasks else [names[0], names[13], names[26]]
    base = load_for_training(None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="adapter_kinds.") as tmp:
        for task in tasks:
            for kind, cfg in KINDS.items():
                cfg = dataclasses.replace(cfg, steps=args.steps, patience=10 ** 6)
                out = Path(tmp) / f"{task}-{kind}"
                row = train_adapter(*base[:3], DATA / "upstream" / f"{task}.jsonl", out, cfg, log=print)
                params = sum(v.size for v in load_file(out / "adapter_model.safetensors").values())
                rows.append({"task": task, "kind": kind, "trainable_params": int(params), "steps": row["steps"],
                             "seconds_per_step": round(row["minutes"] * 60 / max(row["steps"], 1), 2),
                             "peak_rss_mb": row["peak_rss_mb"], "heldout_start": row["heldout_loss_start"],
                             "heldout_best": row["heldout_loss"], "best_step": row["best_step"],
                             "heldout_curve": row["heldout_curve"], "config": dataclasses.asdict(cfg)})
                print(f"{task} {kind}: {params} parameters, {rows[-1]['seconds_per_step']} s/step, held-out "
                      f"{row['heldout_loss_start']:.3f} -> {row['heldout_loss']:.3f}", flush=True)
    print("\n| task | kind | trainable parameters | s/step | peak RSS MB | held-out loss start → best (step) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['task']} | {r['kind']} | {r['trainable_params']:,} | {r['seconds_per_step']} | {r['peak_rss_mb']} | "
              f"{r['heldout_start']:.3f} → {r['heldout_best']:.3f} ({r['best_step']}) |")
    atomic_write(RESULTS / "adapter_kinds.svg", curves_svg(rows))
    save("adapter_kinds", {"tasks": tasks, "steps": args.steps, "runs": rows})


if __name__ == "__main__":
    main()
