"""LoRA tensors: the bundle's file format, COMPOSE (Σ w·A, Σ w·B) and the delta B·A.

A bundle LoRA stores, per target module, A stacked over layers as [L, r, in] and B as
[L, out, r]; `scale` (alpha / r) is kept apart and folded into B when LoRAs are stacked, so
the scoring graph computes plain x·Aᵀ·Bᵀ and every LoRA may have its own alpha.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from .errors import UserError
from .io import atomic_write, read_json

if TYPE_CHECKING:
    from .bundle import Bundle

# A LoRA's name is its file's stem in a bundle's library (`<name>.safetensors`) and in a trained
# library's folder: it must be a plain file name on every system.
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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


def check_name(name: str, what: str) -> str:
    """`name`, once it can name a LoRA's file; `what` says where it was given, in the error."""
    if not LORA_NAME.fullmatch(name):
        raise UserError(f"{what} {name!r}: use letters, digits, '_', '-' and '.'")
    return name


def save_lora(path: str | Path, lora: Lora, dtype=np.float16) -> None:
    """A and B at `dtype`, and Arrow's prototypes (fp32) of the values as stored, so a bundle
    ranks its library from one forward without touching A and B."""
    tensors = {}
    for m in lora.A:
        tensors[f"{m}.A"] = np.ascontiguousarray(lora.A[m], dtype=dtype)
        tensors[f"{m}.B"] = np.ascontiguousarray(lora.B[m], dtype=dtype)
    stored = Lora(lora.name, lora.rank, lora.alpha, {m: tensors[f"{m}.A"] for m in lora.A},
                  {m: tensors[f"{m}.B"] for m in lora.A})
    for m, v in prototypes(stored).items():
        tensors[f"{m}.proto"] = v
    atomic_write(path, save(tensors, metadata=lora.metadata()))


# What safetensors raises for a file it cannot read: damaged, truncated, a header that lies.
SAFETENSORS_ERRORS = (SafetensorError, OSError, ValueError, TypeError)


def unreadable(path: Path, e: Exception) -> UserError:
    reason = (str(e).splitlines() or [type(e).__name__])[0]
    return UserError(f"{path}: not a readable safetensors file ({reason})")


def read_adapter(path: Path, fmt: str, what: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, tensors) of a bundle adapter file of format `fmt`. A file that is damaged,
    truncated, lies about its offsets or is another format is a UserError naming it: safetensors
    only parses, it never runs code."""
    try:
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except SAFETENSORS_ERRORS as e:
        raise unreadable(path, e) from None
    if meta.get("format") != fmt:
        raise UserError(f"{path}: not an edgelora {what} (safetensors metadata lacks format={fmt})")
    return meta, tensors


def load_lora(path: str | Path) -> Lora:
    """Read a bundle LoRA (`read_adapter`)."""
    path = Path(path)
    meta, tensors = read_adapter(path, "edgelora-lora", "LoRA")
    try:
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
    except (KeyError, ValueError):
        raise UserError(f"{path}: its metadata needs an integer rank and a number alpha") from None
    if rank < 1 or not np.isfinite(alpha):
        raise UserError(f"{path}: rank {rank} and alpha {alpha} must be a positive integer and a finite number")
    weights = sorted(k for k in tensors if not k.endswith(".proto"))  # .proto: Arrow's prototypes
    mods = sorted({k.rsplit(".", 1)[0] for k in weights})
    if not mods or weights != sorted(f"{m}.{ab}" for m in mods for ab in "AB"):
        raise UserError(f"{path}: expected tensors <module>.A and <module>.B, found {', '.join(weights) or 'none'}")
    A = {m: tensors[f"{m}.A"].astype(np.float32) for m in mods}
    B = {m: tensors[f"{m}.B"].astype(np.float32) for m in mods}
    return Lora(meta.get("name", path.stem), rank, alpha, A, B, meta.get("source", ""))


def prototypes(lora: Lora) -> dict[str, np.ndarray]:
    """Arrow's prototype of each layer and module ([L, in] per module): the top right singular
    vector of ΔW = B·A, unit norm, sign arbitrary (routing uses |x·v|). Exact, from the thin
    factors: Aᵀ = QR, then the SVD of the small [out, r] core B·Rᵀ, so ΔW = U·S·(Q·V)ᵀ is never
    formed (peft's ArrowConfig gets the same vector by power iteration on Aᵀ(BᵀB)A)."""
    out = {}
    for m in lora.A:
        Q, R = np.linalg.qr(lora.A[m].astype(np.float64).transpose(0, 2, 1))  # [L, in, r], [L, r, r]
        _, _, Vt = np.linalg.svd(lora.B[m].astype(np.float64) @ R.transpose(0, 2, 1), full_matrices=False)
        out[m] = (Q @ Vt[:, 0, :, None])[..., 0].astype(np.float32)
    return out


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


def load_checked(paths: list[Path], bundle: Bundle) -> list[Lora]:
    """The LoRAs at `paths`, each refused with one line unless the bundle can take it."""
    loras = [load_lora(p) for p in paths]
    for lora, p in zip(loras, paths):
        check_compatible(lora, bundle.targets, bundle.arch["layers"], str(p))
    return loras


def pad_rank(A: np.ndarray, B: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A [..., r, in] and B [..., out, r] zero-padded to `rank`: the rows added to A meet zero
    columns of B, so B·A is unchanged, and LoRAs of different ranks stack into one array."""
    extra = rank - A.shape[-2]
    return (np.pad(A, [(0, 0)] * (A.ndim - 2) + [(0, extra), (0, 0)]),
            np.pad(B, [(0, 0)] * (B.ndim - 1) + [(0, extra)]))


COMPOSITIONS = ("cat", "lorahub")


class LoraStack:
    """The chosen LoRAs stacked once, so that COMPOSE writes into preallocated buffers (ranks
    zero-padded to the largest one). Two compositions:

    - "lorahub": A = Σ wᵢAᵢ, B = Σ wᵢBᵢ (element-wise, LoraHub's `get_score`): rank r, but ΔW
      is quadratic in w and carries the cross terms BᵢAⱼ.
    - "cat": the exact ΔW = Σ wᵢ·sᵢ·BᵢAᵢ (peft's `add_weighted_adapter(combination_type="cat")`):
      A is the LoRAs' A stacked [L, n·r, in] (fixed), B their wᵢ·sᵢ·Bᵢ side by side [L, out, n·r].
      ΔW is linear in w, which the surrogate search relies on, and equals LoraHub's at every
      single-LoRA point w = eᵢ, so the library ranking's forwards are points of both.
    """

    def __init__(self, loras: list[Lora], modules: list[str], compose: str = "lorahub"):
        if not loras:
            raise UserError("no LoRAs to compose: the bundle's library is empty; add some with edgelora-export lora")
        if compose not in COMPOSITIONS:
            raise UserError(f"--compose {compose}: choose one of {', '.join(COMPOSITIONS)}")
        self.names = [l.name for l in loras]
        self.rank = max(l.rank for l in loras)
        self.modules, self.mode = modules, compose
        n, r = len(loras), self.rank
        self._A, self._B, self.A, self.B = {}, {}, {}, {}
        for m in modules:
            ref = next((l for l in loras if m in l.A), None)
            if ref is None:  # check_compatible gives every LoRA every target; this is a LoRA it did not see
                raise UserError(f"none of the LoRAs {', '.join(self.names)} covers the target {m}")
            L, _, d_in = ref.A[m].shape
            d_out = ref.B[m].shape[1]
            A = np.zeros((n, L, r, d_in), np.float32)
            B = np.zeros((n, L, d_out, r), np.float32)
            for i, l in enumerate(loras):
                if m in l.A:
                    A[i], B[i] = pad_rank(l.A[m], l.B[m] * l.scale, r)
            if compose == "cat":
                self.A[m] = np.ascontiguousarray(A.transpose(1, 0, 2, 3).reshape(L, n * r, d_in))
                self._B[m] = np.ascontiguousarray(B.transpose(1, 2, 0, 3))  # [L, out, n, r]
                self.B[m] = np.empty((L, d_out, n * r), np.float32)
            else:
                self._A[m], self._B[m] = A.reshape(n, -1), B.reshape(n, -1)
                self.A[m] = np.empty((L, r, d_in), np.float32)
                self.B[m] = np.empty((L, d_out, r), np.float32)

    def compose(self, w: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The slot's A and B at weights w (scale folded into B), into reused buffers."""
        w = np.asarray(w, np.float32)
        for m in self.modules:
            if self.mode == "cat":
                np.multiply(self._B[m], w[:, None], out=self.B[m].reshape(self._B[m].shape))
            else:
                np.dot(w, self._A[m], out=self.A[m].reshape(-1))
                np.dot(w, self._B[m], out=self.B[m].reshape(-1))
        return self.A, self.B

    def slots(self, w: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], None]:
        """The scoring graph's slots at w: the LoRA, no adaption prompt. "cat" runs only the LoRAs
        with a weight: the slot's rank is r times those, not the stack's."""
        return (*(self.merged(w) if self.mode == "cat" else self.compose(w)), None)

    def merged(self, w: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Copies of A and B at w for the outputs. "cat" drops the LoRAs whose weight is 0, so the
        written adapter's rank is r times the LoRAs that contribute (the exact sum, no truncation)."""
        w = np.asarray(w, np.float32)
        A, B = self.compose(w)
        if self.mode != "cat":
            return {m: a.copy() for m, a in A.items()}, {m: b.copy() for m, b in B.items()}
        keep = np.flatnonzero(w) if np.any(w) else np.array([0])
        cols = (keep[:, None] * self.rank + np.arange(self.rank)).ravel()
        return ({m: np.ascontiguousarray(a[:, cols]) for m, a in A.items()},
                {m: np.ascontiguousarray(b[:, :, cols]) for m, b in B.items()})


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


PEFT_WEIGHT = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")


def pattern_value(patterns: dict, module: str, default):
    """peft's `get_pattern_key`: the value of the first pattern that matches the end of the module's
    name after a dot (a plain name such as `v_proj`, or a regex such as `layers.[0-3].self_attn.q_proj`)."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            continue
    return default


def peft_folder(folder: Path, what: str) -> tuple[dict, Path, Path]:
    """(adapter_config.json's contents, its path, adapter_model.safetensors' path) of a PEFT folder,
    refused in one line where either file is missing; `what` names the kind in that line."""
    cfg_path, st_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise UserError(f"{folder}: not a PEFT {what} folder (no {p.name})")
    return read_json(cfg_path), cfg_path, st_path


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors; a damaged one is a UserError naming it."""
    try:
        return load_file(path)
    except SAFETENSORS_ERRORS as e:
        raise unreadable(path, e) from None


def peft_settings(cfg: dict, cfg_path: Path) -> tuple[int, float, dict, dict, bool]:
    """(r, lora_alpha, rank_pattern, alpha_pattern, use_rslora) of an adapter_config.json, each
    checked; what a bundle LoRA cannot hold (biases, whole trained modules) refused by its field."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_path}: peft_type {cfg.get('peft_type')} is not a LoRA")
    if cfg.get("use_dora"):
        raise UserError(f"{cfg_path}: DoRA adapters cannot be composed as plain LoRAs")
    if cfg.get("bias", "none") not in (None, "none"):
        raise UserError(f"{cfg_path}: bias {cfg.get('bias')!r}: a LoRA that trains biases cannot be composed as B·A "
                        "(only bias \"none\")")
    if cfg.get("lora_bias"):
        raise UserError(f"{cfg_path}: lora_bias true: a bias on lora_B cannot be composed as B·A")
    if cfg.get("modules_to_save"):
        raise UserError(f"{cfg_path}: modules_to_save {cfg['modules_to_save']!r}: whole trained modules cannot be "
                        "composed as a LoRA")
    if cfg.get("trainable_token_indices"):
        raise UserError(f"{cfg_path}: trainable_token_indices: trained embedding rows cannot be composed as a LoRA")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not (isinstance(rank, int) and rank >= 1 and isinstance(alpha, (int, float)) and np.isfinite(alpha)):
        raise UserError(f"{cfg_path}: r must be a positive integer and lora_alpha a finite number")
    patterns = []
    for field, ok, want in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                             "positive integers"),
                            ("alpha_pattern", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                             and np.isfinite(v), "finite numbers")):
        value = cfg.get(field) or {}
        if not isinstance(value, dict) or not all(isinstance(k, str) and ok(v) for k, v in value.items()):
            raise UserError(f"{cfg_path}: {field} must map module names to {want}")
        patterns.append(value)
    return rank, float(alpha), patterns[0], patterns[1], bool(cfg.get("use_rslora"))


def from_peft(folder: str | Path, targets: dict[str, dict], layers: int, name: str | None = None) -> Lora:
    """Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) without torch.

    A module's rank and alpha are peft's: `rank_pattern` and `alpha_pattern` override r and
    lora_alpha per module name (one layer's, or every layer's), `use_rslora` scales by alpha/√r.
    Where every module has one rank and scale, the LoRA keeps them; otherwise it is written exactly
    at the largest rank (smaller ones zero-padded) with alpha = rank, each module's own scale folded
    into its B, so that B·A·scale is peft's merged ΔW everywhere."""
    folder = Path(folder)
    cfg, cfg_path, st_path = peft_folder(folder, "LoRA")
    rank, alpha, rank_pattern, alpha_pattern, rslora = peft_settings(cfg, cfg_path)
    tensors = load_tensors(st_path)
    for k in tensors:
        if not PEFT_WEIGHT.fullmatch(k):
            raise UserError(f"{st_path}: holds {k}, which is not a lora_A or lora_B weight (biases, modules_to_save "
                            "and embedding rows cannot be composed as a LoRA)")
    found = {PEFT_WEIGHT.fullmatch(k)["module"].rsplit(".", 1)[-1] for k in tensors}
    for m in sorted(found - set(targets)):
        raise UserError(f"{folder}: module {m} is not a LoRA target of this bundle "
                        f"(targets: {', '.join(targets)}); re-export the base with --targets")
    extra = [k for k in tensors if f".layers.{layers}." in k]
    if extra:
        raise UserError(f"{st_path}: has weights for layer {layers} ({extra[0]}), the bundle's base has {layers} layers")
    if not found:
        raise UserError(f"{st_path}: no LoRA weights (keys with .lora_A/.lora_B)")
    parts = {}  # (module, layer) -> (A [r, in], B [out, r], its rank, its alpha)
    for m in sorted(found):
        for i in range(layers):
            module = f"model.layers.{i}.{targets[m]['path']}"  # the name peft matches its patterns against
            ka, kb = PEFT_KEY.format(layer=i, path=targets[m]["path"], ab="A"), PEFT_KEY.format(layer=i, path=targets[m]["path"], ab="B")
            if ka not in tensors or kb not in tensors:
                raise UserError(f"{st_path}: no {m} LoRA for layer {i} (key {ka}); the bundle's base has {layers} layers")
            a, b = tensors[ka].astype(np.float32), tensors[kb].astype(np.float32)
            r = pattern_value(rank_pattern, module, rank)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
                raise UserError(f"{st_path}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, where "
                                f"{cfg_path.name} gives it rank {r} (r, rank_pattern)")
            parts[m, i] = a, b, r, float(pattern_value(alpha_pattern, module, alpha))
    settings = {(r, al) for _, _, r, al in parts.values()}
    A, B = {}, {}
    try:
        if len(settings) == 1:  # one rank and alpha everywhere: kept as they are
            rank, out_alpha = settings.pop()
            out_alpha = out_alpha * rank ** 0.5 if rslora else out_alpha  # keep scale = alpha / √r
            for m in sorted(found):
                A[m] = np.stack([parts[m, i][0] for i in range(layers)])
                B[m] = np.stack([parts[m, i][1] for i in range(layers)])
        else:  # per-module ranks or alphas: the largest rank, zero-padded, each module's scale folded into B
            rank = max(r for r, _ in settings)
            out_alpha = float(rank)
            for m in sorted(found):
                padded = [pad_rank(a, b * (al / (r ** 0.5 if rslora else r)), rank)
                          for a, b, r, al in (parts[m, i] for i in range(layers))]
                A[m] = np.stack([a for a, _ in padded])
                B[m] = np.stack([b for _, b in padded])
    except ValueError:
        raise UserError(f"{st_path}: {m} has different shapes in different layers") from None
    lora = Lora(name or folder.name, rank, out_alpha, A, B, source=cfg.get("base_model_name_or_path") or str(folder))
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
