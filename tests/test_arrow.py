"""Arrow routing at inference (`--route arrow`): the routed decoder graph against peft's
`create_arrow_model` (GenKnowSub included), against a numpy reference of the routing, cached
decoding against the full sequence, and every refusal as one line with exit code 2."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from helpers import assert_refused, cli, make_peft_lora

from edgelora.bundle import Bundle
from edgelora.generate import Decoder
from edgelora.arrow import ArrowRoute, arrow_library, arrow_weights, routed_decoder
from edgelora.lora import load_lora

TASKS, GENERAL = ["t0", "t1", "t2", "t3"], ["g0", "g1"]
TEXT = "The quick brown fox jumps over the lazy dog. red green blue. Today is 01/02/1987."


def peaked_lora(hf_dir, out, seed):
    """A random PEFT LoRA whose B·A has one clearly dominant singular value: peft finds the
    prototype by 15 steps of power iteration, which only converge (to the SVD's vector that
    edgelora computes exactly) when the top singular value stands apart."""
    from safetensors.torch import load_file, save_file
    make_peft_lora(hf_dir, out, seed=seed, r=4, alpha=8, std=0.3)
    f = out / "adapter_model.safetensors"
    t = load_file(f)
    for k in t:
        if "lora_B" in k:
            t[k][:, 0] *= 4
        elif "lora_A" in k:
            t[k][0, :] *= 2
    save_file({k: v.contiguous() for k, v in t.items()}, f, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def arrow_bundle(tiny_bundle_ro, tiny_hf, tmp_path_factory):
    """The tiny bundle with four task LoRAs and two general ones (fp32), and their PEFT folders."""
    from edgelora_export.lora import add_lora
    root = tmp_path_factory.mktemp("arrow")
    bundle = root / "bundle"
    shutil.copytree(tiny_bundle_ro, bundle)
    peft = {}
    for i, name in enumerate(TASKS + GENERAL):
        peft[name] = peaked_lora(tiny_hf, root / "peft" / name, seed=20 + i)
        add_lora(peft[name], bundle, name, dtype="fp32")
    return bundle, peft


def prompt_ids(bundle: Bundle) -> list[int]:
    return bundle.tokenizer().encode(bundle.prompt_format.prompt(TEXT), add_special_tokens=False).ids


def peft_logits(hf_dir, peft: dict, ids: list[int], route: ArrowRoute) -> np.ndarray:
    import torch
    from peft import ArrowConfig, create_arrow_model
    from transformers import AutoModelForCausalLM
    tasks = [n for n in sorted(peft) if n not in route.gks]
    config = ArrowConfig(top_k=route.top_k, router_temperature=route.temperature, use_gks=bool(route.gks), rng_seed=0)
    model = create_arrow_model(AutoModelForCausalLM.from_pretrained(hf_dir).eval(), [str(peft[n]) for n in tasks],
                               config, general_adapter_paths=[str(peft[n]) for n in route.gks] or None).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("route", [ArrowRoute(top_k=2), ArrowRoute(top_k=3, temperature=0.5),
                                   ArrowRoute(top_k=2, gks=tuple(GENERAL))], ids=["top2", "top3-T0.5", "gks"])
def test_routed_logits_match_peft(arrow_bundle, tiny_hf, route):
    import torch
    from transformers import AutoModelForCausalLM
    path, peft = arrow_bundle
    bundle = Bundle.open(path)
    ids = prompt_ids(bundle)
    ours = Decoder(routed_decoder(bundle, route), eos_ids=[]).forward(ids, 0)
    ref = peft_logits(tiny_hf, peft, ids, route)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ref - plain).max() > 0.5  # the routed LoRAs really change the model
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_routing_matches_numpy_reference(arrow_bundle, tmp_path):
    """One target's input x and added output read from the graph equal numpy's routing:
    |x·v| per LoRA, top-k, softmax, Σ wᵢ·scaleᵢ·(x·Aᵢᵀ)·Bᵢᵀ over the LoRAs loaded alone."""
    path, _ = arrow_bundle
    bundle = Bundle.open(path)
    route = ArrowRoute(top_k=2)
    model = onnx.load(str(routed_decoder(bundle, route)))
    x_name = next(n.input[0] for n in model.graph.node if n.name == "arrow/v_proj/1/score")
    probes = [x_name, "arrow/v_proj/1/top_idx", "arrow/v_proj/1/top_w", "arrow/v_proj/1/delta"]
    for name in probes:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    onnx.save(model, str(tmp_path / "probe.onnx"))
    dec = Decoder(tmp_path / "probe.onnx", eos_ids=[])
    ids = prompt_ids(bundle)
    feeds = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64),
             "position_ids": np.arange(len(ids))[None],
             **{n: np.zeros((1, dec.kv_heads, 0, dec.head_dim), np.float32) for n in dec.past_names},
             "arrow_gate": np.ones(1, np.float32)}
    x, idx, top_w, d = (a[0] for a in dec.session.run(probes, feeds))
    w = np.zeros((len(ids), len(bundle.lora_paths())), np.float32)
    np.put_along_axis(w, idx, top_w, axis=-1)  # each token's kept LoRAs' weights, 0 elsewhere
    loras = [load_lora(p) for p in bundle.lora_paths().values()]
    ref_w = arrow_weights(x @ arrow_library(loras).protos["v_proj"][1], top_k=2)
    assert ((ref_w > 0).sum(-1) == 2).all()
    np.testing.assert_allclose(w, ref_w, atol=1e-6)
    ref_d = sum(ref_w[:, [i]] * l.scale * (x @ l.A["v_proj"][1].T) @ l.B["v_proj"][1].T for i, l in enumerate(loras))
    np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-5)


def test_cached_decode_equals_full_sequence(arrow_bundle):
    path, _ = arrow_bundle
    bundle = Bundle.open(path)
    dec = Decoder(routed_decoder(bundle, ArrowRoute(top_k=2)), eos_ids=[])
    ids = prompt_ids(bundle)
    full = dec.forward(ids, 0)
    n = len(ids) // 2
    steps = [dec.forward(ids[:n], 0)] + [dec.forward([ids[k]], k) for k in range(n, len(ids))]
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-4, rtol=0)


def run_cli(*args):
    return cli("edgelora.cli", *args)


def test_generate_routes_and_caches_outside_the_bundle(arrow_bundle, edgelora_home):
    path, _ = arrow_bundle
    r = run_cli("generate", str(path), "red green", "--route", "arrow", "--top-k", "2", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    cached = sorted((edgelora_home / "routed").glob("*/model.onnx.data"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = run_cli("generate", str(path), "red green", "--route", "arrow", "--top-k", "2", "--max-new-tokens", "5")
    assert again.stdout == r.stdout and cached[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert Bundle.open(path).verify() == []
    with open(cached[0], "r+b") as f:  # a damaged cache is rebuilt, not run
        f.write(b"\0" * 64)
    third = run_cli("generate", str(path), "red green", "--route", "arrow", "--top-k", "2", "--max-new-tokens", "5")
    assert third.stdout == r.stdout and cached[0].stat().st_mtime_ns != stamp


@pytest.mark.parametrize("flags,words", [
    (["--top-k", "0"], ["--top-k 0"]),
    (["--top-k", "7"], ["--top-k 7", "6 LoRAs"]),
    (["--gks", "g0", "--top-k", "6"], ["--top-k 6", "5 LoRAs"]),
    (["--gks", "nope"], ["--gks nope", "no LoRA"]),
    (["--gks", *TASKS, *GENERAL], ["--gks", "none is left"]),
], ids=["top-k-0", "top-k-too-many", "top-k-over-gks", "gks-unknown", "gks-all"])
def test_bad_route_flags_are_one_line(arrow_bundle, flags, words):
    path, _ = arrow_bundle
    assert_refused(run_cli("generate", str(path), "hi", "--route", "arrow", *flags), *words)


def test_route_flags_need_route(arrow_bundle):
    path, _ = arrow_bundle
    assert_refused(run_cli("generate", str(path), "hi", "--top-k", "2"), "--route arrow")


def test_route_needs_a_library(tiny_bundle_ro, tmp_path):
    assert_refused(run_cli("generate", str(tiny_bundle_ro), "hi", "--route", "arrow"), "no per-task library")
    task = tmp_path / "task.jsonl"
    task.write_text('{"input": "hi", "output": "yes"}\n')
    assert_refused(run_cli("eval", str(task), "--model", str(tiny_bundle_ro), "--route", "arrow"), "no per-task library")
    assert_refused(run_cli("eval", str(task), "--model", str(tiny_bundle_ro), "--route", "arrow", "--library", "mbc"),
                   "no mbc library", "edgelora-export library")
    assert_refused(run_cli("generate", str(tiny_bundle_ro), "hi", "--library", "mbc"), "--library", "--route arrow")


def test_route_over_the_mbc_library(arrow_bundle, tiny_bundle_ro, tmp_path, edgelora_home):
    """`--library mbc` routes the bundle's second library, in a graph of its own: the same two
    LoRAs routed as a bundle's mbc library and as another's per-task library give the same logits."""
    from edgelora_export.lora import add_lora
    _, peft = arrow_bundle
    ids = None
    logits = {}
    for library in ("per-task", "mbc"):
        path = tmp_path / library
        shutil.copytree(tiny_bundle_ro, path)
        for name in TASKS[:2]:
            add_lora(peft[name], path, name, dtype="fp32", library=library)
        bundle = Bundle.open(path)
        ids = ids or prompt_ids(bundle)
        graph = routed_decoder(bundle, ArrowRoute(top_k=1, library=library))
        assert graph.parent.name.endswith("-mbc") == (library == "mbc")
        logits[library] = Decoder(graph, eos_ids=[]).forward(ids, 0)
    np.testing.assert_allclose(logits["mbc"], logits["per-task"], atol=1e-5, rtol=0)
    r = run_cli("generate", str(tmp_path / "mbc"), "red green", "--route", "arrow", "--library", "mbc", "--top-k", "1",
                "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert_refused(run_cli("generate", str(tmp_path / "mbc"), "hi", "--route", "arrow"), "no per-task library")


def test_route_refuses_an_adapt_output(tmp_path):
    (tmp_path / "edgelora.json").write_text("{}")
    assert_refused(run_cli("generate", str(tmp_path), "hi", "--route", "arrow"), "not a bundle")


def test_gks_needs_one_rank():
    from edgelora.errors import UserError
    from edgelora.lora import Lora
    lora = lambda r: Lora(f"r{r}", r, 8.0, {"q_proj": np.zeros((2, r, 8), np.float32)}, {"q_proj": np.zeros((2, 8, r), np.float32)})
    with pytest.raises(UserError, match="one rank"):
        arrow_library([lora(4)], [lora(3)])


def test_the_gate_turns_routing_off_and_options_are_routed_on_their_prompt_only(arrow_bundle):
    """`arrow_gate` 0 is the base model exactly; by default (ArrowRoute.options "prompt") an option's
    own tokens are run with the routing off, after the routed prompt: a one-token option scores the
    same either way, a longer one differs."""
    from edgelora.generate import Model
    bundle = Bundle.open(arrow_bundle[0])
    ids = prompt_ids(bundle)
    base = Decoder(bundle.decoder_dir / bundle.manifest["decoder"]["file"], bundle.manifest["eos_ids"])
    routed = Decoder(routed_decoder(bundle, ArrowRoute()), bundle.manifest["eos_ids"])
    np.testing.assert_allclose(routed.forward(ids, 0, gate=0.0), base.forward(ids, 0), rtol=1e-5, atol=1e-5)
    assert np.abs(routed.forward(ids, 0) - base.forward(ids, 0)).max() > 1e-3  # routing on: another model
    prompt_only = Model.load(bundle.path, route=ArrowRoute())
    everywhere = Model.load(bundle.path, route=ArrowRoute(options="routed"))
    assert ArrowRoute().options == "prompt" and prompt_only.option_gate == 0.0 and everywhere.option_gate == 1.0
    tok = bundle.tokenizer()
    one = [o for o in ("a", "b", "c", "x") if len(tok.encode(o, add_special_tokens=False).ids) == 1][:2]
    long_ = ["the red answer", "blue sky above"]
    a, b = (m.answer(ids, 1, one + long_)[1] for m in (prompt_only, everywhere))
    np.testing.assert_allclose(a[:len(one)], b[:len(one)], rtol=1e-6)
    assert not np.allclose(a[len(one):], b[len(one):], rtol=1e-4)
