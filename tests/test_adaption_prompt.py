"""LLaMA-Adapter's adaption prompts (seed 003) as a second adapter kind: trained by the same
trainer, zero-gated (untrained = the base model exactly), resumable, written as a bundle file, and
read back into peft with the same logits."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import assert_refused, cli_here
from safetensors.numpy import load_file

from edgelora import adaption_prompt as ap_mod
from edgelora.errors import UserError
from edgelora_export import train as train_mod
from edgelora_export.library import train_library
from edgelora_export.train import TrainConfig, evaluate, tokenize, train_adapter

CFG = TrainConfig(kind="adaption-prompt", adapter_len=4, adapter_layers=2, steps=6, batch=4, eval_every=2, heldout=8,
                  patience=100)
quiet = lambda *a: None  # noqa: E731


def arch(model) -> dict:
    return {"layers": len(model.model.layers), "hidden": model.config.hidden_size}


def logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


def test_defaults_follow_the_kind():
    assert TrainConfig().lr == train_mod.DEFAULT_LR["lora"]
    assert TrainConfig(kind="adaption-prompt").lr == train_mod.DEFAULT_LR["adaption-prompt"]
    with pytest.raises(UserError, match="--kind"):
        TrainConfig(kind="prefix")


def test_an_untrained_adapter_is_the_base_model_exactly(train_base, colors, tmp_path):
    """The gate starts at zero: the held-out loss before the first step is the base model's, to the
    bit, and training restores the base for the next task."""
    model, tok, fmt, _ = train_base
    row = train_adapter(model, tok, fmt, colors, tmp_path / "o", dataclasses.replace(CFG, steps=0), log=quiet)
    from edgelora.examples import load_examples
    examples = load_examples(colors)
    order = np.random.default_rng(CFG.seed).permutation(len(examples))
    held = tokenize([examples[i] for i in order], tok, fmt, CFG.max_len)[: min(CFG.heldout, len(examples) // 5)]
    shim = type("Peft", (), {"get_base_model": lambda self: model})()
    assert row["heldout_loss_start"] == evaluate(shim, held, tok.pad_token_id, CFG.batch)
    assert not any("adaption" in n for n, _ in model.named_parameters())
    gates = {k: v for k, v in load_file(tmp_path / "o" / "adapter_model.safetensors").items() if k.endswith("gate")}
    assert len(gates) == CFG.adapter_layers and all(v.tolist() == [0.0] for v in gates.values())


def test_a_trained_library_loads_back_into_peft_with_the_same_logits(train_base, colors, tmp_path, tiny_hf):
    """library --kind adaption-prompt: held-out loss falls, the bundle file holds the top layers'
    prompts and gates, and that file written as a PEFT folder gives peft's own logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "colors.jsonl").write_text(colors.read_text())
    rows = train_library(tmp_path / "tasks", tmp_path / "lib", CFG, str(tiny_hf), log=quiet)
    assert rows[0]["heldout_loss"] < rows[0]["heldout_loss_start"]
    base = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    ap = ap_mod.load_prompt(tmp_path / "lib" / "colors.safetensors")
    assert ap.prompt.shape == (2, 4, base.config.hidden_size) and ap.gate.shape == (2,) and np.all(ap.gate != 0)
    ids = torch.randint(0, base.config.vocab_size, (2, 11))
    want = logits(PeftModel.from_pretrained(base, tmp_path / "lib" / "peft" / "colors").eval(), ids)
    exact = ap_mod.from_peft(tmp_path / "lib" / "peft" / "colors", arch(base))
    ap_mod.to_peft(tmp_path / "exact", exact, arch(base), str(tiny_hf))
    ap_mod.to_peft(tmp_path / "fp16", ap, arch(base), str(tiny_hf))
    for folder, tol in (("exact", 0.0), ("fp16", 2e-2)):
        base = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
        got = logits(PeftModel.from_pretrained(base, tmp_path / folder).eval(), ids)
        np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    assert np.abs(want - logits(AutoModelForCausalLM.from_pretrained(tiny_hf).eval(), ids)).max() > 1e-3


def test_files_that_are_not_adaption_prompts_are_refused(tmp_path, tiny_hf):
    from helpers import make_peft_lora
    a = {"layers": 2, "hidden": 64}
    lora = make_peft_lora(tiny_hf, tmp_path / "lora", seed=0)
    with pytest.raises(UserError, match="peft_type LORA is not ADAPTION_PROMPT"):
        ap_mod.from_peft(lora, a)
    ok = ap_mod.AdaptionPrompt("x", np.zeros((2, 4, 64), np.float32), np.zeros(2, np.float32))
    ap_mod.save_prompt(tmp_path / "x.safetensors", ok)
    with pytest.raises(UserError, match="width 64 in 2 layers; the base has width 32"):
        ap_mod.check(ap_mod.load_prompt(tmp_path / "x.safetensors"), {"layers": 2, "hidden": 32}, "x")
    from edgelora.lora import load_lora
    with pytest.raises(UserError, match="not an edgelora LoRA"):
        load_lora(tmp_path / "x.safetensors")
    (tmp_path / "lora.safetensors").write_bytes((lora / "adapter_model.safetensors").read_bytes())
    with pytest.raises(UserError, match="not an edgelora adaption prompt"):
        ap_mod.load_prompt(tmp_path / "lora.safetensors")
    ap_mod.to_peft(tmp_path / "p", ok, a, "base")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**cfg, "adapter_layers": 1}))
    with pytest.raises(UserError, match="a prompt and a gate in each of layers 1..1; found others"):
        ap_mod.from_peft(tmp_path / "p", a)


def test_cli_refuses_what_it_cannot_train(capsys, colors, tmp_path, tiny_hf):
    export = "edgelora_export.cli"
    r = cli_here(capsys, export, "train", str(colors), "-o", str(tmp_path / "o"), "--kind", "adaption-prompt",
                 "--bundle", str(tmp_path))
    assert_refused(r, "--bundle", "adaption-prompt")
    r = cli_here(capsys, export, "train", str(colors), "-o", str(tmp_path / "o"), "--kind", "adaption-prompt",
                 "--adapter-len", "0")
    assert_refused(r, "--adapter-len 0")
    r = cli_here(capsys, export, "train", str(colors), "-o", str(tmp_path / "o"), "--base", str(tiny_hf),
                 "--kind", "adaption-prompt", "--adapter-layers", "9")
    assert_refused(r, "--adapter-layers 9: the base has 2 layers")


def test_the_scoring_graph_scores_an_adaption_prompt_as_peft(tiny_bundle_ro, tiny_hf, tmp_path):
    """The graph's prompt slot against peft's AdaptedAttention on the same random adapter (gated,
    in the top layer only), over packed examples of different lengths; gate 0 is the base exactly."""
    from helpers import encode, torch_losses
    from peft import PeftModel
    from test_bundle import EXAMPLES
    from transformers import AutoModelForCausalLM
    from edgelora.bundle import Bundle
    from edgelora.lora import zero_slots
    from edgelora.scorer import Scorer
    bundle = Bundle.open(tiny_bundle_ro)
    rng = np.random.default_rng(0)
    ap = ap_mod.AdaptionPrompt("rand", rng.normal(0, 1, (1, 5, bundle.arch["hidden"])).astype(np.float32),
                               np.array([0.7], np.float32))
    ap_mod.to_peft(tmp_path / "peft", ap, bundle.arch, str(tiny_hf))
    batch = encode(bundle, EXAMPLES)
    scorer = Scorer(bundle)
    scorer.bind(batch)
    no_lora = zero_slots(bundle.targets, bundle.arch["layers"])
    loss, lp = scorer.run(*no_lora, prompt=ap)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_hf), tmp_path / "peft").eval()
    ref_loss, ref_lp = torch_losses(ref, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-4, atol=1e-4)
    base_loss = scorer.run(*no_lora)[0]
    assert np.abs(base_loss - loss).max() > 1e-3  # the prompt changed something
    shut = ap_mod.AdaptionPrompt("shut", ap.prompt, np.zeros(1, np.float32))
    np.testing.assert_array_equal(scorer.run(*no_lora, prompt=shut)[0], base_loss)


def test_the_written_decoder_carries_the_prompt_as_peft_decodes(tiny_bundle_ro, tiny_hf, tmp_path):
    """write_model(prompt=): onnxruntime alone, with edgelora's Decoder, greedy-decodes what peft's
    AdaptionPrompt model decodes, where the base model decodes something else."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from edgelora.bundle import Bundle
    from edgelora.generate import Decoder
    from edgelora.writeback import write_model
    bundle = Bundle.open(tiny_bundle_ro)
    rng = np.random.default_rng(1)
    ap = ap_mod.AdaptionPrompt("rand", rng.normal(0, 2, (2, 3, bundle.arch["hidden"])).astype(np.float32),
                               np.array([0.9, -1.3], np.float32))
    ap_mod.to_peft(tmp_path / "peft", ap, bundle.arch, str(tiny_hf))
    ids = bundle.tokenizer().encode(bundle.prompt_format.prompt("The quick brown fox"), add_special_tokens=False).ids
    ours = list(Decoder(write_model(bundle, None, None, tmp_path / "m", quant="none", prompt=ap), eos_ids=[])
                .stream(ids, max_new_tokens=12))
    base = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_hf), tmp_path / "peft").eval()
    with torch.no_grad():
        want = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
        plain = base.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
    assert ours == want and want != plain
    int4 = Decoder(write_model(bundle, None, None, tmp_path / "q", quant="int4", prompt=ap), eos_ids=[])
    assert len(list(int4.stream(ids, max_new_tokens=12))) == 12  # the prompt's nodes stay fp32 beside int4 weights


def random_prompt(name: str, arch: dict, seed: int, layers: int = 2, length: int = 3) -> ap_mod.AdaptionPrompt:
    rng = np.random.default_rng(seed)
    return ap_mod.AdaptionPrompt(name, rng.normal(0, 2, (layers, length, arch["hidden"])).astype(np.float32),
                                 rng.normal(0, 1, layers).astype(np.float32))


@pytest.fixture
def prompt_library(tiny_bundle, tmp_path):
    """Three random adaption prompts installed as the bundle's prompts library, as `edgelora-export
    library --kind adaption-prompt --bundle` installs a trained one."""
    from edgelora.bundle import Bundle
    from edgelora_export.lora import install_library
    arch_ = Bundle.open(tiny_bundle).arch
    files = []
    for i in range(3):
        files.append(tmp_path / "lib" / f"task{i}.safetensors")
        files[-1].parent.mkdir(exist_ok=True)
        ap_mod.save_prompt(files[-1], random_prompt(f"task{i}", arch_, seed=10 + i), np.float32)
    install_library(files, tiny_bundle, "prompts")
    return Bundle.open(tiny_bundle)


def test_adapt_composes_adaption_prompts_and_writes_what_it_scored(prompt_library, tiny_hf, tmp_path, capsys):
    """adapt --kind adaption-prompt: each library prompt ranked alone is the scorer's loss for that
    prompt; the result's loss is the scorer's loss for the composed prompt Σ wᵢPᵢ, Σ wᵢgᵢ; the
    written adapter/ is a PEFT AdaptionPromptConfig folder, and the written model greedy-decodes
    what peft decodes with it."""
    from peft import PeftModel
    from test_adapt import PROMPTS
    from transformers import AutoModelForCausalLM
    from edgelora.examples import Example
    from edgelora.generate import Decoder
    from edgelora.outputs import write_outputs
    from edgelora.scorer import Scorer
    from edgelora.search import adapt, pooled_loss
    bundle = prompt_library
    examples = [Example(p, a) for p, a in zip(PROMPTS, ["5", "yes", "colours", "a date", "jumps"])]
    res = adapt(examples, bundle, kind="adaption-prompt", budget=12, n_loras=3, warn=quiet)
    assert sorted(res.loras) == ["task0", "task1", "task2"] and res.settings["kind"] == "adaption-prompt"
    from helpers import encode
    scorer = Scorer(bundle)
    batch = encode(bundle, examples)
    scorer.bind(batch)
    n = float(batch.target_mask.sum())
    library = {p.stem: ap_mod.load_prompt(p) for p in bundle.lora_paths("prompts").values()}
    alone = {k: pooled_loss(scorer.run(None, None, prompt=p)[1], n) for k, p in library.items()}
    assert res.loras == sorted(alone, key=alone.get)  # ranked by their loss alone, the best first
    first = [e for e in res.history if e.weights == [1.0, 0.0, 0.0]]
    assert len(first) == 1 and first[0].loss == pytest.approx(alone[res.loras[0]], rel=1e-6)
    composed = res.merged()
    w = res.weights.astype(np.float32)
    np.testing.assert_allclose(composed.prompt, sum(wi * library[k].prompt for wi, k in zip(w, res.loras)), atol=1e-5)
    np.testing.assert_allclose(composed.gate, sum(wi * library[k].gate for wi, k in zip(w, res.loras)), atol=1e-6)
    assert res.loss == pytest.approx(pooled_loss(scorer.run(None, None, prompt=composed)[1], n), rel=1e-6)

    write_outputs(res, bundle, tmp_path / "out", quant="none")
    meta = json.loads((tmp_path / "out" / "edgelora.json").read_text())
    assert meta["lora"] is None and meta["adaption_prompt"]["layers"] == 2
    ids = bundle.tokenizer().encode(bundle.prompt_format.prompt(PROMPTS[0]), add_special_tokens=False).ids
    ours = list(Decoder(tmp_path / "out" / "model.onnx", eos_ids=[]).stream(ids, max_new_tokens=8))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_hf), tmp_path / "out" / "adapter").eval()
    with torch.no_grad():
        want = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
    assert ours == want
    (tmp_path / "t.jsonl").write_text(json.dumps({"input": PROMPTS[0], "output": "5"}) + "\n")
    r = cli_here(capsys, "edgelora.cli", "eval", str(tmp_path / "t.jsonl"), "--model", str(tmp_path / "out"),
                 "--library", "per-task")
    assert_refused(r, "adapted with the prompts library")


def test_adapt_refuses_what_adaption_prompts_cannot_do(prompt_library, tiny_bundle_ro, capsys, tmp_path):
    """LoRA-only settings, a bundle without the library, and a LoRA export of a prompt output:
    each one line."""
    from test_adapt import PROMPTS
    from edgelora.examples import Example
    from edgelora.outputs import write_outputs
    from edgelora.search import adapt
    ex = tmp_path / "ex.jsonl"
    ex.write_text("".join(json.dumps({"input": p, "output": "x"}) + "\n" for p in PROMPTS))
    for flags, words in ((["--optimizer", "surrogate", "--compose", "cat"], ["--optimizer surrogate", "LoRAs only"]),
                         (["--select", "arrow"], ["--select arrow"]), (["--library", "mbc"], ["--library mbc"]),
                         (["--compose", "cat"], ["--compose cat"])):
        r = cli_here(capsys, "edgelora.cli", "adapt", str(ex), "--bundle", str(prompt_library.path), "--kind",
                     "adaption-prompt", *flags)
        assert_refused(r, *words)
    r = cli_here(capsys, "edgelora.cli", "adapt", str(ex), "--bundle", str(tiny_bundle_ro), "--kind", "adaption-prompt")
    assert_refused(r, "no prompts library", "--kind adaption-prompt --bundle")
    res = adapt([Example(p, "x") for p in PROMPTS], prompt_library, kind="adaption-prompt", budget=4, warn=quiet)
    write_outputs(res, prompt_library, tmp_path / "out", quant=None)
    r = cli_here(capsys, "edgelora.cli", "export", str(tmp_path / "out"), "--format", "gguf")
    assert_refused(r, "composes adaption prompts", "AdaptionPromptConfig")


def test_library_bundle_installs_the_prompts_library(capsys, colors, tmp_path, tiny_hf, tiny_bundle):
    """edgelora-export library --kind adaption-prompt --bundle: the trained prompts become the
    bundle's prompts library (hashed in the manifest; `edgelora info` lists them); --clusters,
    which clusters LoRAs, is refused for this kind."""
    from edgelora.bundle import Bundle
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "colors.jsonl").write_text(colors.read_text())
    flags = ["--base", str(tiny_hf), "--kind", "adaption-prompt", "--adapter-len", "4", "--adapter-layers", "2",
             "--steps", "2", "--eval-every", "2", "--bundle", str(tiny_bundle)]
    r = cli_here(capsys, "edgelora_export.cli", "library", str(tmp_path / "tasks"), "-o", str(tmp_path / "lib"), *flags,
                 "--clusters", str(tmp_path / "c.json"))
    assert_refused(r, "--clusters", "adaption-prompt")
    r = cli_here(capsys, "edgelora_export.cli", "library", str(tmp_path / "tasks"), "-o", str(tmp_path / "lib"), *flags)
    assert r.returncode == 0, r.stderr
    bundle = Bundle.open(tiny_bundle)
    assert list(bundle.lora_paths("prompts")) == ["colors"] and bundle.verify() == []
    assert ap_mod.load_prompt(bundle.lora_paths("prompts")["colors"]).prompt.shape == (2, 4, bundle.arch["hidden"])
    r = cli_here(capsys, "edgelora.cli", "info", "--bundle", str(tiny_bundle), "--json")
    assert [p["name"] for p in json.loads(r.stdout)["adaption_prompts"]] == ["colors"]


def test_export_base_prompts_installs_the_shipped_prompt_library(tiny_bundle, capsys, monkeypatch, tmp_path):
    """`edgelora-export base --prompts`, on a bundle that exists, installs the shipped adaption-prompt
    library as its prompts library (here stand-ins shaped for the tiny model: the shipped ones are
    SmolLM2's), so `adapt --kind adaption-prompt` needs no training."""
    from edgelora.bundle import Bundle
    from edgelora_export import lora as export_lora
    arch_ = Bundle.open(tiny_bundle).arch
    for i in range(2):
        ap_mod.save_prompt(tmp_path / f"task{i}.safetensors", random_prompt(f"task{i}", arch_, seed=i))
    monkeypatch.setitem(export_lora.SHIPPED, "prompts", tmp_path)
    r = cli_here(capsys, "edgelora_export.cli", "base", "-o", str(tiny_bundle), "--prompts")
    assert r.returncode == 0, r.stderr
    bundle = Bundle.open(tiny_bundle)
    assert sorted(bundle.lora_paths("prompts")) == ["task0", "task1"] and bundle.verify() == []
