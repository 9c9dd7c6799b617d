"""Metrics of *Label Words are Anchors* (Wang et al. 2023): information flow, loyalty, AUCROC_l.

All functions take tensors whose positions index the padded batch (as produced by
[`build_icl_batch`][anchor_lens.prompts.build_icl_batch]) and use the attention mask, so padding
never
enters a metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "FlowMasks",
    "aucroc_per_layer",
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
) -> FlowMasks:
    """The pair sets of Eqs. 2–4 for a padded batch (diagonal excluded, padding excluded)."""
    b, n = attention_mask.shape
    real = attention_mask.bool()
    lower = torch.ones(n, n, dtype=torch.bool, device=real.device).tril(-1)
    valid = lower & real[:, :, None] & real[:, None, :]
    is_label = torch.zeros(b, n, dtype=torch.bool, device=real.device)
    is_label.scatter_(1, label_positions, True)
    is_target = torch.zeros(b, n, dtype=torch.bool, device=real.device)
    is_target.scatter_(1, target_positions[:, None], True)
    wp = valid & is_label[:, :, None]
    pq = valid & is_target[:, :, None] & is_label[:, None, :]
    ww = valid & ~wp & ~pq
    return FlowMasks(wp, pq, ww)


def information_flow(
    saliency: Float[Tensor, "layer batch q k"], masks: FlowMasks
) -> dict[str, Float[Tensor, "layer batch"]]:
    """``S_wp``, ``S_pq``, ``S_ww`` (Eqs. 2–4) per layer and example: means of ``I_l(i, j)``.

    * ``S_wp = Σ_{(i,j)∈C_wp} I_l(i,j) / |C_wp|`` with ``C_wp = {(p_k, j) : j < p_k}``
    * ``S_pq = Σ_{(i,j)∈C_pq} I_l(i,j) / |C_pq|`` with ``C_pq = {(q, p_k)}``
    * ``S_ww = Σ_{(i,j)∈C_ww} I_l(i,j) / |C_ww|`` over all other pairs ``j < i``

    The public code divides the ``S_ww`` sum by a count that includes the diagonal; this
    follows the paper's definition (a mean over the pair set).
    """
    out = {}
    for name in ("wp", "pq", "ww"):
        m = getattr(masks, name).to(saliency.dtype)
        out[f"S_{name}"] = (saliency * m).sum((-1, -2)) / m.sum((-1, -2)).clamp(min=1)
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
    """Attention from the target to each class's label words, normalised over classes (§2.3).

    ``score_i = Σ_h Σ_{k : class(k) = i} A_l(q, p_k)``, then divided by ``Σ_i score_i``.
    """
    heads = target_rows.sum(2)  # [layer, batch, k]
    idx = label_positions[None].expand(heads.shape[0], -1, -1).to(heads.device)
    to_labels = heads.gather(-1, idx)  # [layer, batch, demo]
    scores = heads.new_zeros(*to_labels.shape[:2], n_classes)
    cls = demo_labels[None].expand_as(to_labels).to(heads.device)
    scores = scores.scatter_add(-1, cls, to_labels)
    return scores / scores.sum(-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)


def aucroc_per_layer(
    scores: Float[Tensor, "layer batch n_class"], predictions: Int[Tensor, " batch"]
) -> list[float]:
    """AUCROC_l: ROC AUC of each layer's class scores against the model's own prediction.

    Binary tasks use the positive class's score; multi-class tasks use scikit-learn's
    one-vs-one macro average over the classes that the model predicts. Layers are NaN when
    the model predicts a single class (no ROC curve exists).
    """
    from sklearn.metrics import roc_auc_score

    y = predictions.cpu().numpy()
    present = np.unique(y)
    if len(present) < 2:
        return [float("nan")] * scores.shape[0]
    out = []
    for layer_scores in scores.float().cpu().numpy():
        if scores.shape[-1] == 2:
            out.append(float(roc_auc_score(y, layer_scores[:, 1])))
            continue
        # Restrict to predicted classes and renormalise, as roc_auc_score requires.
        s = layer_scores[:, present]
        s = s / np.clip(s.sum(-1, keepdims=True), 1e-12, None)
        if len(present) == 2:
            out.append(float(roc_auc_score(y == present[1], s[:, 1])))
        else:
            out.append(float(roc_auc_score(y, s, multi_class="ovo", labels=present)))
    return out


def cumulative_r(aucroc: list[float]) -> list[float]:
    """``R_l = Σ_{i≤l} (AUCROC_i − 0.5) / Σ_{i≤N} (AUCROC_i − 0.5)`` (§2.3)."""
    gains = np.nan_to_num(np.asarray(aucroc, dtype=float) - 0.5)
    total = gains.sum()
    if total == 0:
        return [float("nan")] * len(gains)
    return (np.cumsum(gains) / total).tolist()
