"""LoRA tensors: the bundle's file format, COMPOSE (Σ w·A, Σ w·B) and the delta B·A.

A bundle LoRA stores, per target module, A stacked over layers as [L, r, in] and B as
[L, out, r]; `scale` (alpha / r) is kept apart and folded into B when LoRAs are stacked, so
the scoring graph computes plain x·Aᵀ·Bᵀ and every LoRA may have its own alpha.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from .errors import UserError
from .io import atomic_write, read_json


@dataclass
class Lora:
    name: str
    rank: int
    alpha: float
    A: dict[str, np.ndarray]  # module -> [L, r, in]
    B: dict[str, np.ndarray]  # module -> [L, out, r]
    source: str = ""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def metadata(self) -> dict[str, str]:
        return {"format": "edgelora-lora", "name": self.name, "rank": str(self.rank),
                "alpha": repr(float(self.alpha)), "source": self.source}


def save_lora(path: str | Path, lora: Lora, dtype=np.float16) -> None:
    tensors = {}
    for m in lora.A:
        tensors[f"{m}.A"] = np.ascontiguousarray(lora.A[m], dtype=dtype)
        tensors[f"{m}.B"] = np.ascontiguousarray(lora.B[m], dtype=dtype)
    atomic_write(path, save(tensors, metadata=lora.metadata()))


def load_lora(path: str | Path) -> Lora:
    """Read a bundle LoRA. A file that is damaged, truncated, lies about its offsets or is not an
    edgelora LoRA is a UserError naming it: safetensors only parses, it never runs code."""
    path = Path(path)
    try:
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: not a readable safetensors file ({reason})") from None
    if meta.get("format") != "edgelora-lora":
        raise UserError(f"{path}: not an edgelora LoRA (safetensors metadata lacks format=edgelora-lora)")
    try:
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
    except (KeyError, ValueError):
        raise UserError(f"{path}: its metadata needs an integer rank and a number alpha") from None
    if rank < 1 or not np.isfinite(alpha):
        raise UserError(f"{path}: rank {rank} and alpha {alpha} must be a positive integer and a finite number")
    mods = sorted({k.rsplit(".", 1)[0] for k in tensors})
    if not mods or sorted(tensors) != sorted(f"{m}.{ab}" for m in mods for ab in "AB"):
        raise UserError(f"{path}: expected tensors <module>.A and <module>.B, found {', '.join(sorted(tensors)) or 'none'}")
    A = {m: tensors[f"{m}.A"].astype(np.float32) for m in mods}
    B = {m: tensors[f"{m}.B"].astype(np.float32) for m in mods}
    return Lora(meta.get("name", path.stem), rank, alpha, A, B, meta.get("source", ""))


def check_compatible(lora: Lora, targets: dict[str, dict], layers: int, where: str) -> None:
    """Refuse a LoRA whose modules, shapes or values the bundle cannot take, naming module and
    shapes. A target the LoRA does not cover (a PEFT LoRA on q_proj only) gets zero A and B: that
    module stays as the base has it, and every LoRA of a stack covers every target."""
    for m in lora.A:
        if m not in targets:
            raise UserError(f"{where}: module {m} is not a LoRA target of this bundle "
                            f"(targets: {', '.join(targets)}); re-export the base with --targets")
        want_a = (layers, lora.rank, targets[m]["in"])
        want_b = (layers, targets[m]["out"], lora.rank)
        if lora.A[m].shape != want_a or lora.B[m].shape != want_b:
            raise UserError(f"{where}: {m} has A {tuple(lora.A[m].shape)} and B {tuple(lora.B[m].shape)}, "
                            f"the bundle needs A {want_a} and B {want_b}: a LoRA made for another base?")
        if not (np.isfinite(lora.A[m]).all() and np.isfinite(lora.B[m]).all()):
            raise UserError(f"{where}: {m} holds NaN or infinite values")
    for m, t in targets.items():
        if m not in lora.A:
            lora.A[m] = np.zeros((layers, lora.rank, t["in"]), np.float32)
            lora.B[m] = np.zeros((layers, t["out"], lora.rank), np.float32)


class LoraStack:
    """The chosen LoRAs stacked once, so that COMPOSE is one matrix-vector product per module
    written into preallocated buffers (ranks zero-padded to the largest one)."""

    def __init__(self, loras: list[Lora], modules: list[str]):
        if not loras:
            raise UserError("no LoRAs to compose: the bundle's library is empty; add some with edgelora-export lora")
        self.names = [l.name for l in loras]
        self.rank = max(l.rank for l in loras)
        self.modules = modules
        n = len(loras)
        self._A, self._B, self.A, self.B = {}, {}, {}, {}
        for m in modules:
            ref = next((l for l in loras if m in l.A), None)
            if ref is None:  # check_compatible gives every LoRA every target; this is a LoRA it did not see
                raise UserError(f"none of the LoRAs {', '.join(self.names)} covers the target {m}")
            L, _, d_in = ref.A[m].shape
            d_out = ref.B[m].shape[1]
            A = np.zeros((n, L, self.rank, d_in), np.float32)
            B = np.zeros((n, L, d_out, self.rank), np.float32)
            for i, l in enumerate(loras):
                if m in l.A:
                    A[i, :, : l.rank] = l.A[m]
                    B[i, :, :, : l.rank] = l.B[m] * l.scale
            self._A[m], self._B[m] = A.reshape(n, -1), B.reshape(n, -1)
            self.A[m] = np.empty((L, self.rank, d_in), np.float32)
            self.B[m] = np.empty((L, d_out, self.rank), np.float32)

    def compose(self, w: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """A = Σ wᵢ Aᵢ and B = Σ wᵢ Bᵢ (element-wise, as LoraHub does), into reused buffers."""
        w = np.asarray(w, np.float32)
        for m in self.modules:
            np.dot(w, self._A[m], out=self.A[m].reshape(-1))
            np.dot(w, self._B[m], out=self.B[m].reshape(-1))
        return self.A, self.B


def zero_slots(targets: dict[str, dict], layers: int, rank: int = 1):
    """A LoRA slot that adds nothing: the plain base model."""
    A = {m: np.zeros((layers, rank, t["in"]), np.float32) for m, t in targets.items()}
    B = {m: np.zeros((layers, t["out"], rank), np.float32) for m, t in targets.items()}
    return A, B


def delta(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """ΔW = B·A per layer ([L, out, in]); the scale is already in B."""
    return np.matmul(B, A)


# -- PEFT's layout: what `peft` loads, and what other tools hand us -----------------------
PEFT_KEY = "base_model.model.model.layers.{layer}.{path}.lora_{ab}.weight"


def from_peft(folder: str | Path, targets: dict[str, dict], layers: int, name: str | None = None) -> Lora:
    """Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) without torch."""
    folder = Path(folder)
    cfg_path, st_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise UserError(f"{folder}: not a PEFT LoRA folder (no {p.name})")
    cfg = read_json(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_path}: peft_type {cfg.get('peft_type')} is not a LoRA")
    if cfg.get("use_dora"):
        raise UserError(f"{cfg_path}: DoRA adapters cannot be composed as plain LoRAs")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not (isinstance(rank, int) and rank >= 1 and isinstance(alpha, (int, float)) and np.isfinite(alpha)):
        raise UserError(f"{cfg_path}: r must be a positive integer and lora_alpha a finite number")
    alpha = float(alpha)
    if cfg.get("use_rslora"):
        alpha = alpha * rank ** 0.5  # keep scale = alpha / r
    try:
        tensors = load_file(st_path)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{st_path}: not a readable safetensors file ({reason})") from None
    found = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors if ".lora_" in k}
    for m in sorted(found - set(targets)):
        raise UserError(f"{folder}: module {m} is not a LoRA target of this bundle "
                        f"(targets: {', '.join(targets)}); re-export the base with --targets")
    extra = [k for k in tensors if f".layers.{layers}." in k]
    if extra:
        raise UserError(f"{st_path}: has weights for layer {layers} ({extra[0]}), the bundle's base has {layers} layers")
    A, B = {}, {}
    for m in sorted(found):
        path = targets[m]["path"]
        a, b = [], []
        for i in range(layers):
            ka, kb = PEFT_KEY.format(layer=i, path=path, ab="A"), PEFT_KEY.format(layer=i, path=path, ab="B")
            if ka not in tensors or kb not in tensors:
                raise UserError(f"{st_path}: no {m} LoRA for layer {i} (key {ka}); the bundle's base has {layers} layers")
            a.append(tensors[ka]), b.append(tensors[kb])
        try:
            A[m], B[m] = np.stack(a).astype(np.float32), np.stack(b).astype(np.float32)
        except ValueError:
            raise UserError(f"{st_path}: {m} has different shapes in different layers") from None
    if not A:
        raise UserError(f"{st_path}: no LoRA weights (keys with .lora_A/.lora_B)")
    lora = Lora(name or folder.name, rank, alpha, A, B, source=cfg.get("base_model_name_or_path") or str(folder))
    check_compatible(lora, targets, layers, str(folder))
    return lora


def to_peft(folder: str | Path, A: dict[str, np.ndarray], B: dict[str, np.ndarray], targets: dict[str, dict],
            base_name: str) -> None:
    """Write A/B (scale already in B) as a PEFT folder: alpha = r keeps PEFT's scale at 1."""
    folder = Path(folder)
    rank = next(iter(A.values())).shape[1]
    tensors = {}
    for m in A:
        for i in range(A[m].shape[0]):
            tensors[PEFT_KEY.format(layer=i, path=targets[m]["path"], ab="A")] = np.ascontiguousarray(A[m][i])
            tensors[PEFT_KEY.format(layer=i, path=targets[m]["path"], ab="B")] = np.ascontiguousarray(B[m][i])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "target_modules": sorted(A), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "base_model_name_or_path": base_name, "use_rslora": False, "use_dora": False}
    atomic_write(folder / "adapter_model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")
