import math

import numpy as np
import pytest
import torch

from anchor_lens import metrics


def test_flow_masks_and_means_on_a_hand_computed_case():
    # One example, 5 real tokens after one pad on the left: pad, w0, p0, w1, p1, q
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[2, 4]])
    target = torch.tensor([5])
    masks = metrics.flow_masks(attention_mask, labels, target)
    # C_wp: (2,1) and (4,1),(4,2),(4,3): the pad column 0 never counts.
    assert masks.wp[0].nonzero().tolist() == [[2, 1], [4, 1], [4, 2], [4, 3]]
    assert masks.pq[0].nonzero().tolist() == [[5, 2], [5, 4]]
    # All real pairs j < i: 5*4/2 = 10; minus 4 (wp) and 2 (pq) = 4 ww pairs.
    assert masks.ww[0].nonzero().tolist() == [[3, 1], [3, 2], [5, 1], [5, 3]]

    sal = torch.zeros(1, 1, 6, 6)
    sal[0, 0, 2, 1], sal[0, 0, 4, 1], sal[0, 0, 4, 2], sal[0, 0, 4, 3] = 1, 2, 3, 6
    sal[0, 0, 5, 2], sal[0, 0, 5, 4] = 4, 8
    sal[0, 0, 3, 1], sal[0, 0, 5, 3] = 2, 2
    sal[0, 0, 3, 3] = 100  # the diagonal is excluded
    sal[0, 0, 2, 0] = 100  # so is padding
    flows = metrics.information_flow(sal, masks)
    assert flows["S_wp"].item() == pytest.approx(12 / 4)
    assert flows["S_pq"].item() == pytest.approx(12 / 2)
    assert flows["S_ww"].item() == pytest.approx(4 / 4)
    norm = metrics.normalise_flow(flows)
    assert norm["S_wp"].item() == pytest.approx(3 / 10)
    assert sum(v.item() for v in norm.values()) == pytest.approx(1.0)


def test_jaccard_and_loyalty():
    ref = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]])
    same = ref.clone()
    shifted = torch.tensor([[5.0, 4, 0, 2, 1, 3], [0, 1, 2, 3, 4, 5]])
    assert metrics.jaccard_topk(ref, same, k=3).tolist() == [1.0, 1.0]
    # top-3 {0,1,2} vs {0,1,5}: |∩| = 2, |∪| = 4.
    assert metrics.jaccard_topk(ref, shifted, k=3).tolist() == [0.5, 1.0]
    assert metrics.word_loyalty(ref, shifted, k=3) == pytest.approx(0.75)
    assert metrics.label_loyalty(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0])) == 0.75


def test_class_attention_scores_sum_heads_and_demonstrations():
    # 1 layer, 1 example, 2 heads, 5 keys; demos at 1 (class 0), 2 (class 1), 3 (class 0)
    rows = torch.zeros(1, 1, 2, 5)
    rows[0, 0, 0] = torch.tensor([0.1, 0.2, 0.3, 0.1, 0.3])
    rows[0, 0, 1] = torch.tensor([0.0, 0.4, 0.1, 0.1, 0.4])
    s = metrics.class_attention_scores(
        rows, torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 0]]), 2
    )
    class0, class1 = 0.2 + 0.4 + 0.1 + 0.1, 0.3 + 0.1
    assert s[0, 0].tolist() == pytest.approx(
        [class0 / (class0 + class1), class1 / (class0 + class1)]
    )


def test_aucroc_binary_and_one_vs_one():
    from sklearn.metrics import roc_auc_score

    pred = torch.tensor([0, 0, 1, 1])
    scores = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]])
    assert metrics.aucroc_per_layer(scores, pred) == [1.0]
    rng = np.random.default_rng(0)
    s3 = torch.tensor(rng.dirichlet(np.ones(3), size=30))[None]
    p3 = torch.tensor(rng.integers(0, 3, size=30))
    expected = roc_auc_score(p3.numpy(), s3[0].numpy(), multi_class="ovo")
    assert metrics.aucroc_per_layer(s3, p3)[0] == pytest.approx(expected)
    assert all(math.isnan(v) for v in metrics.aucroc_per_layer(scores, torch.zeros(4).long()))


def test_aucroc_with_an_unpredicted_class_uses_the_predicted_ones():
    pred = torch.tensor([0, 0, 2, 2])
    scores = torch.tensor([[[0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8], [0.2, 0.3, 0.5]]])
    assert metrics.aucroc_per_layer(scores, pred) == [1.0]


def test_cumulative_r():
    r = metrics.cumulative_r([0.5, 0.7, 0.9])
    assert r == pytest.approx([0.0, 0.2 / 0.6, 1.0])
    assert all(math.isnan(v) for v in metrics.cumulative_r([0.5, 0.5]))
