"""`edgelora-export library` on a two-node Ray cluster against the sequential run, on one machine.

The first N upstream tasks (sorted by name, no choice made on speed), trained three times with the
same settings: sequentially (one process, every core as torch threads: today's default); on a Ray
cluster of two nodes started here (`ray start --head --num-cpus C`, then a second
`ray start --address ... --num-cpus C`), one LoRA per task with `--cpus-per-task C`; and
sequentially on C threads (`--threads C`), the run whose adapters Ray's must equal byte for byte
(torch's float sums depend on the thread count). Prints the wall times and ratios, each LoRA's
minutes, and whether the adapters are byte-identical (else the largest difference). Writes
bench/results/ray_library.json.

    python bench/ray_library.py [--tasks 6] [--steps 30] [--cpus-per-node 1]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import DATA, save
from safetensors.numpy import load_file

from edgelora.io import read_json

BIN = Path(sys.executable).parent
PORT = 6391


def timed(cmd: list[str], env: dict) -> float:
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - t


def start_cluster(cpus: int, env: dict) -> str:
    """Two Ray nodes on this machine, `cpus` CPUs each; the head's address."""
    ray = str(BIN / "ray")
    subprocess.run([ray, "start", "--head", "--num-cpus", str(cpus), "--port", str(PORT), "--include-dashboard=false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True)
    subprocess.run([ray, "start", "--address", f"127.0.0.1:{PORT}", "--num-cpus", str(cpus), "--disable-usage-stats"],
                   env=env, check=True, capture_output=True)
    return f"127.0.0.1:{PORT}"


def compare(a: Path, b: Path, names: list[str]) -> dict:
    """Per LoRA: byte-identical, and the largest absolute difference of any tensor."""
    out = {}
    for n in names:
        x, y = load_file(a / f"{n}.safetensors"), load_file(b / f"{n}.safetensors")
        diff = max(float(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64)).max()) for k in x)
        out[n] = {"identical": x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), "max_abs_diff": diff}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=6, help="the first N upstream tasks (default 6)")
    ap.add_argument("--steps", type=int, help="training steps (default: TrainConfig's)")
    ap.add_argument("--cpus-per-node", type=int, default=1)
    args = ap.parse_args()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    names = sorted(p.stem for p in (DATA / "upstream").glob("*.jsonl"))[: args.tasks]
    steps = ["--steps", str(args.steps)] if args.steps else []
    with tempfile.TemporaryDirectory(prefix="ray_library.") as tmp:
        tmp = Path(tmp)
        (tmp / "tasks").mkdir()
        for n in names:
            (tmp / "tasks" / f"{n}.jsonl").symlink_to(DATA / "upstream" / f"{n}.jsonl")
        export = [str(BIN / "edgelora-export"), "library", str(tmp / "tasks"), *steps]
        seq = timed([*export, "-o", str(tmp / "seq")], env)
        address = start_cluster(args.cpus_per_node, env)
        try:
            par = timed([*export, "-o", str(tmp / "ray"), "--ray", address, "--cpus-per-task", str(args.cpus_per_node)], env)
        finally:
            subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)
        few = timed([*export, "-o", str(tmp / "seq_c"), "--threads", str(args.cpus_per_node)], env)
        same = compare(tmp / "seq_c", tmp / "ray", names)
        near = compare(tmp / "seq", tmp / "ray", names)
        reports = {k: {r["task"]: r for r in read_json(tmp / k / "report.json")["tasks"]} for k in ("seq", "ray", "seq_c")}
        config = read_json(tmp / "seq" / "report.json")["config"]
    rows = [{"task": n, "steps": reports["seq"][n]["steps"], "steps_ray": reports["ray"][n]["steps"],
             **{f"minutes_{k}": reports[k][n]["minutes"] for k in reports},
             "identical_to_sequential_c": same[n]["identical"], "max_abs_diff_sequential_c": same[n]["max_abs_diff"],
             "identical_to_sequential": near[n]["identical"], "max_abs_diff_sequential": near[n]["max_abs_diff"]}
            for n in names]
    c, cores = args.cpus_per_node, os.cpu_count()
    print(f"\n| task | steps | minutes: sequential ({cores} threads) / Ray ({c} per task) / sequential ({c}) "
          f"| Ray = sequential on {c} | Ray vs sequential on {cores}: max abs diff |\n|---|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['task']} | {r['steps']} | {r['minutes_seq']:.2f} / {r['minutes_ray']:.2f} / {r['minutes_seq_c']:.2f} | "
              f"{'byte-identical' if r['identical_to_sequential_c'] else r['max_abs_diff_sequential_c']} | "
              f"{r['max_abs_diff_sequential']:.2g} |")
    print(f"\n{len(names)} LoRAs: sequential on {cores} threads {seq / 60:.1f} min, Ray (2 nodes x {c} CPU) {par / 60:.1f} min "
          f"({seq / par:.2f}x), sequential on {c} {few / 60:.1f} min ({few / par:.2f}x); Ray's adapters byte-identical to "
          f"sequential on {c}: {sum(r['identical_to_sequential_c'] for r in rows)}/{len(rows)}")
    save("ray_library", {"tasks": rows, "config": config, "nodes": 2, "cpus_per_node": c, "sequential_threads": cores,
                         "seconds_sequential": round(seq, 1), "seconds_ray": round(par, 1),
                         "seconds_sequential_c": round(few, 1), "ratio": round(seq / par, 3),
                         "ratio_same_threads": round(few / par, 3)})


if __name__ == "__main__":
    main()
