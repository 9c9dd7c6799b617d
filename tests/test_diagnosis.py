import itertools
import json
import math

import numpy as np
import pytest
import torch

import anchor_lens as al
from anchor_lens import Example
from anchor_lens.cli import main
from anchor_lens.diagnosis import diagnose, predicted_confusion, real_confusion


def test_predicted_confusion_is_a_normalised_distance_in_query_pca_space():
    # Queries vary along x only: keys differing only in y are indistinguishable to them.
    queries = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [2, 0, 0], [-2, 0, 0]])
    keys = torch.tensor([[0.0, 0, 0], [0, 5, 0], [1, 0, 0]])
    c = predicted_confusion(queries, keys, n_components=1)
    assert torch.diagonal(c).tolist() == [1.0, 1.0, 1.0]
    assert c[0, 1] == pytest.approx(0.0, abs=1e-6)  # same x: maximally confusable
    assert c[0, 2] == pytest.approx(1.0) and c[1, 2] == pytest.approx(1.0)
    assert torch.allclose(c, c.T)


def test_real_confusion_is_pairwise_auc_by_hand():
    probs = torch.tensor(
        [
            [0.7, 0.2, 0.1, 0.0],
            [0.2, 0.5, 0.3, 0.0],
            [0.3, 0.6, 0.1, 0.0],
            [0.1, 0.1, 0.8, 0.0],
            [0.6, 0.1, 0.3, 0.0],
        ]
    )
    labels = torch.tensor([0, 0, 1, 2, 2])  # no query has gold class 3
    c = real_confusion(probs, labels)
    # (0,1): p0/(p0+p1) of gold 0 = (.78, .29) vs gold 1 = (.33): 1 of 2 pairs -> 0.5.
    assert c[0, 1] == pytest.approx(0.5)
    # (0,2): p0/(p0+p2) of gold 0 = (.875, .4) vs gold 2 = (.11, .67): 3 of 4 -> 0.75.
    assert c[0, 2] == pytest.approx(0.75)
    # (1,2): p1/(p1+p2) of gold 1 = (.86) vs gold 2 = (.11, .25): 2 of 2 -> 1.
    assert c[1, 2] == pytest.approx(1.0)
    assert torch.equal(c[:3, :3], c[:3, :3].T) and torch.diagonal(c).tolist() == [1.0] * 4
    # Class 3 never occurs as a gold label: no AUC against it.
    assert all(math.isnan(float(c[i, 3])) and math.isnan(float(c[3, i])) for i in range(3))


def _ranks(xs):
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _spearman(a, b):
    """Pearson correlation of the ranks."""
    ra, rb = np.array(_ranks(a)), np.array(_ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra**2).sum() * (rb**2).sum()))


def _auc(pos, neg):
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_diagnose_matches_a_plain_hf_reference(tiny_tokenizer, tiny_llama):
    """Queries, keys and probabilities recomputed from a plain HF Llama (GQA, rotary)."""
    from .conftest import tiny_hf_model

    hf = tiny_hf_model("llama", tiny_tokenizer, seed=0)  # the same weights as tiny_llama
    words = ["good", "bad", "fine", "odd", "sad", "long", "nice", "dull"]
    queries = [Example(w, i % 4) for i, w in enumerate(words)]
    demos = [
        Example("war news", 0),
        Example("cup final", 1),
        Example("stocks", 2),
        Example("new chip", 3),
    ]
    result = diagnose(tiny_llama, "agnews", queries, demos, layer=-1, progress=False)
    layer = tiny_llama.cfg.n_layers - 1
    assert result.layer == layer and result.n == 8

    attn = hf.model.layers[layer].self_attn
    norm = hf.model.layers[layer].input_layernorm
    n_heads, n_kv = hf.config.num_attention_heads, hf.config.num_key_value_heads
    d_head = hf.config.hidden_size // n_heads
    target_q, keys, probs = [], {c: [] for c in range(4)}, []
    for query in queries:
        batch = al.build_icl_batch(tiny_llama, "agnews", demos, [query])
        ids, q = batch.input_ids[0], int(batch.target_positions[0])
        with torch.no_grad():
            out = hf(input_ids=ids[None], output_hidden_states=True)
            x = norm(out.hidden_states[layer][0])  # the input of layer `layer`, normed
            qv, kv = attn.q_proj(x), attn.k_proj(x)  # before the rotary embedding
        target_q.append(qv[q].double().numpy())
        for p, d in zip(batch.label_positions[0].tolist(), demos, strict=True):
            # GQA: each key head serves n_heads // n_kv consecutive query heads.
            k = kv[p].reshape(n_kv, d_head).repeat_interleave(n_heads // n_kv, 0).flatten()
            keys[d.label].append(k.double().numpy())
        probs.append(out.logits[0, q, batch.label_token_ids].softmax(-1).tolist())

    # Predicted confusion: PCA of the target queries; class keys projected, scaled by the
    # singular values; distances over the largest one.
    Q = np.stack(target_q)
    _, sv, vt = np.linalg.svd(Q - Q.mean(0), full_matrices=False)
    n_comp = min(10, *Q.shape)
    K = np.stack([np.mean(keys[c], 0) for c in range(4)]) @ vt[:n_comp].T * sv[:n_comp]
    dist = np.array([[np.linalg.norm(K[i] - K[j]) for j in range(4)] for i in range(4)])
    expected_pred = dist / max(dist[i, j] for i in range(4) for j in range(4) if i != j)
    np.fill_diagonal(expected_pred, 1.0)
    assert np.array(result.predicted) == pytest.approx(expected_pred, abs=1e-4)

    # Real confusion: pairwise AUC of p_i / (p_i + p_j) on gold i vs gold j.
    gold = [e.label for e in queries]
    expected_real = np.ones((4, 4))
    pairs = list(itertools.combinations(range(4), 2))
    for i, j in pairs:
        share = [p[i] / (p[i] + p[j]) for p in probs]
        pos = [share[n] for n, g in enumerate(gold) if g == i]
        neg = [share[n] for n, g in enumerate(gold) if g == j]
        expected_real[i, j] = expected_real[j, i] = _auc(pos, neg)
    assert np.array(result.real, dtype=float) == pytest.approx(expected_real, abs=1e-6)
    assert result.accuracy == pytest.approx(
        np.mean([int(np.argmax(p)) == g for p, g in zip(probs, gold, strict=True)])
    )

    # Agreement: Spearman's rho over the six class pairs.
    rho = _spearman(
        [expected_pred[i, j] for i, j in pairs], [expected_real[i, j] for i, j in pairs]
    )
    assert result.spearman == pytest.approx(rho, abs=1e-6)
    i, j = min(pairs, key=lambda ij: expected_pred[ij])
    assert result.most_confused("predicted") == (result.labels[i], result.labels[j])
    lowest = sorted(expected_real[ij] for ij in pairs)
    if lowest[0] < lowest[1]:  # a unique most-confused pair
        i, j = min(pairs, key=lambda ij: expected_real[ij])
        assert result.most_confused("real") == (result.labels[i], result.labels[j])


def test_spearman_is_none_for_two_classes(tiny_llama):
    queries = [Example("good", 1), Example("bad", 0), Example("fine", 1)]
    demos = [Example("good fun", 1), Example("bad", 0)]
    result = diagnose(tiny_llama, "sst2", queries, demos, progress=False)
    assert result.spearman is None  # one class pair: no rank correlation
    assert result.real[0][1] is not None


def test_cli_diagnose(tiny_llama_folder, tmp_path):
    code = main(
        [
            "diagnose",
            "--model",
            str(tiny_llama_folder),
            "--n",
            "8",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 0
    out = json.loads((tmp_path / "diagnose.json").read_text())
    assert {"predicted", "real", "spearman", "layer"} <= set(out)
    # The stored agreement is the rank correlation of the stored matrices' defined pairs.
    n = len(out["labels"])
    pairs = [
        (out["predicted"][i][j], out["real"][i][j])
        for i, j in itertools.combinations(range(n), 2)
        if out["real"][i][j] is not None
    ]
    if len(pairs) < 3:
        assert out["spearman"] is None
    else:
        rho = _spearman([p for p, _ in pairs], [r for _, r in pairs])
        assert out["spearman"] == pytest.approx(rho, abs=1e-6)
    assert (tmp_path / "confusion.png").stat().st_size > 1000
