"""The bundle: the folder a workstation writes and an edge device reads (see DESIGN.md).

`Bundle.open` checks what is cheap (manifest, every file present at its size) so a broken
bundle fails before a search starts; `verify` re-hashes every file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .examples import PromptFormat
from .io import atomic_write_json, sha256_file

FORMAT = "edgelora-bundle"
FORMAT_VERSION = 2  # 2: the scoring graph takes the examples packed (examples.pack)
MANIFEST = "manifest.json"
BUILD_HINT = "build it with: edgelora-export base"


def home() -> Path:
    return Path(os.environ.get("EDGELORA_HOME", Path.home() / ".cache" / "edgelora"))


def default_bundle_path() -> Path:
    return home() / "bundles" / "smollm2-135m-instruct"


def hash_files(root: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"sha256": sha256_file(root / n), "size": (root / n).stat().st_size} for n in sorted(names)}


def write_manifest(root: Path, manifest: dict) -> None:
    """(Re)hash every file in the bundle but the manifest itself, then write it atomically."""
    names = [p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")]
    manifest = {**manifest, "files": hash_files(root, names)}
    atomic_write_json(root / MANIFEST, manifest)


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path | None = None) -> "Bundle":
        path = Path(path) if path is not None else default_bundle_path()
        mpath = path / MANIFEST
        if not mpath.is_file():
            hint = BUILD_HINT if path == default_bundle_path() else f"{BUILD_HINT} -o {path}"
            raise UserError(f"{path}: not a bundle (no {MANIFEST}); {hint}")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{mpath}:{e.lineno}: not valid JSON ({e.msg})") from None
        if manifest.get("format") != FORMAT:
            raise UserError(f"{mpath}: not an edgelora bundle manifest")
        missing = [k for k in ("files", "arch", "targets", "scoring", "decoder", "tokenizer", "prompt", "eos_ids", "pad_id")
                   if k not in manifest]
        if missing:
            raise UserError(f"{mpath}: manifest lacks {', '.join(missing)}; rebuild the bundle with edgelora-export base")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{mpath}: bundle format {manifest.get('format_version')} is not supported "
                            f"(this edgelora reads {FORMAT_VERSION}); rebuild it with edgelora-export")
        for name, info in manifest["files"].items():
            f = path / name
            if not f.is_file():
                raise UserError(f"{path}: file {name} listed in the manifest is missing")
            if f.stat().st_size != info["size"]:
                raise UserError(f"{path}: file {name} has {f.stat().st_size} bytes, the manifest says {info['size']}")
        return cls(path, manifest)

    def verify(self) -> list[str]:
        """Names of files whose sha256 differs from the manifest's (empty: the bundle is intact)."""
        return [n for n, info in self.manifest["files"].items() if sha256_file(self.path / n) != info["sha256"]]

    # -- what the runtime reads --------------------------------------------------------
    @property
    def arch(self) -> dict:
        return self.manifest["arch"]

    @property
    def targets(self) -> dict[str, dict]:
        """LoRA target modules: name -> {"in": in_features, "out": out_features}."""
        return self.manifest["targets"]

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat.from_dict(self.manifest["prompt"])

    @property
    def scoring_path(self) -> Path:
        return self.path / self.manifest["scoring"]["file"]

    @property
    def decoder_dir(self) -> Path:
        return self.path / self.manifest["decoder"]["dir"]

    def tokenizer(self):
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(self.path / self.manifest["tokenizer"]))

    def lora_paths(self) -> dict[str, Path]:
        files = sorted(n for n in self.manifest["files"] if n.startswith("loras/") and n.endswith(".safetensors"))
        return {Path(n).stem: self.path / n for n in files}
