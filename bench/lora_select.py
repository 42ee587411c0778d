"""The price of `adapt --select loss` (the default) against LoraHub's random 20: adapt time and
the loss reached on the examples, both searches at budget 40, alternated in one run. The loss
pick adds one forward per library LoRA before the search; its accuracy is in bbh.md.

    python bench/lora_select.py [--tasks date_understanding,navigate] [--rounds 2]
"""
from __future__ import annotations

import argparse

from common import DATA, alternate, median, save

from edgelora.bundle import Bundle
from edgelora.search import adapt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="date_understanding")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget", type=int, default=40)
    args = ap.parse_args()
    bundle = Bundle.open()
    rows = {}
    for task in args.tasks.split(","):
        examples = DATA / "bbh" / f"{task}.adapt.jsonl"
        results = {}

        def run(select):
            results[select] = adapt(examples, bundle, budget=args.budget, select=select, warn=lambda m: None)

        times = alternate({s: (lambda s=s: run(s)) for s in ("loss", "random")}, args.rounds)
        rows[task] = {s: {"seconds": times[s], "median_s": median(times[s]), "loss": results[s].loss,
                          "start_loss": results[s].start_loss,
                          "forwards": len(results[s].history) + results[s].settings["selection_evals"]}
                      for s in times}
        rows[task]["time_ratio_loss_over_random"] = median(times["loss"]) / median(times["random"])
        r = rows[task]
        print(f"{task}: loss-picked {r['loss']['median_s']:.1f}s ({r['loss']['forwards']} forwards, loss "
              f"{r['loss']['loss']:.4f}) vs random 20 {r['random']['median_s']:.1f}s ({r['random']['forwards']} forwards, "
              f"loss {r['random']['loss']:.4f}): {r['time_ratio_loss_over_random']:.2f}x the time", flush=True)
    save("lora_select", {"budget": args.budget, "rounds": args.rounds, "n_library": len(bundle.lora_paths()), "tasks": rows})


if __name__ == "__main__":
    main()
