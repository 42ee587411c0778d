"""edgelora-export: the workstation commands. Thin: parse, call, print; user errors exit 2.
Each prints one line per step; what the libraries underneath print goes to a log file under
EDGELORA_HOME/logs/, named in the last line (--verbose shows it instead)."""
from __future__ import annotations

import argparse
import hashlib
import sys
from contextlib import contextmanager
from pathlib import Path

from edgelora.bundle import LORA_LIBRARIES, Bundle, default_bundle_path, home
from edgelora.errors import UserError, run_command
from edgelora.io import exclusive, tidy_temp_folders

from .console import Lap, captured, say
from .base_model import DEFAULT_TARGETS
from .train import DEFAULT_LR, KINDS, TrainConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelora-export", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="show what torch.onnx, onnxscript, transformers and the onnxruntime-genai builder "
                             "print, as they print it (by default it goes to a log file under EDGELORA_HOME/logs/)")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base", parents=[common], help="export a base model (GGUF file or HF folder) into a bundle")
    b.add_argument("source", nargs="?", help="GGUF file or Hugging Face model folder (default: SmolLM2-135M-Instruct)")
    b.add_argument("-o", "--out", type=Path, help=f"bundle folder (default: {default_bundle_path()})")
    b.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="LoRA target modules, comma-separated")
    b.add_argument("--force", action="store_true", help="rebuild an existing bundle")
    b.add_argument("--mbc", action="store_true",
                   help="also install the shipped MBC library (10 cluster LoRAs trained on the default base) as the "
                        "bundle's mbc library; on an existing bundle, only that")
    b.add_argument("--prompts", action="store_true",
                   help="also install the shipped adaption-prompt library (one LLaMA-Adapter prompt per upstream task, "
                        "trained on the default base) for adapt --kind adaption-prompt; on an existing bundle, only that")
    l = sub.add_parser("lora", parents=[common], help="add a PEFT LoRA folder to a bundle")
    l.add_argument("peft_dir", type=Path)
    l.add_argument("--bundle", type=Path)
    l.add_argument("--name")
    l.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    l.add_argument("--force", action="store_true", help="replace a LoRA of the same name")
    l.add_argument("--library", choices=LORA_LIBRARIES, default="per-task",
                   help="the bundle's library to add it to (default per-task; mbc: a per-cluster LoRA)")
    for name, help_ in (("train", "train one LoRA with LoRA+ on a task file"),
                        ("library", "train one LoRA per task file in a folder (resumable)")):
        t = sub.add_parser(name, parents=[common], help=help_)
        t.add_argument("task" if name == "train" else "tasks_dir", type=Path)
        t.add_argument("-o", "--out", type=Path, required=True)
        t.add_argument("--base", help="GGUF file or HF folder (default: SmolLM2-135M-Instruct)")
        t.add_argument("--kind", choices=KINDS, default=TrainConfig.kind,
                       help="lora (LoRA+), or adaption-prompt (LLaMA-Adapter's gated prompts, peft's AdaptionPromptConfig)")
        t.add_argument("--rank", type=int, default=TrainConfig.rank)
        t.add_argument("--alpha", type=float, default=TrainConfig.alpha)
        t.add_argument("--targets", default=",".join(TrainConfig.targets))
        t.add_argument("--lr", type=float, help="learning rate (default: the kind's, "
                       + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + "; lora: A's, B's is lr * loraplus-ratio)")
        t.add_argument("--loraplus-ratio", type=float, default=TrainConfig.loraplus_ratio)
        t.add_argument("--adapter-len", type=int, default=TrainConfig.adapter_len,
                       help=f"adaption-prompt: prompt tokens per adapted layer (default {TrainConfig.adapter_len})")
        t.add_argument("--adapter-layers", type=int, default=TrainConfig.adapter_layers,
                       help=f"adaption-prompt: the top layers adapted (default {TrainConfig.adapter_layers})")
        t.add_argument("--steps", type=int, default=TrainConfig.steps)
        t.add_argument("--batch", type=int, default=TrainConfig.batch)
        t.add_argument("--max-len", type=int, default=TrainConfig.max_len)
        t.add_argument("--seed", type=int, default=TrainConfig.seed)
        t.add_argument("--eval-every", type=int, default=TrainConfig.eval_every, help="steps between held-out losses")
        t.add_argument("--patience", type=int, default=TrainConfig.patience,
                       help="held-out evaluations without a new best before training stops")
        t.add_argument("--min-delta", type=float, default=TrainConfig.min_delta,
                       help="a new best beats the last held-out loss by more than this (default 0); "
                            "a library resumed with another keeps each LoRA whose curve stops alike")
        t.add_argument("--threads", type=int, help="torch threads (default: every core); the same threads give the "
                       "same LoRA byte for byte, others differ by float rounding (a Ray task uses --cpus-per-task)")
        if name == "train":
            t.add_argument("--bundle", type=Path, help="also add the LoRA to this bundle")
        else:
            t.add_argument("--clusters", type=Path, help="clusters JSON (edgelora cluster): one LoRA per cluster, "
                           "trained on the union of its tasks (MBC), instead of one per task")
            t.add_argument("--bundle", type=Path, help="then install the library in this bundle, replacing the one it "
                           "has: with --clusters as its mbc library (loras-mbc/), with --kind adaption-prompt as its "
                           "prompts library (adaption-prompts/)")
            t.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                           help="train each LoRA as a task on a Ray cluster (default: the running one, 'auto'; "
                                "'local' starts one here); -o and the tasks must be paths every node reads and writes "
                                "(pip install './export[ray]')")
            t.add_argument("--cpus-per-task", type=int, default=1, help="--ray: CPUs (torch threads) per LoRA (default 1)")
    return p


# What export_base's temporary folder (.<bundle>.xxxxxxxx beside the bundle) holds.
EXPORT_TEMP_CONTENTS = {"hf", "bundle"}


@contextmanager
def export_lock(out: Path):
    """The lock every `edgelora-export base` of `out` holds while it runs (a file in EDGELORA_HOME,
    not beside the bundle): a second one is refused, and the holder may delete what killed runs
    left beside `out`."""
    key = hashlib.sha256(str(Path(out).absolute()).encode()).hexdigest()[:16]
    with exclusive(home() / "locks" / f"export-base-{key}.lock",
                   f"{out}: another edgelora-export base is writing this bundle; wait for it to end"):
        yield


def train_config(args):
    if args.kind != "lora" and args.bundle and args.cmd == "train":
        raise UserError(f"--bundle: one {args.kind} adapter is written to -o only; edgelora-export library --kind "
                        f"{args.kind} --bundle installs a whole library of them")
    if args.kind != "lora" and getattr(args, "clusters", None):
        raise UserError(f"--clusters: the MBC library clusters LoRAs; --kind {args.kind} trains one adapter per task")
    return TrainConfig(kind=args.kind, adapter_len=args.adapter_len, adapter_layers=args.adapter_layers,
                       rank=args.rank, alpha=args.alpha, targets=tuple(args.targets.split(",")), lr=args.lr,
                       loraplus_ratio=args.loraplus_ratio, steps=args.steps, batch=args.batch,
                       max_len=args.max_len, seed=args.seed, eval_every=args.eval_every, patience=args.patience,
                       min_delta=args.min_delta)


def check_threads(threads: int | None) -> int | None:
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: must be at least 1")
    return threads


def run(args) -> None:
    with captured(args.cmd, args.verbose):
        run_quietly(args)


def run_quietly(args) -> None:
    if args.cmd == "base":
        from .base import export_base
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        out = args.out or default_bundle_path()
        with export_lock(out):
            for p in tidy_temp_folders(out, EXPORT_TEMP_CONTENTS):
                say(f"removed {p}: the temporary folder of an export that was killed")
            export_base(args.source, out, targets, force=args.force)
            from .lora import SHIPPED, install_library
            for library, wanted in (("mbc", args.mbc), ("prompts", args.prompts)):
                if wanted:
                    dst = install_library(sorted(SHIPPED[library].glob("*.safetensors")), out, library)
                    say(f"the shipped {library} library installed as the bundle's {library} library: {dst}")
    elif args.cmd == "lora":
        from .lora import add_lora
        say(add_lora(args.peft_dir, args.bundle, args.name, args.dtype, args.force, args.library))
    elif args.cmd == "train":
        from .library import check_trainable
        from .train import load_for_training, train_adapter
        check_trainable(args.task)
        cfg = train_config(args)
        lap = Lap()
        base, tok, fmt, name = load_for_training(args.base, check_threads(args.threads))
        say(f"loaded {name} ({lap()})")
        row = train_adapter(base, tok, fmt, args.task, args.out, cfg)
        say(f"{args.task.stem}: {row['steps']} steps, held-out loss {row['heldout_loss_start']:.3f} → "
            f"{row['heldout_loss']:.3f}, {row['minutes']:.1f} min; PEFT folder {args.out}")
        if args.bundle:
            from .lora import add_lora
            say(add_lora(args.out, args.bundle, args.task.stem, force=True))
    elif args.cmd == "library":
        from .library import train_library
        if args.bundle:
            if not args.clusters and args.kind == "lora":
                raise UserError("--bundle installs an MBC library (give --clusters) or an adaption-prompt library "
                                "(--kind adaption-prompt); a per-task LoRA is added with edgelora-export lora")
            Bundle.open(args.bundle)  # before hours of training, not after
        if args.cpus_per_task < 1:
            raise UserError(f"--cpus-per-task {args.cpus_per_task}: must be at least 1")
        rows = train_library(args.tasks_dir, args.out, train_config(args), args.base, clusters_file=args.clusters,
                             ray=args.ray, cpus_per_task=args.cpus_per_task, threads=check_threads(args.threads))
        if args.bundle:
            from .lora import install_library
            library = "mbc" if args.kind == "lora" else "prompts"
            dst = install_library([args.out / f"{r['task']}.safetensors" for r in rows], args.bundle, library)
            say(f"{len(rows)} {'cluster LoRAs' if library == 'mbc' else 'adaption prompts'} installed as the bundle's "
                f"{library} library: {dst}")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_command("edgelora-export", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
