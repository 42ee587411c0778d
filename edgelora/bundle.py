"""The bundle: the folder a workstation writes and an edge device reads (README.md, "Two sides").

`Bundle.open` checks the manifest's shape and every file against its sha256 before any ONNX
file is loaded, so a damaged or edited bundle fails with one line, never inside onnxruntime;
the hashes are remembered by size and mtime (`sha256_cached`), so only the first open of a
bundle reads its gigabyte. `verify` re-hashes every file regardless.
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .examples import PromptFormat
from .io import atomic_write, atomic_write_json, read_json, sha256_file

FORMAT = "edgelora-bundle"
FORMAT_VERSION = 4  # 2: the scoring graph takes the examples packed (batch.pack); 3: it returns the
# target positions' hidden states, and the manifest says where the final norm and LM head lie (`head`);
# 4: it takes an adaption prompt and gate per layer (edgelora.adaption_prompt)
MANIFEST = "manifest.json"
BUILD_HINT = "build it with: edgelora-export base"


def home() -> Path:
    return Path(os.environ.get("EDGELORA_HOME", Path.home() / ".cache" / "edgelora"))


def default_bundle_path() -> Path:
    return home() / "bundles" / "smollm2-135m-instruct"


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def sha256_cached(path: Path) -> str:
    """sha256 of a file, remembered in EDGELORA_HOME under its path, size and mtime: a file that
    changes gets a new mtime, so it is hashed again. A cache that cannot be read or written is
    only slower."""
    path = path.resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    cache_file = home() / "sha256-cache.json"
    cache = _read_cache(cache_file)
    hit = cache.get(str(path))
    if isinstance(hit, list) and len(hit) == 3 and hit[:2] == stamp:
        return hit[2]
    digest = sha256_file(path)
    kept = {k: v for k, v in cache.items() if Path(k).is_file()}
    try:
        atomic_write(cache_file, json.dumps({**kept, str(path): [*stamp, digest]}))
    except OSError:
        pass
    return digest


def hash_files(root: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"sha256": sha256_file(root / n), "size": (root / n).stat().st_size} for n in sorted(names)}


def write_manifest(root: Path, manifest: dict) -> None:
    """(Re)hash every file in the bundle but the manifest itself, then write it atomically. Hidden
    paths are not the bundle's: the temporary files and folders of a write in progress."""
    names = [p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.is_file() and p.name != MANIFEST and not any(s.startswith(".") for s in p.relative_to(root).parts)]
    manifest = {**manifest, "files": hash_files(root, names)}
    atomic_write_json(root / MANIFEST, manifest)


# What the runtime reads from a manifest and the JSON type of each: a manifest is checked
# against this before anything in it is used, so a damaged one is one line, not a KeyError.
class Positive(int):
    """In a schema: an integer of at least 1 (a count or a size)."""


SCHEMA = {
    "base": {"name": str, "source": str, "model_type": str},
    "arch": {"layers": Positive, "max_len": Positive, "hidden": Positive, "heads": Positive, "kv_heads": Positive,
             "vocab": Positive},
    "files": dict, "targets": dict,
    "scoring": {"file": str},
    "head": {"file": str, "norm": dict, "lm_head": dict},
    "decoder": {"dir": str, "file": str, "weights": dict},
    "tokenizer": str,
    "prompt": {"head": str, "mid": str, "end": str, "next_user": str, "stop": str},
    "eos_ids": [int], "pad_id": int,
}
FILE_ENTRY = {"sha256": str, "size": int}
TARGET_ENTRY = {"in": Positive, "out": Positive, "path": str}
WEIGHT_ENTRY = {"name": str, "transposed": bool}
REBUILD = "rebuild the bundle with edgelora-export base"
# The bundle's adapter libraries and their folders: one LoRA per upstream task (what `edgelora-export
# base` installs), one per MBC cluster of those tasks (seed 001; `edgelora cluster`), and one
# adaption prompt per upstream task (seed 003; `adapt --kind adaption-prompt` composes it).
LIBRARIES = {"per-task": "loras", "mbc": "loras-mbc", "prompts": "adaption-prompts"}
LORA_LIBRARIES = ("per-task", "mbc")
KINDS = ("lora", "adaption-prompt")  # the adapter kinds: `edgelora-export train --kind`, `adapt --kind`
LIBRARY_HINT = {
    "per-task": "add LoRAs with edgelora-export lora",
    "mbc": "install the shipped one with edgelora-export base --mbc (the default base), or build one with "
           "edgelora cluster, then edgelora-export library TASKS_DIR -o DIR --clusters clusters.json --bundle BUNDLE",
    "prompts": "train one with edgelora-export library TASKS_DIR -o DIR --kind adaption-prompt --bundle BUNDLE",
}
JSON_TYPE = {str: "a string", int: "an integer", bool: "true or false", dict: "an object", list: "a list",
             Positive: "a positive integer"}


def is_json_type(value, want) -> bool:
    """Whether `value` is of the schema type `want`: a type of JSON_TYPE, or [type], a list of them."""
    if isinstance(want, list):
        return isinstance(value, list) and all(is_json_type(v, want[0]) for v in value)
    kind = int if want is Positive else want
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        return False
    return want is not Positive or value >= 1


def check_schema(obj: dict, schema: dict, where: Path, hint: str = REBUILD, prefix: str = "") -> None:
    """Every key of `schema` present in `obj` with its JSON type (nested dicts checked in turn;
    [type]: a list of that type; Positive: an integer of at least 1); `hint` says how to get a
    good file."""
    for key, want in schema.items():
        name = f"{prefix}{key}"
        if key not in obj:
            raise UserError(f"{where}: lacks {name}; {hint}")
        value = obj[key]
        if isinstance(want, dict):
            if not isinstance(value, dict):
                raise UserError(f"{where}: {name} must be {JSON_TYPE[dict]}; {hint}")
            check_schema(value, want, where, hint, f"{name}.")
        elif not is_json_type(value, want):
            what = f"a list of {JSON_TYPE[want[0]].split(' ', 1)[1]}s" if isinstance(want, list) else JSON_TYPE[want]
            raise UserError(f"{where}: {name} must be {what}; {hint}")


def check_entries(manifest: dict, where: Path) -> None:
    """The manifest's open-ended parts: every file entry, target and decoder weight."""
    for name, info in manifest["files"].items():
        check_schema(info if isinstance(info, dict) else {}, FILE_ENTRY, where, REBUILD, f"files.{name}.")
        if posixpath.isabs(name) or posixpath.normpath(name) != name or name.split("/")[0] == "..":
            raise UserError(f"{where}: file name {name!r} leaves the bundle folder")
    for m, info in manifest["targets"].items():
        check_schema(info if isinstance(info, dict) else {}, TARGET_ENTRY, where, REBUILD, f"targets.{m}.")
    for m, layers in manifest["decoder"]["weights"].items():
        if m not in manifest["targets"] or not isinstance(layers, list) or len(layers) != manifest["arch"]["layers"]:
            raise UserError(f"{where}: decoder.weights.{m} must list one weight per layer of a target")
        for i, info in enumerate(layers):
            check_schema(info if isinstance(info, dict) else {}, WEIGHT_ENTRY, where, REBUILD, f"decoder.weights.{m}.{i}.")
    d = manifest["decoder"]
    for name in (manifest["scoring"]["file"], manifest["tokenizer"], f"{d['dir']}/{d['file']}"):
        if name not in manifest["files"]:
            raise UserError(f"{where}: {name} is not among the manifest's hashed files")


def is_bundle(path: Path) -> bool:
    """Whether `path` holds an edgelora bundle (so a rebuild may replace it)."""
    try:
        return read_json(path / MANIFEST).get("format") == FORMAT
    except UserError:
        return False


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path | None = None, hashes: bool = True) -> "Bundle":
        """The bundle at `path` once its manifest and files check out; `hashes=False` checks
        sizes only, for `verify`, which re-hashes every file itself and lists each bad one."""
        path = Path(path) if path is not None else default_bundle_path()
        mpath = path / MANIFEST
        if not mpath.is_file():
            hint = BUILD_HINT if path == default_bundle_path() else f"{BUILD_HINT} -o {path}"
            raise UserError(f"{path}: not a bundle (no {MANIFEST}); {hint}")
        manifest = read_json(mpath)
        if manifest.get("format") != FORMAT:
            raise UserError(f"{mpath}: not an edgelora bundle manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{mpath}: bundle format {manifest.get('format_version')!r} is not supported "
                            f"(this edgelora reads {FORMAT_VERSION}); rebuild it with: edgelora-export base"
                            + ("" if path == default_bundle_path() else f" -o {path}"))
        check_schema(manifest, SCHEMA, mpath)
        check_entries(manifest, mpath)
        for name, info in manifest["files"].items():
            f = path / name
            if not f.is_file():
                raise UserError(f"{f}: missing (listed in {mpath})")
            if f.stat().st_size != info["size"]:
                raise UserError(f"{f}: has {f.stat().st_size} bytes, {mpath} says {info['size']}")
            if hashes and sha256_cached(f) != info["sha256"]:
                raise UserError(f"{f}: sha256 differs from {mpath}: the file was damaged or changed; rebuild the bundle")
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

    def head(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(final norm weight [d], LM head weight [V, d], norm eps), memory-mapped from the decoder's
        data file where the manifest says they lie: the surrogate search's numpy head."""
        h = self.manifest["head"]
        path, out = self.path / h["file"], []
        for key in ("norm", "lm_head"):
            ref = h[key]
            try:
                shape = tuple(int(x) for x in ref["shape"])
                a = np.memmap(path, np.float32, "r", int(ref["offset"]), shape)
            except (KeyError, TypeError, ValueError, OSError) as e:
                raise UserError(f"{self.path / MANIFEST}: head.{key} does not locate a tensor in {path} ({e}); "
                                f"{REBUILD}") from None
            out.append(a.T if ref.get("transposed") else a)
        return out[0], out[1], float(h.get("eps", 1e-5))

    def tokenizer(self):
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(self.path / self.manifest["tokenizer"]))

    def lora_paths(self, library: str = "per-task") -> dict[str, Path]:
        """The adapters of one of the bundle's libraries (LIBRARIES), by name; empty where the bundle has
        none. Only files the manifest lists: they are hashed like every other file."""
        if library not in LIBRARIES:
            raise UserError(f"--library {library}: choose one of {', '.join(LIBRARIES)}")
        folder = LIBRARIES[library] + "/"
        files = sorted(n for n in self.manifest["files"]
                       if n.startswith(folder) and n.endswith(".safetensors") and "/" not in n[len(folder):])
        return {Path(n).stem: self.path / n for n in files}

    def library(self, library: str) -> dict[str, Path]:
        """`lora_paths(library)`, refused with one line saying how to build it where it is empty."""
        paths = self.lora_paths(library)
        if not paths:
            raise UserError(f"{self.path}: the bundle has no {library} library ({LIBRARIES[library]}/); "
                            f"{LIBRARY_HINT[library]}")
        return paths
