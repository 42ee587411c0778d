"""Write-back: W' = W + B·A into the bundle's decoder graph (`merge`), q, k and v fused into one
MatMul (`fuse_qkv`), then quantized (`quantize`): `write_model` is those steps, into a model
folder. (`add_lora_path` keeps the LoRA beside the weights instead, for comparison; Arrow's routed
graph, arrow.py, edits the same MatMuls with `beside_targets`.)

Quantizing after the merge can swamp the small delta B·A, so the matrices the LoRA changed are
kept at 8 bits (weight-only, block 32) while the rest of an int4 model is at 4 bits: the delta
survives and the graph stays the plain base graph, with no extra nodes to slow decoding.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .adaption_prompt import AdaptionPrompt
from .bundle import Bundle
from .errors import UserError
from .io import atomic_write_json, sha256_file, user_mode
from .lora import delta
from .outputs import DATA_FILE, DEFAULT_QUANT, MODEL_META, QUANTS

# int4's block, chosen by measurement (bench/results/int4_block.json); the merged LoRA targets stay
# at 8 bits (bench/results/quant_accuracy.md): weight-only 8 bits moves log-probs far less than 4.
INT4_BLOCK = 32


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def merge(model: onnx.ModelProto, weights: dict, A: dict, B: dict) -> None:
    """Add B·A to every target weight in place; `weights` is the manifest's decoder map."""
    inits = _initializers(model)
    for m, layers in weights.items():
        d = delta(A[m], B[m])
        for i, info in enumerate(layers):
            init = inits[info["name"]]
            W = numpy_helper.to_array(init).astype(np.float32)
            W = W + (d[i].T if info["transposed"] else d[i])
            init.CopyFrom(numpy_helper.from_array(W.astype(np.float32), init.name))


def matmuls_by_weight(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Each MatMul keyed by its second input: where a target weight (the manifest's map) is used."""
    return {n.input[1]: n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2}


def fuse_qkv(model: onnx.ModelProto) -> dict[str, str]:
    """Each layer's q, k and v MatMuls (one input, fp32 weights) as one MatMul over the three
    weights side by side, fed to GroupQueryAttention as its packed-QKV query: one kernel instead
    of three per layer and token, as onnxruntime-genai's builder fuses them. Only for a merged
    model: the bundle keeps them apart so each target weight is its own initializer, and an
    unmerged LoRA adds to q and v alone. Returns each old MatMul's name → the fused one's."""
    nodes, inits = list(model.graph.node), _initializers(model)
    producer = {o: n for n in nodes for o in n.output}
    users: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    renamed: dict[str, str] = {}
    for g in (n for n in nodes if n.op_type == "GroupQueryAttention" and all(n.input[1:3])):
        mms = [producer.get(x) for x in g.input[:3]]
        if any(m is None or m.op_type != "MatMul" or m.input[1] not in inits or users[m.output[0]] != 1
               for m in mms) or len({m.input[0] for m in mms}) != 1:
            continue
        q = mms[0]
        weight, name = f"{q.input[1]}_qkv", f"{q.name}_qkv"
        W = np.concatenate([numpy_helper.to_array(inits[m.input[1]]) for m in mms], axis=1)
        model.graph.initializer.append(numpy_helper.from_array(W.astype(np.float32), weight))
        fused = helper.make_node("MatMul", [q.input[0], weight], [f"{name}/output_0"], name=name)
        for m in mms:
            model.graph.initializer.remove(inits[m.input[1]])
            renamed[m.name] = name
        nodes[nodes.index(q)] = fused
        for m in mms[1:]:
            nodes.remove(m)
        g.input[0], g.input[1], g.input[2] = fused.output[0], "", ""
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return renamed


def beside_targets(model: onnx.ModelProto, weights: dict, what: str, nodes_for) -> None:
    """Each target MatMul's output renamed `<out>/base`, and the nodes `nodes_for(m, i, x, base,
    out)` returns (which must end by writing `out`) put right after it: ONNX wants nodes in
    topological order. `what` names the feature in the error for a graph it cannot edit."""
    consumers = matmuls_by_weight(model)
    after: dict[str, list] = {}  # base MatMul's (new) output -> the nodes that follow it
    for m, layers in weights.items():
        for i, info in enumerate(layers):
            node = consumers.get(info["name"])
            if node is None or not info["transposed"]:
                raise UserError(f"decoder graph: layer {i} {m} is not a MatMul on its weight; {what}")
            out = node.output[0]
            node.output[0] = f"{out}/base"
            after[node.output[0]] = nodes_for(m, i, node.input[0], node.output[0], out)
    order = []
    for node in model.graph.node:
        order += [node, *after.get(node.output[0] if node.output else "", [])]
    del model.graph.node[:]
    model.graph.node.extend(order)


def add_lora_path(model: onnx.ModelProto, weights: dict, A: dict, B: dict) -> list[str]:
    """y = x·Wᵀ + (x·Aᵀ)·Bᵀ as extra nodes beside each target MatMul; returns their names
    (kept out of quantization)."""
    names = []

    def nodes_for(m, i, x, base, out):
        a, b = f"lora/{m}/{i}/A", f"lora/{m}/{i}/B"
        model.graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(A[m][i].T), a),
                                        numpy_helper.from_array(np.ascontiguousarray(B[m][i].T), b)])
        names.extend([f"{a}/MatMul", f"{b}/MatMul"])
        return [helper.make_node("MatMul", [x, a], [f"{a}/out"], name=f"{a}/MatMul"),
                helper.make_node("MatMul", [f"{a}/out", b], [f"{b}/out"], name=f"{b}/MatMul"),
                helper.make_node("Add", [base, f"{b}/out"], [out], name=f"lora/{m}/{i}/Add")]

    beside_targets(model, weights, "cannot keep the LoRA unmerged", nodes_for)
    return names


def add_adaption_prompt(model: onnx.ModelProto, ap: AdaptionPrompt) -> list[str]:
    """LLaMA-Adapter's term in the top `ap.layers` layers of the decoder (edgelora.adaption_prompt):
    each layer's query, rotated as GroupQueryAttention rotates it (RotaryEmbedding on the same
    caches and positions), attends to the prompt's keys, softmax of its own, times the gate-scaled
    values, added to the attention's output before o_proj. The keys (scaled by 1/√head_dim) and
    the values are the base's k_proj and v_proj of the prompt, computed here once. Returns the new
    MatMuls' names (kept out of quantization)."""
    nodes, inits = list(model.graph.node), _initializers(model)
    producer = {o: n for n in nodes for o in n.output}
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    if len(gqa) < ap.layers or any(not all(n.input[1:3]) or len(n.input) < 10 or not n.input[9] for n in gqa):
        raise UserError("decoder graph: its attention is not the GroupQueryAttention with separate q, k, v and "
                        "position_ids that edgelora-export builds; rebuild the bundle")
    names, after = [], {}
    for k, g in enumerate(gqa[len(gqa) - ap.layers:]):
        attr = {a.name: helper.get_attribute_value(a) for a in g.attribute}
        H, kv = attr["num_heads"], attr["kv_num_heads"]
        Wk, Wv = (numpy_helper.to_array(inits[producer[x].input[1]]).astype(np.float32) for x in g.input[1:3])
        hd = Wk.shape[1] // kv
        keys, values = ((ap.prompt[k] @ W).reshape(ap.length, kv, hd).transpose(1, 0, 2).repeat(H // kv, axis=0)
                        for W in (Wk, Wv))  # [heads, length, hd]
        p = f"adaption_prompt/{k}"
        model.graph.initializer.extend([
            numpy_helper.from_array((keys.transpose(0, 2, 1) / np.sqrt(hd)).astype(np.float32), f"{p}/keys"),
            numpy_helper.from_array((ap.gate[k] * values).astype(np.float32), f"{p}/values"),
            numpy_helper.from_array(np.array([0, 0, H, hd], np.int64), f"{p}/heads"),
            numpy_helper.from_array(np.array([0, 0, H * hd], np.int64), f"{p}/flat")])
        out = g.output[0]
        g.output[0] = f"{out}/base"
        names += [f"{p}/scores", f"{p}/mix"]
        after[g.name] = [
            helper.make_node("RotaryEmbedding", [g.input[0], g.input[9], g.input[7], g.input[8]], [f"{p}/q"],
                             name=f"{p}/rotary", domain="com.microsoft", num_heads=H,
                             interleaved=attr.get("rotary_interleaved", 0)),
            helper.make_node("Reshape", [f"{p}/q", f"{p}/heads"], [f"{p}/q4"], name=f"{p}/split"),
            helper.make_node("Transpose", [f"{p}/q4"], [f"{p}/qt"], name=f"{p}/qt", perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", [f"{p}/qt", f"{p}/keys"], [f"{p}/s"], name=f"{p}/scores"),
            helper.make_node("Softmax", [f"{p}/s"], [f"{p}/a"], name=f"{p}/softmax", axis=-1),
            helper.make_node("MatMul", [f"{p}/a", f"{p}/values"], [f"{p}/o"], name=f"{p}/mix"),
            helper.make_node("Transpose", [f"{p}/o"], [f"{p}/ot"], name=f"{p}/ot", perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{p}/ot", f"{p}/flat"], [f"{p}/term"], name=f"{p}/merge"),
            helper.make_node("Add", [g.output[0], f"{p}/term"], [out], name=f"{p}/add")]
    order = []
    for node in nodes:
        order += [node, *after.get(node.name, [])]
    del model.graph.node[:]
    model.graph.node.extend(order)
    return names


def quantize(model: onnx.ModelProto, dst: Path, quant: str, exclude: list[str], eight_bit: list[str] = (),
             block_size: int = INT4_BLOCK) -> None:
    """onnxruntime's weight-only MatMulNBits with accuracy_level 4 (int8 activations inside the
    kernel: MLAS's fast path on x86): every MatMul at 8 bits (int8), or at 4 bits except
    `eight_bit` (int4). `exclude`: MatMuls left in fp32. `quant` is checked by `write_model`."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    passes = {"none": [], "int8": [(8, matmuls)], "int4": [(8, list(eight_bit)), (4, matmuls)]}[quant]
    for bits, nodes in passes:
        # the quantizer takes every MatMul not excluded, so a pass names what it leaves alone
        keep = set(exclude) | (set(matmuls) - set(nodes))
        if len(keep) < len(matmuls):
            q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=4,
                                     nodes_to_exclude=sorted(keep))
            q.process()
            model = q.model.model
            matmuls = [n for n in matmuls if n in keep]
    if quant != "none":
        quantize_embedding(model, block_size)
    save_with_data(model, dst)


def save_with_data(model: onnx.ModelProto, dst: Path) -> None:
    """`dst` and its weights in DATA_FILE beside it, both with the user's usual file mode."""
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA_FILE)
    for f in (dst, dst.parent / DATA_FILE):
        os.chmod(f, user_mode())


def quantize_embedding(model: onnx.ModelProto, block_size: int = INT4_BLOCK) -> bool:
    """The embedding table at 8 bits (block-wise, symmetric, by onnxruntime's own weight-only
    quantizer), read by GatherBlockQuantized. The builder ties the embedding to the LM head as a
    Gather over Transpose(lm_head weight): MatMulNBits quantizes the head into a new tensor, but
    the fp32 [hidden, vocab] table stayed for the Gather (113 MB for SmolLM2, and onnxruntime
    folds a transposed copy at load). 8 bits, not the head's 4: the rows are the model's input.
    Returns whether there was a fp32 table to replace."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer
    nodes = list(model.graph.node)
    inits = _initializers(model)
    producer = {o: n for n in nodes for o in n.output}
    users: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    for g in (n for n in nodes if n.op_type == "Gather" and not any(a.name == "axis" and a.i for a in n.attribute)):
        t = producer.get(g.input[0])
        tied = t is not None and t.op_type == "Transpose" and t.input[0] in inits and users[g.input[0]] == 1
        table = t.input[0] if tied else g.input[0]
        if table not in inits or users[table] != 1 or len(inits[table].dims) != 2:
            continue
        W = numpy_helper.to_array(inits[table]).astype(np.float32)  # [hidden, vocab] if tied, else [vocab, hidden]
        quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=8))
        packed, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(W if tied else W.T))
        rows, sc = f"{table}/rows_Q8", f"{table}/rows_scales"
        model.graph.initializer.extend([numpy_helper.from_array(packed.reshape(packed.shape[0], -1), rows),
                                        numpy_helper.from_array(scales.reshape(packed.shape[0], -1), sc)])
        q = helper.make_node("GatherBlockQuantized", [rows, g.input[1], sc], list(g.output), name=f"{g.name}_Q8",
                             domain="com.microsoft", bits=8, block_size=block_size, gather_axis=0, quantize_axis=1)
        at = nodes.index(g)
        del model.graph.node[:]
        model.graph.node.extend([n for n in nodes[:at] if n is not t or not tied] + [q] +
                                [n for n in nodes[at + 1:] if n is not t or not tied])
        model.graph.initializer.remove(inits[table])
        return True
    return False


def write_model(bundle: Bundle, A: dict | None, B: dict | None, out: Path, quant: str = DEFAULT_QUANT,
                merged: bool = True, block_size: int = INT4_BLOCK, weights_sha256: str | None = None,
                meta: dict | None = None, prompt: AdaptionPrompt | None = None) -> Path:
    """A standard ONNX causal-LM folder (optimum's ORTModelForCausalLM loads it) plus
    `edgelora.json` (prompt format, stop ids, the model's sha256 and that of the weights.json it
    was made from) so `edgelora generate/eval` can use it and refuse it when the two disagree.
    `merged=False`: the LoRA beside the quantized base, in fp32, as two small MatMuls per
    target (the default before the 8-bit targets: less accurate at int4, and no faster, by
    bench/results/quant_accuracy.md and generate_adapted.json; benchmarks compare against it).
    `prompt`: an adaption prompt carried in the decoder (`add_adaption_prompt`); its layers keep
    q, k and v apart."""
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    src_dir = bundle.decoder_dir
    model = onnx.load(str(src_dir / bundle.manifest["decoder"]["file"]))
    weights = bundle.manifest["decoder"]["weights"]
    eight_bit: list[str] = []
    # the prompt first: its keys and values are the base's k_proj and v_proj of it (as the scoring
    # graph takes them), not the projections a LoRA merged or added beside would give
    exclude = add_adaption_prompt(model, prompt) if prompt is not None else []
    if A is not None and merged:
        merge(model, weights, A, B)
        consumers = matmuls_by_weight(model)
        eight_bit = [consumers[i["name"]].name for layers in weights.values() for i in layers if i["name"] in consumers]
    elif A is not None:
        exclude += add_lora_path(model, weights, A, B)
    if A is None or merged:
        renamed = fuse_qkv(model)
        eight_bit = sorted({renamed.get(n, n) for n in eight_bit})
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        final = Path(tmp) / "model.onnx"
        quantize(model, final, quant, exclude, eight_bit, block_size)
        del model
        (Path(tmp) / DATA_FILE).replace(out / DATA_FILE)
        final.replace(out / "model.onnx")
    for f in src_dir.iterdir():
        if f.is_file() and f.suffix not in (".onnx", ".onnx_data") and not f.name.endswith(".onnx.data"):
            shutil.copy(f, out / f.name)
    m = bundle.manifest
    atomic_write_json(out / MODEL_META, {
        "base": m["base"]["name"], "bundle_manifest_sha256": sha256_file(bundle.path / "manifest.json"),
        "quant": quant, "block_size": block_size if quant != "none" else None,
        "lora": None if A is None else "merged" if merged else "unmerged fp32",
        "adaption_prompt": None if prompt is None else {"name": prompt.name, "layers": prompt.layers,
                                                        "length": prompt.length},
        "eight_bit_targets": bool(eight_bit) and quant == "int4",
        "prompt": m["prompt"], "eos_ids": m["eos_ids"],
        "pad_id": m["pad_id"], "max_len": m["arch"]["max_len"], "tokenizer": "tokenizer.json",
        "model_sha256": sha256_file(out / "model.onnx"), "weights_sha256": weights_sha256,
        "data_sha256": sha256_file(out / DATA_FILE), **(meta or {})})
    return out / "model.onnx"
