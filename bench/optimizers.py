"""Which optimizer for the default? Each of scipy's COBYLA, Nelder-Mead and Powell (and cma
where installed) on several BBH dev tasks, budget 40, the same 20 LoRAs: the loss reached.

    python bench/optimizers.py [--tasks a,b,c] [--loras DIR]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import DATA, save

from edgelora.bundle import Bundle, home
from edgelora.search import OPTIMIZERS, adapt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="date_understanding,sports_understanding,navigate")
    ap.add_argument("--loras", type=Path, help="folder of LoRAs (default: the bundle's library, or the adapt "
                    "bench's random LoRAs if the library is empty)")
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--optimizers", default=",".join(o for o in OPTIMIZERS if o != "cma"))
    args = ap.parse_args()
    bundle = Bundle.open()
    loras = args.loras or (None if bundle.lora_paths() else home() / "bench" / "random_loras")
    rows = {}
    for task in args.tasks.split(","):
        rows[task] = {}
        for opt in args.optimizers.split(","):
            r = adapt(DATA / "bbh" / f"{task}.adapt.jsonl", bundle, loras=loras, budget=args.budget, optimizer=opt,
                      warn=lambda m: None)
            rows[task][opt] = {"start": r.start_loss, "loss": r.loss, "objective": r.objective,
                               "curve": [e.objective for e in r.history]}
            print(f"{task:<24} {opt:<12} loss {r.start_loss:.4f} -> {r.loss:.4f} (objective {r.objective:.4f})", flush=True)
    mean_drop = {o: statistics.mean(rows[t][o]["start"] - rows[t][o]["loss"] for t in rows) for o in args.optimizers.split(",")}
    print("mean loss drop:", {k: round(v, 4) for k, v in mean_drop.items()})
    save("optimizers", {"budget": args.budget, "loras": str(loras or "bundle library"), "tasks": rows,
                        "mean_loss_drop": mean_drop})


if __name__ == "__main__":
    main()
