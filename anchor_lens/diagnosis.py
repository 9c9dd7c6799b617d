"""Anchor distances for error diagnosis (Wang et al. 2023, §3.3, Fig. 6).

If the target reads the answer from the label words' keys, classes whose label-word keys look
alike *to the target's queries* should be the ones the model confuses. At one deep layer:

1. collect the target query vectors ``q`` of all examples (heads concatenated) and fit a PCA
   with 10 components;
2. project each class's label-word key ``k_{p_i}`` (mean over examples) onto the components
   and scale by the singular values: ``k̂_i``;
3. predicted confusion ``C^pred_ij = ‖k̂_i − k̂_j‖ / max_{s≠t} ‖k̂_s − k̂_t‖`` (diagonal 1);
4. real confusion ``C^real_ij`` = ROC AUC separating classes ``i`` and ``j`` with the model's
   probabilities ``p_i / (p_i + p_j)`` on examples whose gold label is ``i`` or ``j``
   (diagonal 1).

Low values mean "confusable" in both. Agreement is the Spearman rank correlation of the
off-diagonal entries. Queries and keys are taken before the rotary embedding (``hook_q``,
``hook_k``), which makes them independent of the tokens' positions; under grouped-query
attention each key head is repeated for the query heads that share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import einops
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .episodes import EpisodeMode, Pools, draw_episode, load_pools
from .icl import iter_batches, target_logits
from .tasks import Example, Task, get_task

__all__ = ["DiagnosisResult", "diagnose", "predicted_confusion", "real_confusion", "run_diagnosis"]


@dataclass
class DiagnosisResult:
    """Predicted and real confusion matrices (rows/columns in label-word order).

    ``real[i][j]`` is ``None`` when no query has gold label ``i`` or ``j`` (no AUC exists);
    ``spearman`` is ``None`` with fewer than three class pairs defined in both matrices (a
    two-class task has one pair: the rank correlation is undefined).
    """

    predicted: list[list[float]]
    real: list[list[float | None]]
    spearman: float | None
    labels: list[str]
    layer: int
    n: int
    accuracy: float
    episode: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def most_confused(self, which: str = "predicted") -> tuple[str, str]:
        """The pair of classes with the lowest off-diagonal entry."""
        m = np.array([[np.nan if v is None else v for v in row] for row in getattr(self, which)])
        np.fill_diagonal(m, np.inf)
        i, j = np.unravel_index(np.nanargmin(m), m.shape)
        return self.labels[min(i, j)], self.labels[max(i, j)]


def predicted_confusion(
    queries: Float[Tensor, "n dim"], keys: Float[Tensor, "n_class dim"], n_components: int = 10
) -> Float[Tensor, "n_class n_class"]:
    """``C^pred`` from the target queries' PCA space (§3.3); diagonal 1."""
    q = queries.double() - queries.double().mean(0)
    k = min(n_components, *q.shape)
    _, s, vh = torch.linalg.svd(q, full_matrices=False)
    projected = (keys.double() @ vh[:k].T) * s[:k]  # [n_class, k]
    dist = torch.cdist(projected, projected)
    off = ~torch.eye(len(keys), dtype=torch.bool)
    dist = dist / dist[off].max().clamp(min=1e-12)
    dist.fill_diagonal_(1.0)
    return dist.float()


def real_confusion(
    probs: Float[Tensor, "n n_class"], labels: Tensor
) -> Float[Tensor, "n_class n_class"]:
    """``C^real``: pairwise ROC AUC of ``p_i / (p_i + p_j)`` on gold ``i`` vs gold ``j``."""
    from sklearn.metrics import roc_auc_score

    n_class = probs.shape[1]
    out = torch.ones(n_class, n_class)
    p, y = probs.double().numpy(), labels.numpy()
    for i in range(n_class):
        for j in range(i + 1, n_class):
            rows = (y == i) | (y == j)
            if (y[rows] == i).all() or (y[rows] == j).all():
                out[i, j] = out[j, i] = float("nan")
                continue
            score = p[rows, i] / np.clip(p[rows, i] + p[rows, j], 1e-12, None)
            out[i, j] = out[j, i] = roc_auc_score(y[rows] == i, score)
    return out


def diagnose(
    model,
    task: str | Task,
    queries: Sequence[Example],
    demonstrations: Sequence[Example] | Sequence[Sequence[Example]],
    *,
    layer: int | None = None,
    n_components: int = 10,
    batch_size: int = 8,
    progress: bool = True,
) -> DiagnosisResult:
    """Predicted vs real confusion for ``queries`` (gold labels needed) at ``layer``.

    ``layer`` defaults to three quarters of the depth (a deep layer).
    """
    from scipy.stats import spearmanr

    task = get_task(task)
    n_layers = model.cfg.n_layers
    layer = (3 * n_layers) // 4 if layer is None else layer % n_layers
    group = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
    qs, ks, classes, probs, golds = [], [], [], [], []
    store: dict[str, Tensor] = {}

    def grab(name):
        def hook(t, hook):
            store[name] = t.detach()

        return hook

    hooks = [
        (f"blocks.{layer}.attn.hook_q", grab("q")),  # [batch, pos, head, d]
        (f"blocks.{layer}.attn.hook_k", grab("k")),  # [batch, pos, kv_head, d]
    ]
    with torch.no_grad():
        for batch in iter_batches(
            model,
            task,
            queries,
            demonstrations,
            batch_size=batch_size,
            desc="diagnose",
            progress=progress,
        ):
            logits = target_logits(model, batch, hooks)[:, batch.label_token_ids]
            rows = torch.arange(len(batch), device=logits.device)
            qs.append(store["q"][rows, batch.target_positions].flatten(1).cpu())
            # GQA: each key head serves `group` consecutive query heads.
            k = einops.repeat(store["k"], "b pos kv d -> b pos (kv g) d", g=group)
            for d in range(batch.n_demos):
                ks.append(k[rows, batch.label_positions[:, d]].flatten(1).cpu())
                classes.append(batch.demo_labels[:, d].cpu())
            probs.append(logits.float().softmax(-1).cpu())
            golds.append(batch.labels.cpu())
    keys_all, cls = torch.cat(ks), torch.cat(classes)
    keys = torch.stack([keys_all[cls == c].mean(0) for c in range(task.n_classes)])
    prob, gold = torch.cat(probs), torch.cat(golds)
    pred = predicted_confusion(torch.cat(qs), keys, n_components)
    real = real_confusion(prob, gold)
    iu = np.triu_indices(task.n_classes, 1)
    a, b = pred.numpy()[iu], real.numpy()[iu]
    ok = np.isfinite(a) & np.isfinite(b)
    rho = float(spearmanr(a[ok], b[ok]).statistic) if ok.sum() >= 3 else None
    return DiagnosisResult(
        predicted=pred.tolist(),
        real=[[v if math.isfinite(v) else None for v in row] for row in real.tolist()],
        spearman=rho,
        labels=list(task.label_words),
        layer=layer,
        n=len(gold),
        accuracy=float((prob.argmax(-1) == gold).float().mean()),
    )


def run_diagnosis(
    model,
    task: str | Task,
    *,
    data: str | Path | None = None,
    demo_data: str | Path | None = None,
    pools: Pools | None = None,
    n: int | None = 200,
    seed: int = 42,
    mode: EpisodeMode = "per_query",
    **kwargs,
) -> DiagnosisResult:
    """[`diagnose`][anchor_lens.diagnosis.diagnose] on one seeded 1-shot
    [`sample_episode`][anchor_lens.episodes.sample_episode] (fresh demonstrations per query;
    each class's key is averaged over the episodes)."""
    task = get_task(task)
    pools = pools if pools is not None else load_pools(task, data, demo_data)
    episode = draw_episode(task, pools, shots=1, n=n, seed=seed, mode=mode)
    result = diagnose(model, task, episode.queries, episode.demonstrations, **kwargs)
    result.episode = episode.to_json()
    return result
