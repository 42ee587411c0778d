"""The LoraHub search on the tiny model: a planted problem, budget and bounds, determinism,
interruption, PEFT-loadable output, and every bad input's message."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgelora.bundle import Bundle, write_manifest
from edgelora.errors import UserError
from edgelora.examples import Example, load_examples
from edgelora.lora import Lora, LoraStack, save_lora
from edgelora.outputs import write_outputs
from edgelora.search import AdaptConfig, adapt

PROMPTS = ["What is 2 plus 3?", "Is the following sentence plausible?", "red green blue", "Today is 01/02/1987.",
           "The quick brown fox"]


def random_lora(name, bundle, seed, rank=4, std=0.5) -> Lora:
    rng = np.random.default_rng(seed)
    L = bundle.arch["layers"]
    A = {m: rng.normal(0, std, (L, rank, t["in"])).astype(np.float32) for m, t in bundle.targets.items()}
    B = {m: rng.normal(0, std, (L, t["out"], rank)).astype(np.float32) for m, t in bundle.targets.items()}
    return Lora(name, rank, 2.0 * rank, A, B, source=f"random seed {seed}")


@pytest.fixture
def library(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    loras = [random_lora(f"lib{i}", bundle, seed=i, rank=4 if i % 2 else 2) for i in range(4)]
    for l in loras:
        save_lora(tiny_bundle / "loras" / f"{l.name}.safetensors", l, np.float32)
    write_manifest(tiny_bundle, bundle.manifest)
    return Bundle.open(tiny_bundle), loras


def planted_examples(bundle, hf_dir, loras, w) -> list[Example]:
    """Answers generated greedily by the base model plus the LoRA mix Σ w·A, Σ w·B."""
    import torch
    from transformers import AutoModelForCausalLM
    from edgelora.lora import delta
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    A, B = LoraStack(loras, list(bundle.targets)).compose(np.asarray(w))
    with torch.no_grad():
        for m, t in bundle.targets.items():
            d = delta(A[m], B[m])
            for i, layer in enumerate(model.model.layers):
                layer.get_submodule(t["path"]).weight += torch.from_numpy(d[i])
    tok, fmt = bundle.tokenizer(), bundle.prompt_format
    out = []
    for p in PROMPTS:
        ids = tok.encode(fmt.prompt(p), add_special_tokens=False).ids
        gen = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(Example(p, tok.decode(gen[0, len(ids):].tolist()).replace(fmt.stop, "") or "x"))
    return out


def test_search_recovers_planted_mix(library, tiny_hf):
    bundle, loras = library
    planted = np.array([0.0, 1.0, 0.0, -0.8])
    examples = planted_examples(bundle, tiny_hf, loras, planted)
    res = adapt(examples, bundle, loras=[l.name for l in loras], budget=80, l1=0.0)
    # the start is the base model, w = 0, and the planted point's loss: both scored outside the search
    assert res.start_loss == pytest.approx(_loss_at(bundle, examples, loras, np.zeros(4)), rel=1e-6)
    f_loss = _loss_at(bundle, examples, loras, planted)
    assert f_loss < res.start_loss - 0.3, "the planted LoRA mix must make a real difference"
    assert res.loss <= f_loss + 0.2 * (res.start_loss - f_loss)


def _loss_at(bundle, examples, loras, w, keep: int = 0) -> float:
    """The pooled loss at `w`; with `keep`, on the examples cut as the loss pick cuts them."""
    from edgelora.batch import encode_pairs, keep_ends
    from edgelora.scorer import Scorer
    fmt = bundle.prompt_format
    batch, _ = encode_pairs(bundle.tokenizer(), fmt.pairs(examples),
                            bundle.arch["max_len"])
    batch = keep_ends(batch, keep) if keep else batch
    s = Scorer(bundle)
    s.bind(batch)
    _, lp = s.run(*LoraStack(loras, list(bundle.targets)).compose(np.asarray(w)))
    return float(-lp.sum() / batch.target_mask.sum())


@pytest.mark.parametrize("optimizer", ["cobyla", "nelder-mead", "powell"])
def test_budget_and_bounds_respected(library, optimizer, monkeypatch):
    from edgelora import scorer as scorer_mod
    bundle, loras = library
    calls = []
    orig = scorer_mod.Scorer.run
    monkeypatch.setattr(scorer_mod.Scorer, "run", lambda self, A, B, **kw: calls.append(1) or orig(self, A, B, **kw))
    res = adapt([Example(p, "yes") for p in PROMPTS], bundle, budget=9, optimizer=optimizer, bounds=0.3,
                select="random")
    assert len(calls) == 9 == len(res.history)
    assert all(abs(w) <= 0.3 for e in res.history for w in e.weights)
    assert res.history[0].weights == [0.0] * 4  # the search starts at 0: the base model


def test_select_by_loss_keeps_the_best_single_loras_and_starts_at_the_best(library):
    bundle, loras = library
    ex = [Example(p, "no") for p in PROMPTS]
    alone = {l.name: _loss_at(bundle, ex, [l], [1.0]) for l in loras}
    ranked = []
    res = adapt(ex, bundle, budget=6, n_loras=2, l1=0.0, select="loss", patience=0, on_rank=lambda *a: ranked.append(a))
    assert ranked == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert sorted(res.loras) == sorted(sorted(alone, key=alone.get)[:2])
    best = min(alone, key=alone.get)
    # w = 0 first (the start loss), then the best LoRA alone, its ranking forward reused: the start
    assert [h.weights for h in res.history[:2]] == [[0.0, 0.0], [1.0 if n == best else 0.0 for n in res.loras]]
    assert res.history[1].loss == pytest.approx(alone[best], rel=1e-5)
    assert res.loss <= alone[best] + 1e-6 and res.settings["selection_forwards"] == 4
    assert res.settings["forwards"] == 4 + 5 and len(res.history) == 6


def test_keep_ends_keeps_the_header_and_each_examples_last_tokens(library):
    from edgelora.batch import encode_pairs, keep_ends
    bundle, _ = library
    pairs = bundle.prompt_format.pairs([Example(p, "no") for p in PROMPTS])
    batch, _ = encode_pairs(bundle.tokenizer(), pairs, bundle.arch["max_len"])
    P, own = batch.prefix_len, [len(p) - batch.prefix_len for p, _ in batch.rows]
    keep = sorted(own)[2] + 1  # longer than some examples' own tokens, shorter than others'
    T = len(batch.rows[0][1])  # the answer's tokens, the same for every example here
    cut = keep_ends(batch, keep + T)
    for (p, t), (cp, ct), n in zip(batch.rows, cut.rows, own):
        assert ct == t and cp[:P] == p[:P] and cp[P:] == p[len(p) - min(n, keep):]
    assert cut.n_tokens < batch.n_tokens and keep_ends(batch, max(own) + T).rows == batch.rows


def test_a_cut_ranking_scores_its_finalists_whole_and_starts_at_their_best(library):
    """--select-len: the library ranked on each example's last 2 own tokens (the header kept),
    the best 3 by it scored on the whole examples, and the best of those is the search's start;
    the finalists' points are the search's first points. A cut no shorter than the examples is
    the plain loss pick, forward for forward."""
    bundle, loras = library
    ex = [Example(p, "no") for p in PROMPTS]
    whole = {l.name: _loss_at(bundle, ex, [l], [1.0]) for l in loras}
    cut = {l.name: _loss_at(bundle, ex, [l], [1.0], keep=2) for l in loras}
    assert sorted(cut, key=cut.get) != sorted(whole, key=whole.get)  # the cut ranks differently here
    finalists = sorted(cut, key=cut.get)[:3]
    best = min(finalists, key=whole.get)
    res = adapt(ex, bundle, budget=8, n_loras=2, l1=0.0, select="loss", select_len=2, patience=0)
    assert res.settings["selection_forwards"] == 4 + 3  # the cut pays here: 4 short forwards + 3 whole < 4 whole
    assert res.loras[0] == best and res.loras[1] == next(n for n in sorted(cut, key=cut.get) if n != best)
    known = res.history[1: 1 + sum(n in finalists for n in res.loras)]  # right after w = 0
    assert known[-1].weights == [1.0, 0.0] and known[-1].loss == pytest.approx(whole[best], rel=1e-5)
    for h in known:
        assert h.loss == pytest.approx(whole[res.loras[h.weights.index(1.0)]], rel=1e-5)
    plain = adapt(ex, bundle, budget=8, n_loras=2, l1=0.0, select="loss", select_len=0, patience=0)
    long_cut = adapt(ex, bundle, budget=8, n_loras=2, l1=0.0, select="loss", select_len=500, patience=0)
    assert [h.weights for h in long_cut.history] == [h.weights for h in plain.history]
    assert long_cut.settings["selection_forwards"] == plain.settings["selection_forwards"] == 4
    assert res.settings["ranking_tokens"] < res.settings["tokens"] == long_cut.settings["ranking_tokens"]


def test_a_cut_ranks_only_where_it_saves_more_than_its_finalists_cost():
    from edgelora.search import FINALISTS, cut_pays
    assert FINALISTS == 3 and cut_pays(39, 80, 100) and not cut_pays(39, 95, 100) and not cut_pays(39, 100, 100)
    assert not cut_pays(2, 10, 100)  # a library of 2 ranked on a 10% cut: 2·90 < 2·100


def test_a_budget_below_the_selections_points_still_scores_the_start(library):
    """The loss pick's start point counts against the budget, but w = 0 is scored first: a budget
    of 1 still gives a start loss (a NaN there made weights.json unreadable)."""
    bundle, _ = library
    res = adapt([Example(p, "no") for p in PROMPTS], bundle, budget=1, n_loras=3, select="loss")
    assert np.isfinite(res.start_loss) and res.history[0].weights == [0.0, 0.0, 0.0]
    assert res.settings["forwards"] == 4 + 1 and res.stop == "budget"


@pytest.mark.parametrize("select", ["arrow", "loss", "random"])
def test_no_point_is_scored_twice(library, select, monkeypatch):
    """w = 0 is scored once (the optimizer's start is not re-run), and no point is re-run."""
    from edgelora import scorer as scorer_mod
    bundle, _ = library
    calls = []
    orig = scorer_mod.Scorer.run
    monkeypatch.setattr(scorer_mod.Scorer, "run", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    res = adapt([Example(p, "yes") for p in PROMPTS], bundle, budget=12, n_loras=3, select=select, patience=0)
    points = [tuple(e.weights) for e in res.history]
    assert len(points) == len(set(points)) == 12
    assert len(calls) == res.settings["forwards"] == {"arrow": 12, "loss": 4 + 11, "random": 12}[select]
    assert res.stop == "budget"


def test_arrow_selection_is_one_base_forward_and_the_first_point(library):
    bundle, loras = library
    ex = [Example(p, "no") for p in PROMPTS]
    res = adapt(ex, bundle, budget=5, n_loras=2, select="arrow")
    assert res.settings["selection_forwards"] == 1 and res.history[0].weights == [0.0, 0.0]
    assert res.start_loss == pytest.approx(_loss_at(bundle, ex, loras[:1], [0.0]), rel=1e-5)


def test_patience_stops_a_search_that_no_longer_gains(library, tmp_path):
    """The objective stops a search whose best has not moved by 1e-4 over `patience` points; the
    reason is written to weights.json."""
    from edgelora.search import Objective, _Stop

    class Flat:  # a scorer whose loss never changes
        def run(self, A, B, hidden=False, prompt=None):
            return np.ones(1), -np.ones(1)

    bundle, loras = library
    f = Objective(Flat(), LoraStack(loras[:2], list(bundle.targets)), 1.0, AdaptConfig(patience=3, l1=0.0))
    for i in range(5):  # the optimizer's 3 start points (n + 1) are never cut, then 2 more without gain
        f(np.array([0.1 * i, 0.0]))
    with pytest.raises(_Stop, match="no gain over 3 points"):
        f(np.array([0.5, 0.5]))
    # a whole search on a loss that never changes: the 3 start points, then 3 without gain, well
    # inside the budget; weights.json says why it stopped
    from edgelora import scorer as scorer_mod
    flat = lambda self, A, B, **kw: (np.ones(len(PROMPTS)), -np.ones(len(PROMPTS)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scorer_mod.Scorer, "run", flat)
        res = adapt([Example(p, "yes") for p in PROMPTS], bundle, budget=40, n_loras=2, select="random", patience=3)
    write_outputs(res, bundle, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "weights.json").read_text())
    assert data["stop"] == res.stop == "no gain over 3 points" and data["forwards"] == 6


def test_same_seed_same_weights(library):
    bundle, _ = library
    ex = [Example(p, "no") for p in PROMPTS]
    a = adapt(ex, bundle, budget=12, n_loras=3, seed=7, select="random")
    b = adapt(ex, bundle, budget=12, n_loras=3, seed=7, select="random")
    assert a.loras == b.loras and len(a.loras) == 3
    assert np.array_equal(a.weights, b.weights)


def test_interrupt_keeps_best_and_writes(library, tmp_path):
    bundle, _ = library

    def stop_at_5(n, ev, best):
        if n == 5:
            raise KeyboardInterrupt

    res = adapt([Example(p, "yes") for p in PROMPTS], bundle, budget=40, on_eval=stop_at_5)
    assert res.interrupted and len(res.history) == 5
    write_outputs(res, bundle, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "weights.json").read_text())
    assert data["interrupted"] and data["evaluations"] == 5
    assert data["objective"] == min(e["objective"] for e in data["history"])


@pytest.mark.parametrize("compose", ["lorahub", "cat"])
def test_outputs_load_in_peft(library, tiny_hf, tmp_path, compose):
    """The written adapter is the searched model in peft; under "cat" it is the exact sum, of rank
    r times the LoRAs with a weight (no truncation)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from helpers import encode, torch_losses
    bundle, _ = library
    ex = [Example(p, "yes") for p in PROMPTS]
    res = adapt(ex, bundle, budget=15, compose=compose)
    if compose == "cat":
        used = int(np.count_nonzero(res.weights))
        assert used > 1 and next(iter(res.merged()[0].values())).shape[1] == used * res.stack.rank
    write_outputs(res, bundle, tmp_path / "out")
    assert (tmp_path / "out" / "loss_curve.svg").read_text().startswith("<svg")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_hf), tmp_path / "out" / "adapter").eval()
    batch = encode(bundle, ex)
    _, lp = torch_losses(model, batch)
    assert float(-lp.sum() / batch.target_mask.sum()) == pytest.approx(res.loss, rel=1e-4)


def test_cli_adapt_json(library, tmp_path):
    bundle, _ = library
    f = tmp_path / "task.jsonl"
    f.write_text("".join(json.dumps({"input": p, "output": "yes"}) + "\n" for p in PROMPTS))
    r = subprocess.run([sys.executable, "-m", "edgelora.cli", "adapt", str(f), "--bundle", str(bundle.path),
                        "--budget", "6", "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["evaluations"] == 6 and set(out["weights"]) == {"lib0", "lib1", "lib2", "lib3"}
    assert (tmp_path / "task-adapted" / "weights.json").exists()


@pytest.mark.parametrize("flags,select", [([], AdaptConfig().select), (["--select", "arrow"], "arrow"),
                                          (["--select", "random"], "random")])
def test_cli_adapt_select(library, tmp_path, flags, select):
    bundle, _ = library
    f = tmp_path / "task.jsonl"
    f.write_text("".join(json.dumps({"input": p, "output": "yes"}) + "\n" for p in PROMPTS))
    r = subprocess.run([sys.executable, "-m", "edgelora.cli", "adapt", str(f), "--bundle", str(bundle.path),
                        "--budget", "6", "--no-model", *flags], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert ("select: 100%" in r.stderr) == (select == "loss") and "search:" in r.stderr
    assert json.loads((tmp_path / "task-adapted" / "weights.json").read_text())["settings"]["select"] == select


BAD = [
    ("not json\n", "ex.jsonl:1: not valid JSON"),
    ('{"input": "a"}\n', "ex.jsonl:1: missing field 'output'"),
    ('{"input": "a", "output": "b"}\n{"input": "", "output": "b"}\n', "ex.jsonl:2: field 'input' is empty"),
    ('{"input": "a", "output": 3}\n', "ex.jsonl:1: field 'output' must be a string"),
    ("\n\n", "ex.jsonl: no examples"),
    ('["a", "b"]\n', "ex.jsonl:1: expected a JSON object"),
    ('{"input": "a", "output": "b", "options": ["c", "d"]}\n', "ex.jsonl:1: 'output' 'b' is not one of its 'options'"),
    ('{"input": "a", "output": "b", "aliases": "b"}\n', "ex.jsonl:1: 'aliases' must be a list"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_examples_are_refused(tmp_path, text, message, library):
    f = tmp_path / "ex.jsonl"
    f.write_text(text)
    with pytest.raises(UserError, match=None) as e:
        load_examples(f)
    assert message in str(e.value)
    r = subprocess.run([sys.executable, "-m", "edgelora.cli", "adapt", str(f), "--bundle", str(library[0].path)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_duplicates_and_long_examples_warn(library, tmp_path):
    bundle, _ = library
    f = tmp_path / "ex.jsonl"
    long = "the quick brown fox " * 200
    f.write_text(json.dumps({"input": "a", "output": "b"}) + "\n" + json.dumps({"input": "a", "output": "b"}) + "\n"
                 + json.dumps({"input": long, "output": "yes"}) + "\n")
    warnings = []
    res = adapt(f, bundle, budget=2, warn=warnings.append)
    assert any("ex.jsonl:2: duplicate of line 1" in w for w in warnings)
    assert any("ex.jsonl:3: longer than the bundle's 256 tokens" in w for w in warnings)
    assert res.settings["n_examples"] == 3


def test_bad_flags_are_refused(library, tmp_path):
    bundle, _ = library
    f = tmp_path / "ex.jsonl"
    f.write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    for args, message in ((["--loras", "nope"], "no LoRA named nope"), (["--budget", "0"], "--budget 0"),
                          (["--bounds", "-1"], "--bounds -1"), (["--optimizer", "cma"], None)):
        r = subprocess.run([sys.executable, "-m", "edgelora.cli", "adapt", str(f), "--bundle", str(bundle.path),
                            "--budget", "2", *args], capture_output=True, text=True, cwd=tmp_path)
        if message is None:  # cma: works where installed, otherwise says how to install it
            assert r.returncode == 0 or "pip install 'edgelora[cma]'" in r.stderr
            continue
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_lora_for_another_base_is_refused(library, tmp_path):
    bundle, loras = library
    folder = tmp_path / "loras"
    folder.mkdir()
    bad = random_lora("bad", bundle, seed=99)
    bad.A["q_proj"] = bad.A["q_proj"][:, :, :32]
    save_lora(folder / "bad.safetensors", bad)
    f = tmp_path / "ex.jsonl"
    f.write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "edgelora.cli", "adapt", str(f), "--bundle", str(bundle.path),
                        "--loras", str(folder)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "bad.safetensors: q_proj has A (2, 4, 32)" in r.stderr, r.stderr


def test_a_box_that_does_not_hold_weight_1_records_no_ranking_point_it_did_not_score(library):
    """With --bounds below 1 the loss pick's forwards (each LoRA alone at weight 1) lie outside the
    box: none is recorded as a search point (it used to be recorded at bounds·eᵢ with the loss at
    weight 1), so every point in the history has the loss its weights give."""
    bundle, loras = library
    ex = [Example(p, "no") for p in PROMPTS]
    res = adapt(ex, bundle, budget=6, n_loras=2, select="loss", bounds=0.5, patience=0)
    chosen = [next(l for l in loras if l.name == n) for n in res.loras]
    for e in res.history:
        assert max(abs(w) for w in e.weights) <= 0.5
        assert e.loss == pytest.approx(_loss_at(bundle, ex, chosen, e.weights), rel=1e-5)
    assert res.loss == pytest.approx(_loss_at(bundle, ex, chosen, res.weights), rel=1e-5)
