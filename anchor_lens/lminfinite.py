"""LM-Infinite: Λ-shaped attention with a RoPE distance limit (Han et al., 2023).

A model trained on sequences of length ``L`` (its *pre-training length*) fails on longer inputs
for two reasons the paper isolates: it has never seen relative distances beyond ``L``, and it
has never attended over more than ``L`` tokens. LM-Infinite fixes both without training. For a
query at position ``i`` and a key at position ``j ≤ i`` (distance ``d = i - j``):

* **local branch** — ``d < n_local``: the ordinary rotary logit
  ``s_ij = (R_i q_i)ᵀ (R_j k_j) · scale``;
* **global branch** — ``j < n_global`` and ``d ≥ n_local``: the key is left *unrotated* and the
  query is rotated to ``min(i, L)``, ``s_ij = (R_{min(i, L)} q_i)ᵀ k_j · scale``, so no global
  token ever looks further than ``L`` away (the distance limit);
* everything else is masked.

Both branches share one softmax (the paper's Λ-shaped mask, Fig. 1 / §4.1). ``n_local = L`` and
``n_global`` between 10 and 100 are the paper's settings; with ``n_global = 0`` this is plain
windowed attention, which the paper shows fails.

Two implementations, numerically equal on inputs both can run:

* [`lambda_attention_hooks`][anchor_lens.lminfinite.lambda_attention_hooks] — composable
  TransformerLens hooks on ``hook_rot_q``,
  ``hook_rot_k`` and ``hook_attn_scores``, for analysis: patterns and saliency stay visible;
  cost O(n²) like any hooked forward.
* [`forward_hidden`][anchor_lens.lminfinite.forward_hidden] with ``attention=LambdaAttention(...)``
  — a blocked attention function
  registered through transformers' ``AttentionInterface``: queries are processed in blocks that
  read only the global keys and their own band, so time and memory are O(n · n_local) and the
  ``n × n`` score matrix never exists.

Positions are token indices (``0 … n-1``): pad batches on the **right**; causal attention never
lets a real token see right padding. ``forward_hidden`` refuses an ``attention_mask`` with
padding anywhere else. Neither path implements attention-logit soft-capping (Gemma 2): both
refuse such models.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int, Real, Shaped
from torch import Tensor

from .hooks import HookPair, resolve_layers, scores_hook_name
from .models import hf_model, plain_hf_model

__all__ = [
    "LAMBDA_ATTENTION",
    "LambdaAttention",
    "RotaryNotFoundError",
    "forward_hidden",
    "lambda_attention_forward",
    "lambda_attention_hooks",
    "lambda_scores",
    "pretrain_length",
    "rope_inv_freq",
    "rotate",
    "unembed",
]

#: Name under which the blocked Λ attention is registered in transformers' ``AttentionInterface``.
LAMBDA_ATTENTION = "anchor_lens_lambda"


class RotaryNotFoundError(ValueError):
    """The model has no rotary embedding, so LM-Infinite's distance limit does not apply."""


@dataclass(frozen=True)
class LambdaAttention:
    """Λ-shaped attention: ``n_global`` starting tokens + the ``n_local`` most recent ones.

    Args:
        n_global: starting tokens every query may attend to (the paper: 10–100 work alike).
        n_local: width of the recent band, the query itself included (the paper: ``L``).
        max_distance: ``L``, the distance limit for the global branch. ``None`` keeps ordinary
            rotary logits everywhere (a plain Λ mask, also right for non-rotary models).
        block_size: queries per block in the efficient path (memory ∝ ``block_size ·
            (n_global + n_local + block_size)`` per head).
    """

    n_global: int = 10
    n_local: int = 4096
    max_distance: int | None = None
    block_size: int = 512

    def __post_init__(self) -> None:
        if self.n_global < 0:
            raise ValueError(f"n_global must be ≥ 0, got {self.n_global}.")
        if self.n_local < 1:
            raise ValueError(f"n_local must be ≥ 1 (a token sees itself), got {self.n_local}.")
        if self.max_distance is not None and self.max_distance < 1:
            raise ValueError(f"max_distance must be ≥ 1 or None, got {self.max_distance}.")
        if self.block_size < 1:
            raise ValueError(f"block_size must be ≥ 1, got {self.block_size}.")

    @classmethod
    def for_model(cls, model: torch.nn.Module, n_global: int = 10, **kwargs) -> LambdaAttention:
        """The paper's setting: ``n_local = max_distance = L`` (the model's pre-training length)."""
        length = pretrain_length(model)
        return cls(n_global=n_global, n_local=length, max_distance=length, **kwargs)

    @classmethod
    def window(cls, n_local: int, **kwargs) -> LambdaAttention:
        """Plain sliding-window attention (no global tokens), the paper's failing baseline."""
        return cls(n_global=0, n_local=n_local, max_distance=None, **kwargs)


# --------------------------------------------------------------------------------------------
# Rotary helpers


def _text_config(model):
    config = hf_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def pretrain_length(model) -> int:
    """``L``: the model's ``max_position_embeddings`` (``cfg.n_ctx`` for other models)."""
    length = getattr(_text_config(model), "max_position_embeddings", None)
    if length is None:
        length = model.cfg.n_ctx
    return int(length)


def _layer_type(model: torch.nn.Module, layer: int) -> str | None:
    types = getattr(_text_config(model), "layer_types", None)
    return types[layer] if types else None


def rope_inv_freq(model: torch.nn.Module, layer: int) -> Float[Tensor, " half_rotary_dim"]:
    """Inverse frequencies ``θ`` of layer ``layer``'s rotary embedding (``angle = pos · θ``).

    Read from the model's rotary module, so scaled variants (Llama 3, YaRN, …) and per-layer
    bases (Gemma 3's sliding vs global layers) come out right.
    """
    layer_type = _layer_type(model, layer)
    for module in hf_model(model).modules():
        if layer_type is not None and hasattr(module, f"{layer_type}_inv_freq"):
            return getattr(module, f"{layer_type}_inv_freq")
        if isinstance(getattr(module, "inv_freq", None), Tensor):
            return module.inv_freq
    raise RotaryNotFoundError(
        f"{type(hf_model(model)).__name__} has no rotary embedding, so LM-Infinite's distance "
        "limit does not apply; use LambdaAttention(max_distance=None) for a plain Λ mask."
    )


def rotate(
    x: Float[Tensor, "*batch pos d"], shift: Real[Tensor, " pos"], inv_freq: Float[Tensor, " r"]
) -> Float[Tensor, "*batch pos d"]:
    """``R(shift) x``: rotate by ``shift`` positions in Hugging Face's ``rotate_half`` layout.

    Rotations compose (``R(a) R(b) = R(a + b)``), so an already-rotated vector at position ``i``
    is moved to position ``m`` with ``shift = m - i`` and unrotated with ``shift = -i``. Only the
    first ``2·len(inv_freq)`` dimensions rotate (partial rotary, as in GPT-NeoX).
    """
    rot = 2 * inv_freq.shape[-1]
    angles = shift.to(torch.float32)[:, None] * inv_freq.to(x.device, torch.float32)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)
    head, tail = x[..., :rot].to(torch.float32), x[..., rot:]
    first, second = head.chunk(2, dim=-1)
    turned = head * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([turned.to(x.dtype), tail], dim=-1)


def _refuse_softcapping(model: torch.nn.Module) -> None:
    """Raise if the model soft-caps attention logits (Gemma 2's ``attn_logit_softcapping``).

    Neither path implements it: the blocked path runs uncapped fused SDPA, and the hooks would
    mix capped band logits with uncapped global-branch logits.
    """
    hf = hf_model(model)
    caps = [getattr(_text_config(model), "attn_logit_softcapping", None)]
    caps += [getattr(module, "attn_logit_softcapping", None) for module in hf.modules()]
    cap = next((c for c in caps if c is not None), None)
    if cap is not None:
        raise NotImplementedError(_softcapping_message(f"{type(hf).__name__} ", cap))


def _softcapping_message(name: str, cap) -> str:
    return (
        f"LM-Infinite attention does not support logit soft-capping: {name}soft-caps its "
        f"attention logits (attn_logit_softcapping={cap}, as Gemma 2 does), and neither "
        "lambda_attention_hooks nor forward_hidden implements that. Use a model without "
        "attention soft-capping."
    )


def _refuse_left_padding(
    attention_mask: Shaped[Tensor, "batch pos"] | None, input_ids: Int[Tensor, "batch pos"]
) -> None:
    """Raise unless every row of ``attention_mask`` is real tokens followed by padding."""
    if attention_mask is None:
        return
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; it must match input_ids, "
            f"{tuple(input_ids.shape)} (1 for real tokens, 0 for padding)."
        )
    real = attention_mask.to(torch.bool)
    gaps = (~real[:, :-1] & real[:, 1:]).any(dim=1)  # padding followed by a real token
    if bool(gaps.any()):
        rows = gaps.nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask has padding before real tokens in row(s) {rows} (left padding or "
            "gaps). forward_hidden uses token indices as positions, so only right padding is "
            "correct: pad on the right (tokenizer.padding_side = 'right') or run the prompts "
            "one at a time."
        )


def _attention_module(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    for module in hf_model(model).modules():
        if getattr(module, "layer_idx", None) == layer and hasattr(module, "scaling"):
            return module
    raise ValueError(
        f"Could not find the attention module of layer {layer} in "
        f"{type(hf_model(model)).__name__} (looked for `layer_idx` and `scaling`)."
    )


# --------------------------------------------------------------------------------------------
# The Λ mask on materialised scores (hook version)


def lambda_scores(
    scores: Float[Tensor, "batch head q k"],
    q_rot: Float[Tensor, "batch head q d"] | None,
    k_rot: Float[Tensor, "batch head k d"] | None,
    attention: LambdaAttention,
    *,
    inv_freq: Float[Tensor, " r"] | None = None,
    scaling: float | None = None,
    q_positions: Int[Tensor, " q"],
    k_positions: Int[Tensor, " k"],
) -> Float[Tensor, "batch head q k"]:
    """Apply the Λ mask (and the distance limit) to a full score matrix.

    Entries outside both branches become ``finfo.min``; the diagonal is always in the local
    band, so no row is ever fully masked. With ``attention.max_distance`` set, global-branch
    entries are recomputed from rotated ``q``/``k`` as ``(R_{min(i,L)-i} q_rot_i)ᵀ
    (R_{-j} k_rot_j) · scaling`` (§4.1 of the paper).
    """
    distance = q_positions[:, None] - k_positions[None, :]
    local = (distance >= 0) & (distance < attention.n_local)
    is_global = (k_positions < attention.n_global)[None, :] & (distance >= attention.n_local)
    keep = local | is_global
    n_g = int((k_positions < attention.n_global).sum())
    if attention.max_distance is not None and bool(is_global.any()):
        if q_rot is None or k_rot is None or inv_freq is None or scaling is None:
            raise ValueError("The distance limit needs q_rot, k_rot, inv_freq and scaling.")
        limited = q_positions.clamp(max=attention.max_distance) - q_positions
        q_far = rotate(q_rot, limited, inv_freq)
        k_flat = rotate(k_rot[..., :n_g, :], -k_positions[:n_g], inv_freq)
        far = torch.einsum("bhqd,bhkd->bhqk", q_far, k_flat) * scaling
        head = torch.where(is_global[:, :n_g], far.to(scores.dtype), scores[..., :n_g])
        scores = torch.cat([head, scores[..., n_g:]], dim=-1)
    return scores.masked_fill(~keep, torch.finfo(scores.dtype).min)


def _full_attention_layers(model) -> tuple[int, ...]:
    types = getattr(_text_config(model), "layer_types", None)
    layers = range(model.cfg.n_layers)
    if not types:
        return tuple(layers)
    return tuple(layer for layer in layers if "sliding" not in types[layer])


def lambda_attention_hooks(
    model: torch.nn.Module, attention: LambdaAttention, layers: Sequence[int] | None = None
) -> list[HookPair]:
    """Hooks that turn a TransformerBridge's attention into LM-Infinite's Λ attention.

    Per layer: ``hook_rot_q`` and ``hook_rot_k`` keep the rotated queries and keys of the
    current forward (only when ``max_distance`` is set), and ``hook_attn_scores`` applies
    [`lambda_scores`][anchor_lens.lminfinite.lambda_scores] before the model's own softmax.
    Everything else — patterns,
    saliency, other hooks — works as usual, so these compose with the rest of the library.

    Args:
        model: a ``TransformerBridge`` of a rotary model (any model if ``max_distance=None``).
        attention: the Λ configuration.
        layers: layers to change; default all layers with full attention (Gemma 3's
            sliding-window layers are already local and are left alone).

    Raises:
        NotImplementedError: the model soft-caps attention logits (``attn_logit_softcapping``,
            Gemma 2), which LM-Infinite attention does not implement (nor does
            [`forward_hidden`][anchor_lens.lminfinite.forward_hidden]).
    """
    _refuse_softcapping(model)
    layers = resolve_layers(model, layers) if layers is not None else _full_attention_layers(model)
    hooks: list[HookPair] = []
    for layer in layers:
        hooks += _layer_hooks(model, attention, layer)
    return hooks


def _layer_hooks(model: torch.nn.Module, attention: LambdaAttention, layer: int) -> list[HookPair]:
    limit = attention.max_distance is not None
    inv_freq = rope_inv_freq(model, layer) if limit else None
    scaling = float(_attention_module(model, layer).scaling) if limit else None
    seen: dict[str, Tensor] = {}

    def keep(name: str):
        def fn(tensor: Float[Tensor, "batch pos head d"], hook) -> None:
            seen[name] = tensor.transpose(1, 2)

        return fn

    def edit(scores: Float[Tensor, "batch head q k"], hook) -> Tensor:
        n_q, n_k = scores.shape[-2:]
        k_positions = torch.arange(n_k, device=scores.device)
        q_rot = k_rot = None
        if limit:
            q_rot, k_rot = seen.pop("q"), seen.pop("k")
            if k_rot.shape[2] != n_k:
                raise ValueError(
                    "lambda_attention_hooks need the keys of every position: run the model "
                    "on the whole sequence, without past_key_values."
                )
            k_rot = k_rot.repeat_interleave(q_rot.shape[1] // k_rot.shape[1], dim=1)
        return lambda_scores(
            scores,
            q_rot,
            k_rot,
            attention,
            inv_freq=inv_freq,
            scaling=scaling,
            q_positions=k_positions[n_k - n_q :],
            k_positions=k_positions,
        )

    prefix = f"blocks.{layer}.attn"
    captures = [(f"{prefix}.hook_rot_q", keep("q")), (f"{prefix}.hook_rot_k", keep("k"))]
    return [*(captures if limit else []), (scores_hook_name(layer), edit)]


# --------------------------------------------------------------------------------------------
# The efficient path: blocked Λ attention through transformers' AttentionInterface


@dataclass(frozen=True)
class _Runtime:
    """What the attention function needs besides q, k, v: passed as a forward kwarg."""

    attention: LambdaAttention
    inv_freq: dict[int, Tensor]


def lambda_attention_forward(
    module: Any,
    query: Float[Tensor, "batch head q d"],
    key: Float[Tensor, "batch kv_head k d"],
    value: Float[Tensor, "batch kv_head k d"],
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    lm_infinite: _Runtime | None = None,
    position_ids: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Float[Tensor, "batch q head d"], None]:
    """Blocked Λ attention with the distance limit, in O(n · (n_global + n_local)).

    A transformers attention function (same signature as ``eager_attention_forward``;
    ``module`` is the calling attention module, anything with ``layer_idx`` and ``scaling``). Query
    block ``[s, e)`` reads only the global keys ``[0, n_global)`` and the band
    ``[s - n_local + 1, e)``, masked as in [`lambda_scores`][anchor_lens.lminfinite.lambda_scores],
    in one fused
    ``scaled_dot_product_attention`` call (one softmax over both branches; grouped-query
    attention without copying keys). Memory per block is ``O(block_size · (n_global + n_local
    + block_size))``; nothing of size ``n × n`` is built. Sliding-window layers
    (``module.sliding_window``, Gemma 3) keep their own window with no global tokens, as the
    model does.
    """
    if lm_infinite is None:
        raise ValueError(
            f"The '{LAMBDA_ATTENTION}' attention needs its configuration: run the model through "
            "anchor_lens.lminfinite.forward_hidden(model, ids, attention=LambdaAttention(...))."
        )
    cap = getattr(module, "attn_logit_softcapping", None)
    cap = kwargs.get("softcap") if cap is None else cap
    if cap is not None:
        raise NotImplementedError(_softcapping_message(f"{type(module).__name__} ", cap))
    batch, n_heads, n_q, d_head = query.shape
    n_kv, n_k = key.shape[1], key.shape[2]
    offset = n_k - n_q  # cached keys before this call's queries
    if position_ids is not None:
        expected = torch.arange(offset, n_k, device=position_ids.device)
        if not bool((position_ids == expected).all()):
            raise ValueError(
                "LM-Infinite attention takes token indices as positions: pad on the right and "
                "do not pass custom position_ids."
            )
    config = lm_infinite.attention
    window = getattr(module, "sliding_window", None)
    if window:
        config = LambdaAttention.window(int(window), block_size=config.block_size)
    inv_freq = lm_infinite.inv_freq.get(module.layer_idx)
    scaling = module.scaling if scaling is None else scaling

    # Global keys matter only once some query is n_local or more past them.
    n_g = min(config.n_global, n_k) if n_k - 1 >= config.n_local else 0
    positions = torch.arange(offset, n_k, device=query.device)
    if config.max_distance is not None and n_g:
        # The global branch needs its own dot product. Stacking both branches along the head
        # dimension, [q | q_far] · [k | 0] (local) and [q | q_far] · [0 | k_flat] (global),
        # keeps one fused SDPA call per block; v is zero-padded to the same width and cut after.
        q_far = rotate(query, positions.clamp(max=config.max_distance) - positions, inv_freq)
        k_flat = rotate(key[:, :, :n_g], -torch.arange(n_g, device=key.device), inv_freq)
        query = torch.cat([query, q_far], dim=-1)
        k_global = torch.cat([torch.zeros_like(k_flat), k_flat], dim=-1)
        key = torch.cat([key, torch.zeros_like(key)], dim=-1)
        value = torch.nn.functional.pad(value, (0, d_head))
    else:
        k_global = key[:, :, :n_g]
    v_global = value[:, :, :n_g]
    out = torch.empty(batch, n_heads, n_q, d_head, dtype=query.dtype, device=query.device)
    for start in range(0, n_q, config.block_size):
        stop = min(n_q, start + config.block_size)
        pos = positions[start:stop]
        lo = max(0, offset + start - config.n_local + 1)
        distance = pos[:, None] - torch.arange(lo, offset + stop, device=query.device)[None, :]
        mask = (distance >= 0) & (distance < config.n_local)
        k_band, v_band = key[:, :, lo : offset + stop], value[:, :, lo : offset + stop]
        far = pos[:, None] - torch.arange(n_g, device=query.device)[None, :] >= config.n_local
        if n_g and bool(far.any()):
            k_band = torch.cat([k_global, k_band], dim=2)
            v_band = torch.cat([v_global, v_band], dim=2)
            mask = torch.cat([far, mask], dim=-1)
        out[:, :, start:stop] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:stop],
            k_band,
            v_band,
            attn_mask=mask,
            scale=scaling,
            enable_gqa=n_heads != n_kv,
        )[..., :d_head]
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    if LAMBDA_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(LAMBDA_ATTENTION, lambda_attention_forward)


@contextmanager
def _attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Switch a Hugging Face model's attention function for the duration of a call."""
    config = model.config
    previous = config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def forward_hidden(
    model: torch.nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention: LambdaAttention | None = None,
    *,
    attention_mask: Shaped[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """Final hidden states (after the last norm) of a long input, without hooks.

    ``attention=None`` is ordinary full attention through PyTorch's fused SDPA kernel;
    a [`LambdaAttention`][anchor_lens.lminfinite.LambdaAttention] runs the blocked O(n · n_local)
    path. ``model`` is a Hugging
    Face model; a ``TransformerBridge`` works too but pays for
    [`plain_hf_model`][anchor_lens.models.plain_hf_model] on every call, so convert it once for
    repeated
    calls. Unembed with [`unembed`][anchor_lens.lminfinite.unembed] chunk by chunk: full logits of
    a long input are large.

    Positions are token indices, so a padded batch must be padded on the **right** (causal
    attention keeps real tokens from seeing it; hidden states at padded positions are
    meaningless). ``attention_mask`` (1 real, 0 padding) is only checked, never applied:
    padding anywhere but on the right raises before anything is computed.

    Raises:
        ValueError: ``attention_mask`` has padding before a real token (left padding or gaps),
            or a shape other than ``input_ids``'s.
        NotImplementedError: ``attention`` is given and the model soft-caps attention logits.
    """
    _refuse_left_padding(attention_mask, input_ids)
    if attention is not None:
        _refuse_softcapping(model)
    hf = plain_hf_model(model)
    body = hf.get_decoder() if hasattr(hf, "get_decoder") else hf.model
    kwargs: dict[str, Any] = {}
    name = "sdpa"
    if attention is not None:
        _register()
        name = LAMBDA_ATTENTION
        limit = attention.max_distance is not None
        inv_freq = {}
        if limit:
            n_layers = _text_config(model).num_hidden_layers
            inv_freq = {layer: rope_inv_freq(model, layer) for layer in range(n_layers)}
        kwargs["lm_infinite"] = _Runtime(attention, inv_freq)
    with _attention_implementation(hf, name), torch.no_grad():
        return body(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state


def unembed(
    model: torch.nn.Module, hidden: Float[Tensor, "batch pos d_model"]
) -> Float[Tensor, "batch pos vocab"]:
    """Logits from final hidden states (the model's LM head and any final soft-capping)."""
    hf = hf_model(model)
    logits = hf.get_output_embeddings()(hidden)
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits
