"""The adapt output folder, both ways. Written by `adapt`: weights.json (the search's result),
the merged adapter in PEFT's layout, a loss-curve SVG and the adapted model with its
edgelora.json, the folder built aside and swapped in whole. Read back by `generate` and `eval`
(the model, once edgelora.json vouches for it) and by `export` and `eval` (weights.json).

onnx is imported only where a model is written: what reads a folder starts without it.
"""
from __future__ import annotations

import platform
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from .bundle import Bundle, Positive, check_schema, sha256_cached
from .errors import UserError
from .examples import Example, parse_example
from .io import atomic_write, atomic_write_json, building, check_replaceable, read_json, sha256_file
from . import adaption_prompt
from .lora import to_peft, zero_slots
from .recipe import deployed

if TYPE_CHECKING:
    from .search import AdaptResult

WEIGHTS = "weights.json"  # the search's result: the weights found, the history, the settings
WEIGHTS_KEYS = {"weights", "history", "settings"}  # what every adapt output's weights.json holds
MODEL_META = "edgelora.json"  # the model's: prompt format, stop ids, sha256s; what generate and eval read
# The model's weights (`adapt --quant`): fp32, or int8 or int4 weight-only. The default, int4 with the
# LoRA's targets at 8 bits (writeback.py), was chosen by bench/results/quant_accuracy.md; onnxruntime's
# dynamic int8 (activations quantized per tensor) broke generation.
QUANTS = ("none", "int8", "int4")
DEFAULT_QUANT = "int4"
# A model's weights lie in model.onnx.data beside it, never inside model.onnx: protobuf cannot
# write 2 GB (a ~500M-parameter base in fp32), and onnxruntime maps an external file where it
# copies a protobuf's tensors, so decoding the int4 model peaks ~30 MB lower
# (bench/results/generate.json).
DATA_FILE = "model.onnx.data"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "machine": platform.machine(), "cpu": platform.processor()}
    for pkg in ("edgelora", "onnxruntime", "numpy", "scipy", "tokenizers", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def weights_json(result: AdaptResult, bundle: Bundle) -> dict:
    return {
        "weights": dict(zip(result.loras, [round(float(w), 6) for w in result.weights])),
        "loss": result.loss, "objective": result.objective, "start_loss": result.start_loss,
        "evaluations": len(result.history), "forwards": result.settings["forwards"], "stop": result.stop,
        "interrupted": result.interrupted, "seconds": round(result.seconds, 2),
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "settings": result.settings, "versions": versions(),
        **({"surrogate": result.surrogate} if result.surrogate else {}),
        **({"recipe": result.recipe} if result.recipe else {}),
        "bundle": {"path": str(bundle.path), "manifest_sha256": sha256_file(bundle.path / "manifest.json"),
                   "base": bundle.manifest["base"]["name"]},
        "history": [{"loss": e.loss, "objective": e.objective, "seconds": round(e.seconds, 4),
                     "weights": [round(w, 6) for w in e.weights]} for e in result.history],
    }


def loss_curve_svg(result: AdaptResult, width: int = 640, height: int = 360) -> str:
    """Each evaluation's objective (dots) and the best so far (line): a picture anyone can open."""
    ys = [e.objective for e in result.history]
    best, run = [], float("inf")
    for y in ys:
        run = min(run, y)
        best.append(run)
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1e-6
    pad = 50
    X = lambda i: pad + (width - 2 * pad) * (i / max(len(ys) - 1, 1))
    Y = lambda v: height - pad - (height - 2 * pad) * (v - lo) / (hi - lo)
    dots = "".join(f'<circle cx="{X(i):.1f}" cy="{Y(v):.1f}" r="2.5" fill="#9db4d6"/>' for i, v in enumerate(ys))
    line = " ".join(f"{X(i):.1f},{Y(v):.1f}" for i, v in enumerate(best))
    ticks = "".join(f'<text x="{pad - 6}" y="{Y(v) + 4:.1f}" text-anchor="end" font-size="11">{v:.3f}</text>'
                    for v in (lo, (lo + hi) / 2, hi))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
            f'<rect width="100%" height="100%" fill="white"/>'
            f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">LoraHub search: loss + L1 '
            f'({result.settings["optimizer"]}, {len(ys)} evaluations)</text>'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#444"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#444"/>{ticks}'
            f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle" font-size="11">evaluation</text>'
            f'{dots}<polyline points="{line}" fill="none" stroke="#c0392b" stroke-width="2"/></svg>\n')


def check_out(out: Path) -> None:
    """Refuse an --out that is not empty and not an adapt output: it would be replaced whole."""
    check_replaceable(out, is_adapt_output, "--out")


# What the search's result is, in an adapt output: written first, and kept when the model is not.
RESULT_FILES = ("adapter", "loss_curve.svg", WEIGHTS)
NO_MODEL = "it holds the search's result (weights.json, adapter/, loss_curve.svg) without a model"


def write_result(result: AdaptResult, bundle: Bundle, out: Path) -> tuple[dict, dict] | adaption_prompt.AdaptionPrompt:
    """The search's result (RESULT_FILES) built aside and swapped in whole for `out`, before any
    model is written: an interrupted or failed write-back cannot lose it. Returns the composed
    adapter: the merged A, B, or the adaption prompt."""
    check_out(out)
    composed = result.merged()
    with building(out) as tmp:
        if isinstance(composed, adaption_prompt.AdaptionPrompt):
            adaption_prompt.to_peft(tmp / "adapter", composed, bundle.arch, bundle.manifest["base"]["name"])
        else:
            to_peft(tmp / "adapter", *composed, bundle.targets, bundle.manifest["base"]["name"])
        atomic_write(tmp / "loss_curve.svg", loss_curve_svg(result))
        atomic_write_json(tmp / WEIGHTS, weights_json(result, bundle))
    return composed


def model_slots(bundle: Bundle, composed: tuple[dict, dict] | adaption_prompt.AdaptionPrompt, adapted: bool = True):
    """What a written model carries, as (A, B, prompt) for write_model: the composed LoRA; or a zero
    LoRA, so that its targets are at 8 bits as in every adapt model, with the composed adaption
    prompt, or (`adapted` False: a recipe on the base) with nothing."""
    if adapted and not isinstance(composed, adaption_prompt.AdaptionPrompt):
        return (*composed, None)
    return (*zero_slots(bundle.targets, bundle.arch["layers"]), composed if adapted else None)


def write_adapted_model(bundle: Bundle, composed: tuple[dict, dict] | adaption_prompt.AdaptionPrompt, out: Path,
                        quant: str, recipe: dict | None = None) -> None:
    """The recipe's model beside the result `write_result` put in `out`: the result's files copied
    into a folder built aside, the model written there, and that swapped in whole. Whatever stops
    it (Ctrl-C, a kill, a full disk, a bug), `out` is the result without a model or all of it.
    A recipe on the base model writes the base (at `quant`, its LoRA targets at 8 bits as in an
    adapted model; the searched adapter stays in adapter/); an adaption prompt goes into the
    decoder beside a zero LoRA (so its targets are at 8 bits too);
    one with shots puts them in edgelora.json, where generate and eval read them."""
    from .writeback import write_model
    adapted, shots = deployed(recipe)
    with building(out, failed=NO_MODEL) as tmp:
        for name in RESULT_FILES:
            src = out / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            else:
                shutil.copy2(src, tmp / name)
        # the base as the adapted models are written (q/v at 8 bits): at 4 bits it lost most of its
        # ICL accuracy (linguistic_mappings_plural_regular_json, 20 examples: fp32 70%, int4 10%, this 50%)
        A, B, prompt = model_slots(bundle, composed, adapted)
        lora = {} if adapted and prompt is None else {"lora": None}
        meta = {**({} if recipe is None else {"recipe": recipe["choice"], "shots": shots}), **lora} or None
        write_model(bundle, A, B, tmp, quant, weights_sha256=sha256_file(tmp / WEIGHTS), meta=meta, prompt=prompt)


def write_outputs(result: AdaptResult, bundle: Bundle, out: Path, quant: str | None = None) -> None:
    """The search's result, swapped in, then (`quant` not None) the adapted model beside it in a
    second swap, so `out` is never a new weights.json beside an older model: after a kill or a
    full disk it is the previous output, the new result without a model, or the whole new one.
    `quant` None writes no model (--no-model, or an interrupted search)."""
    composed = write_result(result, bundle, out)
    if quant:
        write_adapted_model(bundle, composed, out, quant, result.recipe)


def summary_table(result: AdaptResult, top: int = 10) -> str:
    order = sorted(range(len(result.loras)), key=lambda i: -abs(result.weights[i]))[:top]
    width = max(len(result.loras[i]) for i in order)
    what = "adapter" if result.settings.get("kind", "lora") != "lora" else "LoRA"
    width = max(width, len(what))
    lines = [f"{what:<{width}}  weight", f"{'-' * width}  ------"]
    lines += [f"{result.loras[i]:<{width}}  {result.weights[i]:+.3f}" for i in order]
    return "\n".join(lines)


# -- reading an output folder -----------------------------------------------------------------
def read_weights(folder: Path) -> dict:
    """`folder`'s weights.json, refused with one line unless it is an adapt output's (WEIGHTS_KEYS):
    the one reader of the search's result, for export, eval and a new run's --out."""
    try:
        weights = read_json(folder / WEIGHTS)
    except UserError:
        weights = {}
    if not WEIGHTS_KEYS <= weights.keys():
        raise UserError(f"{folder}: not an `edgelora adapt` output (no {WEIGHTS} with weights, history and settings)")
    return weights


def is_adapt_output(folder: Path) -> bool:
    """Whether `folder` holds an `edgelora adapt` output, which a new run may replace."""
    try:
        read_weights(folder)
    except UserError:
        return False
    return True


# What `generate` and `eval` read from edgelora.json, and the JSON type of each.
MODEL_SCHEMA = {"prompt": {"head": str, "mid": str, "end": str, "next_user": str, "stop": str},
                "eos_ids": [int], "pad_id": int, "max_len": Positive, "tokenizer": str, "model_sha256": str}


def check_model(folder: Path) -> dict:
    """edgelora.json of an adapt output, once its model.onnx is the one it names (sha256, cached
    by size and mtime) and, where weights.json is beside it, was made from that weights.json:
    a model never runs beside weights it does not hold."""
    meta_path = folder / MODEL_META
    meta = read_json(meta_path)
    check_schema(meta, MODEL_SCHEMA, meta_path, "re-run edgelora adapt to rewrite the model")
    if Path(meta["tokenizer"]).name != meta["tokenizer"]:
        raise UserError(f"{meta_path}: tokenizer {meta['tokenizer']!r} is not a file of this folder")
    model = folder / "model.onnx"
    if not model.is_file():
        raise UserError(f"{model}: missing; re-run edgelora adapt to rewrite the model")
    for path, key in ((model, "model_sha256"), (folder / DATA_FILE, "data_sha256")):
        if meta.get(key) is None:
            continue
        if not path.is_file():
            raise UserError(f"{path}: missing; re-run edgelora adapt to rewrite the model")
        if sha256_cached(path) != meta[key]:
            raise UserError(f"{path}: sha256 differs from {meta_path} (damaged or replaced); re-run edgelora adapt")
    weights = folder / WEIGHTS
    if weights.is_file() and sha256_file(weights) != meta.get("weights_sha256"):
        raise UserError(f"{model}: made from other weights than {weights}; re-run edgelora adapt to rewrite the model")
    return meta


def recipe_shots(meta: dict, folder: Path) -> list[Example]:
    """The examples an adapt output's recipe prompts with (edgelora.json's `shots`), checked as
    an examples file's lines are."""
    shots = meta.get("shots", [])
    where = folder / MODEL_META
    if not isinstance(shots, list):
        raise UserError(f"{where}: 'shots' must be a list of examples; re-run edgelora adapt to rewrite it")
    return [parse_example(s, f"{where}: shots[{i}]") for i, s in enumerate(shots)]
