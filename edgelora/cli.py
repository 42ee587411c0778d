"""edgelora: the command line. Thin: parse, call the modules, print. User errors exit 2
with one line on stderr; Ctrl-C exits 130."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .bundle import Bundle, default_bundle_path
from .errors import UserError


def cmd_info(args) -> None:
    from safetensors import safe_open
    bundle = Bundle.open(args.bundle)
    loras = []
    for name, path in bundle.lora_paths().items():
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
        loras.append({"name": name, "rank": int(meta.get("rank", 0)), "alpha": float(meta.get("alpha", 0)),
                      "source": meta.get("source", "")})
    sizes = {n: i["size"] for n, i in bundle.manifest["files"].items()}
    info = {"bundle": str(bundle.path), "base": bundle.manifest["base"], "arch": bundle.arch,
            "targets": {m: {"in": t["in"], "out": t["out"]} for m, t in bundle.targets.items()},
            "size_mb": round(sum(sizes.values()) / 1e6, 1), "loras": loras}
    if args.json:
        print(json.dumps(info))
        return
    a = bundle.arch
    print(f"bundle   {bundle.path}  ({info['size_mb']} MB)")
    print(f"base     {info['base']['name']}  [{info['base']['model_type']}]  from {info['base']['source']}")
    print(f"arch     {a['layers']} layers, hidden {a['hidden']}, vocab {a['vocab']}, max {a['max_len']} tokens")
    print("targets  " + ", ".join(f"{m} ({t['in']}→{t['out']})" for m, t in info["targets"].items()))
    print(f"loras    {len(loras)}")
    for l in loras:
        print(f"  {l['name']:<48} rank {l['rank']:<3} alpha {l['alpha']:g}")


def cmd_verify(args) -> None:
    bundle = Bundle.open(args.bundle)
    bad = bundle.verify()
    if bad:
        raise UserError(f"{bundle.path}: sha256 differs from the manifest for {', '.join(bad)}")
    print(f"{bundle.path}: {len(bundle.manifest['files'])} files, all sha256 match")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelora", description="Adapt a small language model from a few examples, on the CPU.")
    sub = p.add_subparsers(dest="cmd", required=True)
    bundle_help = f"bundle folder (default: {default_bundle_path()}; EDGELORA_HOME moves it)"
    i = sub.add_parser("info", help="what a bundle holds")
    i.add_argument("--bundle", type=Path, help=bundle_help)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)
    v = sub.add_parser("verify", help="check every file's sha256 against the manifest")
    v.add_argument("--bundle", type=Path, help=bundle_help)
    v.set_defaults(fn=cmd_verify)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        print(f"edgelora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgelora: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
