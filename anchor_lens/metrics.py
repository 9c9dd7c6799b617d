"""Metrics of *Label Words are Anchors* (Wang et al. 2023): information flow, loyalty, AUCROC_l.

All functions take tensors whose positions index the padded batch (as produced by
[`build_icl_batch`][anchor_lens.prompts.build_icl_batch]) and use the attention mask, so padding
never enters a metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import einops
import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .hooks import positions_mask

__all__ = [
    "BinaryScore",
    "FlowMasks",
    "aucroc_per_layer",
    "aucroc_undefined_reason",
    "class_attention_scores",
    "cumulative_r",
    "flow_masks",
    "information_flow",
    "jaccard_topk",
    "label_loyalty",
    "normalise_flow",
    "word_loyalty",
]


@dataclass
class FlowMasks:
    """Which ``(i, j)`` pairs (query ``i``, key ``j``) count for each flow, per example.

    ``wp``: ``i = p_k``, ``j < p_k`` (text → label words); ``pq``: ``i = q``, ``j = p_k``
    (label words → target); ``ww``: every other real pair with ``j < i``.
    """

    wp: Bool[Tensor, "batch q k"]
    pq: Bool[Tensor, "batch q k"]
    ww: Bool[Tensor, "batch q k"]


def flow_masks(
    attention_mask: Int[Tensor, "batch pos"],
    label_positions: Int[Tensor, "batch demo"],
    target_positions: Int[Tensor, " batch"],
    exclude: Bool[Tensor, "batch pos"] | None = None,
) -> FlowMasks:
    """The pair sets of Eqs. 2–4 for a padded batch (diagonal and padding excluded).

    ``label_positions`` entries of ``-1`` mean "no label word" (ragged rows), as in the hooks.
    Positions in ``exclude`` (e.g. a BOS token: ``batch.roles == TokenRole.SPECIAL``) take
    part in no pair, neither as query nor as key.
    """
    real = attention_mask.bool()
    if exclude is not None:
        real = real & ~exclude.to(real.device)
    n = real.shape[1]
    lower = torch.ones(n, n, dtype=torch.bool, device=real.device).tril(-1)
    valid = lower & real[:, :, None] & real[:, None, :]
    is_label = positions_mask(label_positions, n, real.device)
    is_target = positions_mask(target_positions[:, None], n, real.device)
    wp = valid & is_label[:, :, None]
    pq = valid & is_target[:, :, None] & is_label[:, None, :]
    ww = valid & ~wp & ~pq
    return FlowMasks(wp, pq, ww)


def information_flow(
    saliency: Float[Tensor, "*layer batch q k"], masks: FlowMasks
) -> dict[str, Float[Tensor, "*layer batch"]]:
    """``S_wp``, ``S_pq``, ``S_ww`` (Eqs. 2–4) per layer and example: means of ``I_l(i, j)``.

    * ``S_wp = Σ_{(i,j)∈C_wp} I_l(i,j) / |C_wp|`` with ``C_wp = {(p_k, j) : j < p_k}``
    * ``S_pq = Σ_{(i,j)∈C_pq} I_l(i,j) / |C_pq|`` with ``C_pq = {(q, p_k)}``
    * ``S_ww = Σ_{(i,j)∈C_ww} I_l(i,j) / |C_ww|`` over all other pairs ``j < i``

    The official code (``attention_attr.py``) divides the ``S_ww`` sum by
    ``q(q+1)/2 − Σ_k p_k − K`` (``q`` the target index, ``K`` demonstrations): the number of
    strictly-lower pairs of an unpadded prompt less those of ``C_wp`` and ``C_pq``, which is
    exactly ``|C_ww|`` here, so the two agree when no position is excluded.

    Entries outside a pair set never reach the sum (selected, not multiplied by 0), so a NaN
    in a padded row cannot leak into a metric. An empty pair set gives 0.
    """
    out = {}
    zero = saliency.new_zeros(())
    for name in ("wp", "pq", "ww"):
        m = getattr(masks, name)
        total = torch.where(m, saliency, zero).sum((-1, -2))
        out[f"S_{name}"] = total / m.sum((-1, -2)).clamp(min=1).to(saliency.dtype)
    return out


def normalise_flow(flows: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each of ``S_wp, S_pq, S_ww`` divided by their sum per layer (Fig. 3's normalisation)."""
    total = sum(flows.values())
    return {k: v / torch.where(total == 0, 1, total) for k, v in flows.items()}


def label_loyalty(reference: Int[Tensor, " n"], edited: Int[Tensor, " n"]) -> float:
    """Fraction of examples whose label prediction is unchanged by an intervention (§2.2)."""
    return float((reference == edited).float().mean())


def jaccard_topk(
    reference: Float[Tensor, "n vocab"], edited: Float[Tensor, "n vocab"], k: int = 5
) -> Float[Tensor, " n"]:
    """Jaccard similarity ``|A ∩ B| / |A ∪ B|`` of the top-``k`` vocabulary tokens, per row."""
    a = reference.topk(k, dim=-1).indices
    b = edited.topk(k, dim=-1).indices
    inter = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1).float()
    return inter / (2 * k - inter)


def word_loyalty(
    reference: Float[Tensor, "n vocab"], edited: Float[Tensor, "n vocab"], k: int = 5
) -> float:
    """Mean top-``k`` Jaccard similarity with and without an intervention (§2.2; k = 5)."""
    return float(jaccard_topk(reference, edited, k).mean())


def class_attention_scores(
    target_rows: Float[Tensor, "layer batch head k"],
    label_positions: Int[Tensor, "batch demo"],
    demo_labels: Int[Tensor, "batch demo"],
    n_classes: int,
) -> Float[Tensor, "layer batch n_class"]:
    """Attention from the target to each class's label words, summed (§2.3).

    ``score_c = Σ_h Σ_{k : class(k) = c} A_l(q, p_k)``, unnormalised, as the paper's code
    accumulates it (label positions of ``-1`` contribute nothing);
    [`aucroc_per_layer`][anchor_lens.metrics.aucroc_per_layer] decides how to normalise.
    """
    heads = einops.reduce(target_rows, "layer batch head k -> layer batch k", "sum")
    positions = label_positions.to(heads.device)
    present = positions >= 0  # -1: no label word in this slot
    idx = positions.clamp(min=0)[None].expand(heads.shape[0], -1, -1)
    to_labels = heads.gather(-1, idx) * present  # [layer, batch, demo]
    scores = heads.new_zeros(*to_labels.shape[:2], n_classes)
    cls = demo_labels.to(heads.device).clamp(min=0)[None].expand_as(to_labels)
    return scores.scatter_add(-1, cls, to_labels)


BinaryScore = Literal["raw", "share"]


def aucroc_undefined_reason(predictions: Int[Tensor, " batch"]) -> str | None:
    """Why AUCROC_l cannot be computed for these predictions, or ``None`` if it can."""
    present = torch.unique(predictions.cpu())
    if len(present) < 2:
        what = f"class {int(present[0])}" if len(present) else "no class"
        return (
            f"the model predicted {what} for all {len(predictions)} queries, so there is no "
            "second class to rank against (ROC AUC needs both)"
        )
    return None


def aucroc_per_layer(
    scores: Float[Tensor, "layer batch n_class"],
    predictions: Int[Tensor, " batch"],
    binary_score: BinaryScore = "raw",
) -> list[float | None]:
    """AUCROC_l: ROC AUC of each layer's class scores against the model's own prediction (§2.3).

    Only the classes the model predicts at least once take part (as in the official
    ``deep_analysis.ipynb``):

    * two such classes ``a < b``: the score of class ``b``; ``binary_score="raw"`` (default,
      the official code) uses the raw attention ``score_b``, ``"share"`` the share
      ``score_b / (score_a + score_b)``, which discounts how much the target attends to label
      words overall;
    * three or more: scores renormalised over those classes and scikit-learn's one-vs-one
      macro average (``multi_class="ovo"``), the official code's choice.

    Returns ``None`` for every layer when the model predicts a single class: no ROC curve
    exists (see [`aucroc_undefined_reason`][anchor_lens.metrics.aucroc_undefined_reason]).
    """
    from sklearn.metrics import roc_auc_score

    if binary_score not in ("raw", "share"):
        raise ValueError(f"binary_score must be 'raw' or 'share', got {binary_score!r}.")
    if aucroc_undefined_reason(predictions) is not None:
        return [None] * scores.shape[0]
    y = predictions.cpu().numpy()
    present = np.unique(y)
    out: list[float | None] = []
    for layer_scores in scores.double().cpu().numpy():
        s = layer_scores[:, present]
        if len(present) == 2:
            score = s[:, 1]
            if binary_score == "share":
                score = score / np.clip(s.sum(-1), 1e-300, None)
            out.append(float(roc_auc_score(y == present[1], score)))
        else:
            s = s / np.clip(s.sum(-1, keepdims=True), 1e-300, None)
            out.append(float(roc_auc_score(y, s, multi_class="ovo", labels=present)))
    return out


def cumulative_r(aucroc: Sequence[float | None], atol: float = 1e-9) -> list[float | None]:
    """``R_l = Σ_{i≤l} (AUCROC_i − 0.5) / Σ_{i≤N} (AUCROC_i − 0.5)`` (§2.3).

    Undefined (``None`` for every layer) when any AUCROC_l is undefined, or when the total
    gain ``Σ_i (AUCROC_i − 0.5)`` is within ``atol`` of zero (the ratio would be noise).
    """
    if any(a is None or not math.isfinite(a) for a in aucroc):
        return [None] * len(aucroc)
    gains = np.asarray(aucroc, dtype=float) - 0.5
    total = gains.sum()
    if abs(total) <= atol:
        return [None] * len(gains)
    return (np.cumsum(gains) / total).tolist()
