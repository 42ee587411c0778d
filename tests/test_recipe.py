"""The recipe choice (recipe.py) on the tiny model: its held-out scoring is what greedy decoding and
eval's option ranking give, the adapted recipes are scored at the weights fitted without the
held-out example, the rule that picks among them, and an adapt output that follows its recipe."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_refused, cli
from test_adapt import library  # noqa: F401  (the fixture)
from test_surrogate import EXAMPLES

from edgelora.bundle import Bundle, write_manifest
from edgelora.errors import UserError
from edgelora.examples import Example
from edgelora.generate import Model
from edgelora.lora import zero_slots
from edgelora.outputs import write_outputs
from edgelora.recipe import RECIPES, best, same, score
from edgelora.scorer import Scorer
from edgelora.search import adapt
from edgelora.surrogate import Head


def _head(bundle):
    norm, weight, eps = bundle.head()
    return Head(norm, weight, eps, np.zeros(0, np.int64))


def _row(correct, ce, tokens):
    return {"correct": correct, "n": 5, "ce": ce, "prompt_tokens": tokens}


def test_the_choice_most_right_then_lowest_cross_entropy_then_shortest_prompt():
    assert best({"adapted": _row(2, 0.2, 30), "icl": _row(4, 0.9, 90), "zero-shot": _row(1, 0.1, 30)}) == "icl"
    # one example of five is within noise: then the cross-entropy decides
    assert best({"adapted": _row(3, 0.2, 30), "icl": _row(4, 0.9, 90)}) == "adapted"
    assert best({"adapted": _row(3, 0.5, 30), "adapted+icl": _row(3, 0.3, 90)}) == "adapted+icl"
    # within 2% of the lowest cross-entropy, the shorter prompt wins
    assert best({"adapted": _row(3, 0.305, 30), "adapted+icl": _row(3, 0.300, 90)}) == "adapted"
    # a full tie: the earlier in RECIPES (the adapted model before the base alone)
    assert best({"zero-shot": _row(2, 0.3, 30), "adapted": _row(2, 0.3, 30)}) == "adapted"
    assert [same(n) for n in (2, 4, 5, 15, 16)] == [0, 1, 1, 1, 2]


def test_held_out_exact_match_is_what_greedy_decoding_gives(tiny_bundle):
    """An answer counts as right exactly when greedy decoding produces it and then the stop text:
    the bundle's stop is set to the token greedy decoding emits after a few tokens, so that the
    greedy answer is known; one token changed and it is a miss."""
    bundle = Bundle.open(tiny_bundle)
    tok, model = bundle.tokenizer(), Model.load(tiny_bundle)
    dec = lambda t: tok.decode(t, skip_special_tokens=False)
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids
    clean = lambda t: enc(dec(t)) == t  # byte tokens of the random model decode to half characters

    def first_clean(prompt):  # (k, greedy): k greedy tokens and the next one that survive decode → encode
        greedy = list(model.decoder.stream(model.encode(bundle.prompt_format.prompt(prompt)), max_new_tokens=12))
        return next(((k, greedy) for k in range(1, len(greedy) - 1)
                     if clean(greedy[:k]) and clean(greedy[k:k + 1]) and clean(greedy[:k + 1])), None)

    prompt, (k, greedy) = next((p, f) for p in ("the red answer", "Mix red and blue.", "Name a colour.")
                               if (f := first_clean(p)))
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["prompt"]["stop"] = dec(greedy[k:k + 1])
    write_manifest(tiny_bundle, manifest)
    bundle = Bundle.open(tiny_bundle)
    answer, wrong = dec(greedy[:k]), "blue"
    scorer, zero = Scorer(bundle), zero_slots(bundle.targets, bundle.arch["layers"])
    right, miss, alias = score(scorer, _head(bundle), bundle.tokenizer(), *zero, [(Example(prompt, answer), []), (Example(prompt, wrong), []),
                                                             (Example(prompt, wrong, aliases=(answer,)), [])])
    assert right.correct and not miss.correct and alias.correct


def test_held_out_option_ranking_is_evals(library):
    """With options, the held-out example is right when its output is the option eval ranks first
    (summed log-prob of each option's tokens after the prompt, through the decoder)."""
    bundle, _ = library
    model = Model.load(bundle.path)
    scorer, zero, head = Scorer(bundle), zero_slots(bundle.targets, bundle.arch["layers"]), _head(bundle)
    options = ("red", "green", "blue sky", "orange")
    for p in ("Pick a colour.", "What colour is grass?", "And the sea?"):
        ids = model.encode(bundle.prompt_format.prompt(p))
        lps = model.answer(ids, 1, list(options))[1]
        top = options[int(np.argmax(lps))]
        for out in options:
            held = score(scorer, head, bundle.tokenizer(), *zero, [(Example(p, out, options), [])])[0]
            assert held.correct == (out == top)


def test_the_adapted_recipes_are_scored_at_the_weights_fitted_without_the_held_out_example(library, monkeypatch):
    """The surrogate's leave-one-out folds, not the final weights, score each held-out example;
    the table covers the four recipes, each over every example."""
    from edgelora import recipe
    bundle, _ = library
    seen = []
    real = recipe.score

    def spy(scorer, head, tok, A, B, cases):
        seen.append(({m: a.copy() for m, a in A.items()}, {m: b.copy() for m, b in B.items()}, cases))
        return real(scorer, head, tok, A, B, cases)

    monkeypatch.setattr(recipe, "score", spy)
    res = adapt(EXAMPLES, bundle, optimizer="surrogate", compose="cat", budget=12)
    folds = res.surrogate["folds"]
    assert len(folds) == len(EXAMPLES)
    table = res.recipe["table"]
    assert list(table) == list(RECIPES) and all(r["n"] == len(EXAMPLES) for r in table.values())
    adapted_calls = [c for c in seen if any(np.any(b) for b in c[1].values())]
    assert len(adapted_calls) == len(EXAMPLES)
    for j, (A, B, cases) in enumerate(adapted_calls):
        fA, fB = res.stack.merged(np.asarray(folds[j]))
        for m in bundle.targets:
            np.testing.assert_allclose(B[m] @ A[m], fB[m] @ fA[m], rtol=1e-6, atol=1e-7)
        (ex, none), (ex2, others) = cases
        assert ex == ex2 == EXAMPLES[j] and none == [] and ex not in others and len(others) == len(EXAMPLES) - 1
    assert res.recipe["choice"] in RECIPES and res.recipe["why"] == "leave-one-out"
    assert res.timings["recipe"] > 0


def test_without_leave_one_out_folds_auto_keeps_the_adapted_model_and_says_so(library, monkeypatch):
    from edgelora import recipe
    bundle, _ = library
    monkeypatch.setattr(recipe, "score", lambda *a: pytest.fail("no forward is spent on an unvalidated table"))
    res = adapt(EXAMPLES, bundle, budget=8)
    assert res.recipe["choice"] == "adapted" and res.recipe["table"] == {} and "not validated" in res.recipe["why"]


@pytest.mark.parametrize("forced", ["adapted+icl", "icl"])
def test_an_adapt_output_follows_its_recipe(library, tmp_path, forced):
    """--recipe with shots puts the examples in edgelora.json, and generate and eval prompt with
    them unless --zero-shot; a recipe on the base model writes the base (the searched LoRA stays
    in adapter/ and weights.json)."""
    bundle, _ = library
    res = adapt(EXAMPLES, bundle, optimizer="surrogate", compose="cat", budget=8, recipe=forced)
    assert res.recipe["choice"] == forced and res.recipe["why"] == "--recipe" and res.recipe["table"]
    out = tmp_path / "out"
    write_outputs(res, bundle, out, quant="none")
    meta = json.loads((out / "edgelora.json").read_text())
    assert meta["recipe"] == forced and [s["input"] for s in meta["shots"]] == [e.input for e in EXAMPLES]
    assert (meta["lora"] is None) == (forced == "icl")
    saved = json.loads((out / "weights.json").read_text())
    assert saved["recipe"]["choice"] == forced and saved["weights"] and (out / "adapter").is_dir()
    assert [e.input for e in Model.load(out).shots] == [e.input for e in EXAMPLES]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"input": e.input, "output": e.output}) + "\n" for e in EXAMPLES[:2]))
    for flags, shots in (([], len(EXAMPLES)), (["--zero-shot"], 0)):
        r = cli("edgelora.cli", "eval", str(task), "--model", str(out), "--json", "--out", str(tmp_path / "e.json"),
                "--force", "--max-new-tokens", "2", *flags)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["shots"] == shots and got["recipe"] == forced


def test_damaged_recipe_shots_are_refused_in_one_line(library, tmp_path):
    bundle, _ = library
    res = adapt(EXAMPLES, bundle, optimizer="surrogate", compose="cat", budget=8, recipe="adapted+icl")
    out = tmp_path / "out"
    write_outputs(res, bundle, out, quant="none")
    meta = json.loads((out / "edgelora.json").read_text())
    (out / "edgelora.json").write_text(json.dumps({**meta, "shots": [{"input": "x"}]}))
    r = cli("edgelora.cli", "generate", str(out), "hi", "--max-new-tokens", "1")
    assert_refused(r, "edgelora.json: shots[0]", "missing field 'output'")


def test_an_unknown_recipe_is_refused(library):
    bundle, _ = library
    with pytest.raises(UserError, match="--recipe best: choose one of auto, adapted"):
        adapt(EXAMPLES, bundle, recipe="best")
