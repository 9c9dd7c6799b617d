"""Synthetic in-context learning tasks of Fu et al. (ICML 2024), generated on the fly.

**Factor task** (the paper's main setting, after its Shapes3D construction). An *item* has
``F`` factors, each taking one of ``V`` values, so there are ``V^F`` items. A sequence picks a
factor ``f`` (uniformly) and a label map ``π`` — a permutation of the ``V`` values — from a
fixed set of ``m`` maps, then shows ``N`` pairs ``(x_i, y_i)`` with ``y_i = π(v_f(x_i))``.
The model predicts every ``y_i`` from ``x_i`` and the earlier pairs. As in the official code a
*map* is one permutation per factor (``maps[k, f]``), the factor is not named anywhere in the
sequence (no task token), and the items of a sequence are distinct and drawn from a training
split of the items (80 %); the held-out items make the test set, so probes are scored on items
the model never saw.

* ``m = 1`` is the easy task ``D_fix``: the label of an item under factor ``f`` is always the
  same, so what the model must take from the context is only *which factor* is in use.
* Large ``m`` is the hard task: the map itself must be read from the context.

Items are fixed random non-linear embeddings (the paper feeds 768-d VAE codes of the
images). Each factor value has a random vector ``E_f[v]`` and a random sign pattern
``S_f[v] ∈ {±1}^d``; an item is

    x = Σ_f ((1 − a) + a · S_f[v_{f+1}]) ⊙ E_f[v_f]          (f + 1 taken mod F)

standardised per coordinate. With ``a = 0`` (``entangle``) the factors add up and a linear
read-out decodes them; with ``a = 1`` each factor's code has its signs flipped by the next
factor's value (an XOR-like interaction), so a linear probe on ``x`` reads the factors only
partly (0.67 for F = 3, V = 4 against chance 0.25) and the model has to *learn* to read them —
the weights component of the paper has something to learn, as with the VAE codes.

**Linear-function task** (Garg et al. 2022; the paper's second setting): ``w ~ N(0, I_d)`` per
sequence, ``x_i ~ N(0, I_d)``, ``y_i = w · x_i``.

Both tasks sample whole batches with one ``torch.Generator`` (vectorised, no Python loop over
sequences), so a seed fixes the data stream exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "FactorBatch",
    "FactorTask",
    "LinearBatch",
    "LinearTask",
]


@dataclass
class FactorBatch:
    """A batch of factor-task sequences.

    ``x`` are the item vectors, ``y`` the labels ``π(v_f(x))``, ``values`` every factor value
    of every item (what the weights-component probe and the auxiliary loss predict),
    ``factor`` the factor each sequence uses (what the context-component probe predicts) and
    ``map_index`` which of the ``m`` maps it uses.
    """

    x: Float[Tensor, "batch pair d_item"]
    y: Int[Tensor, "batch pair"]
    values: Int[Tensor, "batch pair factor"]
    factor: Int[Tensor, " batch"]
    map_index: Int[Tensor, " batch"]

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> FactorBatch:
        return FactorBatch(*(t.to(device) for t in self._parts()))

    def _parts(self) -> tuple[Tensor, ...]:
        return (self.x, self.y, self.values, self.factor, self.map_index)

    @staticmethod
    def cat(batches: list[FactorBatch]) -> FactorBatch:
        """Sequences of several batches in one (the mixed-difficulty strategy's batches)."""
        parts = zip(*(b._parts() for b in batches), strict=True)
        return FactorBatch(*(torch.cat(p) for p in parts))


@dataclass
class FactorTask:
    """The factor task with its knobs: ``F`` factors of ``V`` values, ``m`` maps, ``N`` pairs.

    Everything fixed about the task (item embeddings, the train/test split of items, the
    ``m`` maps) is drawn from ``seed``; batches are drawn from the generator given to
    [`sample`][anchor_lens.plateau.tasks.FactorTask.sample]. Two tasks with the same ``F``,
    ``V``, ``d_item`` and ``seed`` share items and split whatever their ``m``, and the first
    map of every task is the same, so ``with_maps(1)`` is the ``D_fix`` of the same world.
    """

    n_factors: int = 3
    n_values: int = 4
    n_maps: int = 1000
    n_pairs: int = 16
    d_item: int = 32
    entangle: float = 1.0
    test_fraction: float = 0.2
    seed: int = 0
    items: Float[Tensor, "item d_item"] = field(init=False, repr=False)
    item_values: Int[Tensor, "item factor"] = field(init=False, repr=False)
    train_items: Int[Tensor, " n_train"] = field(init=False, repr=False)
    test_items: Int[Tensor, " n_test"] = field(init=False, repr=False)
    maps: Int[Tensor, "map factor value"] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_pairs(self.n_pairs)
        F, V, m = self.n_factors, self.n_values, self.n_maps
        if not 0 <= self.entangle <= 1:
            raise ValueError(f"entangle is a mixing weight in [0, 1], got {self.entangle}")
        if F < 1 or V < 2 or m < 1:
            raise ValueError(
                f"FactorTask needs n_factors >= 1, n_values >= 2 and n_maps >= 1; got F={F}, "
                f"V={V}, m={m}."
            )
        n_items = V**F
        n_test = max(1, round(self.test_fraction * n_items))
        if n_items - n_test < self.n_pairs:
            raise ValueError(
                f"A sequence shows {self.n_pairs} distinct items but only {n_items - n_test} "
                f"training items exist (V^F = {n_items}, {n_test} held out): raise n_values or "
                "n_factors, or lower n_pairs."
            )
        g = torch.Generator().manual_seed(self.seed)
        self.item_values = torch.tensor(list(itertools.product(range(V), repeat=F)))
        self.items = self._embed(self.item_values, g)
        order = torch.randperm(n_items, generator=g)
        self.test_items, self.train_items = (
            order[:n_test].sort().values,
            order[n_test:].sort().values,
        )
        # Maps come from their own stream so map k is the same for every m (D_fix = map 0).
        gm = torch.Generator().manual_seed(self.seed + 1_000_003)
        self.maps = torch.rand(m, F, V, generator=gm).argsort(-1)

    def _embed(self, values: Int[Tensor, "item factor"], g: torch.Generator) -> Tensor:
        F_, V, d, a = self.n_factors, self.n_values, self.d_item, self.entangle
        E = torch.randn(F_, V, d, generator=g)
        S = torch.randint(0, 2, (F_, V, d), generator=g).float() * 2 - 1
        nxt = values.roll(-1, dims=1)  # the value of factor f + 1 flips factor f's signs
        x = sum(((1 - a) + a * S[f, nxt[:, f]]) * E[f, values[:, f]] for f in range(F_))
        return (x - x.mean(0)) / x.std(0).clamp_min(1e-6)

    @property
    def n_classes(self) -> int:
        """Labels are factor values: ``V`` classes, chance ``1/V``."""
        return self.n_values

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    @property
    def sequence_test_split(self) -> str:
        """Where held-out *sequences* come from: the held-out items when there are ``N``.

        Otherwise ``"train"``: fresh sequences (new maps, factors and item combinations) of
        training items. Held-out items drawn with replacement would repeat items within a
        sequence, a distribution the model never trained on.
        """
        return "test" if len(self.test_items) >= self.n_pairs else "train"

    def with_maps(self, n_maps: int) -> FactorTask:
        """The same world (items, split, first maps) with ``n_maps`` maps; ``1`` is ``D_fix``."""
        return FactorTask(
            self.n_factors,
            self.n_values,
            n_maps,
            self.n_pairs,
            self.d_item,
            self.entangle,
            self.test_fraction,
            self.seed,
        )

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        split: str = "train",
        distinct: bool = True,
        device: torch.device | str = "cpu",
    ) -> FactorBatch:
        """``batch_size`` sequences of ``N`` ``split`` items, in one vectorised draw.

        Items within a sequence are distinct (the paper's sampling) unless ``distinct=False``,
        which draws with replacement (the attention-off probe, whose positions cannot see
        each other, uses it on a held-out split smaller than ``N``).
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        pool = self.train_items if split == "train" else self.test_items
        if distinct and len(pool) < self.n_pairs:
            raise ValueError(
                f"The {split} split has {len(pool)} items, fewer than n_pairs={self.n_pairs}: "
                "a sequence's items are distinct. Raise n_values or n_factors, or lower n_pairs."
            )
        g = generator
        B, N = batch_size, self.n_pairs
        if distinct:
            pick = torch.rand(B, len(pool), generator=g).argsort(-1)[:, :N]
        else:
            pick = torch.randint(len(pool), (B, N), generator=g)
        idx = pool[pick]
        values = self.item_values[idx]  # [B, N, F]
        factor = torch.randint(self.n_factors, (B,), generator=g)
        map_index = torch.randint(self.n_maps, (B,), generator=g)
        value_f = values.gather(2, factor[:, None, None].expand(B, N, 1)).squeeze(2)
        perm = self.maps[map_index, factor]  # [B, V]: this sequence's permutation
        y = perm.gather(1, value_f)
        batch = FactorBatch(self.items[idx], y, values, factor, map_index)
        return batch.to(device)


@dataclass
class LinearBatch:
    """Linear-function sequences: ``y_i = w · x_i`` with one ``w`` per sequence."""

    x: Float[Tensor, "batch pair d"]
    y: Float[Tensor, "batch pair"]
    w: Float[Tensor, "batch d"]

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> LinearBatch:
        return LinearBatch(self.x.to(device), self.y.to(device), self.w.to(device))

    @staticmethod
    def cat(batches: list[LinearBatch]) -> LinearBatch:
        return LinearBatch(
            *(torch.cat(p) for p in zip(*((b.x, b.y, b.w) for b in batches), strict=True))
        )


def _check_pairs(n_pairs: int) -> None:
    if n_pairs < 2:
        raise ValueError(
            f"n_pairs must be at least 2 (--pairs), got {n_pairs}: each label is predicted from "
            "the pairs before it, and the plateau is read on the later half of the pairs."
        )


@dataclass
class LinearTask:
    """Garg et al.'s linear regression in context: ``w, x ~ N(0, I_d)``, ``y = w · x``.

    ``n_maps=None`` draws a fresh ``w`` for every sequence (the hard task); ``n_maps=k`` picks
    ``w`` among ``k`` vectors fixed by ``seed``, and ``k = 1`` is the analogue of ``D_fix``
    (``y`` is a fixed function of ``x``). Scores are ``R² = 1 − (ŷ − y)² / d`` per position
    (``d`` is the variance of ``y``): 0 is predicting the mean, 1 is exact.
    """

    d: int = 8
    n_pairs: int = 16
    n_maps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_pairs(self.n_pairs)

    @property
    def chance(self) -> float:
        return 0.0

    def with_maps(self, n_maps: int | None) -> LinearTask:
        return LinearTask(self.d, self.n_pairs, n_maps, self.seed)

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        split: str = "train",
        distinct: bool = True,
        device: torch.device | str = "cpu",
    ) -> LinearBatch:
        """``batch_size`` sequences (``split``/``distinct`` only mirror the factor task's)."""
        del split, distinct  # x and w are continuous: train and test never coincide
        if self.n_maps is None:
            w = torch.randn(batch_size, self.d, generator=generator)
        else:
            fixed = torch.randn(
                self.n_maps, self.d, generator=torch.Generator().manual_seed(self.seed)
            )
            w = fixed[torch.randint(self.n_maps, (batch_size,), generator=generator)]
        x = torch.randn(batch_size, self.n_pairs, self.d, generator=generator)
        y = torch.einsum("bnd,bd->bn", x, w)
        return LinearBatch(x, y, w).to(device)
