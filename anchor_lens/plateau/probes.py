"""The weights component and the context component of Fu et al. (ICML 2024), probed linearly.

Fu et al. split what an ICL model computes at an item position into a **weights component**
— what the weights alone make of the item, with no information from the other tokens — and a
**context component** — what the context adds. Their official code measures the first by
switching attention off (each attention block's output is replaced by its input, so tokens
cannot mix) and training a linear probe on the output of a chosen block at the item positions
to predict every factor value of the item; the score is the mean test accuracy over factors.

* [`attention_off_hooks`][anchor_lens.plateau.probes.attention_off_hooks] — the switch, as
  composable ``(hook_name, fn)`` pairs: ``hook_attn_out ← ln1.hook_normalized`` (the
  attention's input), the official replacement; ``replace="zero"`` drops the attention
  output instead.
* [`item_representations`][anchor_lens.plateau.probes.item_representations] — the residual
  stream after block ``layer`` at the item positions, with or without attention.
* [`fit_probe`][anchor_lens.plateau.probes.fit_probe] — a linear probe ``h ↦ W h + b``
  predicting several categorical targets at once (one softmax per target), trained full-batch
  with Adam on standardised features and scored on held-out samples.
* [`weights_component_probe`][anchor_lens.plateau.probes.weights_component_probe] — attention
  off, targets = the item's ``F`` factor values; trained on training items, scored on the
  held-out items (never seen in training).
* [`context_component_probe`][anchor_lens.plateau.probes.context_component_probe] — attention
  on, target = which factor the sequence's task uses, read at the last item position; scored
  on sequences of held-out items.

What the paper does not make public and we chose (documented in the tutorial): the probe is
trained full-batch (300 Adam steps, lr 0.01, weight decay 1e-4) instead of one pass over the
training set; the context component is read at the last item position (it has seen ``N - 1``
pairs) rather than averaged over positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ..hooks import HookPair
from .model import PlateauTransformer, encode_pairs
from .tasks import FactorBatch, FactorTask

__all__ = [
    "ProbeResult",
    "cpu_threads",
    "attention_off_hooks",
    "context_component_probe",
    "fit_probe",
    "item_representations",
    "weights_component_probe",
]


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads, then restore the setting (``None``: as is).

    The plateau models are so small that extra threads only add synchronisation; on a busy
    machine, oversubscribed threads made a probe fit or a training step tens of times slower.
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def attention_off_hooks(layers: Sequence[int], replace: str = "input") -> list[HookPair]:
    """Switch attention off in ``layers``: no position receives anything from another.

    ``replace="input"`` (the official code): the attention block's output becomes its input,
    ``attn_out = LN1(resid_pre)``, so the block is a per-position map. ``replace="zero"``:
    ``attn_out = 0``. Either way a position's residual stream depends on its own token and
    position only.
    """
    if replace not in ("input", "zero"):
        raise ValueError(f"replace must be 'input' or 'zero', got {replace!r}")
    seen: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(normalized: Float[Tensor, "batch pos d_model"], hook) -> None:
            seen[layer] = normalized

        return hook

    def swap(layer: int):
        def hook(attn_out: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
            if replace == "zero":
                return torch.zeros_like(attn_out)
            return seen.pop(layer)

        return hook

    pairs: list[HookPair] = []
    for layer in layers:
        if replace == "input":
            pairs.append((f"blocks.{layer}.ln1.hook_normalized", keep(layer)))
        pairs.append((f"blocks.{layer}.hook_attn_out", swap(layer)))
    return pairs


def _resolve(model: PlateauTransformer, layer: int) -> int:
    n = model.cfg.n_layers
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} does not exist: the model has {n} layers (0-{n - 1}).")
    return layer % n


@torch.no_grad()
def item_representations(
    model: PlateauTransformer,
    batch: FactorBatch,
    layer: int = -1,
    *,
    attention: bool = True,
) -> Float[Tensor, "batch pair d_model"]:
    """``blocks.{layer}.hook_resid_post`` at every item position (positions ``0, 2, 4, ...``).

    With ``attention=False`` every layer's attention is off (`attention_off_hooks`), which is
    the weights component of the paper.
    """
    layer = _resolve(model, layer)
    name = f"blocks.{layer}.hook_resid_post"
    out: dict[str, Tensor] = {}

    def grab(resid: Float[Tensor, "batch pos d_model"], hook) -> None:
        out["resid"] = resid

    hooks = [] if attention else attention_off_hooks(range(model.cfg.n_layers))
    inputs = encode_pairs(batch.x, batch.y, model.cfg.n_out)
    with model.hooks(fwd_hooks=hooks + [(name, grab)]):
        model(inputs)
    return out["resid"][:, ::2]


@dataclass
class ProbeResult:
    """Held-out accuracy of a linear probe: per target and the mean over targets."""

    accuracy: float
    per_target: list[float]
    train_accuracy: float

    def to_json(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "per_target": self.per_target,
            "train_accuracy": self.train_accuracy,
        }


def fit_probe(
    train_x: Float[Tensor, "n d"],
    train_y: Int[Tensor, "n target"],
    test_x: Float[Tensor, "m d"],
    test_y: Int[Tensor, "m target"],
    n_classes: int,
    *,
    steps: int = 300,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    seed: int = 0,
    threads: int | None = 1,
) -> ProbeResult:
    """Train one linear map ``d → target × n_classes`` (a softmax per target) and score it.

    Loss: mean over targets of the cross-entropy; features are standardised with the training
    mean and deviation (a linear probe's accuracy does not change, its optimisation does).
    Runs on ``threads`` CPU threads (`cpu_threads`).
    """
    with cpu_threads(threads), torch.enable_grad():
        g = torch.Generator().manual_seed(seed)
        mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
        xs, xt = (train_x - mean) / std, (test_x - mean) / std
        n_t = train_y.shape[1]
        W = (torch.randn(xs.shape[1], n_t * n_classes, generator=g) * 0.01).to(xs.device)
        W.requires_grad_(True)
        b = torch.zeros(n_t * n_classes, device=xs.device, requires_grad=True)
        opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            logits = (xs @ W + b).view(-1, n_t, n_classes)
            loss = F.cross_entropy(logits.reshape(-1, n_classes), train_y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():

        def acc(x: Tensor, y: Tensor) -> Tensor:
            return ((x @ W + b).view(-1, n_t, n_classes).argmax(-1) == y).float().mean(0)

        per = acc(xt, test_y)
        return ProbeResult(float(per.mean()), per.tolist(), float(acc(xs, train_y).mean()))


def weights_component_probe(
    model: PlateauTransformer,
    task: FactorTask,
    layer: int = -1,
    *,
    n_sequences: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ProbeResult:
    """Attention off; a linear probe on the item representations predicts all factor values.

    Trained on ``n_sequences`` sequences of training items, scored on as many of held-out
    items. With attention off a position cannot see the others, so these sequences may repeat
    items (the held-out split can be smaller than ``N``).
    """
    g = torch.Generator().manual_seed(seed)
    parts = []
    for split in ("train", "test"):
        batch = task.sample(n_sequences, g, split=split, distinct=False, device=device)
        h = item_representations(model, batch, layer, attention=False)
        parts += [h.reshape(-1, h.shape[-1]), batch.values.reshape(-1, task.n_factors)]
    return fit_probe(*parts, task.n_values, seed=seed)


def context_component_probe(
    model: PlateauTransformer,
    task: FactorTask,
    layer: int = -1,
    *,
    n_sequences: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ProbeResult:
    """Attention on; a linear probe at the last item position predicts the sequence's factor.

    Chance is ``1/F``. Trained on sequences of training items and scored on other sequences:
    of held-out items when there are ``N`` of them, else fresh sequences of training items
    (``FactorTask.sequence_test_split``), the same held-out set as the ICL accuracy.
    """
    g = torch.Generator().manual_seed(seed)
    parts = []
    for split in ("train", task.sequence_test_split):
        batch = task.sample(n_sequences, g, split=split, device=device)
        h = item_representations(model, batch, layer, attention=True)[:, -1]
        parts += [h, batch.factor[:, None]]
    return fit_probe(*parts, task.n_factors, seed=seed)
