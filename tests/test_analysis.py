import itertools
import json

import pytest
import torch
import torch.nn.functional as F

import anchor_lens as al
from anchor_lens import Example, analysis, metrics
from anchor_lens.cli import main
from anchor_lens.hooks import PatternCapture, SaliencyCapture, block_attention_hooks
from anchor_lens.icl import target_logits

DEMOS = [Example("good fun", 1), Example("bad", 0)]
SHORT, LONG = Example("ok", 1), Example("a long and very boring film indeed", 0)


def _per_example_metrics(model, batch):
    layers = tuple(range(model.cfg.n_layers))
    sal, pat = SaliencyCapture(layers), PatternCapture(layers, batch.target_positions)
    logits = target_logits(model, batch, sal.hooks + pat.hooks)[:, batch.label_token_ids]
    loss = F.cross_entropy(logits, batch.labels, reduction="sum")
    saliency = sal.saliency(loss)
    masks = metrics.flow_masks(batch.attention_mask, batch.label_positions, batch.target_positions)
    flows = metrics.information_flow(saliency, masks)
    scores = metrics.class_attention_scores(
        pat.stacked(), batch.label_positions, batch.demo_labels, 2
    )
    return flows, scores.detach()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_does_not_change_any_metric(tiny_model, padding_side):
    batch = al.build_icl_batch(tiny_model, "sst2", DEMOS, [SHORT, LONG], padding_side=padding_side)
    alone = al.build_icl_batch(tiny_model, "sst2", DEMOS, [SHORT])
    assert batch.input_ids.shape[1] > alone.input_ids.shape[1]  # the short one is padded
    flows, scores = _per_example_metrics(tiny_model, batch)
    flows_alone, scores_alone = _per_example_metrics(tiny_model, alone)
    for key in flows:
        assert torch.allclose(flows[key][:, 0], flows_alone[key][:, 0], rtol=1e-4, atol=1e-9)
    assert torch.allclose(scores[:, 0], scores_alone[:, 0], atol=1e-6)


def test_loyalty_is_one_when_nothing_is_isolated(tiny_model):
    batch = al.build_icl_batch(tiny_model, "sst2", DEMOS, [SHORT, LONG])
    nobody = torch.full_like(batch.label_positions, -1)
    with torch.no_grad():
        ref = target_logits(tiny_model, batch)
        out = target_logits(tiny_model, batch, block_attention_hooks(range(2), nobody))
    ids = batch.label_token_ids
    assert metrics.label_loyalty(ref[:, ids].argmax(-1), out[:, ids].argmax(-1)) == 1.0
    assert metrics.word_loyalty(ref, out) == 1.0


def test_random_positions_avoid_labels_target_and_padding(tiny_llama):
    batch = al.build_icl_batch(tiny_llama, "sst2", DEMOS, [SHORT, LONG])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = analysis.random_positions(batch, 2, gen)
        for b in range(len(batch)):
            picked = set(rows[b].tolist())
            assert len(picked) == 2
            assert not picked & set(batch.label_positions[b].tolist())
            assert all(batch.attention_mask[b, p] == 1 for p in picked)
            assert all(p < batch.target_positions[b] for p in picked)
    again = analysis.random_positions(batch, 2, torch.Generator().manual_seed(0))
    assert torch.equal(again, analysis.random_positions(batch, 2, torch.Generator().manual_seed(0)))


def test_experiments_return_per_layer_results(tiny_llama):
    queries = [SHORT, LONG, Example("great", 1), Example("awful", 0)]
    n_layers = tiny_llama.cfg.n_layers
    flow = analysis.information_flow(tiny_llama, "sst2", queries, DEMOS, progress=False)
    assert len(flow.S_wp) == n_layers and flow.n == 4
    for layer in range(n_layers):
        # The normalised flows are this layer's raw flows over their sum (Fig. 3).
        raw = [flow.S_wp_raw[layer], flow.S_pq_raw[layer], flow.S_ww_raw[layer]]
        norm = [flow.S_wp[layer], flow.S_pq[layer], flow.S_ww[layer]]
        assert norm == pytest.approx([r / sum(raw) for r in raw], rel=1e-6)
    # Batching does not change the mean over queries (padding differs between the two runs).
    one_by_one = analysis.information_flow(
        tiny_llama, "sst2", queries, DEMOS, batch_size=1, progress=False
    )
    assert one_by_one.S_pq_raw == pytest.approx(flow.S_pq_raw, rel=1e-4)
    assert one_by_one.S_wp_raw == pytest.approx(flow.S_wp_raw, rel=1e-4)
    pred = analysis.information_flow(
        tiny_llama,
        "sst2",
        queries,
        DEMOS,
        loss_target="prediction",
        keep_per_head=True,
        progress=False,
    )
    assert len(pred.per_head["S_pq"]) == n_layers
    chosen = analysis.information_flow(
        tiny_llama, "sst2", queries, DEMOS, layers=[-1], progress=False
    )
    assert chosen.S_pq_raw == pytest.approx(flow.S_pq_raw[-1:], rel=1e-5)
    assert len(pred.per_head["S_pq"][0]) == tiny_llama.cfg.n_heads
    iso = analysis.isolation(tiny_llama, "sst2", queries, DEMOS, k_layers=1, progress=False)
    assert set(iso.conditions) == {"label_first", "label_last", "random_first", "random_last"}
    assert iso.layers["label_last"] == [n_layers - 1]
    deep = analysis.deep_layer_auc(tiny_llama, "sst2", queries, DEMOS, progress=False)
    assert len(deep.aucroc) == len(deep.r_l) == n_layers
    counts = al.evaluate(tiny_llama, "sst2", queries, DEMOS, progress=False).predicted_counts
    assert list(deep.predicted_classes.values()) == counts
    if sum(c > 0 for c in counts) < 2:  # the tiny random model answers one class throughout
        assert deep.aucroc == deep.r_l == [None] * n_layers and not deep.defined
        word = al.get_task("sst2").label_words[counts.index(4)]
        assert repr(word) in deep.undefined_reason and "all 4 queries" in deep.undefined_reason
    else:
        assert deep.r_l == metrics.cumulative_r(deep.aucroc)


def test_experiments_need_demonstrations(tiny_llama):
    with pytest.raises(ValueError, match="demonstrations"):
        analysis.isolation(tiny_llama, "sst2", [SHORT], [], k_layers=1, progress=False)
    with pytest.raises(ValueError, match="k_layers"):
        analysis.isolation(tiny_llama, "sst2", [SHORT], DEMOS, k_layers=9, progress=False)


def test_cli_analyze_writes_results_figures_and_report(tiny_llama_folder, tmp_path, capsys):
    code = main(
        [
            "analyze",
            "--model",
            str(tiny_llama_folder),
            "--n",
            "6",
            "--k-layers",
            "1",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 0
    flow = json.loads((tmp_path / "flow.json").read_text())
    assert {"S_wp", "S_pq", "S_ww", "S_wp_raw"} <= set(flow) and len(flow["S_wp"]) == 3
    for layer in range(3):
        raw = [flow[f"S_{k}_raw"][layer] for k in ("wp", "pq", "ww")]
        assert [flow[f"S_{k}"][layer] for k in ("wp", "pq", "ww")] == pytest.approx(
            [r / sum(raw) for r in raw], rel=1e-6
        )
    iso = json.loads((tmp_path / "isolation.json").read_text())
    assert iso["n"] == 6 and iso["k_layers"] == 1
    assert iso["layers"]["label_first"] == [0] and iso["layers"]["label_last"] == [2]
    for cond in iso["conditions"].values():
        # A fraction of 6 queries; word loyalty a mean of six top-5 Jaccards (|∩| / (10 - |∩|)).
        assert cond["label_loyalty"] * 6 == pytest.approx(round(cond["label_loyalty"] * 6))
        jaccards = [i / (10 - i) for i in range(6)]
        assert any(
            sum(combo) / 6 == pytest.approx(cond["word_loyalty"])
            for combo in itertools.combinations_with_replacement(jaccards, 6)
        )
    # Isolating label words in the last layer cannot reach the target's logits.
    assert iso["conditions"]["label_last"] == {"label_loyalty": 1.0, "word_loyalty": 1.0}
    deep = json.loads((tmp_path / "deep.json").read_text())
    assert len(deep["aucroc"]) == len(deep["r_l"]) == 3
    assert sum(deep["predicted_classes"].values()) == 6
    assert deep["r_l"] == metrics.cumulative_r(deep["aucroc"])
    assert (deep["undefined_reason"] is None) == all(a is not None for a in deep["aucroc"])
    for name in ("fig3_flow", "fig4_isolation", "fig5_deep"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert "findings of Wang et al." in report and "| finding | holds |" in report
    assert "paper findings hold" in capsys.readouterr().out


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_last_layers_resume_from_the_captured_residual(tiny_model, padding_side):
    """Blocks N-k… run again on what they received equal the full forward with the same
    edits (the same operations on the same inputs), so the last-k isolation conditions can skip
    the first N-k blocks. Where a bridge feeds its blocks something outside their arguments
    (GPT-2's bridge and a left-padding mask), the unedited replay differs from the reference,
    which is how batch_isolation detects it and runs the whole model instead."""
    from anchor_lens.icl import capture_block_inputs, resume_target_logits

    batch = al.build_icl_batch(tiny_model, "sst2", DEMOS, [SHORT, LONG], padding_side=padding_side)
    start = tiny_model.cfg.n_layers - 2
    with torch.no_grad(), capture_block_inputs(tiny_model, start) as inputs:
        reference = target_logits(tiny_model, batch)
    assert inputs.resid.shape[:2] == batch.input_ids.shape and len(inputs.kwargs) == 2
    hooks = block_attention_hooks(range(start, tiny_model.cfg.n_layers), batch.label_positions)
    with torch.no_grad():
        replay = resume_target_logits(tiny_model, batch, inputs)
        edited = target_logits(tiny_model, batch, hooks)
        resumed = resume_target_logits(tiny_model, batch, inputs, hooks)
    exact = torch.allclose(replay, reference, rtol=1e-6, atol=1e-6)
    rotary = tiny_model.cfg.positional_embedding_type == "rotary"
    assert exact or (not rotary and padding_side == "left")  # Llama-style models: always
    assert not torch.allclose(edited, reference, atol=1e-4)  # the edit matters
    if exact:
        assert torch.allclose(resumed, edited, rtol=1e-6, atol=1e-6)


def test_batch_isolation_with_block_inputs_equals_the_full_forwards(tiny_model, monkeypatch):
    """Analyze's path (last-k conditions from the saliency forward's captured inputs) gives the
    same loyalty as running the whole model per condition; it takes the short path exactly when
    the unedited replay reproduces the reference."""
    import anchor_lens.analysis as module

    layers = range(tiny_model.cfg.n_layers)
    spans = analysis.isolation_spans(tiny_model.cfg.n_layers, 1)
    real = module.resume_target_logits
    for side in ("left", "right"):
        batch = al.build_icl_batch(tiny_model, "sst2", DEMOS, [SHORT, LONG], padding_side=side)
        sal = analysis.saliency_pass(tiny_model, batch, layers, capture_from=spans["last"][0])
        gens = lambda: [analysis.example_generator(0, i) for i in range(2)]  # noqa: E731
        full = analysis.batch_isolation(tiny_model, batch, spans, gens(), reference=sal.logits)
        calls = []
        counted = lambda *a, calls=calls: calls.append(1) or real(*a)  # noqa: E731
        monkeypatch.setattr(module, "resume_target_logits", counted)
        short = analysis.batch_isolation(
            tiny_model, batch, spans, gens(), reference=sal.logits, block_inputs=sal.block_inputs
        )
        given = len(calls)
        # Without a reference, its own reference forward records the block inputs.
        auto = analysis.batch_isolation(tiny_model, batch, spans, gens())
        monkeypatch.setattr(module, "resume_target_logits", real)
        replays = torch.allclose(real(tiny_model, batch, sal.block_inputs), sal.logits, 1e-5, 1e-5)
        assert given == (3 if replays else 1)  # the check, then label_last and random_last
        assert len(calls) == 2 * given
        for key in full:
            for other in (short, auto):
                assert torch.equal(full[key][0], other[key][0])
                assert torch.allclose(full[key][1], other[key][1], atol=1e-6)
