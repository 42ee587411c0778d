"""`edgelora export`: an adapt output's LoRA as a PEFT folder, a llama.cpp GGUF adapter and an
onnxruntime .onnx_adapter, each read back by the library that owns the format and checked
against the adapted model."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_adapt import PROMPTS, library  # noqa: F401  (library: a fixture)

from edgelora.bundle import Bundle
from edgelora.errors import UserError
from edgelora.examples import Example
from edgelora.formats import export, gguf_tensors
from edgelora.lora import delta, zero_slots
from edgelora.outputs import write_outputs
from edgelora.search import adapt

EXAMPLES = [Example(p, "yes") for p in PROMPTS]


@pytest.fixture
def adapted(library, tmp_path):  # noqa: F811
    """An adapt output (weights, adapter, no model) and its merged A, B (scale in B)."""
    bundle, _ = library
    res = adapt(EXAMPLES, bundle, budget=8)
    assert np.abs(res.weights).max() > 0.1  # a real merge, not the base model
    write_outputs(res, bundle, tmp_path / "adapted")
    A, B = res.merged()
    return bundle, res, tmp_path / "adapted", {m: a.copy() for m, a in A.items()}, {m: b.copy() for m, b in B.items()}


def run_export(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelora.cli", "export", *args], capture_output=True, text=True,
                          cwd=cwd)


def test_peft_loads_in_peft_and_scores_as_the_search_did(adapted, tiny_hf, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from helpers import encode, torch_losses
    from edgelora.scorer import Scorer
    bundle, res, folder, A, B = adapted
    r = run_export(str(folder), "--format", "peft", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "adapted-peft"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_hf), out).eval()
    batch = encode(bundle, EXAMPLES)
    ref_loss, ref_lp = torch_losses(model, batch)
    scorer = Scorer(bundle)
    scorer.bind(batch)
    loss, lp = scorer.run(A, B)  # edgelora's unmerged LoRA slots
    assert np.abs(loss - scorer.losses(*zero_slots(bundle.targets, bundle.arch["layers"]))).max() > 1e-2
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-4)
    assert float(-lp.sum() / batch.target_mask.sum()) == pytest.approx(res.loss, rel=1e-4)


def test_gguf_is_a_llama_cpp_lora_adapter(adapted, tmp_path):
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    bundle, _, folder, A, B = adapted
    out = tmp_path / "x" / "a.gguf"
    assert export(folder, "gguf", out) == out
    reader = gguf.GGUFReader(out)
    field = lambda k: reader.fields[k].contents()
    rank = A["q_proj"].shape[1]
    assert field(gguf.Keys.General.ARCHITECTURE) == "llama"
    assert field(gguf.Keys.General.TYPE) == "adapter"
    assert field(gguf.Keys.Adapter.TYPE) == "lora"
    assert field(gguf.Keys.Adapter.LORA_ALPHA) == rank  # llama.cpp's scale alpha / rank = 1: the scale is in B
    L, a = bundle.arch["layers"], bundle.arch
    tensors = {t.name: t for t in reader.tensors}
    names = {"q_proj": "attn_q", "v_proj": "attn_v"}
    assert sorted(tensors) == sorted(f"blk.{i}.{names[m]}.weight.lora_{ab}" for i in range(L) for m in A for ab in "ab")
    # llama.cpp's GGUF reads back as HF weights through transformers' inverse of the converter's q/k row permutation
    undo = LlamaTensorProcessor({"num_attention_heads": a["heads"], "num_key_value_heads": a["kv_heads"]})
    for m in A:
        d = delta(A[m], B[m])
        for i in range(L):
            ta, tb = tensors[f"blk.{i}.{names[m]}.weight.lora_a"], tensors[f"blk.{i}.{names[m]}.weight.lora_b"]
            assert ta.tensor_type == tb.tensor_type == gguf.GGMLQuantizationType.F32
            # ggml's ne order: lora_a {in, rank}, lora_b {rank, out}, as llama.cpp checks against the base weight
            assert list(ta.shape) == [bundle.targets[m]["in"], rank] and list(tb.shape) == [rank, bundle.targets[m]["out"]]
            ba = np.asarray(tb.data) @ np.asarray(ta.data)
            np.testing.assert_allclose(undo.process(ba, ta.name).weights, d[i], rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(tensors["blk.0.attn_q.weight.lora_b"].data), B["q_proj"][0])  # q was permuted


@pytest.mark.parametrize("model_type,permuted", [("llama", True), ("mistral", True), ("qwen2", False)])
def test_gguf_permutes_q_where_llama_cpps_converter_does(tiny_bundle_ro, model_type, permuted):
    """LlamaModel (Llama, Mistral) permutes q and k rows for GGML's rotary; Qwen2Model does not."""
    bundle = Bundle.open(tiny_bundle_ro)
    bundle.manifest["base"]["model_type"] = model_type
    rng = np.random.default_rng(0)
    L, t = bundle.arch["layers"], bundle.targets
    A = {m: rng.normal(size=(L, 3, t[m]["in"])).astype(np.float32) for m in t}
    B = {m: rng.normal(size=(L, t[m]["out"], 3)).astype(np.float32) for m in t}
    tensors = gguf_tensors(bundle, A, B)
    assert np.array_equal(tensors["blk.1.attn_q.weight.lora_b"], B["q_proj"][1]) != permuted
    assert np.array_equal(tensors["blk.1.attn_v.weight.lora_b"], B["v_proj"][1])
    assert np.array_equal(tensors["blk.1.attn_q.weight.lora_a"], A["q_proj"][1])
    bundle.manifest["base"]["model_type"] = "gpt2"
    with pytest.raises(UserError, match="knows llama, mistral, qwen2 bases, this one is gpt2"):
        gguf_tensors(bundle, A, B)


def test_gguf_without_the_package_says_how_to_install(adapted, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(UserError, match=r"pip install 'edgelora\[gguf\]'"):
        export(adapted[2], "gguf", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def lora_as_inputs(src: Path, dst: Path) -> None:
    """The builder's model with its baked LoRA initializers made graph inputs, so an adapter file
    can override them (what Olive's ExtractAdapters pass does for onnxruntime-genai)."""
    import shutil
    import onnx
    from onnx import helper
    model = onnx.load(str(src / "model.onnx"))
    lora = [i for i in model.graph.initializer if ".lora_" in i.name]
    for init in lora:
        model.graph.initializer.remove(init)
    model.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in lora)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx*"))
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")


def genai_run(folder: Path, ids: list[int], adapter: Path | None = None) -> tuple[np.ndarray, list[int]]:
    """onnxruntime-genai: the last prompt position's logits and 8 greedy tokens, with `adapter`
    loaded by og.Adapters and made active."""
    import onnxruntime_genai as og
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 8, do_sample=False)
    gen = og.Generator(model, params)
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter), "adapted")
        gen.set_active_adapter(adapters, "adapted")
    gen.append_tokens(ids)
    logits = np.array(gen.get_logits())[0, -1]
    while not gen.is_done():
        gen.generate_next_token()
    return logits, list(gen.get_sequence(0))[len(ids):]


def test_onnx_adapter_is_what_onnxruntime_genai_bakes_in_and_loads(adapted, tiny_hf, tmp_path):
    """The builder given the PEFT export as `adapter_path` bakes the LoRA into the graph as
    initializers: the .onnx_adapter holds each of them (same name, orientation and values), and
    og.Adapters loading it into that graph gives the baked model's logits and tokens."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from onnxruntime_genai.models.builder import create_model
    bundle, _, folder, _, _ = adapted
    export(folder, "peft", tmp_path / "peft")
    out = export(folder, "onnx-adapter")
    assert out == folder.resolve().with_name("adapted.onnx_adapter")
    fmt = ort.AdapterFormat.read_adapter(str(out))
    assert (fmt.get_format_version(), fmt.get_adapter_version(), fmt.get_model_version()) == (1, 1, 0)
    params = {k: v.numpy().copy() for k, v in fmt.get_parameters().items()}  # copied while the views live
    create_model(None, str(tiny_hf), str(tmp_path / "baked"), "fp32", "cpu", str(tmp_path / "cache"),
                 disable_qkv_fusion=True, hf_remote=False, hf_token="false", adapter_path=str(tmp_path / "peft"))
    graph = onnx.load(str(tmp_path / "baked" / "model.onnx")).graph
    baked = {i.name: numpy_helper.to_array(i) for i in graph.initializer if ".lora_" in i.name}
    assert sorted(params) == sorted(baked) and len(params) == 8
    for k, v in baked.items():
        np.testing.assert_allclose(params[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    lora_as_inputs(tmp_path / "baked", tmp_path / "slots")
    ids = bundle.tokenizer().encode(bundle.prompt_format.prompt(PROMPTS[0]), add_special_tokens=False).ids
    want_logits, want_tokens = genai_run(tmp_path / "baked", ids)
    logits, tokens = genai_run(tmp_path / "slots", ids, adapter=out)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert tokens == want_tokens
    base_logits, _ = genai_run(bundle.decoder_dir, ids)
    assert np.abs(base_logits - want_logits).max() > 1e-2  # the adapter changes the model


def test_peft_replaces_an_adapter_and_refuses_any_other_folder(adapted, tmp_path):
    again = tmp_path / "again"
    export(adapted[2], "peft", again)
    (again / "README.md").write_text("PEFT writes one")
    export(adapted[2], "peft", again)  # an earlier PEFT folder is replaced whole
    assert sorted(p.name for p in again.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not an edgelora output"):
        export(adapted[2], "peft", mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(UserError, match="is a folder"):
        export(adapted[2], "gguf", mine)


def refused_in_process(capsys, argv: list[str], *words: str) -> None:
    """`edgelora ARGV` run in this process: exit 2 and one line holding `words`."""
    from edgelora.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], err[0]


def foreign_gguf(path: Path) -> bytes:
    """A GGUF LoRA adapter edgelora did not write (llama.cpp's converter makes such files)."""
    import gguf
    w = gguf.GGUFWriter(path, "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((2, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.mark.parametrize("fmt,name", [("gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"), ("gguf", "theirs-lora.gguf"),
                                      ("onnx-adapter", "notes.onnx_adapter")])
def test_export_replaces_only_its_own_file_unless_forced(adapted, tmp_path, capsys, fmt, name):
    """A file at -o that edgelora did not write (the base GGUF handed to llama.cpp, another tool's
    adapter, anything) is refused in one line naming --force; an earlier export is replaced."""
    from edgelora.cli import main
    folder, user = adapted[2], tmp_path / name
    mine = foreign_gguf(user) if name == "theirs-lora.gguf" else b"GGUF\x03\x00\x00\x00 a user's model"
    if name != "theirs-lora.gguf":
        user.write_bytes(mine)
    refused_in_process(capsys, ["export", str(folder), "--format", fmt, "-o", str(user)], name, "--force")
    assert user.read_bytes() == mine
    assert main(["export", str(folder), "--format", fmt, "-o", str(user), "--force"]) == 0
    first = user.read_bytes()
    assert first != mine
    assert main(["export", str(folder), "--format", fmt, "-o", str(user)]) == 0  # its own: replaced
    assert user.read_bytes() == first


def test_peft_export_replaces_any_folder_only_with_force(adapted, tmp_path, capsys):
    from edgelora.cli import main
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused_in_process(capsys, ["export", str(adapted[2]), "--format", "peft", "-o", str(mine)], "mine", "--force")
    assert main(["export", str(adapted[2]), "--format", "peft", "-o", str(mine), "--force"]) == 0
    assert sorted(p.name for p in mine.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
