"""The scoring graph: the base model with a LoRA slot in every target module and an adaption-prompt
slot in every layer, over the examples packed into one sequence (`edgelora.batch.pack`), exported
to ONNX.

The LoRA slot computes y = x·Wᵀ + (x·Aᵀ)·Bᵀ with A and B taken from stacked inputs, so the graph
exported from `ScoringModel` takes any merge as plain arrays; the prompt slot adds LLaMA-Adapter's
gated term (`edgelora.adaption_prompt`), exactly zero at gate 0. It returns per-example losses, the
answer positions' hidden states and every LoRA slot's x·Aᵀ, never the [tokens, vocab] logits.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn


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


def base_linear(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, SlotLinear) else module


def prompt_term(attn, q, prompt, gate):
    """LLaMA-Adapter's term before o_proj, [T, heads·hd]: each token's query q [1, heads, T, hd]
    (positions applied) attends, in a softmax of its own, to the layer's prompt [P, d] projected by
    the base's k_proj and v_proj (no positions), times the layer's gate; as peft's AdaptedAttention,
    whose o_proj of it this graph folds into the attention's own (o_proj has no bias)."""
    hd, P = attn.head_dim, prompt.shape[0]
    k = base_linear(attn.k_proj)(prompt).view(P, -1, hd).transpose(0, 1)  # [kv heads, P, hd]
    v = base_linear(attn.v_proj)(prompt).view(P, -1, hd).transpose(0, 1)
    groups = q.shape[1] // k.shape[0]
    k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
    scores = torch.softmax(q[0] @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)  # [heads, T, P]
    out = gate * (scores @ v)  # [heads, T, hd]
    return out.transpose(0, 1).reshape(q.shape[2], -1)


def packed_attention(attn, x, cos, sin, gather_idx, scatter_idx, prompt, gate):
    """Self-attention over the packed sequence x [1, T, d]: each example's rows (the shared prefix,
    then its own tokens; `gather_idx` [n, S]) are gathered into a causal batch, and each token's
    output is read back from its own row (`scatter_idx` [T]). The projections, the MLP and the LoRA
    slots run once per packed token: the prefix is computed once for all examples and nothing is
    padded; only attention, a small part of the cost, sees the gathered rows. Each example's rows
    end with its padding, so a plain causal mask never lets a real token see a padded one. The
    adaption prompt's term is per token, so it is added before o_proj without gathering."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    T, hd = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, T, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, T, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(1, T, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    adapter = prompt_term(attn, q, prompt, gate)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    q, k, v = (t[0][:, gather_idx].transpose(0, 1) for t in (q, k, v))  # [n, heads, S, hd]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
    n, heads, S, _ = out.shape
    out = out.transpose(1, 2).reshape(n * S, heads * hd)[scatter_idx] + adapter
    return attn.o_proj(out.unsqueeze(0))


class ScoringModel(nn.Module):
    """Inputs: the examples packed into one sequence (see `edgelora.batch.pack`): tokens,
    positions, each example's rows and each token's home row, target positions/ids/mask; the
    adaption prompt of every layer [L, P, d] and its gate [L] (0: the layer has none); and per
    target module A [L,r,in], B [L,out,r]. Outputs: per-example mean target loss and summed target
    log-prob, and per module x·Aᵀ [L, T, r]. The LM head runs on the target positions only: never
    the [tokens, vocab] logits."""

    INPUTS = ("input_ids", "position_ids", "gather_idx", "scatter_idx", "target_pos", "target_ids", "target_mask",
              "adaption_prompt", "adaption_gate")

    def __init__(self, model, shapes: dict[str, dict]):
        super().__init__()
        self.model = model
        self.modules_ = list(shapes)
        self.slots = insert_slots(model, shapes)

    def forward(self, input_ids, position_ids, gather_idx, scatter_idx, target_pos, target_ids, target_mask,
                adaption_prompt, adaption_gate, *lora):
        for i, m in enumerate(self.modules_):
            self.slots[m] = (lora[2 * i], lora[2 * i + 1])
            self.slots[f"xa/{m}"] = []
        base = self.model.model
        x = base.embed_tokens(input_ids).unsqueeze(0)
        cos, sin = base.rotary_emb(x, position_ids.unsqueeze(0))
        for i, layer in enumerate(base.layers):
            x = x + packed_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, gather_idx, scatter_idx,
                                     adaption_prompt[i], adaption_gate[i])
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = x[0][target_pos]
        logits = self.model.lm_head(base.norm(hidden)).float()
        logp = torch.log_softmax(logits, dim=-1)
        tok = torch.gather(logp, 2, target_ids.unsqueeze(-1)).squeeze(-1) * target_mask
        logprob = tok.sum(dim=1)
        loss = -logprob / target_mask.sum(dim=1).clamp(min=1.0)
        xa = [torch.cat(self.slots[f"xa/{m}"], dim=0) for m in self.modules_]
        return loss, logprob, hidden, *xa


def export_scoring(model, shapes: dict, path: Path) -> list[str]:
    """torch.onnx (dynamo) export of ScoringModel; tokens, examples, rows, targets and rank are dynamic."""
    wrapper = ScoringModel(model, shapes).eval()
    L, V, d = len(model.model.layers), model.config.vocab_size, model.config.hidden_size
    n, S, T, K, r, P = 3, 7, 13, 5, 4, 6  # distinct sizes so the exporter keeps every axis symbolic
    args = [torch.randint(0, V, (T,)), torch.arange(T), torch.randint(0, T, (n, S)), torch.randint(0, n * S, (T,)),
            torch.randint(0, T, (n, K)), torch.randint(0, V, (n, K)), torch.ones(n, K), torch.randn(L, P, d),
            torch.rand(L)]
    names = list(ScoringModel.INPUTS)
    Dim = torch.export.Dim
    tokens, examples, rows, tgt, rank = Dim("tokens"), Dim("examples"), Dim("rows"), Dim("targets"), Dim("rank")
    dyn = [{0: tokens}, {0: tokens}, {0: examples, 1: rows}, {0: tokens},
           {0: examples, 1: tgt}, {0: examples, 1: tgt}, {0: examples, 1: tgt}, {1: Dim("prompt_len")}, {}]
    slots = []
    for m, s in shapes.items():
        args += [torch.randn(L, r, s["in"]) * 0.01, torch.randn(L, s["out"], r) * 0.01]
        names += [f"lora_A_{m}", f"lora_B_{m}"]
        slots += [{1: rank}, {2: rank}]
    outputs = ["loss", "logprob", "hidden", *(f"xa_{m}" for m in shapes)]
    with torch.no_grad():
        torch.onnx.export(wrapper, tuple(args), str(path), input_names=names, output_names=outputs,
                          dynamic_shapes=(*dyn, tuple(slots)) if slots else tuple(dyn), dynamo=True,
                          external_data=False, optimize=True)
    return names
