"""The bundle: scoring graph parity with torch + PEFT, decoder parity with transformers,
PEFT round trip, and every refusal as one line with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_refused, cli_here, encode, make_peft_lora, torch_losses
from helpers import cli as run_cli

from edgelora.bundle import Bundle
from edgelora.examples import Example
from edgelora.generate import Decoder
from edgelora.lora import LoraStack, load_lora, zero_slots
from edgelora.scorer import Scorer

EXAMPLES = [Example("What is 2 plus 3?", "5"), Example("Is the following sentence plausible?", "yes"),
            Example("red green blue", "orange purple white black"), Example("Today is 01/02/1987.", "01/03/1987")]


def test_zero_slots_equal_plain_model(tiny_bundle_ro, tiny_hf):
    from transformers import AutoModelForCausalLM
    bundle = Bundle.open(tiny_bundle_ro)
    batch = encode(bundle, EXAMPLES)
    scorer = Scorer(bundle)
    scorer.bind(batch)
    loss, lp = scorer.run(*zero_slots(bundle.targets, bundle.arch["layers"]))
    ref_loss, ref_lp = torch_losses(AutoModelForCausalLM.from_pretrained(tiny_hf).eval(), batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-4)


def test_scoring_matches_peft(tiny_bundle, tiny_hf, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    peft_dir = make_peft_lora(tiny_hf, tmp_path / "peft", seed=1, r=4, alpha=8)
    from edgelora_export.lora import add_lora
    add_lora(peft_dir, tiny_bundle, "rand")
    bundle = Bundle.open(tiny_bundle)
    lora = load_lora(bundle.lora_paths()["rand"])
    A, B = LoraStack([lora], list(bundle.targets)).compose(np.ones(1))
    batch = encode(bundle, EXAMPLES)
    scorer = Scorer(bundle)
    scorer.bind(batch)
    loss, lp = scorer.run(A, B)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_hf), peft_dir).eval()
    ref_loss, ref_lp = torch_losses(ref, batch)
    base_loss = scorer.losses(*zero_slots(bundle.targets, bundle.arch["layers"]))
    assert np.abs(loss - base_loss).max() > 1e-2  # the LoRA really changes the model
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-4)


def test_scoring_graph_shares_the_decoders_weights(tiny_bundle_ro):
    """The base weights are stored once: the scoring graph's weights are references into the
    decoder's data file (the tied embedding through a Transpose), and every one of the tiny
    model's weight matrices is found there; the graph's parity tests above run on this bundle."""
    import onnx
    bundle = Bundle.open(tiny_bundle_ro)
    graph = onnx.load(str(bundle.scoring_path), load_external_data=False).graph
    refs = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert refs and {e.value for t in refs for e in t.external_data if e.key == "location"} == {"decoder/model.onnx.data"}
    inline = sum(len(t.raw_data) for t in graph.initializer)
    shared = sum(int(e.value) for t in refs for e in t.external_data if e.key == "length")
    assert len(refs) >= 7 * bundle.arch["layers"] + 1  # every projection and the embedding
    assert inline < 0.05 * shared


def test_decoder_greedy_matches_transformers(tiny_bundle_ro, tiny_hf):
    import torch
    from transformers import AutoModelForCausalLM
    bundle = Bundle.open(tiny_bundle_ro)
    ids = bundle.tokenizer().encode(bundle.prompt_format.prompt("The quick brown fox"), add_special_tokens=False).ids
    dec = Decoder(bundle.decoder_dir / "model.onnx", eos_ids=[])
    ours = list(dec.stream(ids, max_new_tokens=20))
    model = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert ours == out[0, len(ids):].tolist()


def test_decoder_position_ids_are_honoured_like_transformers(tiny_bundle_ro, tiny_hf):
    """The decoder takes `position_ids` (optimum loads a decoder without it only as a legacy
    model): a cached step placed 3 positions further on gives transformers' logits for that
    position, not the ones of the next position."""
    import torch
    from transformers import AutoModelForCausalLM
    bundle = Bundle.open(tiny_bundle_ro)
    sess = Decoder(bundle.decoder_dir / "model.onnx", eos_ids=[]).session
    names = [i.name for i in sess.get_inputs()]
    assert "position_ids" in names
    ids = bundle.tokenizer().encode("The quick brown fox", add_special_tokens=False).ids
    n, past = len(ids), [k for k in names if k.startswith("past_key_values.")]
    kv = sess.get_inputs()[names.index(past[0])].shape
    empty = {k: np.zeros((1, kv[1], 0, kv[3]), np.float32) for k in past}
    out = sess.run(None, {"input_ids": np.array([ids]), "attention_mask": np.ones((1, n), np.int64),
                          "position_ids": np.arange(n)[None], **empty})
    cache = dict(zip(past, out[1:]))

    def step(pos: int) -> np.ndarray:
        return sess.run(["logits"], {"input_ids": np.array([[7]]), "attention_mask": np.ones((1, n + 1), np.int64),
                                     "position_ids": np.array([[pos]]), **cache})[0][0, -1]

    model = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    for pos in (n, n + 3):
        with torch.no_grad():
            want = model(torch.tensor([ids + [7]]), position_ids=torch.tensor([[*range(n), pos]])).logits[0, -1].numpy()
        np.testing.assert_allclose(step(pos), want, atol=1e-4)
    assert np.abs(step(n) - step(n + 3)).max() > 1e-3


def test_peft_round_trip_is_bit_exact(tiny_bundle, tiny_hf, tmp_path):
    from safetensors.numpy import load_file
    peft_dir = make_peft_lora(tiny_hf, tmp_path / "peft", seed=2, r=3, alpha=5)
    r = run_cli("edgelora_export.cli", "lora", str(peft_dir), "--bundle", str(tiny_bundle), "--name", "rt",
                "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    bundle = Bundle.open(tiny_bundle)
    assert bundle.verify() == []
    lora = load_lora(bundle.lora_paths()["rt"])
    assert (lora.rank, lora.alpha) == (3, 5.0)
    src = load_file(peft_dir / "adapter_model.safetensors")
    for m in ("q_proj", "v_proj"):
        for i in range(2):
            key = f"base_model.model.model.layers.{i}.self_attn.{m}.lora_%s.weight"
            assert np.array_equal(lora.A[m][i], src[key % "A"])
            assert np.array_equal(lora.B[m][i], src[key % "B"])


def test_refuses_lora_for_another_base(tiny_bundle, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM
    other = tmp_path / "other"
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(other)
    peft_dir = make_peft_lora(other, tmp_path / "peft", seed=0)
    r = cli_here(capsys, "edgelora_export.cli", "lora", str(peft_dir), "--bundle", str(tiny_bundle))
    assert_refused(r, "q_proj", "(2, 4, 32)", "(2, 4, 64)")


def test_refuses_lora_with_missing_target(tiny_bundle, tiny_hf, tmp_path, capsys):
    peft_dir = make_peft_lora(tiny_hf, tmp_path / "peft", seed=0, targets=("k_proj",))
    r = cli_here(capsys, "edgelora_export.cli", "lora", str(peft_dir), "--bundle", str(tiny_bundle))
    assert_refused(r, "k_proj", "not a LoRA target")


def test_refuses_non_peft_folder(tiny_bundle, tmp_path, capsys):
    r = cli_here(capsys, "edgelora_export.cli", "lora", str(tmp_path), "--bundle", str(tiny_bundle))
    assert_refused(r, "adapter_config.json")


def test_refuses_non_llama_model(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    r = cli_here(capsys, "edgelora_export.cli", "base", str(tmp_path / "m"), "-o", str(tmp_path / "b"))
    assert_refused(r, "gpt2", "Llama-family")


def test_refuses_unknown_target(tiny_hf, tmp_path, capsys):
    r = cli_here(capsys, "edgelora_export.cli", "base", str(tiny_hf), "-o", str(tmp_path / "b"), "--targets", "q_proj,lm_head")
    assert_refused(r, "lm_head", "linear projection")


def test_refuses_missing_source(tmp_path, capsys):
    r = cli_here(capsys, "edgelora_export.cli", "base", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "b"))
    assert_refused(r, "nope.gguf", "no such file")


def test_open_and_verify_detect_damage(tiny_bundle):
    r = run_cli("edgelora.cli", "verify", "--bundle", str(tiny_bundle))
    assert r.returncode == 0, r.stderr
    data = bytearray((tiny_bundle / "tokenizer.json").read_bytes())
    data[10] ^= 1
    (tiny_bundle / "tokenizer.json").write_bytes(bytes(data))
    r = run_cli("edgelora.cli", "verify", "--bundle", str(tiny_bundle))
    assert_refused(r, "tokenizer.json")
    (tiny_bundle / "scoring.onnx").write_bytes(b"short")
    r = run_cli("edgelora.cli", "info", "--bundle", str(tiny_bundle))
    assert_refused(r, "scoring.onnx", "bytes")


def test_missing_bundle_says_how_to_build(tmp_path):
    r = run_cli("edgelora.cli", "info", "--bundle", str(tmp_path / "none"))
    assert_refused(r, "edgelora-export base")


def test_info_lists_loras(tiny_bundle, tiny_hf, tmp_path):
    from edgelora_export.lora import add_lora
    add_lora(make_peft_lora(tiny_hf, tmp_path / "peft", seed=3), tiny_bundle, "task_a")
    r = run_cli("edgelora.cli", "info", "--bundle", str(tiny_bundle), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["loras"] == [{"name": "task_a", "rank": 4, "alpha": 8.0, "source": str(tiny_hf)}]  # the PEFT base
    assert info["targets"]["v_proj"] == {"in": 64, "out": 32}


def test_closed_stdout_is_not_a_traceback(tiny_bundle_ro):
    """`edgelora info | head -1`: the reader leaves before the output ends."""
    p = subprocess.Popen([sys.executable, "-m", "edgelora.cli", "info", "--bundle", str(tiny_bundle_ro)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before the interpreter has even started: every write meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait() == 141 and "Traceback" not in err and "Exception" not in err, err


def test_prototypes_are_the_top_right_singular_vectors(tiny_bundle_ro):
    from edgelora.lora import Lora, prototypes
    rng = np.random.default_rng(0)
    bundle = Bundle.open(tiny_bundle_ro)
    L = bundle.arch["layers"]
    A = {m: rng.normal(size=(L, 4, t["in"])).astype(np.float32) for m, t in bundle.targets.items()}
    B = {m: rng.normal(size=(L, t["out"], 4)).astype(np.float32) for m, t in bundle.targets.items()}
    protos = prototypes(Lora("x", 4, 8.0, A, B))
    for m in bundle.targets:
        for i in range(L):
            v = np.linalg.svd(B[m][i].astype(np.float64) @ A[m][i])[2][0]
            assert abs(float(protos[m][i] @ v)) == pytest.approx(1.0, abs=1e-5)
            assert np.linalg.norm(protos[m][i]) == pytest.approx(1.0, abs=1e-5)


def test_arrow_scores_are_x_dot_prototype_at_every_token(tiny_bundle_ro, tiny_hf):
    """The scoring graph's x·Aᵀ outputs, fed prototypes, equal x·v with x each target module's
    input in the torch model run on each example alone (hooks), at every packed token."""
    import torch
    from transformers import AutoModelForCausalLM
    from edgelora.arrow import routing_slots
    bundle = Bundle.open(tiny_bundle_ro)
    L, rng = bundle.arch["layers"], np.random.default_rng(1)
    protos = [{m: rng.normal(size=(L, t["in"])).astype(np.float32) for m, t in bundle.targets.items()} for _ in range(3)]
    batch = encode(bundle, EXAMPLES)
    scorer = Scorer(bundle)
    scorer.bind(batch)
    _, _, *xa = scorer.run(*routing_slots(protos, bundle.targets, L), xa=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    for j, m in enumerate(bundle.targets):
        V = np.stack([p[m] for p in protos], axis=1)  # [L, N, d]
        for i, (p, t) in enumerate(batch.rows):
            seen = []
            hooks = [layer.get_submodule(bundle.targets[m]["path"]).register_forward_hook(
                lambda mod, inp, out: seen.append(inp[0][0].numpy())) for layer in model.model.layers]
            with torch.no_grad():
                model(input_ids=torch.tensor([p + t]))
            for h in hooks:
                h.remove()
            rows = batch.gather_idx[i, : len(p) + len(t)]  # example i's packed positions, in order
            for l in range(L):
                np.testing.assert_allclose(xa[j][l, rows], seen[l] @ V[l].T, rtol=1e-3, atol=1e-4)


LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)


@pytest.mark.parametrize("examples", [
    [Example(LONG, "yes"), Example("red", "orange purple white black " * 3), Example("Today is 01/02/1987.", "5")],
    [Example("What is 2 plus 3?", "5")],  # one example: the whole prompt is the shared prefix
    [Example("red green blue", "yes"), Example("red green blue", "no")],  # same prompt, different answers
], ids=["lengths", "one", "same-prompt"])
def test_packed_losses_match_peft_without_padding(tiny_bundle, tiny_hf, tmp_path, examples):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from edgelora_export.lora import add_lora
    add_lora(make_peft_lora(tiny_hf, tmp_path / "peft", seed=2, r=4, alpha=8), tiny_bundle, "rand", dtype="fp32")
    bundle = Bundle.open(tiny_bundle)
    batch = encode(bundle, examples)
    own = [len(p) + len(t) - batch.prefix_len for p, t in batch.rows]
    assert batch.n_tokens == batch.prefix_len + sum(own)  # the prefix once, no padding
    assert batch.prefix_len > 0 and min(own) >= 1
    scorer = Scorer(bundle)
    scorer.bind(batch)
    loss, lp = scorer.run(*LoraStack([load_lora(bundle.lora_paths()["rand"])], list(bundle.targets)).compose(np.ones(1)))
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_hf), tmp_path / "peft").eval()
    ref_loss, ref_lp = torch_losses(ref, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-4)


def peft_with_config(hf_dir, out, seed: int = 0, **config):
    """A random PEFT LoRA saved by peft itself, and each target's merged ΔW per layer as peft's own
    merge_and_unload computes it (the reference from_peft must reproduce)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(hf_dir)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **config))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    merged = dict(model.merge_and_unload().named_parameters())
    return {n: (merged[n].detach() - w).numpy() for n, w in before.items() if n in merged}


@pytest.mark.parametrize("config", [
    {"rank_pattern": {"v_proj": 2, "layers.1.self_attn.q_proj": 6}, "alpha_pattern": {"q_proj": 3, "layers.0.self_attn.v_proj": 20}},
    {"alpha_pattern": {"v_proj": 1.5}},
    {"rank_pattern": {"q_proj": 2}, "use_rslora": True},
])
def test_from_peft_honours_rank_and_alpha_patterns(tiny_bundle_ro, tiny_hf, tmp_path, config):
    """A LoRA whose modules have their own rank and alpha (peft's rank_pattern / alpha_pattern,
    matched on module names as peft matches them): its ΔW per layer and module equals peft's merge."""
    from edgelora.lora import delta, from_peft
    bundle = Bundle.open(tiny_bundle_ro)
    want = peft_with_config(tiny_hf, tmp_path / "p", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **config)
    lora = from_peft(tmp_path / "p", bundle.targets, bundle.arch["layers"])
    for m, t in bundle.targets.items():
        got = delta(lora.A[m], lora.B[m] * lora.scale)
        for i in range(bundle.arch["layers"]):
            np.testing.assert_allclose(got[i], want[f"model.layers.{i}.{t['path']}.weight"], rtol=1e-5, atol=1e-6)


def test_from_peft_refuses_what_a_lora_cannot_hold(tiny_bundle_ro, tiny_hf, tmp_path):
    """Biases (bias "all"/"lora_only", lora_bias, a bias tensor) and modules_to_save change the model
    beyond B·A: refused in one line naming the field, never dropped."""
    from safetensors.numpy import load_file, save_file
    from edgelora.errors import UserError
    from edgelora.lora import from_peft
    bundle = Bundle.open(tiny_bundle_ro)
    src = make_peft_lora(tiny_hf, tmp_path / "src", seed=1)
    cfg, tensors = json.loads((src / "adapter_config.json").read_text()), load_file(src / "adapter_model.safetensors")
    bias = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    cases = [({"bias": "all"}, {}, "bias"), ({"bias": "lora_only"}, {}, "bias"), ({"lora_bias": True}, {}, "lora_bias"),
             ({"modules_to_save": ["lm_head"]}, {}, "modules_to_save"),
             ({}, {bias: np.zeros(32, np.float32)}, bias),
             ({}, {"base_model.model.lm_head.weight": np.zeros((400, 64), np.float32)}, "lm_head.weight"),
             ({"rank_pattern": {"q_proj": 0}}, {}, "rank_pattern"), ({"alpha_pattern": {"q_proj": "x"}}, {}, "alpha_pattern")]
    for n, (edit, extra, word) in enumerate(cases):
        folder = tmp_path / f"case{n}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, **edit}))
        save_file({**tensors, **extra}, folder / "adapter_model.safetensors")
        with pytest.raises(UserError) as e:
            from_peft(folder, bundle.targets, bundle.arch["layers"])
        assert word in str(e.value) and "\n" not in str(e.value), (edit, str(e.value))
