"""Write-back: W' = W + B·A into the bundle's decoder graph, then quantize.

Quantizing after the merge can swamp a small delta, so there is also an unmerged mode: the
base weights quantized, the LoRA kept beside them in fp32 as two small MatMuls per target.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .bundle import Bundle
from .errors import UserError
from .io import atomic_write_json, sha256_file
from .lora import delta

QUANTS = ("none", "int8", "int4")
# int4, block 32, with the LoRA kept unmerged in fp32, by measurement. bench/int4_block.json:
# block 32 moves target log-probs less than per-tensor dynamic int8 (0.50 vs 0.75 nats a token).
# bench/quant_accuracy.md (3 BBH dev tasks, 60 test examples each, exact match mean): fp32 45.0,
# int4 unmerged 40.0, int4 merged 33.9, int8 merged 16.7 (dynamic int8 breaks generation).
# Merging into int4 swamps part of the small delta; unmerged costs ~10% in eval time.
DEFAULT_QUANT = "int4"
INT4_BLOCK = 32
MODEL_META = "edgelora.json"


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


def add_lora_path(model: onnx.ModelProto, weights: dict, A: dict, B: dict) -> list[str]:
    """y = x·Wᵀ + (x·Aᵀ)·Bᵀ as extra nodes beside each target MatMul; returns their names
    (kept out of quantization)."""
    consumers = {n.input[1]: n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2}
    after: dict[str, list] = {}  # base MatMul's (new) output -> the LoRA nodes that follow it
    names = []
    for m, layers in weights.items():
        for i, info in enumerate(layers):
            node = consumers.get(info["name"])
            if node is None or not info["transposed"]:
                raise UserError(f"decoder graph: layer {i} {m} is not a MatMul on its weight; cannot keep the LoRA unmerged")
            base_out, x = node.output[0], node.input[0]
            node.output[0] = f"{base_out}/base"
            a, b = f"lora/{m}/{i}/A", f"lora/{m}/{i}/B"
            model.graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(A[m][i].T), a),
                                            numpy_helper.from_array(np.ascontiguousarray(B[m][i].T), b)])
            after[node.output[0]] = [
                helper.make_node("MatMul", [x, a], [f"{a}/out"], name=f"{a}/MatMul"),
                helper.make_node("MatMul", [f"{a}/out", b], [f"{b}/out"], name=f"{b}/MatMul"),
                helper.make_node("Add", [node.output[0], f"{b}/out"], [base_out], name=f"lora/{m}/{i}/Add")]
            names += [f"{a}/MatMul", f"{b}/MatMul"]
    # ONNX wants nodes in topological order: each LoRA triple right after its base MatMul.
    order = []
    for node in model.graph.node:
        order += [node, *after.get(node.output[0] if node.output else "", [])]
    del model.graph.node[:]
    model.graph.node.extend(order)
    return names


def quantize(src: Path, dst: Path, quant: str, exclude: list[str], block_size: int = INT4_BLOCK) -> None:
    """onnxruntime's own tools: dynamic int8 (MatMul), or int4 MatMulNBits with
    accuracy_level 4 (int8 activations: MLAS's fast path on x86)."""
    if quant == "none":
        shutil.copy(src, dst)
    elif quant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         nodes_to_exclude=exclude, per_channel=False)
    elif quant == "int4":
        import logging
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        q = MatMulNBitsQuantizer(str(src), bits=4, block_size=block_size, is_symmetric=True, accuracy_level=4,
                                 nodes_to_exclude=exclude)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)
    else:
        raise UserError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")


def write_model(bundle: Bundle, A: dict | None, B: dict | None, out: Path, quant: str = DEFAULT_QUANT,
                merged: bool | None = None, block_size: int = INT4_BLOCK) -> Path:
    """A standard ONNX causal-LM folder (optimum's ORTModelForCausalLM loads it) plus
    `edgelora.json` (prompt format, stop ids) so `edgelora generate/eval` can use it.
    `merged=None`: merge only when nothing is quantized, where merging is lossless."""
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    if merged is None:
        merged = quant == "none"
    out.mkdir(parents=True, exist_ok=True)
    src_dir = bundle.decoder_dir
    model = onnx.load(str(src_dir / bundle.manifest["decoder"]["file"]))
    weights = bundle.manifest["decoder"]["weights"]
    exclude: list[str] = []
    if A is not None:
        if merged:
            merge(model, weights, A, B)
        else:
            exclude = add_lora_path(model, weights, A, B)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        onnx.save(model, str(fp32))
        del model
        final = Path(tmp) / "model.onnx"
        quantize(fp32, final, quant, exclude, block_size)
        final.replace(out / "model.onnx")
    for f in src_dir.iterdir():
        if f.is_file() and f.suffix not in (".onnx", ".onnx_data") and not f.name.endswith(".onnx.data"):
            shutil.copy(f, out / f.name)
    m = bundle.manifest
    atomic_write_json(out / MODEL_META, {
        "base": m["base"]["name"], "bundle_manifest_sha256": sha256_file(bundle.path / "manifest.json"),
        "quant": quant, "int4_block_size": block_size if quant == "int4" else None, "merged": merged if A is not None else None, "prompt": m["prompt"], "eos_ids": m["eos_ids"],
        "pad_id": m["pad_id"], "max_len": m["arch"]["max_len"], "tokenizer": "tokenizer.json"})
    return out / "model.onnx"
