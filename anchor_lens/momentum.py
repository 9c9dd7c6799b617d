"""Momentum attention (Dai et al., Findings of ACL 2023, §6) as composable hooks.

Dai et al. read attention to earlier tokens as a meta-optimiser's update and propose, by
analogy with momentum in gradient descent, to add an exponential moving average of the earlier
value vectors to every attention output:

    MoAttn(V, K, q_t) = Attn(V, K, q_t) + Σ_{i=1}^{t−1} η^{t−i} v_i,      0 < η < 1.

The paper **trains** a 350M GPT with it from scratch (perplexity 17.61 → 17.55; ICL accuracy
51.9 → 54.7); η and the layers are not public, nor is code. Applying it at inference time to a
pre-trained model, as [`momentum_attention_hooks`][anchor_lens.momentum.momentum_attention_hooks]
does, is anchor-lens' extension: the model never learned to use the extra term, so expect it to
cost accuracy rather than add it (``docs/results-dual-form.md`` has the numbers).

The sum is computed with the O(n) recurrence ``m_1 = 0``, ``m_t = η (m_{t−1} + v_{t−1})`` (no
``n × n`` matrix), per head, on ``hook_v`` (captured) and ``hook_z`` (the per-head attention
output before the output projection, edited). Under grouped-query attention each query head
gets the value vectors of its shared kv head (``repeat_interleave``, Hugging Face's
``repeat_kv``). The sum runs over earlier positions only, so right padding cannot reach a real
token; for left padding pass the batch's ``attention_mask`` so that padded value vectors are
zeroed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from .hooks import HookPair
from .tasks import Example, Task

__all__ = ["layer_sets", "momentum_accuracy", "momentum_attention_hooks", "momentum_term"]


def momentum_term(
    v: Float[Tensor, "batch pos head d_head"], eta: float
) -> Float[Tensor, "batch pos head d_head"]:
    """``m_t = Σ_{i<t} η^{t−i} v_i`` for every position ``t``, by ``m_t = η (m_{t−1} + v_{t−1})``.

    One pass over the positions (O(n) time, O(1) extra memory per step); ``m_0 = 0``.
    """
    out = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])
    for t in range(1, v.shape[1]):
        running = eta * (running + v[:, t - 1])
        out[:, t] = running
    return out


def momentum_attention_hooks(
    layers: Iterable[int],
    eta: float,
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> list[HookPair]:
    """Hooks that turn attention into MoAttn in ``layers``: ``z_t += Σ_{i<t} η^{t−i} v_i``.

    Two hooks per layer: one keeps the layer's value vectors (``hook_v``, unchanged), the other
    adds the momentum term to ``hook_z`` (per-head attention output, before the output
    projection). ``eta = 0`` leaves the model unchanged.

    Args:
        layers: Layers to edit.
        eta: The decay ``η`` (the paper: ``0 < η < 1``).
        attention_mask: ``[batch, pos]`` (1 = real token) to zero padded value vectors; needed
            with left padding only (a real token has no padded position before it otherwise).
    """
    if not 0 <= eta < 1:
        raise ValueError(f"eta must be in [0, 1) (the paper: 0 < η < 1), got {eta}.")
    stored: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(v: Float[Tensor, "batch pos kv_head d_head"], hook) -> None:
            stored[layer] = v

        return hook

    def add(layer: int):
        def hook(z: Float[Tensor, "batch pos head d_head"], hook) -> Tensor:
            v = stored.pop(layer)
            if v.shape[1] != z.shape[1]:
                raise ValueError(
                    "momentum_attention_hooks got fewer value positions than attention rows: "
                    "the model ran with a KV cache; run the whole prompt in one forward pass."
                )
            if attention_mask is not None:
                v = v * attention_mask.to(v.device, v.dtype)[:, :, None, None]
            v = v.repeat_interleave(z.shape[2] // v.shape[2], dim=2)  # GQA: repeat kv heads
            return z + momentum_term(v, eta).to(z.dtype)

        return hook

    pairs: list[HookPair] = []
    for layer in layers:
        pairs.append((get_act_name("v", layer), keep(layer)))
        pairs.append((get_act_name("z", layer), add(layer)))
    return pairs


def layer_sets(n_layers: int) -> dict[str, tuple[int, ...]]:
    """The layer choices measured by default: every layer, the first third, the last third."""
    third = max(1, n_layers // 3)
    return {
        "all": tuple(range(n_layers)),
        "shallow": tuple(range(third)),
        "deep": tuple(range(n_layers - third, n_layers)),
    }


def momentum_accuracy(
    model,
    task: Task,
    demonstrations: Sequence[Example],
    queries: Sequence[Example],
    etas: Sequence[float],
    layers: dict[str, Sequence[int]] | None = None,
    *,
    batch_size: int = 8,
) -> list[dict]:
    """ICL accuracy with MoAttn added at inference time, for every ``η`` × layer choice.

    Returns ``{"eta", "layers", "accuracy", "predicted_counts"}`` rows, the first with
    ``η = 0`` (plain ICL, the reference). ``layers`` maps a name to layer indices (default
    [`layer_sets`][anchor_lens.momentum.layer_sets]).
    """
    from .icl import evaluate

    layers = layers if layers is not None else layer_sets(model.cfg.n_layers)
    common = dict(batch_size=batch_size, progress=False)
    plain = evaluate(model, task, queries, demonstrations, **common)
    rows = [{"eta": 0.0, "layers": "none", "accuracy": plain.accuracy,
             "predicted_counts": plain.predicted_counts}]  # fmt: skip
    for eta in etas:
        for name, chosen in layers.items():

            def hooks(batch, chosen=chosen, eta=eta):
                mask = batch.attention_mask
                return momentum_attention_hooks(chosen, eta, attention_mask=mask)

            result = evaluate(model, task, queries, demonstrations, intervention=hooks, **common)
            rows.append(
                {
                    "eta": float(eta),
                    "layers": name,
                    "accuracy": result.accuracy,
                    "predicted_counts": result.predicted_counts,
                }
            )
    return rows
