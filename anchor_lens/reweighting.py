"""Anchor re-weighting (Wang et al. 2023, §3.1, Eq. 9 and Table 1).

The target's attention to each demonstration's label word is rescaled after the softmax,

    Â_l^h(q, p_i) = exp(β_{l,h,i}) · A_l^h(q, p_i)      (no renormalisation),

with one β per layer × head × demonstration, initialised to 0 (so the model is unchanged).
β is learned on a few extra labelled examples with the demonstrations as context (paper:
4 per class, Adam, lr 0.01, batch 1, 10 epochs, cross-entropy over the label logits), the
model frozen. Works for any model whose ``hook_pattern`` is exposed, grouped-query attention
included (TransformerLens expands patterns to the query heads, so β has one entry per query
head).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from .episodes import Pools, draw_episode, load_pools
from .hooks import HookPair, scale_attention_hooks
from .icl import evaluate, target_logits
from .prompts import ICLBatch, build_icl_batch
from .tasks import Example, Task, get_task, sample_demonstrations

__all__ = [
    "AnchorReweighting",
    "ReweightResult",
    "frozen",
    "run_reweighting",
    "train_reweighting",
]


class AnchorReweighting(nn.Module):
    """β of Eq. 9: ``[layer, head, demonstration]``, zeros at initialisation.

    ``hooks(batch)`` returns the ``(name, fn)`` pairs that apply ``exp(β)`` to the target row
    of every layer's post-softmax pattern at the batch's label-word columns.
    """

    def __init__(self, n_layers: int, n_heads: int, n_demos: int):
        super().__init__()
        self.beta: Float[Tensor, "layer head demo"] = nn.Parameter(
            torch.zeros(n_layers, n_heads, n_demos)
        )

    @classmethod
    def for_model(cls, model, n_demos: int) -> AnchorReweighting:
        """Zero β sized from ``model.cfg`` (``n_layers`` × ``n_heads``)."""
        module = cls(model.cfg.n_layers, model.cfg.n_heads, n_demos)
        return module.to(next(model.parameters()).device)

    def hooks(self, batch: ICLBatch) -> list[HookPair]:
        if batch.n_demos != self.beta.shape[2]:
            raise ValueError(
                f"β was built for {self.beta.shape[2]} demonstrations, the batch has "
                f"{batch.n_demos}: re-weighting is tied to one demonstration set."
            )
        scales = {layer: self.beta[layer].exp() for layer in range(self.beta.shape[0])}
        return scale_attention_hooks(scales, batch.target_positions, batch.label_positions)

    def save(self, path: str | Path) -> None:
        """Write β to a safetensors file."""
        from safetensors.torch import save_file

        save_file({"beta": self.beta.detach().cpu().contiguous()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> AnchorReweighting:
        """Read β written by `save`."""
        from safetensors.torch import load_file

        beta = load_file(str(path))["beta"]
        module = cls(*beta.shape)
        with torch.no_grad():
            module.beta.copy_(beta)
        return module


@contextmanager
def frozen(model):
    """Temporarily stop gradients to the model's weights (restored afterwards)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def train_reweighting(
    model,
    task: str | Task,
    demonstrations: Sequence[Example],
    train: Sequence[Example],
    *,
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> tuple[AnchorReweighting, list[float]]:
    """Learn β on ``train`` with ``demonstrations`` as the context (the paper's recipe).

    Returns the trained module and the mean training loss of each epoch. The model's weights
    get no gradient ([`frozen`][anchor_lens.reweighting.frozen]); only β is optimised, with Adam.
    """
    task = get_task(task)
    module = AnchorReweighting.for_model(model, len(demonstrations))
    optimiser = torch.optim.Adam(module.parameters(), lr=lr)
    rng = random.Random(seed)
    order = list(train)
    losses: list[float] = []
    with (
        frozen(model),
        tqdm(
            total=epochs * len(order), desc="re-weighting", unit="ex", disable=not progress
        ) as bar,
    ):
        for _ in range(epochs):
            rng.shuffle(order)
            total = 0.0
            for i in range(0, len(order), batch_size):
                chunk = order[i : i + batch_size]
                batch = build_icl_batch(model, task, demonstrations, chunk).to(model.cfg.device)
                logits = target_logits(model, batch, module.hooks(batch))
                loss = F.cross_entropy(logits[:, batch.label_token_ids].float(), batch.labels)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += loss.item() * len(chunk)
                bar.update(len(chunk))
            losses.append(total / len(order))
    return module, losses


@dataclass
class ReweightResult:
    """Table 1 for one seed: vanilla 1-shot and 5-shot ICL against 1-shot + re-weighting."""

    accuracy_1shot: float
    accuracy_5shot: float
    accuracy_reweighted: float
    n: int
    n_train: int
    seed: int
    losses: list[float]
    episode: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


def run_reweighting(
    model,
    task: str | Task,
    *,
    data: str | Path | None = None,
    demo_data: str | Path | None = None,
    pools: Pools | None = None,
    n: int | None = 200,
    seed: int = 42,
    train_per_class: int = 4,
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[ReweightResult, AnchorReweighting]:
    """The paper's protocol (§3.1): same queries, three ways.

    One 1-shot demonstration set shared by all queries
    ([`draw_episode`][anchor_lens.episodes.draw_episode] with ``mode="fixed"``: β is trained
    for one context, so the context cannot change per query); β is trained on
    ``train_per_class`` further examples per class (never a query or a demonstration); the
    5-shot baseline draws 5 demonstrations per class (never a query).
    """
    task = get_task(task)
    pools = pools if pools is not None else load_pools(task, data, demo_data)
    episode = draw_episode(task, pools, shots=1, n=n, seed=seed, mode="fixed")
    queries, demos, pool = episode.queries, episode.demonstrations, pools.demos
    train = sample_demonstrations(
        pool, task, train_per_class, seed=seed + 1, exclude=[*queries, *demos]
    )
    five = sample_demonstrations(pool, task, 5, seed=seed, exclude=queries)
    module, losses = train_reweighting(
        model, task, demos, train, epochs=epochs, lr=lr, seed=seed, progress=progress
    )
    common = dict(batch_size=batch_size, progress=progress)
    with torch.no_grad():
        one = evaluate(model, task, queries, demos, **common)
        many = evaluate(model, task, queries, five, **common)
        reweighted = evaluate(model, task, queries, demos, intervention=module.hooks, **common)
    result = ReweightResult(
        accuracy_1shot=one.accuracy,
        accuracy_5shot=many.accuracy,
        accuracy_reweighted=reweighted.accuracy,
        n=one.n,
        n_train=len(train),
        seed=seed,
        losses=losses,
        episode=episode.to_json(),
    )
    return result, module
