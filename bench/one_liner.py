"""The one-liner as a user runs it, `edgelora adapt EXAMPLES` (whole process: start-up, selection,
search, int4 write-back), against the same command at an earlier revision of edgelora with the
bundle that revision builds ("today's" scoring), alternated in one run. Each side gets a fresh
process per round; the output folders are thrown away.

    python bench/one_liner.py [--examples examples/date_understanding.jsonl] [--baseline 4d984a0] [--rounds 2]
        [--baseline-args "--select loss"]

The baseline's checkout (a git worktree) and bundle are made once under $EDGELORA_HOME/bench/.
`--baseline here` runs the baseline in this checkout on this bundle, with --baseline-args: an
earlier default given by its flags (e.g. `--optimizer cobyla --compose lorahub`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, alternate, median, save

from edgelora.bundle import default_bundle_path, home


def baseline(rev: str) -> tuple[Path, Path]:
    """(source checkout, bundle) of revision `rev`, made on first use ("here": this checkout's)."""
    if rev == "here":
        return ROOT, default_bundle_path()
    work = home() / "bench" / f"baseline-{rev}"
    src, bundle = work / "src", work / "bundle"
    if not src.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(src), rev], check=True)
    if not (bundle / "manifest.json").exists():
        print(f"building the bundle of {rev} (minutes) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "edgelora_export.cli", "base", "-o", str(bundle)], check=True,
                       env={**os.environ, "PYTHONPATH": f"{src}:{src / 'export'}"}, cwd=src)  # cwd: see run()
    return src, bundle


def run(cmd: list[str], env: dict, cwd: Path) -> dict:
    """One adapt in `cwd`, the side's checkout: `python -m` puts the working folder first on sys.path,
    so run elsewhere a side would import that folder's edgelora, whatever PYTHONPATH says."""
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        p = subprocess.run([*cmd, "--out", f"{out}/o", "--json"], capture_output=True, text=True, env=env, cwd=cwd)
        wall = time.perf_counter() - t
        if p.returncode:
            sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
        return {"wall_s": wall, **json.loads(p.stdout.strip().splitlines()[-1])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=Path, default=ROOT / "examples" / "date_understanding.jsonl")
    ap.add_argument("--baseline", default="4d984a0", help="git revision whose default is compared")
    ap.add_argument("--baseline-args", default="--select loss", help="flags for the baseline's adapt")
    ap.add_argument("--args", default="", help="flags for this checkout's adapt (default: none, the defaults)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.6, help="the ratio the issue asks for (printed and saved)")
    ap.add_argument("--name", help="results file name (default: one_liner_<examples><args>)")
    args = ap.parse_args()
    src, old_bundle = baseline(args.baseline)
    ex = str(args.examples.resolve())
    cli = [sys.executable, "-m", "edgelora.cli", "adapt", ex]
    sides = {
        "new": (cli + ["--bundle", str(default_bundle_path()), *args.args.split()],
                {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'export'}"}, ROOT),
        "baseline": (cli + ["--bundle", str(old_bundle), *args.baseline_args.split()],
                     {**os.environ, "PYTHONPATH": f"{src}:{src / 'export'}"}, src),
    }
    results: dict[str, list] = {k: [] for k in sides}
    times = alternate({k: (lambda k=k: results[k].append(run(*sides[k]))) for k in sides}, args.rounds)
    med = {k: median(v) for k, v in times.items()}
    ratio = med["new"] / med["baseline"]
    for k in sides:
        r = results[k][-1]
        print(f"{k:<9} {med[k]:6.1f} s whole process (adapt {r['seconds']:.1f} s), {r['evaluations']} points, "
              f"{r.get('forwards', '?')} forwards, loss {r['start_loss']:.4f} -> {r['loss']:.4f}")
    print(f"new / baseline: {ratio:.2f}x the time (target <= {args.target})")
    suffix = "".join(f"_{a.lstrip('-').replace('-', '_')}" for a in args.args.split())  # e.g. _select_arrow
    save(args.name or f"one_liner_{args.examples.name.split('.')[0]}{suffix}", {
        "examples": str(args.examples), "baseline": args.baseline, "baseline_args": args.baseline_args,
        "args": args.args, "rounds": args.rounds, "seconds": times, "median_s": med, "runs": results,
        "ratio_new_over_baseline": ratio, "target": f"ratio <= {args.target}"})


if __name__ == "__main__":
    main()
