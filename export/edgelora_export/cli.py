"""edgelora-export: the workstation commands. Thin: parse, call, print; user errors exit 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgelora.bundle import default_bundle_path
from edgelora.errors import UserError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelora-export", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base", help="export a base model (GGUF file or HF folder) into a bundle")
    b.add_argument("source", nargs="?", help="GGUF file or Hugging Face model folder (default: SmolLM2-135M-Instruct)")
    b.add_argument("-o", "--out", type=Path, help=f"bundle folder (default: {default_bundle_path()})")
    b.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, comma-separated")
    b.add_argument("--force", action="store_true", help="rebuild an existing bundle")
    l = sub.add_parser("lora", help="add a PEFT LoRA folder to a bundle")
    l.add_argument("peft_dir", type=Path)
    l.add_argument("--bundle", type=Path)
    l.add_argument("--name")
    l.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    l.add_argument("--force", action="store_true", help="replace a LoRA of the same name")
    return p


def run(args) -> None:
    if args.cmd == "base":
        from .base import export_base
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        export_base(args.source, args.out or default_bundle_path(), targets, force=args.force)
    elif args.cmd == "lora":
        from .lora import add_lora
        print(add_lora(args.peft_dir, args.bundle, args.name, args.dtype, args.force))


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"edgelora-export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgelora-export: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
