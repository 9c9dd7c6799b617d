"""The label-anchor experiments of Wang et al. (2023, §2) as functions with typed results.

* [`information_flow`][anchor_lens.analysis.information_flow] — saliency-based flows ``S_wp``,
  ``S_pq``, ``S_ww`` per layer
  (§2.1, Eqs. 1–4, Fig. 3).
* [`isolation`][anchor_lens.analysis.isolation] — label and word loyalty when label words are
  isolated in the first or
  last ``k`` layers, against isolating random non-label positions (§2.2, Fig. 4).
* [`deep_layer_auc`][anchor_lens.analysis.deep_layer_auc] — AUCROC_l of the target's attention to
  label words against the
  model's own prediction, and its cumulative share R_l (§2.3, Fig. 5).

Which of the paper's findings hold on a run is decided in `anchor_lens.report`.

Each takes a model, a task, queries and demonstrations (one list shared by all queries, or one
per query), runs in padded batches, and returns a dataclass with a ``to_json()`` method.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Literal

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from . import metrics
from .hooks import (
    PatternCapture,
    SaliencyCapture,
    block_attention_hooks,
    resolve_layers,
)
from .icl import (
    BlockInputs,
    capture_block_inputs,
    iter_batches,
    resume_target_logits,
    target_logits,
)
from .prompts import ICLBatch, TokenRole
from .tasks import Example, Task, get_task

__all__ = [
    "ISOLATION_CONDITIONS",
    "DeepResult",
    "FlowResult",
    "IsolationResult",
    "SaliencyPass",
    "batch_deep_scores",
    "batch_flows",
    "batch_isolation",
    "deep_layer_auc",
    "deep_result",
    "example_generator",
    "flow_result",
    "information_flow",
    "isolation",
    "isolation_result",
    "isolation_spans",
    "random_positions",
    "saliency_pass",
]

LossTarget = Literal["gold", "prediction"]


def _check_demos(batch: ICLBatch, what: str) -> None:
    if batch.n_demos == 0:
        raise ValueError(f"{what} needs demonstrations: label words only exist in them.")


# --------------------------------------------------------------------------- information flow
@dataclass
class FlowResult:
    """Per-layer information flow (Fig. 3). ``S_*`` are normalised to sum to 1 per layer."""

    S_wp: list[float]
    S_pq: list[float]
    S_ww: list[float]
    S_wp_raw: list[float]
    S_pq_raw: list[float]
    S_ww_raw: list[float]
    n: int
    loss_target: str
    exclude_special: bool = True
    per_head: dict[str, list[list[float]]] | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SaliencyPass:
    """What one forward + backward pass over a batch gives (see `saliency_pass`).

    Attributes:
        flows: ``S_wp``/``S_pq``/``S_ww`` per layer and example, ``[layer, batch]`` (and
            ``S_*_head`` ``[layer, head, batch]`` with ``keep_per_head``).
        logits: The unedited next-token logits at the target, ``[batch, vocab]``, float32:
            the reference for loyalty (the saliency placeholders multiply by exactly 1).
        predictions: The label-restricted prediction of each example, ``[batch]``.
        class_attention: Class scores per layer ``[layer, batch, n_class]`` from the same
            forward's patterns (§2.3), when ``n_classes`` was given.
        block_inputs: What the blocks from ``capture_from`` on received, when asked for (and
            the model's blocks can be run alone): lets edits confined to the last layers start
            there ([`resume_target_logits`][anchor_lens.icl.resume_target_logits]).
    """

    flows: dict[str, Tensor]
    logits: Tensor
    predictions: Tensor
    class_attention: Tensor | None = None
    block_inputs: BlockInputs | None = None


def saliency_pass(
    model,
    batch: ICLBatch,
    layers: Sequence[int],
    *,
    loss_target: LossTarget = "gold",
    exclude_special: bool = True,
    keep_per_head: bool = False,
    n_classes: int | None = None,
    capture_from: int | None = None,
) -> SaliencyPass:
    """Flows, reference logits and (optionally) class attention from one forward + backward.

    The analysis needs the unedited logits (loyalty's reference, the prediction AUCROC_l is
    scored against) and the target rows of every pattern (§2.3); the saliency forward already
    computes both, so [`Analyze`][anchor_lens.experiments.Analyze] runs no other unedited
    forward. With ``n_classes``, ``layers`` must be every layer for AUCROC_l to mean Fig. 5.
    With ``capture_from``, the same forward also records the inputs of blocks
    ``capture_from`` … ``N−1`` (``SaliencyPass.block_inputs``).
    """
    _check_demos(batch, "information_flow")
    if loss_target not in ("gold", "prediction"):
        raise ValueError(f"loss_target must be 'gold' or 'prediction', not {loss_target!r}")
    if loss_target == "gold" and (batch.labels < 0).any():
        raise ValueError("loss_target='gold' needs labelled queries.")
    capture = SaliencyCapture(tuple(layers))
    rows = PatternCapture(tuple(layers), query_positions=batch.target_positions)
    hooks = capture.hooks + (rows.hooks if n_classes is not None else [])
    blocks = (
        capture_block_inputs(model, capture_from) if capture_from is not None else nullcontext()
    )
    with torch.enable_grad(), blocks as block_inputs:
        full = target_logits(model, batch, hooks)
        logits = full[:, batch.label_token_ids]
        target = batch.labels if loss_target == "gold" else logits.argmax(-1)
        # Summed over the batch: examples do not interact, so each keeps its own gradient.
        loss = F.cross_entropy(logits.float(), target, reduction="sum")
        grads = capture.gradients(loss).float()  # [layer, batch, head, q, k]
    masks = metrics.flow_masks(
        batch.attention_mask,
        batch.label_positions,
        batch.target_positions,
        exclude=batch.roles == TokenRole.SPECIAL if exclude_special else None,
    )
    # Eq. 1: heads summed first, then the absolute value.
    saliency = einops.reduce(grads, "layer batch head q k -> layer batch q k", "sum").abs()
    out = {k: v.detach().cpu() for k, v in metrics.information_flow(saliency, masks).items()}
    if keep_per_head:
        head_flows = metrics.information_flow(
            einops.rearrange(grads.abs(), "layer batch head q k -> layer head batch q k"), masks
        )
        out |= {f"{k}_head": v.detach().cpu() for k, v in head_flows.items()}
    scores = None
    if n_classes is not None:
        scores = metrics.class_attention_scores(
            rows.stacked().float(), batch.label_positions, batch.demo_labels, n_classes
        ).cpu()
    predictions = logits.detach().argmax(-1).cpu()
    return SaliencyPass(out, full.detach().float(), predictions, scores, block_inputs)


def batch_flows(
    model,
    batch: ICLBatch,
    layers: Sequence[int],
    *,
    loss_target: LossTarget = "gold",
    exclude_special: bool = True,
    keep_per_head: bool = False,
) -> dict[str, Tensor]:
    """Per-example flows of one batch: ``S_wp``/``S_pq``/``S_ww`` as ``[layer, batch]``.

    With ``keep_per_head`` also ``S_*_head`` as ``[layer, head, batch]``. One forward and one
    backward pass ([`saliency_pass`][anchor_lens.analysis.saliency_pass]); see
    [`information_flow`][anchor_lens.analysis.information_flow].
    """
    return saliency_pass(
        model,
        batch,
        layers,
        loss_target=loss_target,
        exclude_special=exclude_special,
        keep_per_head=keep_per_head,
    ).flows


def flow_result(
    per_example: dict[str, Tensor], *, loss_target: str, exclude_special: bool
) -> FlowResult:
    """Average per-example flows (``[layer, n]``; ``S_*_head``: ``[layer, head, n]``)."""
    raw = {k: per_example[k].mean(-1) for k in ("S_wp", "S_pq", "S_ww")}
    norm = metrics.normalise_flow(raw)
    per_head = None
    if "S_wp_head" in per_example:
        per_head = {k: per_example[f"{k}_head"].mean(-1).tolist() for k in ("S_wp", "S_pq", "S_ww")}
    return FlowResult(
        **{k: v.tolist() for k, v in norm.items()},
        **{f"{k}_raw": v.tolist() for k, v in raw.items()},
        n=per_example["S_wp"].shape[-1],
        loss_target=loss_target,
        exclude_special=exclude_special,
        per_head=per_head,
    )


def information_flow(
    model,
    task: str | Task,
    queries: Sequence[Example],
    demonstrations,
    *,
    loss_target: LossTarget = "gold",
    layers: Sequence[int] | None = None,
    batch_size: int = 4,
    keep_per_head: bool = False,
    exclude_special: bool = True,
    progress: bool = True,
) -> FlowResult:
    """Saliency flows ``S_wp``, ``S_pq``, ``S_ww`` for every layer, averaged over queries.

    One forward and one backward pass per batch: the loss is the cross-entropy of the
    label-restricted logits at the target, for the gold label (``loss_target="gold"``) or the
    model's own prediction (``"prediction"``); ``I_l = |Σ_h A ⊙ ∂L/∂A|`` (Eq. 1) feeds
    Eqs. 2–4 ([`information_flow`][anchor_lens.metrics.information_flow]). Saliency is
    accumulated in float32 whatever the model's dtype.

    ``layers`` restricts the saliency to some layers (default: all); results are listed in
    that order. ``keep_per_head`` additionally returns the three flows per layer and head
    (computed on ``|A_h ⊙ ∂L/∂A_h|``) under ``per_head``.

    ``exclude_special`` leaves special tokens (a BOS the tokenizer policy adds, e.g. Gemma's
    ``<bos>``; ``TokenRole.SPECIAL``) out of every pair set: a BOS is no word of the prompt,
    and as the attention sink of many heads it would dominate ``S_wp`` and ``S_ww``. Prompts
    without special tokens (GPT-2, SmolLM2) are unaffected; set it to ``False`` to count
    them as words, as the paper's GPT-2 setting implicitly did.
    """
    task = get_task(task)
    layers = resolve_layers(model, layers)
    parts: dict[str, list[Tensor]] = {}
    for batch in iter_batches(
        model, task, queries, demonstrations, batch_size=batch_size, desc="flow", progress=progress
    ):
        flows = batch_flows(
            model,
            batch,
            layers,
            loss_target=loss_target,
            exclude_special=exclude_special,
            keep_per_head=keep_per_head,
        )
        for key, v in flows.items():
            parts.setdefault(key, []).append(v)
    per_example = {k: torch.cat(v, dim=-1) for k, v in parts.items()}
    return flow_result(per_example, loss_target=loss_target, exclude_special=exclude_special)


# --------------------------------------------------------------------------------- isolation
def random_positions(batch: ICLBatch, n: int, generator: torch.Generator) -> Int[Tensor, "batch n"]:
    """``n`` random non-label positions per example (text or formatting tokens before ``q``).

    The random baseline of §2.2: the same number of positions as there are label words, drawn
    from the demonstrations' and query's other tokens, never a label word or the target.
    """
    roles = batch.roles.cpu()
    ok = (roles == TokenRole.TEXT) | (roles == TokenRole.FORMAT)
    ok &= torch.arange(roles.shape[1])[None] < batch.target_positions.cpu()[:, None]
    too_few = ok.sum(-1) < n
    if too_few.any():
        raise ValueError(f"Example {int(too_few.nonzero()[0])} has fewer than {n} candidates.")
    noise = torch.rand(roles.shape, generator=generator)
    return noise.masked_fill(~ok, -1.0).topk(n, dim=-1).indices.to(batch.input_ids.device)


@dataclass
class IsolationResult:
    """Label and word loyalty per isolation condition (Fig. 4).

    ``conditions`` maps ``label_first``, ``label_last``, ``random_first``, ``random_last`` to
    ``{"label_loyalty": ..., "word_loyalty": ...}``; ``layers`` says which layers each used.
    """

    conditions: dict[str, dict[str, float]]
    layers: dict[str, list[int]]
    k_layers: int
    top_k: int
    n: int
    seed: int

    def to_json(self) -> dict:
        return asdict(self)


ISOLATION_CONDITIONS = ("label_first", "label_last", "random_first", "random_last")


def isolation_spans(n_layers: int, k_layers: int) -> dict[str, list[int]]:
    """The first and the last ``k_layers`` layers of a model with ``n_layers``."""
    if not 0 < k_layers <= n_layers:
        raise ValueError(f"k_layers must be in 1..{n_layers}, got {k_layers}.")
    return {"first": list(range(k_layers)), "last": list(range(n_layers - k_layers, n_layers))}


def example_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of query ``index`` under ``seed``: the same however queries are
    batched or sharded across processes."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def batch_isolation(
    model,
    batch: ICLBatch,
    spans: dict[str, list[int]],
    generators: Sequence[torch.Generator],
    *,
    top_k: int = 5,
    reference: Tensor | None = None,
    block_inputs: BlockInputs | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-example ``(label agreement, top-k Jaccard)`` of one batch for each condition.

    ``generators[b]`` draws row ``b``'s random positions (one draw per layer), so the random
    baseline of a query does not depend on its batch. ``reference`` is the unedited target
    logits if already computed (e.g. ``SaliencyPass.logits``); else one forward computes them
    and records the block inputs itself. ``block_inputs`` (from the reference forward, e.g.
    ``SaliencyPass.block_inputs``) lets a
    condition confined to layers ``≥ block_inputs.start`` (the last ``k``) run only those
    layers: the layers before compute nothing different. Used only after the unedited replay
    from ``start`` reproduces ``reference``; else every condition runs the whole model.
    """
    _check_demos(batch, "isolation")
    out: dict[str, tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        if reference is None:
            # The reference forward also keeps what the last spans' blocks receive, so callers
            # without a saliency pass (``isolation``) get the short path too.
            later = [min(layers) for layers in spans.values() if min(layers) > 0]
            capture = capture_block_inputs(model, min(later)) if later else nullcontext()
            with capture as captured:
                reference = target_logits(model, batch)
            block_inputs = block_inputs or captured
        ref = reference.float()
        ref_pred = ref[:, batch.label_token_ids].argmax(-1)
        if block_inputs is not None:
            replay = resume_target_logits(model, batch, block_inputs).float()
            if not torch.allclose(replay, ref, rtol=1e-5, atol=1e-5):
                block_inputs = None  # this model's blocks do not replay exactly: run whole

        def run(hooks, layers):
            if block_inputs is not None and min(layers) >= block_inputs.start:
                return resume_target_logits(model, batch, block_inputs, hooks)
            return target_logits(model, batch, hooks)

        for where, layers in spans.items():
            random_rows = {
                layer: torch.cat(
                    [random_positions(batch[b], batch.n_demos, g) for b, g in enumerate(generators)]
                )
                for layer in layers
            }
            for what, rows in (("label", batch.label_positions), ("random", random_rows.get)):
                out_logits = run(block_attention_hooks(layers, rows), layers).float()
                pred = out_logits[:, batch.label_token_ids].argmax(-1)
                out[f"{what}_{where}"] = (
                    (pred == ref_pred).float().cpu(),
                    metrics.jaccard_topk(ref, out_logits, top_k).cpu(),
                )
    return out


def isolation_result(
    per_example: dict[str, tuple[Tensor, Tensor]],
    spans: dict[str, list[int]],
    *,
    k_layers: int,
    top_k: int,
    seed: int,
) -> IsolationResult:
    """Average per-example agreement and Jaccard into label and word loyalty."""
    conditions = {
        key: {
            "label_loyalty": float(per_example[key][0].mean()),
            "word_loyalty": float(per_example[key][1].mean()),
        }
        for key in ISOLATION_CONDITIONS
    }
    layers_used = {f"{w}_{s}": spans[s] for w in ("label", "random") for s in spans}
    n = len(per_example["label_first"][0])
    return IsolationResult(conditions, layers_used, k_layers, top_k, n, seed)


def isolation(
    model,
    task: str | Task,
    queries: Sequence[Example],
    demonstrations,
    *,
    k_layers: int = 5,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> IsolationResult:
    """Isolate label words (or random positions) in the first / last ``k_layers`` layers.

    Isolation sets the pre-softmax scores from each isolated position to every earlier
    position to the minimum ([`block_attention_hooks`][anchor_lens.hooks.block_attention_hooks]).
    Loyalty compares against the unedited run: label loyalty is the agreement of label
    predictions, word loyalty the top-``top_k`` Jaccard similarity of the full next-token
    distribution. Random positions are redrawn per layer and query from the query's own
    generator ([`example_generator`][anchor_lens.analysis.example_generator]``(seed, i)``).
    """
    task = get_task(task)
    spans = isolation_spans(model.cfg.n_layers, k_layers)
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {}
    start = 0
    for batch in iter_batches(
        model,
        task,
        queries,
        demonstrations,
        batch_size=batch_size,
        desc="isolation",
        progress=progress,
    ):
        generators = [example_generator(seed, start + b) for b in range(len(batch))]
        start += len(batch)
        for key, v in batch_isolation(model, batch, spans, generators, top_k=top_k).items():
            parts.setdefault(key, []).append(v)
    per_example = {
        k: (torch.cat([a for a, _ in v]), torch.cat([j for _, j in v])) for k, v in parts.items()
    }
    return isolation_result(per_example, spans, k_layers=k_layers, top_k=top_k, seed=seed)


# ------------------------------------------------------------------------------ deep layers
@dataclass
class DeepResult:
    """AUCROC_l and R_l per layer (Fig. 5), with the predictions they were scored against.

    ``aucroc`` and ``r_l`` hold ``None`` where they are undefined, and ``undefined_reason``
    says why (e.g. the model predicted one class for every query). ``note`` qualifies a
    defined result (e.g. averaged over only some seeds).
    """

    aucroc: list[float | None]
    r_l: list[float | None]
    n: int
    predicted_classes: dict[str, int]
    binary_score: str = "raw"
    undefined_reason: str | None = None
    note: str | None = None

    @property
    def defined(self) -> bool:
        return all(a is not None for a in self.aucroc)

    def to_json(self) -> dict:
        return asdict(self)


def batch_deep_scores(
    model, batch: ICLBatch, layers: Sequence[int], n_classes: int
) -> tuple[Tensor, Tensor]:
    """``(scores [layer, batch, n_class], predictions [batch])`` of one batch (§2.3).

    Only the target row of each layer's pattern is kept, so memory does not grow with the
    square of the prompt length; scores are float32 whatever the model's dtype.
    """
    _check_demos(batch, "deep_layer_auc")
    capture = PatternCapture(tuple(layers), query_positions=batch.target_positions)
    with torch.no_grad():
        logits = target_logits(model, batch, capture.hooks)
    scores = metrics.class_attention_scores(
        capture.stacked().float(), batch.label_positions, batch.demo_labels, n_classes
    )
    return scores.cpu(), logits[:, batch.label_token_ids].argmax(-1).cpu()


def deep_result(
    scores: Tensor, predictions: Tensor, task: Task, binary_score: metrics.BinaryScore = "raw"
) -> DeepResult:
    """AUCROC_l and R_l from per-example class scores ``[layer, n, n_class]``."""
    auc = metrics.aucroc_per_layer(scores, predictions, binary_score)
    counts = torch.bincount(predictions, minlength=task.n_classes).tolist()
    reason = metrics.aucroc_undefined_reason(predictions)
    if reason is not None and len(predictions):
        only = int(predictions[0])
        reason = reason.replace(f"class {only}", repr(task.label_words[only]))
    r_l = metrics.cumulative_r(auc)
    if reason is None and any(r is None for r in r_l):
        reason = "R_l: the AUCROC_l gains over 0.5 sum to zero across layers"
    return DeepResult(
        aucroc=auc,
        r_l=r_l,
        n=len(predictions),
        predicted_classes=dict(zip(task.label_words, counts, strict=True)),
        binary_score=binary_score,
        undefined_reason=reason,
    )


def deep_layer_auc(
    model,
    task: str | Task,
    queries: Sequence[Example],
    demonstrations,
    *,
    binary_score: metrics.BinaryScore = "raw",
    batch_size: int = 8,
    progress: bool = True,
) -> DeepResult:
    """AUCROC_l of ``Σ_h Σ_{k: class c} A_l(q, p_k)`` against the model's own prediction.

    Scored as [`aucroc_per_layer`][anchor_lens.metrics.aucroc_per_layer] does (the official
    code: raw class attention with two predicted classes, normalised one-vs-one with more).
    """
    task = get_task(task)
    layers = resolve_layers(model, None)
    scores, preds = [], []
    for batch in iter_batches(
        model,
        task,
        queries,
        demonstrations,
        batch_size=batch_size,
        desc="deep",
        progress=progress,
    ):
        s, p = batch_deep_scores(model, batch, layers, task.n_classes)
        scores.append(s)
        preds.append(p)
    return deep_result(torch.cat(scores, dim=1), torch.cat(preds), task, binary_score)
