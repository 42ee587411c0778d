"""LLaMA-Adapter's adaption prompts (seed 003): the second adapter kind, its file and PEFT's.

In each of the top `layers` decoder layers, `length` learned vectors (the prompt, [length, hidden])
are projected by the layer's own k_proj and v_proj, without positions; every token's query attends
to them in a softmax of their own, and the result, times the layer's gate, goes through o_proj and
is added to the attention's output. The gate starts at zero, so an untrained adapter is the base
model exactly. This is peft's `AdaptionPromptConfig(adapter_len, adapter_layers)` (one scalar gate
per layer, as peft has it; the paper's code gates each head).

A bundle adapter is `<name>.safetensors` holding `prompt` [layers, length, hidden] and `gate`
[layers], the top layers in order, with metadata format=edgelora-adaption-prompt.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from .errors import UserError
from .io import atomic_write
from .lora import load_tensors, peft_folder, read_adapter

FORMAT = "edgelora-adaption-prompt"
# peft's keys, as save_pretrained writes them
PEFT_KEY = re.compile(r"base_model\.model\.model\.layers\.(?P<layer>\d+)\.self_attn\.adaption_(?P<what>prompt|gate)")


@dataclass
class AdaptionPrompt:
    name: str
    prompt: np.ndarray  # [layers, length, hidden]: the top `layers` layers of the base, in order
    gate: np.ndarray    # [layers]
    source: str = ""

    @property
    def layers(self) -> int:
        return self.prompt.shape[0]

    @property
    def length(self) -> int:
        return self.prompt.shape[1]


def check(ap: AdaptionPrompt, arch: dict, where: str) -> AdaptionPrompt:
    """Refuse, in one line, an adapter the base cannot take: its width, its depth, its values."""
    if ap.prompt.ndim != 3 or ap.gate.shape != (ap.prompt.shape[0],) or ap.layers < 1 or ap.length < 1:
        raise UserError(f"{where}: expected prompt [layers, length, hidden] and gate [layers], found prompt "
                        f"{tuple(ap.prompt.shape)} and gate {tuple(ap.gate.shape)}")
    if ap.prompt.shape[2] != arch["hidden"] or ap.layers > arch["layers"]:
        raise UserError(f"{where}: prompts of width {ap.prompt.shape[2]} in {ap.layers} layers; the base has width "
                        f"{arch['hidden']} and {arch['layers']} layers: an adapter made for another base?")
    if not (np.isfinite(ap.prompt).all() and np.isfinite(ap.gate).all()):
        raise UserError(f"{where}: holds NaN or infinite values")
    return ap


def save_prompt(path: str | Path, ap: AdaptionPrompt, dtype=np.float16) -> None:
    """The prompts at `dtype`; the gates at fp32 (a few numbers, each scaling a whole layer's term)."""
    tensors = {"prompt": np.ascontiguousarray(ap.prompt, dtype=dtype), "gate": np.ascontiguousarray(ap.gate, np.float32)}
    meta = {"format": FORMAT, "name": ap.name, "layers": str(ap.layers), "length": str(ap.length), "source": ap.source}
    atomic_write(path, save(tensors, metadata=meta))


def load_prompt(path: str | Path) -> AdaptionPrompt:
    """A bundle adapter; anything else (damaged, another format) a UserError naming the file."""
    path = Path(path)
    meta, tensors = read_adapter(path, FORMAT, "adaption prompt")
    if sorted(tensors) != ["gate", "prompt"]:
        raise UserError(f"{path}: expected tensors prompt and gate, found {', '.join(sorted(tensors)) or 'none'}")
    return AdaptionPrompt(meta.get("name", path.stem), tensors["prompt"].astype(np.float32),
                          tensors["gate"].astype(np.float32), meta.get("source", ""))


def from_peft(folder: str | Path, arch: dict, name: str | None = None) -> AdaptionPrompt:
    """A PEFT adaption-prompt folder (adapter_config.json + adapter_model.safetensors), without torch."""
    folder = Path(folder)
    cfg, cfg_path, st_path = peft_folder(folder, "adapter")
    if cfg.get("peft_type") != "ADAPTION_PROMPT":
        raise UserError(f"{cfg_path}: peft_type {cfg.get('peft_type')} is not ADAPTION_PROMPT")
    n, length = cfg.get("adapter_layers"), cfg.get("adapter_len")
    if not (isinstance(n, int) and isinstance(length, int) and 1 <= n <= arch["layers"] and length >= 1):
        raise UserError(f"{cfg_path}: adapter_layers must be 1..{arch['layers']} and adapter_len at least 1")
    tensors = load_tensors(st_path)
    parts: dict[tuple[int, str], np.ndarray] = {}
    for k, v in tensors.items():
        m = PEFT_KEY.fullmatch(k)
        if not m:
            raise UserError(f"{st_path}: holds {k}, which is not an adaption prompt or gate")
        parts[int(m["layer"]), m["what"]] = v.astype(np.float32)
    top = range(arch["layers"] - n, arch["layers"])  # peft adapts the top adapter_layers layers
    missing = [f"layer {i} {w}" for i in top for w in ("prompt", "gate") if (i, w) not in parts]
    if missing or len(parts) != 2 * n:
        raise UserError(f"{st_path}: expected a prompt and a gate in each of layers {top.start}..{top.stop - 1}"
                        + (f"; missing {missing[0]}" if missing else "; found others"))
    try:
        prompt = np.stack([parts[i, "prompt"].reshape(length, -1) for i in top])
        gate = np.array([parts[i, "gate"].reshape(()) for i in top], np.float32)
    except ValueError:
        raise UserError(f"{st_path}: a prompt that is not [1, {length}, hidden] or a gate that is not one number") from None
    return check(AdaptionPrompt(name or folder.name, prompt, gate, cfg.get("base_model_name_or_path") or str(folder)),
                 arch, str(folder))


def to_peft(folder: str | Path, ap: AdaptionPrompt, arch: dict, base_name: str) -> None:
    """`ap` as a PEFT folder that `PeftModel.from_pretrained` loads as AdaptionPromptConfig."""
    folder = Path(folder)
    first = arch["layers"] - ap.layers
    tensors = {}
    for k in range(ap.layers):
        key = f"base_model.model.model.layers.{first + k}.self_attn.adaption_"
        tensors[key + "prompt"] = np.ascontiguousarray(ap.prompt[k][None], np.float32)
        tensors[key + "gate"] = np.ascontiguousarray(ap.gate[k:k + 1], np.float32)
    config = {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": ap.length,
              "adapter_layers": ap.layers, "target_modules": "self_attn", "inference_mode": True,
              "base_model_name_or_path": base_name}
    atomic_write(folder / "adapter_model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")


def load_checked_prompts(paths: list[Path], arch: dict) -> list[AdaptionPrompt]:
    """The adaption prompts at `paths`, each refused with one line unless the base can take it."""
    return [check(load_prompt(p), arch, str(p)) for p in paths]


class PromptStack:
    """The chosen adaption prompts stacked once, for LoraHub's composition over them: the prompts
    and the gates each summed with the weights, P(w) = Σ wᵢPᵢ and g(w) = Σ wᵢgᵢ. At w = eᵢ this
    is adapter i exactly (the library ranking's points); between them it is not their outputs'
    sum (the gate scales a softmax over the prompt), as LoraHub's A and B sums are not ΔW's."""

    def __init__(self, prompts: list[AdaptionPrompt]):
        if not prompts:
            raise UserError("no adaption prompts to compose: the bundle's prompt library is empty; train one with "
                            "edgelora-export library TASKS_DIR --kind adaption-prompt --bundle BUNDLE")
        ref = prompts[0]
        for p in prompts:
            if p.prompt.shape != ref.prompt.shape:
                raise UserError(f"{p.name}: {p.length} prompt tokens in {p.layers} layers, but {ref.name} has "
                                f"{ref.length} in {ref.layers}: composed prompts must share adapter_len and adapter_layers")
        self.names = [p.name for p in prompts]
        self.P = np.stack([p.prompt for p in prompts]).reshape(len(prompts), -1)
        self.G = np.stack([p.gate for p in prompts])
        self.shape = ref.prompt.shape

    def compose(self, w: np.ndarray) -> AdaptionPrompt:
        w = np.asarray(w, np.float32)
        return AdaptionPrompt("composed", (w @ self.P).reshape(self.shape), w @ self.G)

    def slots(self, w: np.ndarray) -> tuple[None, None, AdaptionPrompt]:
        """The scoring graph's slots at w: no LoRA, the composed prompt."""
        return None, None, self.compose(w)

    merged = compose  # what the outputs write: a new array each call


def slot_feeds(ap: AdaptionPrompt | None, arch: dict) -> dict[str, np.ndarray]:
    """The scoring graph's prompt inputs for every layer: `ap` in its top layers and gate 0 below;
    None, the base model (one zero token at gate 0: the term is exactly zero)."""
    L, d = arch["layers"], arch["hidden"]
    prompt = np.zeros((L, ap.length if ap else 1, d), np.float32)
    gate = np.zeros(L, np.float32)
    if ap is not None:
        prompt[L - ap.layers:], gate[L - ap.layers:] = ap.prompt, ap.gate
    return {"adaption_prompt": prompt, "adaption_gate": gate}
