"""The exact composition (peft's cat) and the surrogate search on the tiny model: parity of the
cat slot with PEFT, of the graph's hidden states through the numpy head with the graph's own
log-probs, the model's gradient, and what a surrogate adapt returns and records."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import encode, make_peft_lora, torch_losses
from test_adapt import PROMPTS, library  # noqa: F401  (the fixture)

from edgelora.bundle import Bundle
from edgelora.examples import Example
from edgelora.lora import LoraStack, load_lora
from edgelora.outputs import write_outputs
from edgelora.scorer import Scorer
from edgelora.search import adapt
from edgelora.surrogate import Head, Model, Point, fit_jacobian

EXAMPLES = [Example(p, a) for p, a in zip(PROMPTS, ["5", "yes", "orange purple", "01/03/1987", "jumps"])]


def test_cat_composition_matches_peft(tiny_bundle, tiny_hf, tmp_path):
    """Σ wᵢ·sᵢ·BᵢAᵢ through the scoring graph's slot = peft's add_weighted_adapter(..., "cat"), for
    LoRAs of different ranks and alphas."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from edgelora_export.lora import add_lora
    dirs = [make_peft_lora(tiny_hf, tmp_path / "a", seed=1, r=4, alpha=8),
            make_peft_lora(tiny_hf, tmp_path / "b", seed=2, r=2, alpha=6)]
    for d in dirs:
        add_lora(d, tiny_bundle, d.name)
    bundle = Bundle.open(tiny_bundle)
    loras = [load_lora(bundle.lora_paths()[d.name]) for d in dirs]
    w = [0.7, -0.4]
    scorer = Scorer(bundle)
    scorer.bind(encode(bundle, EXAMPLES))
    loss, lp = scorer.run(*LoraStack(loras, list(bundle.targets), "cat").compose(np.asarray(w)))
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_hf), dirs[0], adapter_name="a")
    ref.load_adapter(dirs[1], adapter_name="b")
    ref.add_weighted_adapter(["a", "b"], w, "mix", combination_type="cat")
    ref.set_adapter("mix")
    ref_loss, ref_lp = torch_losses(ref.eval(), scorer.batch)
    lorahub = scorer.run(*LoraStack(loras, list(bundle.targets), "lorahub").compose(np.asarray(w)))[0]
    # the two compositions differ away from single LoRAs, by far more than cat differs from peft
    # (float error, the LoRAs being large: the losses move by ~0.5)
    assert np.abs(lorahub - ref_loss).max() > 30 * np.abs(loss - ref_loss).max()
    np.testing.assert_allclose(loss, ref_loss, rtol=3e-4)
    np.testing.assert_allclose(lp, ref_lp, rtol=3e-4)


def test_cat_equals_lorahub_at_a_single_lora_and_merged_drops_zero_weights(library):
    bundle, loras = library
    cat, hub = LoraStack(loras, list(bundle.targets), "cat"), LoraStack(loras, list(bundle.targets))
    e = np.eye(len(loras))[1]
    (cA, cB), (hA, hB) = cat.merged(e), hub.merged(e)
    for m in bundle.targets:
        np.testing.assert_allclose(cB[m] @ cA[m], hB[m] @ hA[m], rtol=1e-5, atol=1e-6)
    w = np.array([0.5, 0.0, -1.0, 0.0])
    A, B = cat.merged(w)
    full_A, full_B = cat.compose(w)
    for m in bundle.targets:
        assert A[m].shape[1] == 2 * cat.rank  # two LoRAs with a weight, r columns each
        np.testing.assert_allclose(B[m] @ A[m], full_B[m] @ full_A[m], rtol=1e-5, atol=1e-6)


def test_hidden_states_through_the_numpy_head_give_the_graphs_log_probs(library):
    """The graph's `hidden` output, normed and projected by the bundle's head (memory-mapped from
    the decoder's data), reproduces its own per-example log-probs: the surrogate's loss is exact."""
    bundle, loras = library
    scorer = Scorer(bundle)
    batch = encode(bundle, EXAMPLES)
    scorer.bind(batch)
    _, lp, hidden = scorer.run(*LoraStack(loras[:1], list(bundle.targets)).compose(np.ones(1)), hidden=True)
    mask = batch.target_mask > 0
    head = Head(*bundle.head()[:2], bundle.head()[2], batch.target_ids[mask])
    ce = head.ce(hidden[mask])
    per_example = np.bincount(np.nonzero(mask)[0], weights=ce, minlength=len(lp))
    np.testing.assert_allclose(-per_example, lp, rtol=1e-4)


def _points(bundle, loras, w_list):
    scorer = Scorer(bundle)
    batch = encode(bundle, EXAMPLES)
    scorer.bind(batch)
    stack, mask, pts = LoraStack(loras, list(bundle.targets), "cat"), batch.target_mask > 0, []
    for w in w_list:
        _, lp, h = scorer.run(*stack.compose(np.asarray(w, np.float64)), hidden=True)
        pts.append(Point(np.asarray(w, np.float64), h[mask], lp))
    head = Head(*bundle.head()[:2], bundle.head()[2], batch.target_ids[mask])
    return pts, head


def test_the_model_interpolates_its_points_and_its_gradient_is_right(library):
    """Fitted on w = 0 and each LoRA alone, the linear model of the hidden states passes through
    each of them, so its loss there (every token kept) is the true loss; its gradient agrees
    with finite differences."""
    bundle, loras = library
    n = len(loras)
    pts, head = _points(bundle, loras, [np.zeros(n), *np.eye(n)])
    model = Model(head, pts[1], fit_jacobian(pts, pts[1], 0.5), k=head.W.shape[0])
    for p in pts:
        np.testing.assert_allclose(model.ce(p.w)[0], head.ce(p.hidden), rtol=2e-3, atol=2e-3)
    w = np.array([0.3, 0.2, -0.4, 0.1])
    ce, grad = model.ce(w)
    eps = 1e-5
    num = np.stack([(model.ce(w + eps * e)[0] - model.ce(w - eps * e)[0]) / (2 * eps) for e in np.eye(n)], 1)
    np.testing.assert_allclose(grad, num, rtol=1e-3, atol=1e-5)


def test_surrogate_adapt_returns_its_best_true_point_and_records_its_trace(library, tmp_path):
    """Whatever the model predicts, the result is the best point a true forward scored, never worse
    than the best LoRA alone, and weights.json records the leave-one-out table and the steps."""
    bundle, loras = library
    res = adapt(EXAMPLES, bundle, optimizer="surrogate", compose="cat", budget=12)
    assert res.settings["selection_forwards"] == len(loras)
    best = min(res.history, key=lambda e: e.objective)
    assert res.objective == best.objective and list(res.weights) == best.weights
    assert len(res.stack.names) == len(loras)  # the surrogate spans the whole library
    alone = res.history[1]  # the best LoRA alone, the ranking's forward
    assert sorted(alone.weights) == [0.0] * (len(loras) - 1) + [1.0]
    assert res.objective <= alone.objective
    assert len(res.history) <= 12
    table = res.surrogate["loo"]
    assert table[0]["setting"] == "best single LoRA" and "true" in table[0]
    chosen = next(r for r in table if r["setting"] == res.surrogate["setting"])
    assert "true" in chosen  # a setting is chosen on true forwards, never on the model's word alone
    assert chosen is table[0] or chosen["true"] < table[0]["true"]
    for step in res.surrogate["steps"]:
        assert {"radius", "predicted", "true", "ratio"} <= step.keys()
    write_outputs(res, bundle, tmp_path / "out", quant=None)
    saved = json.loads((tmp_path / "out" / "weights.json").read_text())
    assert saved["surrogate"]["loo"] == table and saved["settings"]["compose"] == "cat"


def test_surrogate_needs_the_exact_composition(library):
    from edgelora.errors import UserError
    bundle, _ = library
    with pytest.raises(UserError, match="--compose cat"):
        adapt(EXAMPLES, bundle, optimizer="surrogate")
    with pytest.raises(UserError, match="box must hold 1"):
        adapt(EXAMPLES, bundle, optimizer="surrogate", compose="cat", bounds=0.5)




def test_on_long_examples_the_surrogate_spans_the_shortlist_the_cut_ranking_picks(library, monkeypatch):
    """Where a cut ranking pays, the library is ranked on the cut examples and only the SHORTLIST
    best are scored whole: those are the LoRAs the model spans, in order of their whole loss."""
    from edgelora import search
    from test_adapt import _loss_at
    bundle, loras = library
    monkeypatch.setattr(search, "SHORTLIST", 2)
    res = adapt(EXAMPLES, bundle, optimizer="surrogate", compose="cat", budget=8, select_len=1)
    cut = {l.name: _loss_at(bundle, EXAMPLES, [l], [1.0], keep=1) for l in loras}
    whole = {l.name: _loss_at(bundle, EXAMPLES, [l], [1.0]) for l in loras}
    short = sorted(cut, key=cut.get)[:2]
    assert res.loras == sorted(short, key=whole.get)
    assert res.settings["selection_forwards"] == len(loras) + 2


def test_a_bundle_of_the_previous_format_is_refused_with_the_command_that_rebuilds_it(tiny_bundle):
    from helpers import assert_refused, cli
    from edgelora.bundle import FORMAT_VERSION, write_manifest
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    old = FORMAT_VERSION - 1
    write_manifest(tiny_bundle, {**manifest, "format_version": old})
    r = cli("edgelora.cli", "info", "--bundle", str(tiny_bundle))
    assert_refused(r)
    assert (f"bundle format {old} is not supported (this edgelora reads {FORMAT_VERSION}); rebuild it with: "
            f"edgelora-export base -o {tiny_bundle}") in r.stderr


def test_the_surrogate_ranks_named_loras_too(library):
    """Given --loras, the surrogate scores each of them alone (its model's first points) and spans them."""
    bundle, loras = library
    names = [l.name for l in loras[:3]]
    res = adapt(EXAMPLES, bundle, loras=names, optimizer="surrogate", compose="cat", budget=6)
    assert sorted(res.loras) == sorted(names) and res.settings["selection_forwards"] == 3
