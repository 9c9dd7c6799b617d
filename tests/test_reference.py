"""The library against references written here from plain Hugging Face ``transformers``.

Nothing in this file uses anchor-lens hooks or metrics to compute an expected value: the
saliency comes from ``output_attentions`` of an eager-attention Hugging Face model and
``torch.autograd.grad``, label-word isolation from a hand-built additive attention mask given to
the chosen layers' attention modules, and AUCROC_l from Mann–Whitney counts. Only prompt
positions are taken from ``build_icl_batch`` (and checked against the token ids).

The reference models are separate Hugging Face models built with the same seed as the bridge
(the bridge rewrites its Hugging Face module in place), so they share no code path with it.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anchor_lens as al
from anchor_lens import Example, analysis, metrics
from anchor_lens.hooks import block_attention_hooks
from anchor_lens.icl import target_logits
from anchor_lens.prompts import TokenRole

from .conftest import tiny_hf_model

DEMOS = [Example("good fun", 1), Example("bad", 0)]
QUERIES = [
    Example("ok", 1),
    Example("a long and very boring film indeed", 0),
    Example("great", 1),
]
# One demonstration list per query (the paper draws fresh demonstrations for every query).
PER_QUERY_DEMOS = [
    DEMOS,
    [Example("bad", 0), Example("fine", 1)],
    [Example("a dull one", 0), Example("nice", 1)],
]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request, tiny_tokenizer):
    """``(kind, bridge, reference)``: the library's bridge and an independent eager HF twin."""
    kind = request.param
    bridge = al.load_model(tiny_hf_model(kind, tiny_tokenizer, seed=0), tokenizer=tiny_tokenizer)
    reference = tiny_hf_model(kind, tiny_tokenizer, seed=0)
    reference.set_attn_implementation("eager")
    return kind, bridge, reference


def _attention_modules(kind, hf):
    if kind == "gpt2":
        return [block.attn for block in hf.transformer.h]
    return [layer.self_attn for layer in hf.model.layers]


def _prompt(bridge, demos, query):
    """Token ids, label positions and target of one unpadded prompt (checked by hand)."""
    batch = al.build_icl_batch(bridge, "sst2", demos, [query])
    assert batch.attention_mask.all()  # a single prompt has no padding
    ids = batch.input_ids[0]
    label_pos = batch.label_positions[0].tolist()
    q = int(batch.target_positions[0])
    label_ids = batch.label_token_ids.tolist()
    # The positions mean what the paper says: p_k holds demonstration k's label token, q is last.
    assert q == len(ids) - 1
    assert [int(ids[p]) for p in label_pos] == [label_ids[d.label] for d in demos]
    special = (batch.roles[0] == TokenRole.SPECIAL).nonzero().flatten().tolist()
    return ids, label_pos, q, label_ids, special


# ------------------------------------------------------------------------------ saliency flows
def _reference_saliency(hf, ids, q, label_ids, gold):
    """``I_l = |Σ_h A_{h,l} ⊙ ∂L/∂A_{h,l}|`` from HF's own attention tensors, per layer."""
    out = hf(input_ids=ids[None], output_attentions=True)
    attentions = out.attentions  # per layer [1, head, n, n], the tensors the forward used
    logits = out.logits[0, q, label_ids]
    loss = F.cross_entropy(logits[None].float(), torch.tensor([gold]))
    grads = torch.autograd.grad(loss, attentions)
    return [(a * g)[0].sum(0).abs().detach() for a, g in zip(attentions, grads, strict=True)]


def _reference_flows(saliency, label_pos, q, excluded=()):
    """Eqs. 2–4 with explicit loops over the pairs ``(i, j)``, ``j < i``."""
    labels = set(label_pos)
    sums = {"S_wp": [], "S_pq": [], "S_ww": []}
    n = saliency.shape[0]
    for i in range(n):
        for j in range(i):  # j < i: the diagonal never counts
            if i in excluded or j in excluded:
                continue
            value = float(saliency[i, j])
            if i in labels:  # i = p_k, j < p_k
                sums["S_wp"].append(value)
            elif i == q and j in labels:  # i = q, j = p_k
                sums["S_pq"].append(value)
            else:
                sums["S_ww"].append(value)
    assert all(sums.values()), "every pair set must be non-empty for the comparison to mean much"
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _reference_flows_per_layer(models_, demos, query, exclude_special=True):
    _, bridge, hf = models_
    ids, label_pos, q, label_ids, special = _prompt(bridge, demos, query)
    saliency = _reference_saliency(hf, ids, q, label_ids, query.label)
    excluded = special if exclude_special else ()
    return [_reference_flows(s, label_pos, q, excluded) for s in saliency]


def _assert_flows_match(result, expected_layers, rel=1e-5):
    for key in ("S_wp", "S_pq", "S_ww"):
        got = getattr(result, f"{key}_raw")
        want = [layer[key] for layer in expected_layers]
        assert got == pytest.approx(want, rel=rel, abs=0), key
        # Real values, not 0 == 0 (S_wp of the last layer is 0: a label word's last-layer
        # attention cannot reach the target's logits).
        assert sum(w > 0 for w in want) >= len(want) - 1, key


def test_information_flow_matches_a_plain_hf_reference(models):
    _, bridge, _ = models
    for query in QUERIES[:2]:
        expected = _reference_flows_per_layer(models, DEMOS, query)
        got = analysis.information_flow(bridge, "sst2", [query], DEMOS, progress=False)
        _assert_flows_match(got, expected)
        # The normalised values are the raw ones over their per-layer sum.
        for layer, e in enumerate(expected):
            total = sum(e.values())
            assert got.S_pq[layer] == pytest.approx(e["S_pq"] / total, rel=1e-5)


def test_information_flow_of_a_padded_batch_matches_unpadded_references(models):
    """A left-padded batch (per-query demonstrations) gives the mean of per-prompt references."""
    _, bridge, _ = models
    lengths = {
        len(al.build_icl_batch(bridge, "sst2", d, [q]).input_ids[0])
        for d, q in zip(PER_QUERY_DEMOS, QUERIES, strict=True)
    }
    assert len(lengths) > 1  # the batch really is padded
    per_example = [
        _reference_flows_per_layer(models, d, q)
        for d, q in zip(PER_QUERY_DEMOS, QUERIES, strict=True)
    ]
    got = analysis.information_flow(
        bridge, "sst2", QUERIES, PER_QUERY_DEMOS, batch_size=len(QUERIES), progress=False
    )
    n_layers = len(per_example[0])
    mean = [
        {k: float(np.mean([ex[layer][k] for ex in per_example])) for k in per_example[0][layer]}
        for layer in range(n_layers)
    ]
    _assert_flows_match(got, mean)
    # Per example too: a two-row batch whose first row is padded, against the reference alone.
    pair = analysis.information_flow(
        bridge, "sst2", QUERIES[:2], PER_QUERY_DEMOS[:2], batch_size=2, progress=False
    )
    alone = analysis.information_flow(
        bridge, "sst2", QUERIES[1:2], PER_QUERY_DEMOS[1:2], progress=False
    )
    _assert_flows_match(alone, per_example[1])
    for key in ("S_wp_raw", "S_pq_raw", "S_ww_raw"):
        first = [2 * p - a for p, a in zip(getattr(pair, key), getattr(alone, key), strict=True)]
        want = [layer[key[:4]] for layer in per_example[0]]
        assert first == pytest.approx(want, rel=1e-4), key


@pytest.mark.parametrize("exclude_special", [True, False])
def test_information_flow_with_a_bos_matches_the_reference(models, monkeypatch, exclude_special):
    """With a BOS, ``exclude_special`` leaves position 0 out of every pair set (or not)."""
    _, bridge, _ = models
    monkeypatch.setattr(bridge.cfg, "default_prepend_bos", True)
    ids, *_, special = _prompt(bridge, DEMOS, QUERIES[0])
    assert special == [0] and int(ids[0]) == bridge.tokenizer.bos_token_id
    expected = _reference_flows_per_layer(models, DEMOS, QUERIES[0], exclude_special)
    got = analysis.information_flow(
        bridge, "sst2", QUERIES[:1], DEMOS, exclude_special=exclude_special, progress=False
    )
    _assert_flows_match(got, expected)


# ---------------------------------------------------------------------------------- isolation
def _reference_logits(kind, hf, ids, isolated_by_layer):
    """Target logits of HF with rows ``isolated_by_layer[l]`` blocked from earlier keys.

    The chosen layers' attention modules get a hand-built additive mask (``0`` = allowed,
    dtype minimum = blocked): causal, and in addition row ``i`` may not see any ``j < i``
    when ``i`` is isolated; the diagonal is kept.
    """
    n = len(ids)
    modules = _attention_modules(kind, hf)
    handles, calls = [], []
    for layer, rows in isolated_by_layer.items():
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        for i in rows:
            for j in range(i):
                allowed[i, j] = False
        mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)

        def pre_hook(module, args, kwargs, mask=mask, layer=layer):
            calls.append(layer)
            return args, {**kwargs, "attention_mask": mask}

        handles.append(modules[layer].register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids[None]).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    assert sorted(calls) == sorted(isolated_by_layer)  # every edit was applied, once
    return logits


@pytest.mark.parametrize("layers", [[0], [0, 1], [1]])
def test_label_isolation_matches_a_hand_masked_hf_forward(models, layers):
    kind, bridge, hf = models
    batch = al.build_icl_batch(bridge, "sst2", DEMOS, QUERIES[:2])  # left-padded
    with torch.no_grad():
        got = target_logits(bridge, batch, block_attention_hooks(layers, batch.label_positions))
    for b, query in enumerate(QUERIES[:2]):
        ids, label_pos, *_ = _prompt(bridge, DEMOS, query)
        want = _reference_logits(kind, hf, ids, {layer: label_pos for layer in layers})
        plain = _reference_logits(kind, hf, ids, {})
        assert (want - plain).abs().max() > 1e-3  # the isolation changes the output
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)


def test_isolating_labels_in_the_last_layer_cannot_reach_the_target(models):
    """Only the target's own row of the last layer feeds its logits: a no-op, in both."""
    kind, bridge, hf = models
    last = bridge.cfg.n_layers - 1
    batch = al.build_icl_batch(bridge, "sst2", DEMOS, QUERIES[:2])
    with torch.no_grad():
        plain = target_logits(bridge, batch)
        got = target_logits(bridge, batch, block_attention_hooks([last], batch.label_positions))
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    ids, label_pos, *_ = _prompt(bridge, DEMOS, QUERIES[0])
    ref = _reference_logits(kind, hf, ids, {last: label_pos})
    torch.testing.assert_close(ref, _reference_logits(kind, hf, ids, {}), rtol=0, atol=0)


def test_per_layer_positions_match_the_reference(models):
    """A callable gives each layer its own rows (the random baseline), as in the reference."""
    kind, bridge, hf = models
    batch = al.build_icl_batch(bridge, "sst2", DEMOS, QUERIES[:1])
    rows = {0: [3, 7], 1: [5, -1], 2: [2, 9]}
    hooks = block_attention_hooks([0, 1, 2], lambda layer: torch.tensor([rows[layer]]))
    with torch.no_grad():
        got = target_logits(bridge, batch, hooks)[0]
    want = _reference_logits(
        kind,
        hf,
        batch.input_ids[0],
        {layer: [r for r in rs if r >= 0] for layer, rs in rows.items()},
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _jaccard_top(a, b, k):
    sa, sb = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
    return len(sa & sb) / len(sa | sb)


def test_isolation_loyalties_match_the_reference(models):
    kind, bridge, hf = models
    iso = analysis.isolation(bridge, "sst2", QUERIES, DEMOS, k_layers=1, top_k=5, progress=False)
    n_layers = bridge.cfg.n_layers
    for where, layer in (("first", 0), ("last", n_layers - 1)):
        agree, jacc = [], []
        for query in QUERIES:
            ids, label_pos, _, label_ids, _ = _prompt(bridge, DEMOS, query)
            ref = _reference_logits(kind, hf, ids, {})
            out = _reference_logits(kind, hf, ids, {layer: label_pos})
            agree.append(int(ref[label_ids].argmax() == out[label_ids].argmax()))
            jacc.append(_jaccard_top(ref, out, 5))
        got = iso.conditions[f"label_{where}"]
        assert got["label_loyalty"] == pytest.approx(np.mean(agree))
        assert got["word_loyalty"] == pytest.approx(np.mean(jacc))


# ------------------------------------------------------------------------------------ AUCROC_l
def _mann_whitney_auc(positives, negatives):
    """P(score of a positive > score of a negative), ties counting one half."""
    wins = 0.0
    for a in positives:
        for b in negatives:
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (len(positives) * len(negatives))


def _paper_aucroc(scores, predictions, binary_score="raw"):
    """The official notebook's scoring, by hand: only classes the model predicts take part.

    Two classes ``a < b``: ROC AUC of class ``b``'s raw attention (or its share of
    ``a + b``) for "predicted b" against "predicted a". More: each row normalised over the
    predicted classes, then the one-vs-one macro average of Hand & Till: for every pair the
    mean of AUC(class a's score, a vs b) and AUC(class b's score, b vs a).
    """
    present = sorted(set(predictions))
    if len(present) < 2:
        return None
    if len(present) == 2:
        a, b = present
        score = [s[b] if binary_score == "raw" else s[b] / (s[a] + s[b]) for s in scores]
        pos = [score[i] for i, p in enumerate(predictions) if p == b]
        neg = [score[i] for i, p in enumerate(predictions) if p == a]
        return _mann_whitney_auc(pos, neg)
    norm = [{c: s[c] / sum(s[d] for d in present) for c in present} for s in scores]
    pair_aucs = []
    for a, b in combinations(present, 2):
        of_a = [i for i, p in enumerate(predictions) if p == a]
        of_b = [i for i, p in enumerate(predictions) if p == b]
        auc_a = _mann_whitney_auc([norm[i][a] for i in of_a], [norm[i][a] for i in of_b])
        auc_b = _mann_whitney_auc([norm[i][b] for i in of_b], [norm[i][b] for i in of_a])
        pair_aucs.append((auc_a + auc_b) / 2)
    return sum(pair_aucs) / len(pair_aucs)


def _synthetic(n_class, predicted_classes, n=40, n_layers=3, seed=0, unpredicted_scale=1.0):
    rng = np.random.default_rng(seed)
    preds = rng.choice(predicted_classes, size=n)
    preds[: len(predicted_classes)] = predicted_classes  # each predicted at least once
    scores = rng.gamma(2.0, 0.05, size=(n_layers, n, n_class))
    # Signal in later layers: the predicted class gets more attention.
    for layer in range(n_layers):
        scores[layer, np.arange(n), preds] += 0.04 * layer * rng.random(n)
    missing = [c for c in range(n_class) if c not in predicted_classes]
    scores[:, :, missing] *= unpredicted_scale
    scores = np.round(scores, 2)  # ties, so their handling counts
    return torch.tensor(scores), torch.tensor(preds)


CASES = {
    "binary": (2, [0, 1]),
    "binary of four": (4, [1, 3]),
    "three classes": (3, [0, 1, 2]),
    "four classes, three predicted": (4, [0, 2, 3]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("binary_score", ["raw", "share"])
def test_aucroc_matches_a_hand_written_paper_reference(case, binary_score):
    n_class, predicted = CASES[case]
    scores, preds = _synthetic(n_class, predicted, unpredicted_scale=5.0)
    got = metrics.aucroc_per_layer(scores, preds, binary_score=binary_score)
    for layer in range(scores.shape[0]):
        want = _paper_aucroc(scores[layer].tolist(), preds.tolist(), binary_score)
        assert got[layer] == pytest.approx(want, abs=1e-12), layer


def test_aucroc_reference_cases_discriminate():
    """The synthetic cases are ones where the other scoring choices give other numbers."""
    scores, preds = _synthetic(2, [0, 1])
    raw = metrics.aucroc_per_layer(scores, preds, "raw")
    share = metrics.aucroc_per_layer(scores, preds, "share")
    assert any(abs(r - s) > 1e-3 for r, s in zip(raw, share, strict=True))
    # Four classes, three predicted: renormalising over all four would give other AUCs.
    scores, preds = _synthetic(4, [0, 2, 3], unpredicted_scale=5.0)
    got = metrics.aucroc_per_layer(scores, preds)
    present = [0, 2, 3]
    for layer in range(scores.shape[0]):
        s = scores[layer]
        s4 = s / s.sum(-1, keepdim=True)  # normalised over all four classes, then restricted
        wrong = _ovo_without_renormalising(s4, preds, present)
        assert abs(got[layer] - wrong) > 1e-4
    assert metrics.aucroc_per_layer(scores, torch.zeros_like(preds)) == [None] * 3


def _ovo_without_renormalising(s, preds, present):
    pairs = []
    for a, b in combinations(present, 2):
        of_a = [i for i, p in enumerate(preds.tolist()) if p == a]
        of_b = [i for i, p in enumerate(preds.tolist()) if p == b]
        auc_a = _mann_whitney_auc([float(s[i, a]) for i in of_a], [float(s[i, a]) for i in of_b])
        auc_b = _mann_whitney_auc([float(s[i, b]) for i in of_b], [float(s[i, b]) for i in of_a])
        pairs.append((auc_a + auc_b) / 2)
    return sum(pairs) / len(pairs)


_DEEP_WORDS = "good bad fine odd sad long nice dull war cup".split() + [
    "a long and very boring film indeed",
    "great fun",
]
_DEEP_CASES = {
    # (model kind, seed, task): what the tiny random model predicts on these prompts.
    "binary": ("gpt2", 0, "sst2"),  # both sentiment classes
    "three of four": ("gpt2", 2, "agnews"),  # Technology never predicted
    "four classes": ("gpt2", 5, "agnews"),
    "one class": ("llama", 0, "agnews"),  # always "Sports": AUCROC_l undefined
}


@pytest.mark.parametrize("case", list(_DEEP_CASES))
def test_deep_layer_auc_matches_hf_attentions(tiny_tokenizer, case):
    """Class scores from HF's attentions and predictions from HF's logits, scored by hand."""
    kind, seed, task_name = _DEEP_CASES[case]
    bridge = al.load_model(tiny_hf_model(kind, tiny_tokenizer, seed=seed), tokenizer=tiny_tokenizer)
    hf = tiny_hf_model(kind, tiny_tokenizer, seed=seed)
    hf.set_attn_implementation("eager")
    task = al.get_task(task_name)
    queries = [Example(w, i % task.n_classes) for i, w in enumerate(_DEEP_WORDS)]
    if task.n_classes == 2:  # the order of the demonstrations alternates per query
        pair = [Example("good fun", 1), Example("bad", 0)]
        per_query = [pair[::-1] if i % 2 else pair for i in range(len(queries))]
    else:
        demos = [
            Example("war news", 0),
            Example("cup final", 1),
            Example("stocks", 2),
            Example("chip", 3),
        ]
        per_query = [demos[i % 4 :] + demos[: i % 4] for i in range(len(queries))]
    n_layers = bridge.cfg.n_layers
    scores = [[] for _ in range(n_layers)]
    preds = []
    for query, qd in zip(queries, per_query, strict=True):
        batch = al.build_icl_batch(bridge, task, qd, [query])
        ids, q = batch.input_ids[0], int(batch.target_positions[0])
        label_pos = batch.label_positions[0].tolist()
        assert [int(ids[p]) for p in label_pos] == [int(batch.label_token_ids[d.label]) for d in qd]
        with torch.no_grad():
            out = hf(input_ids=ids[None], output_attentions=True)
        preds.append(int(out.logits[0, q, batch.label_token_ids].argmax()))
        for layer, a in enumerate(out.attentions):
            row = [0.0] * task.n_classes
            for p, d in zip(label_pos, qd, strict=True):
                row[d.label] += float(a[0, :, q, p].sum())  # summed over heads
            scores[layer].append(row)
    n_predicted = len(set(preds))
    assert n_predicted == {"binary": 2, "three of four": 3, "four classes": 4, "one class": 1}[case]
    for binary_score in ("raw", "share") if n_predicted == 2 else ("raw",):
        got = analysis.deep_layer_auc(
            bridge,
            task,
            queries,
            per_query,
            binary_score=binary_score,
            batch_size=6,
            progress=False,
        )
        assert [got.predicted_classes[w] for w in task.label_words] == [
            preds.count(c) for c in range(task.n_classes)
        ]
        want = [_paper_aucroc(scores[layer], preds, binary_score) for layer in range(n_layers)]
        if n_predicted == 1:
            assert want == [None] * n_layers
            assert got.aucroc == got.r_l == [None] * n_layers
            assert "Sports" in got.undefined_reason
            continue
        assert got.aucroc == pytest.approx(want, abs=1e-6)
        gains = [a - 0.5 for a in want]
        assert got.r_l == pytest.approx(
            [sum(gains[: i + 1]) / sum(gains) for i in range(n_layers)], rel=1e-4
        )
