"""Where one default `edgelora adapt` run's wall time goes: process start-up and imports, bundle
open, tokenise, session build, selection, the search's forwards, COMPOSE and optimizer, and the
write-back. Each run is a fresh process, as a user's is; several runs give a median per phase.

    python bench/profile_adapt.py [--task date_understanding] [--runs 2] [--select arrow]
"""
from __future__ import annotations

import time

T0 = time.perf_counter()  # before the heavy imports: start-up counts them

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

MARK = "PROFILE "


def worker(args) -> dict:
    from edgelora.bundle import Bundle
    from edgelora.search import adapt
    from edgelora.writeback import write_model
    t = {"imports": time.perf_counter() - T0}
    t0 = time.perf_counter()
    bundle = Bundle.open()
    t["bundle_open"] = time.perf_counter() - t0
    res = adapt(args.examples, bundle, warn=lambda m: None, **({"select": args.select} if args.select else {}))
    t.update(res.timings)
    t["search_optimizer"] = t["search"] - t["search_compose"] - t["search_forward"]
    t["adapt_other"] = res.seconds - sum(res.timings[k] for k in ("tokenise", "session", "select", "search"))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        write_model(bundle, *res.merged(), Path(out))
        t["writeback"] = time.perf_counter() - t0
    t["total"] = time.perf_counter() - T0
    return {"timings": t, "forwards": res.settings["forwards"], "points": len(res.history), "stop": res.stop,
            "select": res.settings["select"], "tokens": res.settings["tokens"],
            "padded_tokens": res.settings["padded_tokens"], "loss": [res.start_loss, res.loss]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="date_understanding")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--select", help="default: AdaptConfig's")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--examples", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(MARK + json.dumps(worker(args)), flush=True)
        return
    from common import DATA, median, save
    examples = DATA / "bbh" / f"{args.task}.adapt.jsonl"
    if not examples.exists():
        examples = DATA / "near" / f"{args.task}.adapt.jsonl"
    runs = []
    for _ in range(args.runs):
        cmd = [sys.executable, __file__, "--worker", "--examples", str(examples),
               *(["--select", args.select] if args.select else [])]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
        runs.append(json.loads(next(l for l in out.splitlines() if l.startswith(MARK))[len(MARK):]))
    med = {k: median([r["timings"][k] for r in runs]) for k in runs[0]["timings"]}
    print(f"{args.task}: {runs[0]['select']}, {runs[0]['forwards']} forwards, {runs[0]['points']} points, "
          f"stopped: {runs[0]['stop']}, {runs[0]['tokens']} tokens packed ({runs[0]['padded_tokens']} padded)")
    for k, v in med.items():
        print(f"  {k:<18}{v:8.2f} s  {100 * v / med['total']:5.1f}%" if k != "total" else f"  {k:<18}{v:8.2f} s")
    save(f"profile_adapt_{args.task}", {"task": args.task, "runs": runs, "median_s": med})


if __name__ == "__main__":
    main()
