"""LoRA+ (B's learning rate 16x A's) vs plain LoRA (same rate), same steps, seed and data, on
3 upstream tasks: held-out loss curves side by side, and the steps LoRA+ needs to reach the
plain run's final held-out loss.

    python bench/loraplus.py [--tasks a,b,c] [--steps 30]
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from common import DATA, RESULTS, save

from edgelora_export.train import TrainConfig, load_for_training, train_lora


def steps_to_reach(curve: list[list[float]], target: float) -> int | None:
    return next((s for s, loss in curve if loss <= target), None)


def markdown(rows: dict) -> str:
    """Held-out loss curves side by side, per task."""
    out = []
    for task, r in rows.items():
        out += [f"### {task}", "", "| step | LoRA (λ=1) | LoRA+ (λ=16) |", "|---:|---:|---:|"]
        out += [f"| {s} | {a:.4f} | {b:.4f} |" for (s, a), (_, b) in zip(r["curves"]["lora"], r["curves"]["loraplus"])]
        out += ["", f"LoRA+ reaches plain LoRA's final held-out loss ({r['plain_final_heldout']:.4f}) at step "
                    f"{r['loraplus_steps_to_plain_final']} of {r['steps']}.", ""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="color_rgb,social_iqa,linguistic_mappings_plural_json")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--eval-every", type=int, default=5)
    args = ap.parse_args()
    base, tok, fmt, _ = load_for_training(None)
    cfg = TrainConfig(steps=args.steps, eval_every=args.eval_every, patience=10 ** 6)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            path = DATA / "upstream" / f"{task}.jsonl"
            runs = {}
            for name, ratio in (("lora", 1.0), ("loraplus", 16.0)):
                runs[name] = train_lora(base, tok, fmt, path, Path(tmp) / f"{task}-{name}", replace(cfg, loraplus_ratio=ratio),
                                        log=lambda *a: None)
            plain_final = runs["lora"]["heldout_curve"][-1][1]
            reach = steps_to_reach(runs["loraplus"]["heldout_curve"], plain_final)
            rows[task] = {"plain_final_heldout": plain_final, "loraplus_final_heldout": runs["loraplus"]["heldout_curve"][-1][1],
                          "loraplus_steps_to_plain_final": reach, "steps": args.steps,
                          "curves": {k: v["heldout_curve"] for k, v in runs.items()},
                          "train_curves": {k: v["curve"] for k, v in runs.items()},
                          "minutes": {k: v["minutes"] for k, v in runs.items()}}
            print(markdown({task: rows[task]}), flush=True)
    (RESULTS / "loraplus.md").write_text(markdown(rows))
    save("loraplus", {"config": {"lr": cfg.lr, "batch": cfg.batch, "rank": cfg.rank, "seed": cfg.seed}, "tasks": rows})


if __name__ == "__main__":
    main()
