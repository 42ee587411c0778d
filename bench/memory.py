"""Peak memory (RSS) of the two steps of `edgelora adapt` on the real bundle, each in a process
of its own so neither inherits the other's peak: the search (adapt's defaults, on the README's
date_understanding examples), and the write-back of its result (W + B·A into the decoder
graph, then the default int4 quantization).

    python bench/memory.py [--bundle BUNDLE] [--examples examples/date_understanding.jsonl]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, save

SEARCH = """
import json, sys, time
from pathlib import Path
from edgelora.bundle import Bundle
from edgelora.io import peak_rss_mb
from edgelora.outputs import write_outputs
from edgelora.search import adapt
bundle = Bundle.open(sys.argv[1])
res = adapt(sys.argv[2], bundle, warn=lambda m: None)
write_outputs(res, bundle, Path(sys.argv[3]))  # weights and adapter only: the model is the next step
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": round(res.seconds, 1), "loss": res.loss,
                  "start_loss": res.start_loss, "evaluations": len(res.history),
                  "forwards": res.settings["forwards"], "select": res.settings["select"],
                  "tokens": res.settings["tokens"]}))
"""

WRITE_BACK = """
import json, sys, time
from pathlib import Path
import numpy as np
from edgelora.bundle import Bundle
from edgelora.io import peak_rss_mb
from edgelora.lora import LoraStack, load_checked
from edgelora.outputs import DEFAULT_QUANT, read_weights
from edgelora.writeback import write_model
bundle, out = Bundle.open(sys.argv[1]), Path(sys.argv[2])
weights = read_weights(out)["weights"]
loras = load_checked([bundle.lora_paths()[name] for name in weights], bundle)
A, B = LoraStack(loras, list(bundle.targets)).compose(np.array(list(weights.values())))
t0 = time.time()
write_model(bundle, A, B, out / "model", DEFAULT_QUANT)
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": round(time.time() - t0, 1), "quant": DEFAULT_QUANT,
                  "model_mb": round((out / "model" / "model.onnx").stat().st_size / 1e6, 1)}))
"""


def run(script: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    from edgelora.bundle import default_bundle_path
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=default_bundle_path())
    ap.add_argument("--examples", type=Path, default=ROOT / "examples" / "date_understanding.jsonl")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "adapted"
        search = run(SEARCH, str(args.bundle), str(args.examples), str(out))
        print(f"adapt (search): peak RSS {search['peak_rss_mb']:.0f} MB, {search['seconds']}s", flush=True)
        write_back = run(WRITE_BACK, str(args.bundle), str(out))
        print(f"write-back ({write_back['quant']}): peak RSS {write_back['peak_rss_mb']:.0f} MB, "
              f"{write_back['seconds']}s", flush=True)
    save("memory", {"bundle": str(args.bundle), "examples": str(args.examples),
                    "search": search, "write_back": write_back})


if __name__ == "__main__":
    main()
