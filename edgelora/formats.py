"""`edgelora export`: an adapt output's merged LoRA in the formats other runtimes load.

- `peft`: transformers + peft (`PeftModel.from_pretrained` on the base);
- `gguf`: a llama.cpp LoRA adapter, as its `convert_lora_to_gguf.py` writes one
  (`llama-cli -m BASE.gguf --lora FILE`, the server's `--lora-scaled FILE:SCALE`);
- `onnx-adapter`: an onnxruntime `.onnx_adapter`, named as onnxruntime-genai's model builder
  names the LoRA weights of a model built with `adapter_path` (`og.Adapters`).

Each holds the same A and B with the search's scale folded into B and alpha = rank, so every
runtime applies it at scale 1: the adapted model, unmerged.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import __version__
from .bundle import Bundle
from .errors import UserError
from .io import building, check_file_replaceable, check_replaceable, writing
from .lora import from_peft, to_peft
from .outputs import WEIGHTS, read_weights

FORMATS = ("peft", "gguf", "onnx-adapter")
# the default -o, beside the adapt output: FOLDER-peft/, FOLDER-lora.gguf, FOLDER.onnx_adapter
DEFAULT_SUFFIX = {"peft": "-peft", "gguf": "-lora.gguf", "onnx-adapter": ".onnx_adapter"}
# model_type -> llama.cpp's architecture for it, and whether its converter permutes the rows of q
# and k (HF's rotate-half rotary layout to GGML's interleaved one): LlamaModel takes Llama and
# Mistral and does; Qwen2Model keeps HF's layout (NEOX rotary). The base GGUF has them permuted,
# so a LoRA's B on them is permuted the same way.
GGUF_ARCHS = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}
# the manifest's head count each permuted module uses (LlamaModel.permute's n_head, n_head_kv)
GGUF_PERMUTED = {"q_proj": "heads", "k_proj": "kv_heads"}
# A key only edgelora's GGUF adapters carry (llama.cpp ignores keys it does not know), so that an
# earlier export is told from a file it must not replace: the base GGUF itself, another tool's adapter.
GGUF_MARK = "edgelora.version"
ONNX_ADAPTER_SUFFIXES = (".lora_A.MatMul.weight", ".lora_B.MatMul.weight")


def load_adapted(folder: Path, bundle_path: Path | None = None) -> tuple[Bundle, dict, dict]:
    """The merged LoRA of an adapt output (its adapter/ folder, scale folded into B) and the
    bundle it was adapted on, which holds what the formats need beyond A and B: the layer
    paths, the head counts and the decoder graph's weight names. The bundle is the one
    weights.json names unless `bundle_path` is given; a bundle of another base is refused."""
    weights = read_weights(folder)
    if weights["settings"].get("kind", "lora") != "lora":
        raise UserError(f"{folder}: composes adaption prompts, not LoRAs: its adapter/ is already a PEFT folder "
                        f"(AdaptionPromptConfig), and llama.cpp's and onnxruntime's adapter formats hold LoRAs only")
    recorded = weights.get("bundle")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("path"), str):
        raise UserError(f"{folder / WEIGHTS}: names no bundle; give the one it was adapted on with --bundle")
    bundle = Bundle.open(bundle_path or recorded["path"], hashes=False)
    base = bundle.manifest["base"]["name"]
    if recorded.get("base", base) != base:
        raise UserError(f"{bundle.path}: a bundle of {base}, but {folder} was adapted on {recorded['base']}")
    lora = from_peft(folder / "adapter", bundle.targets, bundle.arch["layers"])
    return bundle, lora.A, {m: b * lora.scale for m, b in lora.B.items()}


def is_peft_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def is_own_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file that edgelora wrote (its header holds GGUF_MARK)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"GGUF") and GGUF_MARK.encode() in head


def is_own_onnx_adapter(path: Path) -> bool:
    """Whether `path` is an onnxruntime adapter holding only LoRA weights named as edgelora names them."""
    from onnxruntime import AdapterFormat
    try:
        params = AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception:  # onnxruntime raises RuntimeError for a file that is not an adapter
        return False
    return bool(params) and all(k.endswith(ONNX_ADAPTER_SUFFIXES) for k in params)


IS_OWN_FILE = {"gguf": is_own_gguf, "onnx-adapter": is_own_onnx_adapter}


def write_peft(out: Path, bundle: Bundle, A: dict, B: dict) -> None:
    """A PEFT LoRA folder, built aside and swapped in whole."""
    with building(out) as tmp:
        to_peft(tmp, A, B, bundle.targets, bundle.manifest["base"]["name"])


def rope_permute(B: np.ndarray, heads: int) -> np.ndarray:
    """B's rows (out features) in llama.cpp's order for q or k: its LlamaModel.permute,
    reshape(heads, 2, head_dim / 2) and swap the last two, which on a LoRA moves only B."""
    out, rank = B.shape
    return B.reshape(heads, 2, out // heads // 2, rank).swapaxes(1, 2).reshape(out, rank)


def gguf_arch(bundle: Bundle) -> tuple[str, bool]:
    """llama.cpp's MODEL_ARCH name for the bundle's base, and whether q and k are permuted."""
    model_type = bundle.manifest["base"]["model_type"]
    if model_type not in GGUF_ARCHS:
        raise UserError(f"{bundle.path}: --format gguf knows {', '.join(GGUF_ARCHS)} bases, this one is {model_type}")
    return GGUF_ARCHS[model_type]


def gguf_tensors(bundle: Bundle, A: dict, B: dict) -> dict[str, np.ndarray]:
    """`blk.N.<tensor>.weight.lora_a` [r, in] and `.lora_b` [out, r] per layer and module,
    named by gguf's own tensor map from the HF names, as convert_lora_to_gguf.py does."""
    import gguf
    arch, permuted = gguf_arch(bundle)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], bundle.arch["layers"])
    out = {}
    for m in A:
        for i in range(A[m].shape[0]):
            name = names.get_name(f"model.layers.{i}.{bundle.targets[m]['path']}.weight", try_suffixes=(".weight",))
            if name is None:
                raise UserError(f"{bundle.path}: llama.cpp has no tensor for {bundle.targets[m]['path']}")
            b = B[m][i]
            if permuted and m in GGUF_PERMUTED:
                heads = bundle.arch[GGUF_PERMUTED[m]]
                if b.shape[0] % (2 * heads):
                    raise UserError(f"{bundle.path / 'manifest.json'}: arch.{GGUF_PERMUTED[m]} {heads} does not split "
                                    f"{m}'s {b.shape[0]} rows into heads; rebuild the bundle with edgelora-export base")
                b = rope_permute(b, heads)
            out[f"{name}.lora_a"] = np.ascontiguousarray(A[m][i], np.float32)
            out[f"{name}.lora_b"] = np.ascontiguousarray(b, np.float32)
    return out


def write_gguf(out: Path, bundle: Bundle, A: dict, B: dict) -> None:
    """GGUF type `adapter`, `adapter.type` lora, `adapter.lora.alpha` = rank (llama.cpp scales
    by alpha / rank, rank read from lora_b), f32 tensors: what the converter writes by default."""
    try:
        import gguf
    except ImportError:
        raise UserError("--format gguf needs the gguf package: pip install 'edgelora[gguf]'") from None
    tensors = gguf_tensors(bundle, A, B)
    rank = next(iter(A.values())).shape[1]
    with writing(out) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[gguf_arch(bundle)[0]]])
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
        w.add_name(out.stem)
        w.add_string(GGUF_MARK, __version__)
        w.add_base_model_count(1)
        w.add_base_model_name(0, bundle.manifest["base"]["name"])
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, t in tensors.items():
            w.add_tensor(name, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def onnx_adapter_params(bundle: Bundle, A: dict, B: dict) -> dict[str, np.ndarray]:
    """onnxruntime-genai's builder bakes a LoRA in beside each target MatMul as
    `<weight>.lora_A.MatMul.weight` = Aᵀ [in, r] and `.lora_B.MatMul.weight` = (scale·B)ᵀ [r, out],
    where the base weight is `<weight>.MatMul.weight`: the bundle's decoder, built by the same
    builder, names each base weight in its manifest."""
    out = {}
    for m, layers in bundle.manifest["decoder"]["weights"].items():
        for i, info in enumerate(layers):
            stem = info["name"].removesuffix(".MatMul.weight")
            if stem == info["name"]:
                raise UserError(f"{bundle.path}: decoder weight {info['name']} is not named as onnxruntime-genai's "
                                "builder names one; rebuild the bundle with edgelora-export base")
            out[f"{stem}.lora_A.MatMul.weight"] = np.ascontiguousarray(A[m][i].T, np.float32)
            out[f"{stem}.lora_B.MatMul.weight"] = np.ascontiguousarray(B[m][i].T, np.float32)
    return out


def write_onnx_adapter(out: Path, bundle: Bundle, A: dict, B: dict) -> None:
    """onnxruntime's AdapterFormat, version 1; model version 0, what the builder's graphs carry."""
    from onnxruntime import AdapterFormat, OrtValue
    fmt = AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(0)
    # the OrtValues borrow the arrays' memory and set_parameters keeps only the borrowed views:
    # `values` holds both until the file is written
    values = {k: OrtValue.ortvalue_from_numpy(v) for k, v in onnx_adapter_params(bundle, A, B).items()}
    fmt.set_parameters(values)
    with writing(out) as tmp:
        fmt.export_adapter(str(tmp))


WRITERS = {"peft": write_peft, "gguf": write_gguf, "onnx-adapter": write_onnx_adapter}


def export(folder: Path, fmt: str, out: Path | None = None, bundle_path: Path | None = None,
           force: bool = False) -> Path:
    """Write `folder`'s merged LoRA as `fmt` to `out` (default: beside `folder`); returns `out`.
    An earlier export is replaced; anything else at `out` only with `force`."""
    if fmt not in WRITERS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    out = out or folder.resolve().with_name(folder.resolve().name + DEFAULT_SUFFIX[fmt])
    if fmt == "peft":  # an earlier PEFT folder is replaced, any other non-empty folder refused
        check_replaceable(out, is_peft_folder, "-o", force)
    elif out.is_dir():
        raise UserError(f"{out}: is a folder; -o names the {fmt} file to write")
    else:
        check_file_replaceable(out, IS_OWN_FILE[fmt], "-o", force)
    bundle, A, B = load_adapted(folder, bundle_path)
    WRITERS[fmt](out, bundle, A, B)
    return out
