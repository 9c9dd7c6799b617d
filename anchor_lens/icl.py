"""ICL prediction and accuracy.

Following Wang et al. (2023, §2 "Experimental Settings"), the prediction for a query is the
argmax of the next-token logits at the target position ``q`` restricted to the first token of
each label word. ``scoring="full_word"`` instead scores class ``c`` with word tokens
``w_1 … w_m`` by the log-probability of the whole word,
``log p(w_1 | x) + Σ_{j>1} log p(w_j | x, w_{<j})``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .episodes import EpisodeMode, sample_episode
from .prompts import ICLBatch, build_icl_batch
from .tasks import Example, Task, get_task

__all__ = [
    "BlockInputs",
    "EvalResult",
    "Predictions",
    "evaluate",
    "iter_batches",
    "label_scores",
    "capture_block_inputs",
    "predict",
    "resume_target_logits",
    "run_icl",
    "target_logits",
]

Scoring = Literal["first_token", "full_word"]
#: A function from a batch to the hooks to run it with (positions depend on the batch).
Intervention = Callable[[ICLBatch], list]


@dataclass
class Predictions:
    """Label-restricted predictions for one [`ICLBatch`][anchor_lens.prompts.ICLBatch].

    Attributes:
        label_logits: Score of each class (first-token logit, or whole-word log-probability).
        label_mass: Probability that the full next-token distribution puts on the label words'
            first tokens — how well the model follows the ICL format.
        labels: Gold classes (-1 when unknown).
    """

    label_logits: Float[Tensor, "batch n_class"]
    label_mass: Float[Tensor, " batch"]
    labels: Int[Tensor, " batch"]

    @property
    def predicted(self) -> Int[Tensor, " batch"]:
        return self.label_logits.argmax(-1)

    @property
    def label_probs(self) -> Float[Tensor, "batch n_class"]:
        return self.label_logits.softmax(-1)

    @property
    def correct(self) -> Tensor:
        return self.predicted == self.labels


def target_logits(model, batch: ICLBatch, fwd_hooks=()) -> Float[Tensor, "batch vocab"]:
    """Next-token logits at each row's target position, with optional forward hooks.

    Only the target columns are unembedded (``logits_to_keep``, passed through to Hugging
    Face): with left padding that is a single column. Gradients flow if enabled.
    """
    targets = batch.target_positions
    keep = torch.unique(targets)
    logits = model.run_with_hooks(
        **batch.model_inputs(), logits_to_keep=keep, fwd_hooks=list(fwd_hooks)
    )
    column = torch.searchsorted(keep, targets)
    return logits[torch.arange(len(batch), device=logits.device), column]


@dataclass
class BlockInputs:
    """What blocks ``start`` … ``N−1`` received in one forward pass, to run them again alone.

    Attributes:
        start: The first block captured.
        resid: The residual stream entering block ``start``, ``[batch, pos, d_model]``
            (detached).
        kwargs: Each block's keyword arguments from ``start`` on (attention masks, rotary
            embeddings, position ids; per block, as some models give each layer its own mask),
            without the KV cache.
    """

    start: int
    resid: Float[Tensor, "batch pos d_model"]
    kwargs: list[dict] = field(default_factory=list)


def _resumable(model) -> bool:
    # TransformerBridge exposes its block stack and the final norm / unembedding as modules;
    # anchor-lens' hooked Hugging Face wrapper (GPT-J, OPT) runs the HF forward whole.
    return all(isinstance(getattr(model, name, None), torch.nn.Module)
               for name in ("blocks", "ln_final", "unembed"))  # fmt: skip


@contextmanager
def capture_block_inputs(model, start: int) -> Iterator[BlockInputs | None]:
    """Record, during the forward passes inside the block, what blocks ``start``… receive.

    Yields ``None`` for a model whose blocks cannot be run alone (then resume is not possible);
    else a [`BlockInputs`][anchor_lens.icl.BlockInputs] filled by the next forward pass.
    """
    if not _resumable(model):
        yield None
        return
    n_layers = model.cfg.n_layers
    if not 0 <= start < n_layers:
        raise ValueError(f"start must be a layer in 0..{n_layers - 1}, got {start}.")
    captured = BlockInputs(start, torch.empty(0, 0, 0))  # filled by the next forward
    handles = []

    def keep(layer: int):
        def hook(module, args, kwargs):
            if layer == start:
                resid = args[0] if args else kwargs["hidden_states"]
                captured.resid = resid.detach()
                captured.kwargs.clear()
            captured.kwargs.append({
                k: v for k, v in kwargs.items()
                if k not in ("hidden_states", "past_key_values", "past_key_value", "cache",
                             "use_cache")
            })  # fmt: skip

        return hook

    try:
        for layer in range(start, n_layers):
            handles.append(
                model.blocks[layer].register_forward_pre_hook(keep(layer), with_kwargs=True)
            )
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def resume_target_logits(
    model, batch: ICLBatch, inputs: BlockInputs, fwd_hooks=()
) -> Float[Tensor, "batch vocab"]:
    """[`target_logits`][anchor_lens.icl.target_logits] computed from block ``inputs.start``
    on: blocks ``start`` … ``N−1`` run again on the captured residual stream, with
    ``fwd_hooks``, then the final norm and the unembedding at each row's target.

    Equal to the full forward with the same hooks when no hook touches a layer before
    ``start`` (the first layers then compute exactly what they computed when captured), at
    ``(N − start)/N`` of its cost. Callers check that equality once per batch against the
    unedited logits (see ``analysis.batch_isolation``).
    """
    x = inputs.resid
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for layer, kwargs in zip(range(inputs.start, model.cfg.n_layers), inputs.kwargs,
                                 strict=True):  # fmt: skip
            out = model.blocks[layer](x, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
        rows = model.ln_final(x)[torch.arange(len(batch), device=x.device), batch.target_positions]
        return model.unembed(rows[:, None, :])[:, 0]


def _continuation_logprobs(model, batch: ICLBatch, tokens: Sequence[int]) -> Tensor:
    """Σ_{j≥1} log p(tokens[j] | prompt, tokens[:j]) for every row (whole-word scoring)."""
    if len(tokens) < 2:
        return torch.zeros(len(batch), device=batch.input_ids.device)
    extra = torch.tensor(tokens[:-1], device=batch.input_ids.device)
    n_extra = len(extra)
    lengths = batch.attention_mask.sum(-1)
    width = int(lengths.max()) + n_extra
    ids = torch.full((len(batch), width), int(batch.input_ids[0, 0]), device=extra.device)
    mask = torch.zeros_like(ids)
    for b in range(len(batch)):  # re-pad on the left so every continuation ends together
        real = batch.input_ids[b][batch.attention_mask[b].bool()]
        row = torch.cat([real, extra])
        ids[b, width - len(row) :] = row
        mask[b, width - len(row) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=mask, position_ids=pos, logits_to_keep=n_extra)
    logprobs = logits.log_softmax(-1)
    wanted = torch.tensor(tokens[1:], device=logits.device)
    return logprobs[:, torch.arange(n_extra), wanted].sum(-1)


@torch.no_grad()
def label_scores(
    model, batch: ICLBatch, scoring: Scoring = "first_token", fwd_hooks: Sequence = ()
) -> tuple[Float[Tensor, "batch n_class"], Float[Tensor, " batch"]]:
    """Class scores at the target position and the probability mass on label tokens.

    ``fwd_hooks`` are active during the forward pass (e.g. re-weighting or isolation).
    """
    if fwd_hooks and scoring != "first_token":
        raise ValueError("Hooks index the prompt's positions: use scoring='first_token'.")
    logits = target_logits(model, batch, fwd_hooks).float()
    first = batch.label_token_ids.to(logits.device)
    mass = logits.softmax(-1)[:, first].sum(-1)
    if scoring == "first_token":
        return logits[:, first], mass
    if scoring != "full_word":
        raise ValueError(f"scoring must be 'first_token' or 'full_word', got {scoring!r}.")
    scores = logits.log_softmax(-1)[:, first]
    for c, word in enumerate(batch.label_word_ids):
        scores[:, c] += _continuation_logprobs(model, batch, word).to(scores.device)
    return scores, mass


def predict(
    model,
    batch: ICLBatch,
    scoring: Scoring = "first_token",
    intervention: Intervention | None = None,
) -> Predictions:
    """Label-restricted prediction for every prompt of ``batch``.

    ``intervention(batch)`` returns hooks to apply (e.g. ``AnchorReweighting.hooks``).
    """
    batch = batch.to(model.cfg.device)
    hooks = intervention(batch) if intervention is not None else ()
    scores, mass = label_scores(model, batch, scoring, hooks)
    return Predictions(scores.cpu(), mass.cpu(), batch.labels.cpu())


def iter_batches(
    model,
    task: str | Task,
    queries: Sequence[Example | str],
    demonstrations: Sequence[Example] | Sequence[Sequence[Example]] = (),
    *,
    batch_size: int = 8,
    desc: str = "ICL",
    progress: bool = True,
    **batch_kwargs,
) -> Iterator[ICLBatch]:
    """Padded batches of ``batch_size`` queries on the model's device, with a progress bar.

    ``demonstrations`` is one list shared by all queries or one list per query;
    ``batch_kwargs`` go to [`build_icl_batch`][anchor_lens.prompts.build_icl_batch].
    """
    per_query = bool(demonstrations) and not isinstance(demonstrations[0], Example)
    with tqdm(total=len(queries), desc=desc, unit="ex", disable=not progress) as bar:
        for i in range(0, len(queries), batch_size):
            chunk = queries[i : i + batch_size]
            demos = demonstrations[i : i + batch_size] if per_query else demonstrations
            yield build_icl_batch(model, task, demos, chunk, **batch_kwargs).to(model.cfg.device)
            bar.update(len(chunk))


@dataclass
class EvalResult:
    """Accuracy of ICL on a set of queries, with the per-example predictions.

    ``predicted_counts[c]`` is how often class ``c`` was predicted: a model that answers one
    class for every query shows here, whatever its accuracy.
    """

    accuracy: float
    n: int
    label_mass: float
    seconds: float
    seconds_per_example: float
    predicted_counts: list[int]
    predictions: list[int] = field(repr=False)
    labels: list[int] = field(repr=False)
    label_probs: list[list[float]] = field(repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model,
    task: str | Task,
    queries: Sequence[Example],
    demonstrations: Sequence[Example] | Sequence[Sequence[Example]] = (),
    *,
    batch_size: int = 8,
    scoring: Scoring = "first_token",
    padding_side: Literal["left", "right"] = "left",
    prepend_bos: bool | None = None,
    intervention: Intervention | None = None,
    progress: bool = True,
) -> EvalResult:
    """Predict every query with the given demonstrations (shared, or one list per query).

    An empty ``demonstrations`` is zero-shot ICL: the prompt is the query alone.
    ``padding_side`` and ``prepend_bos`` are passed to
    [`build_icl_batch`][anchor_lens.prompts.build_icl_batch]; ``intervention(batch)`` gives hooks
    to run
    every batch with.
    """
    task = get_task(task)
    if not queries:
        raise ValueError("evaluate needs at least one query (got an empty list; check --n).")
    start = time.perf_counter()
    batches = iter_batches(
        model,
        task,
        queries,
        demonstrations,
        batch_size=batch_size,
        desc=f"ICL {task.name}",
        progress=progress,
        padding_side=padding_side,
        prepend_bos=prepend_bos,
        check_label_collisions=scoring == "first_token",
    )
    preds = [predict(model, batch, scoring, intervention) for batch in batches]
    seconds = time.perf_counter() - start
    logits = torch.cat([p.label_logits for p in preds])
    labels = torch.cat([p.labels for p in preds])
    mass = torch.cat([p.label_mass for p in preds])
    predicted = logits.argmax(-1)
    n = len(queries)
    return EvalResult(
        accuracy=float((predicted == labels).float().mean()),
        n=n,
        label_mass=float(mass.mean()),
        seconds=seconds,
        seconds_per_example=seconds / n,
        predicted_counts=torch.bincount(predicted, minlength=task.n_classes).tolist(),
        predictions=predicted.tolist(),
        labels=labels.tolist(),
        label_probs=logits.softmax(-1).tolist(),
    )


def run_icl(
    model,
    task: str | Task,
    *,
    data: str | Path | None = None,
    demo_data: str | Path | None = None,
    shots: int = 1,
    n: int | None = 200,
    seed: int = 42,
    mode: EpisodeMode = "per_query",
    batch_size: int = 8,
    scoring: Scoring = "first_token",
    prepend_bos: bool | None = None,
    progress: bool = True,
) -> EvalResult:
    """[`evaluate`][anchor_lens.icl.evaluate] on one seeded episode of
    [`sample_episode`][anchor_lens.episodes.sample_episode] (fresh demonstrations per query by
    default, ``mode="fixed"`` for one shared set)."""
    episode = sample_episode(
        task, data=data, demo_data=demo_data, shots=shots, n=n, seed=seed, mode=mode
    )
    return evaluate(
        model,
        task,
        episode.queries,
        episode.demonstrations,
        batch_size=batch_size,
        scoring=scoring,
        prepend_bos=prepend_bos,
        progress=progress,
    )
