"""`edgelora-export lora`: a PEFT LoRA folder becomes `BUNDLE/loras/<name>.safetensors`."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edgelora.bundle import Bundle, write_manifest
from edgelora.errors import UserError
from edgelora.lora import from_peft, save_lora


def add_lora(peft_dir: Path, bundle_path: Path | None, name: str | None = None, dtype: str = "fp16",
             force: bool = False) -> Path:
    bundle = Bundle.open(bundle_path)
    name = name or Path(peft_dir).resolve().name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise UserError(f"--name {name!r}: use letters, digits, '_', '-' and '.'")
    lora = from_peft(peft_dir, bundle.targets, bundle.arch["layers"], name)
    out = bundle.path / "loras" / f"{name}.safetensors"
    if out.exists() and not force:
        raise UserError(f"{out}: a LoRA named {name} is already in the bundle (--force replaces it)")
    save_lora(out, lora, np.float16 if dtype == "fp16" else np.float32)
    write_manifest(bundle.path, bundle.manifest)
    return out
