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
