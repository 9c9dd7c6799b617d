import inspect

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
    assert [norm[k].item() for k in ("S_wp", "S_pq", "S_ww")] == pytest.approx([0.3, 0.6, 0.1])
    # A layer with no flow at all stays 0 instead of dividing by zero.
    zero = metrics.normalise_flow({k: torch.zeros(2) for k in ("S_wp", "S_pq", "S_ww")})
    assert all(v.tolist() == [0.0, 0.0] for v in zero.values())


def test_jaccard_and_loyalty():
    ref = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]])
    same = ref.clone()
    shifted = torch.tensor([[5.0, 4, 0, 2, 1, 3], [0, 1, 2, 3, 4, 5]])
    assert metrics.jaccard_topk(ref, same, k=3).tolist() == [1.0, 1.0]
    # top-3 {0,1,2} vs {0,1,5}: |∩| = 2, |∪| = 4.
    assert metrics.jaccard_topk(ref, shifted, k=3).tolist() == [0.5, 1.0]
    assert metrics.word_loyalty(ref, shifted, k=3) == pytest.approx(0.75)
    assert metrics.label_loyalty(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0])) == 0.75


def test_class_attention_scores_sum_heads_and_demonstrations_unnormalised():
    # 1 layer, 1 example, 2 heads, 5 keys; demos at 1 (class 0), 2 (class 1), 3 (class 0)
    rows = torch.zeros(1, 1, 2, 5)
    rows[0, 0, 0] = torch.tensor([0.1, 0.2, 0.3, 0.1, 0.3])
    rows[0, 0, 1] = torch.tensor([0.0, 0.4, 0.1, 0.1, 0.4])
    s = metrics.class_attention_scores(
        rows, torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 0]]), 3
    )
    # Raw sums as the paper's code accumulates them: no normalisation across classes, and a
    # class without a demonstration (2) scores 0.
    class0, class1 = 0.2 + 0.4 + 0.1 + 0.1, 0.3 + 0.1
    assert s[0, 0].tolist() == pytest.approx([class0, class1, 0.0])


def test_class_attention_scores_skip_minus_one_label_positions():
    rows = torch.rand(1, 2, 3, 6)  # 1 layer, 2 examples, 3 heads, 6 keys
    labels = torch.tensor([[1, 3], [2, -1]])  # the second example has one demonstration
    s = metrics.class_attention_scores(rows, labels, torch.tensor([[0, 1], [0, 1]]), 2)
    heads = rows.sum(2)
    assert s[0, 1].tolist() == pytest.approx([float(heads[0, 1, 2]), 0.0])
    assert s[0, 0].tolist() == pytest.approx([float(heads[0, 0, 1]), float(heads[0, 0, 3])])


def test_aucroc_binary_uses_the_raw_score_of_the_higher_class():
    pred = torch.tensor([0, 0, 1, 1])
    # Raw class-1 attention ranks the predicted 1s (0.4, 0.5) above the 0s (0.1, 0.45) in 3
    # of 4 pairs: AUC 0.75. Its share of both classes, (0.4/1.2, 0.5/2.5) = (0.33, 0.2) vs
    # (0.1/0.15, 0.45/0.55) = (0.67, 0.82), ranks them below in every pair: AUC 0.
    scores = torch.tensor([[[0.05, 0.1], [0.1, 0.45], [0.8, 0.4], [2.0, 0.5]]])
    assert metrics.aucroc_per_layer(scores, pred) == [pytest.approx(0.75)]
    assert metrics.aucroc_per_layer(scores, pred, binary_score="share") == [pytest.approx(0.0)]


def test_aucroc_one_vs_one_by_hand():
    # Three predicted classes, two examples each; rows are renormalised over the classes.
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    rows = [[6, 2, 2], [4, 4, 2], [2, 6, 2], [5, 3, 2], [1, 1, 8], [3, 3, 4]]
    scores = torch.tensor([rows], dtype=torch.float64) * 0.05  # not summing to 1
    # Shares (÷ row sum 10 each). Pair (0,1): class-0 share of the 0s (.6,.4) vs of the 1s
    # (.2,.5): 3/4; class-1 share of the 1s (.6,.3) vs of the 0s (.2,.4): 3/4 -> 0.75.
    # Pair (0,2): (.6,.4) vs (.1,.3): 1; (.8,.4) vs (.2,.2): 1 -> 1.
    # Pair (1,2): (.6,.3) vs (.1,.3): 3.5/4 (one tie); (.8,.4) vs (.2,.2): 1 -> 0.9375.
    expected = (0.75 + 1.0 + 0.9375) / 3
    assert metrics.aucroc_per_layer(scores, pred) == [pytest.approx(expected)]


def test_aucroc_is_none_when_one_class_is_predicted():
    scores = torch.rand(3, 4, 2)
    assert metrics.aucroc_per_layer(scores, torch.zeros(4).long()) == [None, None, None]
    reason = metrics.aucroc_undefined_reason(torch.ones(4).long())
    assert "class 1" in reason and "4 queries" in reason
    assert metrics.aucroc_undefined_reason(torch.tensor([0, 1])) is None


def test_aucroc_rejects_an_unknown_binary_score():
    scores, pred = torch.rand(1, 4, 2), torch.tensor([0, 1, 0, 1])
    # Under the test suite's run-time type checking the Literal annotation rejects it first
    # (a TypeError); without it, the function's own ValueError does. Both name the argument.
    with pytest.raises((ValueError, TypeError), match="binary_score"):
        metrics.aucroc_per_layer(scores, pred, "softmax")
    unchecked = inspect.unwrap(metrics.aucroc_per_layer)
    with pytest.raises(ValueError, match="binary_score must be 'raw' or 'share', got 'softmax'"):
        unchecked(scores, pred, "softmax")


def test_aucroc_with_an_unpredicted_class_uses_the_predicted_ones():
    pred = torch.tensor([0, 0, 2, 2])
    # Class 1 is never predicted: two classes remain, and the raw score of class 2 ranks
    # (0.8, 0.5) above (0.1, 0.6) in 3 of 4 pairs. Class 1's score never enters.
    scores = torch.tensor([[[0.8, 9.0, 0.1], [0.6, 0.0, 0.6], [0.1, 5.0, 0.8], [0.2, 0.3, 0.5]]])
    assert metrics.aucroc_per_layer(scores, pred) == [pytest.approx(0.75)]


def test_cumulative_r():
    r = metrics.cumulative_r([0.5, 0.7, 0.9])
    assert r == pytest.approx([0.0, 0.2 / 0.6, 1.0])
    # Below-chance layers count negatively.
    assert metrics.cumulative_r([0.4, 0.8]) == pytest.approx([-0.1 / 0.2, 1.0])


def test_cumulative_r_is_none_when_undefined():
    assert metrics.cumulative_r([0.5, 0.5]) == [None, None]
    # 0.3 + 0.7 - 1 is 1.1e-16 in floating point, not 0: without a tolerance R_l was 3.6e15.
    assert (0.3 - 0.5) + (0.7 - 0.5) != 0
    assert metrics.cumulative_r([0.3, 0.7]) == [None, None]
    assert metrics.cumulative_r([0.6, None, 0.8]) == [None, None, None]
    assert metrics.cumulative_r([0.6, float("nan")]) == [None, None]
    # The tolerance is a parameter: a tiny but real total gain is kept when asked for.
    assert metrics.cumulative_r([0.5, 0.5 + 1e-6], atol=1e-9) == pytest.approx([0.0, 1.0])


def test_flow_masks_with_ragged_label_positions():
    # Two examples of 6 tokens; the second has one label word only (-1 = none).
    attention_mask = torch.ones(2, 6, dtype=torch.long)
    labels = torch.tensor([[1, 3], [2, -1]])
    target = torch.tensor([5, 5])
    masks = metrics.flow_masks(attention_mask, labels, target)
    assert masks.wp[1].nonzero().tolist() == [[2, 0], [2, 1]]
    assert masks.pq[1].nonzero().tolist() == [[5, 2]]
    # -1 must not mark the last position (5, the target) as a label word.
    assert not masks.wp[1, 5].any()
    assert masks.wp[0].nonzero().tolist() == [[1, 0], [3, 0], [3, 1], [3, 2]]
    assert masks.pq[0].nonzero().tolist() == [[5, 1], [5, 3]]
    # Every pair j < i is in exactly one set.
    total = masks.wp.long() + masks.pq.long() + masks.ww.long()
    assert torch.equal(total, torch.ones(6, 6, dtype=torch.long).tril(-1).expand(2, -1, -1))
    # All -1: no label word, so S_wp and S_pq are empty (0) and S_ww is the mean of all pairs.
    none = metrics.flow_masks(attention_mask[:1], torch.tensor([[-1, -1]]), target[:1])
    assert not none.wp.any() and not none.pq.any()
    sal = torch.arange(36.0).reshape(1, 6, 6)
    flows = metrics.information_flow(sal, none)
    assert flows["S_wp"].item() == 0 and flows["S_pq"].item() == 0
    lower = [6 * i + j for i in range(6) for j in range(i)]
    assert flows["S_ww"].item() == pytest.approx(sum(lower) / len(lower))


def test_flow_masks_exclude_takes_a_bos_out_of_every_pair_set():
    # bos, w, p0, w, p1, q — with the BOS excluded it is neither a query nor a key.
    attention_mask = torch.ones(1, 6, dtype=torch.long)
    labels, target = torch.tensor([[2, 4]]), torch.tensor([5])
    exclude = torch.tensor([[True, False, False, False, False, False]])
    masks = metrics.flow_masks(attention_mask, labels, target, exclude=exclude)
    for m in (masks.wp, masks.pq, masks.ww):
        assert not m[0, 0].any() and not m[0, :, 0].any()
    assert masks.wp[0].nonzero().tolist() == [[2, 1], [4, 1], [4, 2], [4, 3]]
    assert masks.pq[0].nonzero().tolist() == [[5, 2], [5, 4]]
    assert masks.ww[0].nonzero().tolist() == [[3, 1], [3, 2], [5, 1], [5, 3]]
    # Without exclude the BOS counts as a word: (2,0), (4,0) in wp and (1,0), (3,0), (5,0) in ww.
    kept = metrics.flow_masks(attention_mask, labels, target)
    assert kept.wp[0, :, 0].nonzero().flatten().tolist() == [2, 4]
    assert kept.ww[0, :, 0].nonzero().flatten().tolist() == [1, 3, 5]
    # A huge saliency on the BOS column changes the flows only when it is not excluded.
    sal = torch.ones(1, 6, 6)
    sal[0, :, 0] = 1000.0
    flows = metrics.information_flow(sal, masks)
    assert [flows[k].item() for k in ("S_wp", "S_pq", "S_ww")] == [1.0, 1.0, 1.0]
    assert metrics.information_flow(sal, kept)["S_wp"].item() == pytest.approx((4 + 2 * 1000) / 6)


def test_nan_in_a_padded_row_does_not_reach_the_flows():
    # Left padding: pad, pad, w, p0, w, q. The model may produce NaN in padded rows/columns.
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    masks = metrics.flow_masks(attention_mask, torch.tensor([[3]]), torch.tensor([5]))
    sal = torch.rand(2, 1, 6, 6)  # two layers
    clean = metrics.information_flow(sal, masks)
    dirty = sal.clone()
    dirty[:, :, :2, :] = float("nan")  # padded query rows
    dirty[:, :, :, :2] = float("nan")  # padded key columns
    dirty[:, :, 4, 4] = float("inf")  # and the (excluded) diagonal
    flows = metrics.information_flow(dirty, masks)
    for key in ("S_wp", "S_pq", "S_ww"):
        assert torch.isfinite(flows[key]).all(), key
        assert torch.equal(flows[key], clean[key]), key
    s = sal[:, 0]
    assert flows["S_wp"][:, 0].tolist() == pytest.approx(s[:, 3, 2].tolist())
    assert flows["S_pq"][:, 0].tolist() == pytest.approx(s[:, 5, 3].tolist())
    ww = (s[:, 4, 2] + s[:, 4, 3] + s[:, 5, 2] + s[:, 5, 4]) / 4
    assert flows["S_ww"][:, 0].tolist() == pytest.approx(ww.tolist())
