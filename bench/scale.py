"""Adapt time against library size: 20, 39, 100, 200 LoRAs, timing only.

A bundle per size beside the default one: its model files linked, its library the first 20 or all
39 shipped LoRAs, and above 39 synthetic LoRAs (the average of two shipped ones, A and B alike:
LoRA-shaped, LoRA-sized, not trained; they time the work, not the accuracy). Each size runs the
one-liner as a user would (`edgelora adapt examples/date_understanding.jsonl`, whole process, the
model written back), with the default loss pick (a forward per library LoRA) and with
`--select arrow` (one forward whatever the size), in turn. Prints seconds, forwards and peak RSS
per size; writes bench/results/scale.json.

    python bench/scale.py [--sizes 20,39,100,200] [--rounds 1]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, save

from edgelora.bundle import MANIFEST, Bundle, write_manifest
from edgelora.lora import Lora, load_lora, save_lora

EXAMPLES = ROOT / "examples" / "date_understanding.jsonl"
# peak RSS of the child: the driver's own children only (one per call)
RUN = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def library(shipped: list[Lora], n: int) -> list[Lora]:
    """The first n shipped LoRAs, then synthetic ones: the mean of shipped LoRAs i and j."""
    out = shipped[:n]
    rng = np.random.default_rng(0)
    while len(out) < n:
        i, j = rng.choice(len(shipped), 2, replace=False)
        a, b = shipped[i], shipped[j]
        out.append(Lora(f"synthetic_{len(out):03d}", a.rank, a.alpha, {m: (a.A[m] + b.A[m]) / 2 for m in a.A},
                        {m: (a.B[m] + b.B[m]) / 2 for m in a.B}, f"mean of {a.name} and {b.name} (timing only)"))
    return out


def sized_bundle(bundle: Bundle, loras: list[Lora], root: Path) -> Path:
    """A bundle with `bundle`'s model files, copied (onnx refuses external data behind a symbolic
    link or a hard link), and `loras` as its library."""
    for name in bundle.manifest["files"]:
        if not name.startswith("loras"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle.path / name, root / name)
    (root / "loras").mkdir()
    for lora in loras:
        save_lora(root / "loras" / f"{lora.name}.safetensors", lora)
    write_manifest(root, json.loads((bundle.path / MANIFEST).read_text()))
    return root


def adapt(bundle: Path, out: Path, extra: list[str]) -> dict:
    cmd = [str(Path(sys.executable).parent / "edgelora"), "adapt", str(EXAMPLES), "--bundle", str(bundle),
           "--out", str(out), "--json", *extra]
    t = time.perf_counter()
    rss = subprocess.run([sys.executable, "-c", RUN, *cmd], check=True, stdout=subprocess.PIPE, text=True).stdout
    secs = time.perf_counter() - t
    weights = json.loads((out / "weights.json").read_text())
    return {"seconds": round(secs, 1), "peak_rss_mb": round(int(rss.split()[-1]) / 1024),
            "forwards": weights.get("forwards", weights.get("evaluations")), "loss": weights.get("loss")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20,39,100,200")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    bundle = Bundle.open()
    shipped = [load_lora(p) for p in bundle.library("per-task").values()]
    picks = {"loss": [], "arrow": ["--select", "arrow"]}
    rows = {n: {"loras": n, **{k: [] for k in picks}} for n in sizes}
    with tempfile.TemporaryDirectory(prefix="scale.") as tmp:
        tmp = Path(tmp)
        bundles = {n: sized_bundle(bundle, library(shipped, n), tmp / f"b{n}") for n in sizes}
        for r in range(args.rounds):
            for n in sizes:
                for k, extra in picks.items():
                    res = adapt(bundles[n], tmp / f"out_{n}_{k}_{r}", extra)
                    rows[n][k].append(res)
                    print(f"{n} LoRAs, --select {k}: {res}", flush=True)
    print("\n| library LoRAs | adapt s (loss pick) | forwards | peak RSS MB | adapt s (--select arrow) | forwards | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        cells = []
        for k in picks:
            runs = rows[n][k]
            cells += [f"{np.median([x['seconds'] for x in runs]):.0f}", str(runs[0]["forwards"]),
                      str(max(x["peak_rss_mb"] for x in runs))]
        print(f"| {n} | " + " | ".join(cells) + " |")
    save("scale", {"examples": str(EXAMPLES.relative_to(ROOT)), "rounds": args.rounds, "sizes": list(rows.values())})


if __name__ == "__main__":
    main()
