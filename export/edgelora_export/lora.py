"""`edgelora-export lora`: a PEFT LoRA folder becomes `BUNDLE/loras/<name>.safetensors` (or a
LoRA of the bundle's MBC library, `loras-mbc/`); `library --bundle` installs a whole trained
library at once (an MBC library, or the adaption-prompt library, `adaption-prompts/`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgelora.adaption_prompt import load_checked_prompts, save_prompt
from edgelora.bundle import LIBRARIES, Bundle, write_manifest
from edgelora.errors import UserError
from edgelora.io import building
from edgelora.lora import check_name, from_peft, load_checked, save_lora

# The libraries shipped in this package (package data), trained on the default base, SmolLM2-135M-Instruct:
# one LoRA per upstream task (what `base` installs), one per MBC cluster of them (`base --mbc`), and
# one adaption prompt per upstream task (`base --prompts`).
SHIPPED = {"per-task": Path(__file__).parent / "library", "mbc": Path(__file__).parent / "library-mbc",
           "prompts": Path(__file__).parent / "library-prompts"}


def install_library(files: list[Path], bundle_path: Path | None, library: str) -> Path:
    """The bundle adapters `files` (an `edgelora-export library` output) become the bundle's
    `library` whole: its folder is built aside and swapped in, so adapters of an earlier clustering
    or training do not linger, then the manifest is re-hashed (`edgelora verify` checks them like
    every file). The prompts library takes adaption prompts, the others LoRAs."""
    bundle = Bundle.open(bundle_path)
    if not files:
        raise UserError("no trained adapters to install")
    dst = bundle.path / LIBRARIES[library]
    with building(dst) as tmp:
        if library == "prompts":
            for f, ap in zip(files, load_checked_prompts(files, bundle.arch)):
                save_prompt(tmp / f.name, ap)
        else:
            for f, lora in zip(files, load_checked(files, bundle)):
                save_lora(tmp / f.name, lora, np.float16)
    write_manifest(bundle.path, bundle.manifest)
    return dst


def add_lora(peft_dir: Path, bundle_path: Path | None, name: str | None = None, dtype: str = "fp16",
             force: bool = False, library: str = "per-task") -> Path:
    bundle = Bundle.open(bundle_path)
    name = name or Path(peft_dir).resolve().name
    check_name(name, "--name")
    lora = from_peft(peft_dir, bundle.targets, bundle.arch["layers"], name)
    out = bundle.path / LIBRARIES[library] / f"{name}.safetensors"
    if out.exists() and not force:
        raise UserError(f"{out}: a LoRA named {name} is already in the bundle (--force replaces it)")
    save_lora(out, lora, np.float16 if dtype == "fp16" else np.float32)
    write_manifest(bundle.path, bundle.manifest)
    return out
