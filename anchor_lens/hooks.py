"""Composable attention hooks for the anchor analyses (Wang et al. 2023, §2).

Every factory here is small and pure: it takes positions and parameters and returns a list of
``(hook_name, fn)`` pairs on canonical TransformerLens hook points. Lists compose by
concatenation and work with ``model.run_with_hooks(fwd_hooks=...)``, ``with model.hooks(...)``
and ``model.add_hook(name, fn)``:

```python
hooks = block_attention_hooks([0, 1], batch.label_positions) + capture.hooks
logits = model.run_with_hooks(**batch.model_inputs(), fwd_hooks=hooks)
```

Hooks read the number of layers and heads from the tensors they receive, so they work for any
model, grouped-query attention included (TransformerLens expands scores and patterns to the
query heads).

* [`saliency_hooks`][anchor_lens.hooks.saliency_hooks] — capture ``A ⊙ ∂L/∂A`` (Eq. 1) for every
  layer in one backward pass.
* [`block_attention_hooks`][anchor_lens.hooks.block_attention_hooks] — forbid chosen query
  positions to attend to earlier positions
  (pre-softmax, the paper's label-word isolation, §2.2).
* [`scale_attention_hooks`][anchor_lens.hooks.scale_attention_hooks] — multiply post-softmax
  attention ``A(q, p)`` by a (trainable)
  tensor, as anchor re-weighting does (§3.1, Eq. 9).
* [`capture_pattern_hooks`][anchor_lens.hooks.capture_pattern_hooks] — keep post-softmax patterns
  (or a slice of them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

__all__ = [
    "HookPair",
    "PatternCapture",
    "SaliencyCapture",
    "all_layers",
    "block_attention_hooks",
    "capture_pattern_hooks",
    "pattern_hook_name",
    "positions_mask",
    "resolve_layers",
    "saliency_hooks",
    "scale_attention_hooks",
    "scores_hook_name",
]

HookPair = tuple[str, Callable[..., Tensor | None]]


def pattern_hook_name(layer: int) -> str:
    """Post-softmax attention ``A`` of layer ``layer``, shape ``[batch, head, q, k]``."""
    return get_act_name("pattern", layer)


def scores_hook_name(layer: int) -> str:
    """Pre-softmax attention scores (scaled and causally masked), ``[batch, head, q, k]``."""
    return get_act_name("attn_scores", layer)


def _full_prompt_only(scores: Tensor, what: str) -> None:
    """Refuse a pattern whose query rows are not the key columns (a forward with a KV cache).

    These hooks index rows by absolute prompt position, which a cached forward (fewer query
    rows than key columns) does not have.
    """
    n_q, n_k = scores.shape[-2:]
    if n_q != n_k:
        raise ValueError(
            f"{what} got attention with {n_q} query rows and {n_k} key columns: the model ran "
            "with a KV cache (past_key_values), and these hooks index rows by absolute prompt "
            "position. Run the whole prompt in one forward pass, without past_key_values."
        )


@dataclass
class SaliencyCapture:
    """Ones-placeholders multiplied into ``hook_pattern``; their gradient is ``A ⊙ ∂L/∂A``.

    For ``A' = A ⊙ 1`` we have ``∂L/∂1 = A ⊙ ∂L/∂A'``, so after ``loss.backward()`` (or
    `gradients`) each placeholder's gradient is the per-head saliency of Eq. 1.
    """

    layers: tuple[int, ...]
    placeholders: dict[int, Tensor] = field(default_factory=dict)

    @property
    def hooks(self) -> list[HookPair]:
        return saliency_hooks(self)

    def gradients(self, loss: Tensor) -> Float[Tensor, "layer batch head q k"]:
        """``A ⊙ ∂L/∂A`` per head for every captured layer, via one ``autograd.grad`` call.

        Only the placeholders are differentiated, so no gradient is spent on model weights.
        """
        missing = [layer for layer in self.layers if layer not in self.placeholders]
        if missing:
            raise RuntimeError(
                f"No attention pattern was captured for layers {missing}: run the model with "
                "these hooks (and without torch.no_grad) before asking for gradients."
            )
        if loss.grad_fn is None:
            raise RuntimeError(
                "The loss carries no gradient, so A ⊙ ∂L/∂A cannot be computed: run the forward "
                "pass with gradients enabled (outside torch.no_grad() / torch.inference_mode(), "
                "or inside torch.enable_grad())."
            )
        ones = [self.placeholders[layer] for layer in self.layers]
        grads = torch.autograd.grad(loss, ones, allow_unused=True)
        return torch.stack(
            [torch.zeros_like(o) if g is None else g for o, g in zip(ones, grads, strict=True)]
        )

    def saliency(self, loss: Tensor) -> Float[Tensor, "layer batch q k"]:
        """``I_l = |Σ_h A_{h,l} ⊙ ∂L/∂A_{h,l}|`` (Eq. 1): heads summed, then absolute value."""
        return self.gradients(loss).sum(2).abs()


def saliency_hooks(capture: SaliencyCapture) -> list[HookPair]:
    """Hooks that multiply each layer's pattern by a ones tensor recorded in ``capture``."""

    def make(layer: int):
        def hook(pattern: Float[Tensor, "batch head q k"], hook) -> Tensor:
            if not torch.is_grad_enabled():
                raise RuntimeError(
                    "Saliency hooks need gradients, but this forward pass runs under "
                    "torch.no_grad() or torch.inference_mode(): run it inside "
                    "torch.enable_grad() (the analysis functions do this for you)."
                )
            ones = torch.ones_like(pattern, requires_grad=True)
            capture.placeholders[layer] = ones
            return pattern * ones

        return hook

    return [(pattern_hook_name(layer), make(layer)) for layer in capture.layers]


def positions_mask(
    rows: Int[Tensor, "batch n"], n_pos: int, device: torch.device | str | None = None
) -> Bool[Tensor, "batch pos"]:
    """Boolean ``[batch, pos]`` mask of the positions ``rows``; entries ``-1`` mean "none".

    The convention every hook and metric here shares for ragged position lists.
    """
    device = rows.device if device is None else device
    rows = rows.to(device)
    mask = torch.zeros(rows.shape[0], n_pos + 1, dtype=torch.bool, device=device)
    # -1 goes to an extra last column that is dropped, so ragged rows need no loop.
    return mask.scatter(1, torch.where(rows >= 0, rows, n_pos), True)[:, :n_pos]


def block_attention_hooks(
    layers: Iterable[int],
    query_positions: Int[Tensor, "batch n"] | Callable[[int], Int[Tensor, "batch n"]],
) -> list[HookPair]:
    """Isolate ``query_positions``: they may not attend to any earlier position (§2.2).

    In each chosen layer the pre-softmax score from every listed query position ``i`` to every
    key ``j < i`` is set to the dtype's minimum, so the position only attends to itself. The
    diagonal is kept, so no row is ever fully masked (a fully masked row gives NaN).

    Args:
        layers: Layers to edit.
        query_positions: ``[batch, n]`` positions to isolate (``-1`` = none); the paper uses
            ``batch.label_positions``. A callable ``layer -> positions`` gives each layer its
            own set (the random baseline redraws per layer).
    """

    def make(layer: int):
        def hook(scores: Float[Tensor, "batch head q k"], hook) -> Tensor:
            _full_prompt_only(scores, "block_attention_hooks")
            rows = query_positions(layer) if callable(query_positions) else query_positions
            n_q, n_k = scores.shape[-2:]
            isolated = positions_mask(rows, n_q, scores.device)  # [batch, q]
            earlier = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(-1)
            blocked = isolated[:, :, None] & earlier  # [batch, q, k]
            return scores.masked_fill(blocked[:, None], torch.finfo(scores.dtype).min)

        return hook

    return [(scores_hook_name(layer), make(layer)) for layer in layers]


def scale_attention_hooks(
    scales: dict[int, Float[Tensor, "head n"] | Float[Tensor, " n"] | float],
    query_positions: Int[Tensor, " batch"],
    key_positions: Int[Tensor, "batch n"],
) -> list[HookPair]:
    """Multiply post-softmax attention ``A(q, k_i)`` by ``scales[layer][head, i]`` (no renorm).

    The generic attention edit behind anchor re-weighting (§3.1, Eq. 9:
    ``Â(q, p_i) = exp(β_i) A(q, p_i)``). Differentiable in ``scales``, so trainable
    parameters can be passed directly; other entries of the pattern are untouched.

    Args:
        scales: Per layer, a ``[head, n]`` tensor, an ``[n]`` tensor (all heads) or a scalar.
        query_positions: The query row edited in each example (usually the target ``q``).
        key_positions: ``[batch, n]`` key columns scaled in that row (e.g. label positions).
    """

    def make(layer: int):
        scale = scales[layer]

        def hook(pattern: Float[Tensor, "batch head q k"], hook) -> Tensor:
            _full_prompt_only(pattern, "scale_attention_hooks")
            b, h, _, n_k = pattern.shape
            n = key_positions.shape[1]
            s = torch.as_tensor(scale, dtype=pattern.dtype, device=pattern.device)
            expected = {0: (), 1: (n,), 2: (h, n)}
            if tuple(s.shape) != expected.get(s.dim()):
                raise ValueError(
                    f"scale_attention_hooks: layer {layer}'s scales have shape "
                    f"{tuple(s.shape)}, but the model has {h} heads and {n} key positions "
                    f"were given: pass a scalar, a [{n}] tensor (all heads) or a [{h}, {n}] "
                    "tensor."
                )
            s = s.expand(h, n) if s.dim() < 2 else s
            # -1 ("no position") scatters into an extra last column that is dropped.
            factor = pattern.new_ones(b, h, n_k + 1)
            keys = key_positions.to(pattern.device)
            cols = torch.where(keys >= 0, keys, n_k)[:, None, :].expand(b, h, -1)
            factor = factor.scatter(2, cols, s[None].expand(b, -1, -1))[..., :n_k]
            rows = torch.arange(b, device=pattern.device)
            q = query_positions.to(pattern.device)
            edited = pattern[rows, :, q] * factor  # [batch, head, k]
            return _put_rows(pattern, q, edited)

        return hook

    return [(pattern_hook_name(layer), make(layer)) for layer in scales]


def _put_rows(
    pattern: Float[Tensor, "batch head q k"],
    q: Int[Tensor, " batch"],
    rows: Float[Tensor, "batch head k"],
) -> Tensor:
    """``pattern`` with row ``q[b]`` of every head replaced by ``rows[b]`` (out of place)."""
    select = torch.zeros(
        pattern.shape[0], pattern.shape[2], 1, dtype=torch.bool, device=pattern.device
    )
    select[torch.arange(pattern.shape[0]), q] = True
    return torch.where(select[:, None], rows[:, :, None, :], pattern)


@dataclass
class PatternCapture:
    """Patterns captured by [`capture_pattern_hooks`][anchor_lens.hooks.capture_pattern_hooks],
    keyed by layer."""

    layers: tuple[int, ...]
    query_positions: Tensor | None = None
    patterns: dict[int, Tensor] = field(default_factory=dict)

    @property
    def hooks(self) -> list[HookPair]:
        return capture_pattern_hooks(self)

    def stacked(self) -> Tensor:
        return torch.stack([self.patterns[layer] for layer in self.layers])


def capture_pattern_hooks(capture: PatternCapture) -> list[HookPair]:
    """Store each layer's pattern (detached); only rows ``query_positions`` if given.

    With ``query_positions`` ``[batch]`` the stored tensor is ``[batch, head, k]`` — the
    target row ``A(q, ·)`` that the deep-layer analysis needs, without keeping ``q × k``.
    """

    def make(layer: int):
        def hook(pattern: Float[Tensor, "batch head q k"], hook) -> None:
            if capture.query_positions is not None:
                _full_prompt_only(pattern, "capture_pattern_hooks(query_positions=...)")
            if capture.query_positions is None:
                capture.patterns[layer] = pattern.detach()
            else:
                rows = torch.arange(pattern.shape[0], device=pattern.device)
                q = capture.query_positions.to(pattern.device)
                capture.patterns[layer] = pattern[rows, :, q].detach()

        return hook

    return [(pattern_hook_name(layer), make(layer)) for layer in capture.layers]


def all_layers(model) -> tuple[int, ...]:
    """Every layer index of ``model`` (read from ``model.cfg``)."""
    return tuple(range(model.cfg.n_layers))


def resolve_layers(model, layers: Sequence[int] | None) -> tuple[int, ...]:
    """``layers`` checked against ``model.cfg.n_layers`` (negative indices allowed)."""
    n = model.cfg.n_layers
    if layers is None:
        return all_layers(model)
    out = []
    for layer in layers:
        if not -n <= layer < n:
            raise IndexError(f"Layer {layer} does not exist: the model has {n} layers.")
        out.append(layer % n)
    return tuple(out)
