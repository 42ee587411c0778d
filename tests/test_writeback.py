"""Write-back and quantized inference on the tiny model: the merged decoder equals the scoring
graph fed the same A/B; int8/int4 stay within stated tolerances, with the LoRA's targets at 8
bits in int4; unmerged equals merged;
optimum loads the output; generation stops at EOS; eval's numbers are exact."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import encode

from edgelora.bundle import Bundle
from edgelora.evaluate import evaluate, normalize
from edgelora.examples import Example
from edgelora.generate import Decoder, Model, log_softmax
from edgelora.lora import LoraStack
from edgelora.scorer import Scorer
from edgelora.writeback import write_model
from test_adapt import PROMPTS, random_lora

EXAMPLES = [Example(p, "yes it is") for p in PROMPTS]
# Stated tolerances, mean |Δ loss| in nats against the fp32 merge, on the tiny random model.
TOL = {"int8": 0.02, "int4": 0.25}


@pytest.fixture(scope="module")
def merged(tiny_bundle_ro):
    bundle = Bundle.open(tiny_bundle_ro)
    loras = [random_lora(f"l{i}", bundle, seed=10 + i, std=0.3) for i in range(3)]
    A, B = LoraStack(loras, list(bundle.targets)).compose(np.array([0.7, -0.4, 0.5]))
    return bundle, {m: a.copy() for m, a in A.items()}, {m: b.copy() for m, b in B.items()}


def decoder_logprob(model_path, bundle, batch) -> np.ndarray:
    """Summed target log-probs from the decoder graph's full logits (no cache)."""
    dec = Decoder(model_path, bundle.manifest["eos_ids"])
    out = []
    for p, t in batch.rows:  # each example alone, unpacked
        logits = dec.forward(p + t, 0)
        lp = log_softmax(logits)
        out.append(sum(lp[len(p) - 1 + k, tok] for k, tok in enumerate(t)))
    return np.array(out)


@pytest.fixture(scope="module")
def written(merged, tmp_path_factory):
    bundle, A, B = merged
    root = tmp_path_factory.mktemp("written")
    paths = {q: write_model(bundle, A, B, root / q, q, merged=True) for q in ("none", "int8", "int4")}
    paths["unmerged-int8"] = write_model(bundle, A, B, root / "unmerged-int8", "int8", merged=False)
    paths["unmerged-none"] = write_model(bundle, A, B, root / "unmerged-none", "none", merged=False)
    return paths


def test_merged_fp32_equals_scoring_graph(merged, written):
    bundle, A, B = merged
    batch = encode(bundle, EXAMPLES)
    s = Scorer(bundle)
    s.bind(batch)
    _, ref = s.run(A, B)
    np.testing.assert_allclose(decoder_logprob(written["none"], bundle, batch), ref, rtol=1e-4)
    np.testing.assert_allclose(decoder_logprob(written["unmerged-none"], bundle, batch), ref, rtol=1e-4)


@pytest.mark.parametrize("quant", ["int8", "int4", "unmerged-int8"])
def test_quantized_within_tolerance(merged, written, quant):
    bundle, _, _ = merged
    batch = encode(bundle, EXAMPLES)
    tokens = batch.target_mask.sum(1)
    ref = decoder_logprob(written["none"], bundle, batch) / tokens
    got = decoder_logprob(written[quant], bundle, batch) / tokens
    assert np.abs(got - ref).mean() < TOL[quant.removeprefix("unmerged-")]


def test_int4_keeps_the_merged_lora_targets_at_8_bits(merged, written):
    """The default write-back: the base graph's nodes but each layer's q, k and v MatMuls as one
    (fed to GroupQueryAttention as packed QKV), the tied embedding's Transpose + Gather as one
    GatherBlockQuantized at 8 bits with no fp32 table left, every MatMul weight-only quantized:
    at 8 bits where the LoRA was merged (a fused qkv holds q and v) and 4 bits elsewhere."""
    bundle, _, _ = merged
    base = onnx.load(str(bundle.decoder_dir / bundle.manifest["decoder"]["file"]))
    targets = {i["name"] for layers in bundle.manifest["decoder"]["weights"].values() for i in layers}
    target_nodes = {n.name for n in base.graph.node if n.op_type == "MatMul" and n.input[1] in targets}
    producer = {o: n for n in base.graph.node for o in n.output}
    fused = {producer[x].name: producer[gqa.input[0]].name + "_qkv"
             for gqa in base.graph.node if gqa.op_type == "GroupQueryAttention" for x in gqa.input[:3]}
    for quant in ("int4", "int8"):
        g = onnx.load(str(written[quant])).graph
        layers = bundle.arch["layers"]
        assert len(g.node) == len(base.graph.node) - 1 - 2 * layers and not [n for n in g.node if n.op_type == "MatMul"]
        assert [n.input[1:3] for n in g.node if n.op_type == "GroupQueryAttention"] == [["", ""]] * layers
        assert [next(a.i for a in n.attribute if a.name == "bits") for n in g.node
                if n.op_type == "GatherBlockQuantized"] == [8]
        assert not [i for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT
                    and sorted(i.dims) == sorted([bundle.arch["vocab"], bundle.arch["hidden"]])]
        bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in g.node if n.op_type == "MatMulNBits"}
        want: dict[str, int] = {}
        for n in (n for n in base.graph.node if n.op_type == "MatMul"):
            name = fused.get(n.name, n.name)
            want[name] = max(want.get(name, 4), 8 if quant == "int8" or n.name in target_nodes else 4)
        assert {k.rsplit("_Q", 1)[0]: b for k, b in bits.items()} == want


def test_optimum_loads_output_and_agrees(written, merged):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    bundle, _, _ = merged
    folder = written["none"].parent
    model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False)
    assert "position_ids" in model.input_names  # not optimum's deprecated "legacy" layout
    ids = Model.load(folder).encode(bundle.prompt_format.prompt("The quick brown fox"))
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = list(Decoder(written["none"], []).stream(ids, max_new_tokens=8))
    assert out[0, len(ids):].tolist() == ours


@pytest.mark.parametrize("quant", ["int4", "unmerged-int8"])
def test_onnxruntime_genai_loads_output_and_agrees(written, merged, quant):
    """The adapted folder carries the builder's genai_config.json, so onnxruntime-genai runs it
    as it is: the same greedy tokens as edgelora's decoder."""
    og = pytest.importorskip("onnxruntime_genai")
    bundle, _, _ = merged
    folder = written[quant].parent
    ids = Model.load(folder).encode(bundle.prompt_format.prompt("The quick brown fox"))
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 8, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, dtype=np.int32))
    out = []
    while not gen.is_done() and len(out) < 8:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    ours = list(Decoder(written[quant], []).stream(ids, max_new_tokens=8))
    assert out == ours[: len(out)] and len(out) >= 1


def test_weights_lie_in_a_data_file_checked_like_the_model(written, tmp_path):
    """The weights go to model.onnx.data beside model.onnx (protobuf stops at 2 GB, which a
    ~500M base reaches in fp32; onnxruntime maps the file), and a damaged data file is
    refused like a damaged model."""
    from edgelora.errors import UserError
    from edgelora.outputs import DATA_FILE, check_model
    path = Path(shutil.copytree(written["int8"].parent, tmp_path / "m")) / "model.onnx"  # damaged below
    data = path.parent / DATA_FILE
    inits = onnx.load(str(path), load_external_data=False).graph.initializer
    assert not [t.name for t in inits if len(t.raw_data) > 1024]  # onnx keeps tensors under 1 KB inline
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in inits) > 10
    check_model(path.parent)
    with open(data, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    with pytest.raises(UserError, match="model.onnx.data: sha256 differs"):
        check_model(path.parent)


def test_outputs_get_the_users_file_modes(written, tmp_path):
    """Not tempfile's private 0700/0600 (nor onnx's for external data): what mkdir and open give."""
    import stat
    from edgelora.io import building, user_mode
    from edgelora.outputs import DATA_FILE
    for f in (written["int4"], written["int4"].parent / DATA_FILE):
        assert stat.S_IMODE(f.stat().st_mode) == user_mode(), f
    with building(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == user_mode(folder=True)


def test_generation_stops_at_eos_and_budget(written):
    ids = [5, 6, 7]
    free = list(Decoder(written["none"], []).stream(ids, max_new_tokens=6))
    assert len(free) == 6
    stopped = list(Decoder(written["none"], [free[3]]).stream(ids, max_new_tokens=6))
    assert stopped == free[: free.index(free[3])]


def test_prefill_reuses_the_shared_prefix_and_agrees(written):
    """A prompt sharing its first tokens with the last one (the system turn, ICL shots) runs only
    its tail, and gets the logits and cache a full forward gives."""
    dec, ref = Decoder(written["unmerged-none"], []), Decoder(written["unmerged-none"], [])
    shared, a, b = list(range(5, 25)), [30, 31, 32], [40, 41, 42, 43]
    dec.prefill(shared + a)
    logits = dec.prefill(shared + b)
    ref_logits = ref.forward(shared + b, 0)
    assert len(logits) == len(b) and dec.cache_ids == shared + b
    np.testing.assert_allclose(logits, ref_logits[-len(b):], atol=1e-4)
    n = len(shared + b)  # the caches agree: so does the next step on each
    np.testing.assert_allclose(dec.forward([50], n), ref.forward([50], n), atol=1e-4)


def test_cache_grows_past_its_first_room_and_agrees(written):
    """The KV buffer starts at `first_room` positions and doubles, the cached part copied: a
    token-by-token decode across two growths gives the logits of one full forward."""
    dec = Decoder(written["none"], [])
    dec.first_room = 8
    ids = [5 + k % 50 for k in range(40)]
    steps = [dec.forward(ids[:6], 0)] + [dec.forward([ids[k]], k) for k in range(6, len(ids))]
    assert dec._buffers[dec.past_names[0]].shape[2] == 64  # 8 → 16 → 32 → 64
    full = Decoder(written["none"], []).forward(ids, 0)
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-4, rtol=0)


def test_option_logprobs_match_one_forward_per_option(written):
    """Options of different lengths, scored on the (reused) prompt cache, score as prompt +
    option run from scratch does."""
    dec = Decoder(written["none"], [])
    prompt, options = [5, 6, 7, 8], [[9], [10, 11], [12, 13, 14, 15], [16, 17, 18]]
    ref = []
    for opt in options:
        lp = log_softmax(dec.forward(prompt + opt, 0))
        ref.append(sum(lp[len(prompt) - 1 + j, t] for j, t in enumerate(opt)))
    dec.prefill(prompt[:2] + [99])  # a cached neighbour, as in eval
    np.testing.assert_allclose(dec.option_logprobs(prompt, options), ref, atol=1e-4)


def test_answer_stops_decoding_at_its_first_line(written):
    """Exact match reads the first line only, so `answer` stops pulling tokens once a line ends."""
    model = Model.load(written["none"].parent)
    said, pulled = model.encode("yes\nno no no no"), []

    def stream(prompt_ids, max_new_tokens, prefill, **kw):
        for t in said:
            pulled.append(t)
            yield t
    model.decoder.stream = stream
    text, _ = model.answer(model.encode(model.fmt.prompt(PROMPTS[0])), 32)
    assert normalize(text) == "yes" and len(pulled) < len(said)


def test_eval_numbers_are_exact(written, merged, tmp_path):
    """Answers set from what the model says (2 right, 2 wrong) and option sets whose winner
    is known from the scoring graph (an independent path): exact 50%, options 75%."""
    bundle, A, B = merged
    model = Model.load(written["none"].parent)
    said = [model.answer(model.encode(model.fmt.prompt(p)), 8)[0] for p in PROMPTS[:4]]
    from edgelora.batch import encode_pairs
    s, fmt, opts = Scorer(bundle), bundle.prompt_format, (" red", " blue")
    examples = []
    for i, (p, g) in enumerate(zip(PROMPTS[:4], said)):
        batch, _ = encode_pairs(bundle.tokenizer(), [(fmt.prompt(p), o) for o in opts], 256)
        s.bind(batch)  # options are scored bare, without the stop token, as eval does
        best = opts[int(np.argmax(s.run(A, B)[1]))]
        right = best if i < 3 else next(o for o in opts if o != best)
        # what the model said, in other case and with a period, as an alias: exact match must honour it
        examples.append(Example(p, right, options=opts, aliases=(g.upper() + ".",) if i < 2 else ()))
    res = evaluate(model, examples, max_new_tokens=8)
    assert res["exact_match"] == 0.5
    assert res["option_accuracy"] == 0.75
    assert res["prompt_tokens_mean"] == np.mean([len(model.encode(model.fmt.prompt(p))) for p in PROMPTS[:4]])


def test_icl_prompt_drops_the_oldest_shots_whole_when_too_long(written):
    import dataclasses
    from edgelora.evaluate import prompt_ids
    model = dataclasses.replace(Model.load(written["none"].parent), max_len=4096)
    shots = [Example(f"shot {i} " + "word " * 20, f"answer {i}") for i in range(3)]
    full, k = prompt_ids(model, EXAMPLES[0], shots)
    assert k == 3
    short = dataclasses.replace(model, max_len=len(full) - 1)
    ids, k = prompt_ids(short, EXAMPLES[0], shots)
    assert k == 2 and ids == model.encode(model.fmt.prompt(EXAMPLES[0].input, shots[1:]))


def test_normalize():
    assert normalize("  Yes.\nmore text") == "yes"
    assert normalize("01/03/1987") == "01/03/1987"


def test_cli_generate_and_eval(written, tmp_path):
    folder = written["int8"].parent
    r = subprocess.run([sys.executable, "-m", "edgelora.cli", "generate", str(folder), "--max-new-tokens", "5"],
                       input="hello\nred green\n", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n")
    r = subprocess.run([sys.executable, "-m", "edgelora.cli", "generate", str(folder)], input="  ", capture_output=True,
                       text=True)
    assert r.returncode == 2 and "no prompt" in r.stderr
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"input": p, "output": "yes", "options": ["yes", "no"]}) + "\n" for p in PROMPTS))
    r = subprocess.run([sys.executable, "-m", "edgelora.cli", "eval", str(task), "--model", str(folder), "--json",
                        "--out", str(tmp_path / "res.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mode"] == "adapted" and out["n"] == 5 and out["quant"] == "int8"
    assert len(json.loads((tmp_path / "res.json").read_text())["examples"]) == 5
    r = subprocess.run([sys.executable, "-m", "edgelora.cli", "eval", str(task), "--model", str(folder),
                        "--mode", "icl"], capture_output=True, text=True)
    assert r.returncode == 2 and "--shots" in r.stderr


def test_eval_out_replaces_only_its_own_results_unless_forced(written, tmp_path, capsys):
    """--out naming a file edgelora did not write is refused before any example is run; an
    earlier eval's results are replaced; --force replaces anything."""
    from edgelora.cli import main
    folder, task, out = written["int8"].parent, tmp_path / "task.jsonl", tmp_path / "notes.json"
    task.write_text("".join(json.dumps({"input": p, "output": "yes"}) + "\n" for p in PROMPTS[:2]))
    out.write_text('{"mine": 1}\n')
    argv = ["eval", str(task), "--model", str(folder), "--json", "--max-new-tokens", "2", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.json" in err[0] and "--force" in err[0], err
    assert out.read_text() == '{"mine": 1}\n'
    assert main(argv + ["--force"]) == 0
    assert json.loads(out.read_text())["n"] == 2
    assert main(argv) == 0  # its own results now: replaced without --force


def test_decoding_stops_at_the_models_position_limit(written):
    """New tokens never go past the model's max_len positions: the stream ends there and says so."""
    dec = Decoder(written["none"], [])  # no stop token: only the limit ends it
    ids = [5 + k % 50 for k in range(250)]
    out = list(dec.stream(ids, max_new_tokens=20, max_len=256))
    assert len(out) == 6 and len(dec.cache_ids) <= 256 and dec.stopped_at_limit
    assert list(dec.stream(ids[:10], max_new_tokens=3, max_len=256)) and not dec.stopped_at_limit


def test_generate_and_eval_say_when_the_limit_stopped_them(written, tmp_path):
    folder = written["none"].parent
    prompt = "red green blue orange purple white black " * 60  # far over the tiny model's 256 tokens
    r = subprocess.run([sys.executable, "-m", "edgelora.cli", "generate", str(folder), prompt, "--raw",
                        "--max-new-tokens", "5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    warning = [l for l in r.stderr.splitlines() if "256" in l]
    assert len(warning) == 1 and "stopped" in warning[0] and "Traceback" not in r.stderr, r.stderr
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"input": prompt, "output": "yes"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "edgelora.cli", "eval", str(task), "--model", str(folder), "--json",
                        "--out", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stopped_at_limit"] == 1 and "256" in r.stderr, r.stderr


@pytest.mark.parametrize("lora", ["merged", "unmerged"])
def test_a_lora_and_an_adaption_prompt_written_together_equal_the_scoring_graph(merged, tmp_path, lora):
    """Both adapter kinds in one decoder (the mixed search's model): the LoRA merged or beside, the
    prompt's keys and values from the base's k_proj and v_proj, as the scoring graph takes them,
    not from the projections the LoRA changed."""
    from test_adaption_prompt import random_prompt
    bundle, A, B = merged
    prompt = random_prompt("p", bundle.arch, seed=5)
    batch = encode(bundle, EXAMPLES)
    s = Scorer(bundle)
    s.bind(batch)
    _, ref = s.run(A, B, prompt=prompt)
    path = write_model(bundle, A, B, tmp_path / lora, "none", merged=lora == "merged", prompt=prompt)
    np.testing.assert_allclose(decoder_logprob(path, bundle, batch), ref, rtol=1e-4)
