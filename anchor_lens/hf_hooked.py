"""Hooked attention for plain Hugging Face models whose TransformerLens bridge drops edits.

TransformerLens 4's bridges for GPT-J and OPT hand attention to Hugging Face: their
``hook_attn_scores`` carries the post-softmax pattern and edits to it or to ``hook_pattern`` are
silently discarded (see ``TL4_NOTES``). Both models' Hugging Face attention modules (as do
GPT-2's and Llama's) compute ``q``, ``k``, ``v`` themselves and then dispatch the attention
proper through transformers' ``AttentionInterface`` (``ALL_ATTENTION_FUNCTIONS``), so
anchor-lens registers its own attention function there and runs the model with it:

* [`hooked_attention_forward`][anchor_lens.hf_hooked.hooked_attention_forward] is eager
  attention (``scores = q kᵀ · scaling + mask``, softmax, ``· v``) that fires
  ``blocks.{l}.attn.hook_attn_scores`` (pre-softmax, scaled, causally and padding masked),
  ``hook_pattern`` (post-softmax) and ``hook_z`` (per-head output), and uses what they return;
* [`HFHookedModel`][anchor_lens.hf_hooked.HFHookedModel] wraps the Hugging Face causal LM and
  exposes what anchor-lens uses from a ``TransformerBridge``: ``cfg``, ``tokenizer``,
  ``run_with_hooks``, ``hooks``, ``add_hook``, ``hook_dict``, ``original_model``, a forward that
  takes ``input``/``attention_mask``/``position_ids``/``logits_to_keep``/``past_key_values``/
  ``return_type``. Hook names are TransformerLens' canonical ones, so every hook factory and
  analysis of the library runs unchanged.

The attention function is switched in for the duration of one call (the model's
``set_attn_implementation``) and switched back afterwards, so the wrapped model stays an
ordinary eager model for everything else. ``hook_q``/``hook_k``/``hook_v`` (before the rotary
embedding, ``[batch, pos, head, d_head]``, ``kv_head`` for keys and values under GQA) are forward
hooks on the module's ``q_proj``/``k_proj``/``v_proj`` (or GPT-2's fused ``c_attn``), attached
only while a hook on them is active.

Scores are computed in the query's dtype (in float32 for GPT-J and CodeGen, whose own eager
attention upcasts) and the softmax in float32, as Hugging Face's eager kernels do; with float32
weights the wrapped model's logits equal the Hugging Face eager forward to ~1e-6.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

__all__ = [
    "HOOKED_ATTENTION",
    "HFHookedConfig",
    "HFHookedModel",
    "hooked_attention_forward",
]

#: Name under which the hooked eager attention is registered in transformers'
#: ``AttentionInterface`` (and its eager mask in ``AttentionMaskInterface``).
HOOKED_ATTENTION = "anchor_lens_hooked"

#: Hook points of every layer, in the order they fire.
ATTENTION_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")
_PROJECTION_HOOKS = ("hook_q", "hook_k", "hook_v")

# The wrapper whose forward is running: the attention function finds its hook points here.
_ACTIVE: contextvars.ContextVar[HFHookedModel | None] = contextvars.ContextVar(
    "anchor_lens_hooked_model", default=None
)


# --------------------------------------------------------------------------------------------
# The attention function


def _upcasts_scores(module: nn.Module) -> bool:
    """GPT-J's (and CodeGen's) eager attention computes ``q kᵀ`` in float32."""
    return type(module).__module__.rsplit(".", 1)[-1] in ("modeling_gptj", "modeling_codegen")


def _expand_kv(x: Float[Tensor, "batch kv_head pos d"], n_heads: int) -> Tensor:
    """Repeat each key/value head for the query heads sharing it (Hugging Face's repeat_kv)."""
    n_kv = x.shape[1]
    if n_kv == n_heads:
        return x
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} key/value heads evenly.")
    b, _, pos, d = x.shape
    return x[:, :, None].expand(b, n_kv, n_heads // n_kv, pos, d).reshape(b, n_heads, pos, d)


def hooked_attention_forward(
    module: nn.Module,
    query: Float[Tensor, "batch head q d"],
    key: Float[Tensor, "batch kv_head k d"],
    value: Float[Tensor, "batch kv_head k d"],
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Float[Tensor, "batch q head d"], Float[Tensor, "batch head q k"]]:
    """Eager attention that fires the hooks of the running
    [`HFHookedModel`][anchor_lens.hf_hooked.HFHookedModel].

    A transformers attention function (the signature of ``eager_attention_forward``).
    ``hook_attn_scores`` gets ``q kᵀ · scaling + mask`` (masked entries near ``finfo.min``),
    ``hook_pattern`` the softmax, ``hook_z`` the per-head output ``[batch, q, head, d]``; a hook
    that returns a tensor replaces the value. Keys and values of grouped-query attention are
    expanded to the query heads first, so scores and patterns are ``[batch, head, q, k]``.
    Called outside a wrapper's forward it is plain eager attention.

    Raises:
        NotImplementedError: the module soft-caps its attention logits or has attention sinks
            (Gemma 2's ``softcap``, gpt-oss's ``s_aux``), which this function does not compute.
    """
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"{type(module).__name__} passes `{name}` to its attention function (logit "
                "soft-capping or attention sinks), which anchor-lens' hooked attention does not "
                "implement; load this model with backend='bridge'."
            )
    runner = _ACTIVE.get()
    hooks = runner._attention_hooks(module) if runner is not None else None
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    n_heads = query.shape[1]
    key = _expand_kv(key, n_heads)
    value = _expand_kv(value, n_heads)
    if _upcasts_scores(module):
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    else:
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:  # a boolean "may attend" mask
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    if hooks is not None:
        scores = hooks.hook_attn_scores(scores)
    pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    if hooks is not None:
        pattern = hooks.hook_pattern(pattern)
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    if hooks is not None:
        out = hooks.hook_z(out)
    return out, pattern


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if HOOKED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(HOOKED_ATTENTION, hooked_attention_forward)
    # Without a mask function of its own, transformers builds no mask at all for an unknown
    # attention implementation.
    if HOOKED_ATTENTION not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(HOOKED_ATTENTION, eager_mask)


# --------------------------------------------------------------------------------------------
# The wrapper


class _AttentionHooks(nn.Module):
    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        for name in names:
            setattr(self, name, HookPoint())


class _Block(nn.Module):
    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        self.attn = _AttentionHooks(names)


class HFHookedConfig:
    """The ``TransformerBridge`` config fields anchor-lens reads, for an
    [`HFHookedModel`][anchor_lens.hf_hooked.HFHookedModel].

    ``device`` and ``dtype`` follow the model's first parameter (so ``.to()`` keeps them right).
    """

    def __init__(self, model: HFHookedModel, hf: nn.Module, default_prepend_bos: bool):
        config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
        self._model = model
        self.architecture = (getattr(hf.config, "architectures", None) or [type(hf).__name__])[0]
        self.model_name = getattr(hf.config, "_name_or_path", None) or self.architecture
        self.n_layers = int(config.num_hidden_layers)
        self.n_heads = int(config.num_attention_heads)
        self.d_model = int(config.hidden_size)
        self.d_head = int(getattr(config, "head_dim", None) or self.d_model // self.n_heads)
        n_kv = getattr(config, "num_key_value_heads", None)
        self.n_key_value_heads = int(n_kv) if n_kv not in (None, self.n_heads) else None
        self.d_vocab = int(config.vocab_size)
        self.n_ctx = int(getattr(config, "max_position_embeddings", None) or 2048)
        rotary = any(
            getattr(config, attr, None) is not None
            for attr in ("rotary_dim", "rope_parameters", "rope_theta", "rope_scaling")
        )
        self.positional_embedding_type = "rotary" if rotary else "standard"
        self.default_prepend_bos = default_prepend_bos

    @property
    def device(self) -> str:
        return str(next(self._model.parameters()).device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self._model.parameters()).dtype

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        fields |= {"device": self.device, "dtype": self.dtype}
        return f"HFHookedConfig({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


def _decoder_layers(hf: nn.Module, n_layers: int) -> nn.ModuleList:
    for module in hf.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(
        f"Could not find the {n_layers} decoder layers of {type(hf).__name__} (no ModuleList of "
        "that length), so its attention modules cannot be mapped to layers."
    )


def _projections(block: nn.Module) -> dict[str, Any] | None:
    """How to reach q, k and v of one decoder layer: separate Linear layers or GPT-2's c_attn."""
    for module in block.modules():
        if all(isinstance(getattr(module, p, None), nn.Module) for p in ("q_proj", "k_proj")):
            if isinstance(getattr(module, "v_proj", None), nn.Module):
                return {"q": module.q_proj, "k": module.k_proj, "v": module.v_proj}
        if isinstance(getattr(module, "c_attn", None), nn.Module) and hasattr(module, "split_size"):
            if not getattr(module, "is_cross_attention", False):
                return {"qkv": module.c_attn, "split": int(module.split_size)}
    return None


class HFHookedModel(HookedRootModule):
    """A Hugging Face causal LM with TransformerLens-style attention hooks.

    Exposes what anchor-lens uses from a ``TransformerBridge`` (see the module docstring), so
    every hook factory and analysis runs on it unchanged. Build it with
    [`load_model`][anchor_lens.models.load_model]``(..., backend="hf")``, or directly:

    ```python
    model = HFHookedModel(AutoModelForCausalLM.from_pretrained(path), tokenizer)
    ```

    Hook points per layer ``l``: ``blocks.{l}.attn.hook_attn_scores``, ``hook_pattern``,
    ``hook_z`` and, where the attention has separate ``q_proj``/``k_proj``/``v_proj`` (GPT-J, OPT,
    Llama, ...) or GPT-2's fused ``c_attn``, ``hook_q``, ``hook_k``, ``hook_v``. Unknown names
    raise a ``KeyError`` listing the valid ones.

    Args:
        model: a Hugging Face causal LM whose attention dispatches through transformers'
            ``AttentionInterface`` (it is put in eval mode; its weights are not copied).
        tokenizer: its tokenizer.
        default_prepend_bos: ``cfg.default_prepend_bos``; ``None`` follows the tokenizer.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, default_prepend_bos: bool | None = None):
        super().__init__()
        from .prompts import tokenizer_adds_bos

        _register()
        self.original_model = model
        self.tokenizer = tokenizer
        if default_prepend_bos is None:
            default_prepend_bos = tokenizer is not None and tokenizer_adds_bos(tokenizer)
        self.cfg = HFHookedConfig(self, model, default_prepend_bos)
        layers = _decoder_layers(model, self.cfg.n_layers)
        self._projection_modules = [_projections(block) for block in layers]
        names = ATTENTION_HOOKS
        if any(p is None for p in self._projection_modules):
            names = tuple(n for n in names if n not in _PROJECTION_HOOKS)
        self.blocks = nn.ModuleList([_Block(names) for _ in range(self.cfg.n_layers)])
        # Every submodule of decoder layer l maps to l: the attention function receives the
        # attention module, whatever attribute name the architecture gives it.
        self._layer_of = {
            id(module): layer for layer, block in enumerate(layers) for module in block.modules()
        }
        forward = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        self._accepts_position_ids = "position_ids" in forward
        self.setup()
        self.eval()

    # ---- hook bookkeeping -----------------------------------------------------------------

    def setup(self) -> None:
        """Index the hook points only (``HookedRootModule.setup`` would also name and index
        every Hugging Face submodule)."""
        self.mod_dict = {}
        self.hook_dict = {}
        for name, module in self.blocks.named_modules(prefix="blocks"):
            if isinstance(module, HookPoint):
                module.name = name
                self.mod_dict[name] = module
                self.hook_dict[name] = module

    def _hook_point(self, name: str) -> HookPoint:
        point = self.hook_dict.get(name)
        if point is None:
            names = sorted({n.split(".", 2)[-1] for n in self.hook_dict})
            raise KeyError(
                f"{self.cfg.architecture} (anchor-lens' Hugging Face backend) has no hook point "
                f"{name!r}. Valid names are blocks.{{0..{self.cfg.n_layers - 1}}}."
                f"{{{', '.join(names)}}}."
            )
        return point

    def _enable_hook_with_name(self, name: str, hook: Callable, dir: Any) -> None:
        self._hook_point(name).add_hook(hook, dir=dir, level=self.context_level)

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False):
        if isinstance(name, str):
            self._hook_point(name)  # a KeyError naming the valid hook points
        return super().add_hook(name, hook, dir, is_permanent, level, prepend)

    def _attention_hooks(self, module: nn.Module) -> _AttentionHooks:
        layer = self._layer_of.get(id(module))
        if layer is None:
            layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise RuntimeError(
                f"anchor-lens' hooked attention was called by a {type(module).__name__} that is "
                "not in any decoder layer of the wrapped model."
            )
        return self.blocks[layer].attn

    @contextmanager
    def _projection_hooks(self) -> Iterator[None]:
        """Forward hooks on q/k/v projections, only for hook points that have hooks now."""
        handles = []
        for layer, modules in enumerate(self._projection_modules):
            if modules is None:
                continue
            points = {
                n[-1]: getattr(self.blocks[layer].attn, n)
                for n in _PROJECTION_HOOKS
                if getattr(self.blocks[layer].attn, n).has_hooks()
            }
            if not points:
                continue
            d_head = self.cfg.d_head
            if "qkv" in modules:
                split = modules["split"]

                def fused(mod, args, out, points=points, split=split, d_head=d_head):
                    parts = list(out.split(split, dim=-1))
                    for i, which in enumerate("qkv"):
                        if which in points:
                            shape = parts[i].shape
                            heads = parts[i].reshape(*shape[:-1], -1, d_head)
                            parts[i] = points[which](heads).reshape(shape)
                    return torch.cat(parts, dim=-1)

                handles.append(modules["qkv"].register_forward_hook(fused))
                continue
            for which, point in points.items():

                def separate(mod, args, out, point=point, d_head=d_head):
                    return point(out.reshape(*out.shape[:-1], -1, d_head)).reshape(out.shape)

                handles.append(modules[which].register_forward_hook(separate))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def _installed(self) -> Iterator[None]:
        """Run the Hugging Face model with the hooked attention function, then switch back."""
        hf = self.original_model
        previous = hf.config._attn_implementation
        with ExitStack() as stack:
            hf.set_attn_implementation(HOOKED_ATTENTION)
            stack.callback(hf.set_attn_implementation, previous)
            token = _ACTIVE.set(self)
            stack.callback(_ACTIVE.reset, token)
            stack.enter_context(self._projection_hooks())
            yield

    # ---- tokens ---------------------------------------------------------------------------

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> Tensor:
        """Token ids ``[batch, pos]`` of text (BOS per ``cfg.default_prepend_bos``), padded."""
        return self._encode(input, prepend_bos, padding_side)[0]

    def _encode(self, input, prepend_bos, padding_side) -> tuple[Tensor, Tensor]:
        texts = [input] if isinstance(input, str) else list(input)
        prepend = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        bos = self.tokenizer.bos_token_id
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if prepend and bos is not None:
            rows = [[bos, *row] for row in rows]
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        side = padding_side or getattr(self.tokenizer, "padding_side", "right")
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, row in enumerate(rows):
            cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[b, cols] = torch.tensor(row, dtype=torch.long)
            mask[b, cols] = 1
        device = self.cfg.device
        return ids.to(device), mask.to(device)

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 1:
            return self.tokenizer.decode(tokens.tolist())
        return [self.tokenizer.decode(row.tolist()) for row in tokens]

    # ---- forward --------------------------------------------------------------------------

    def forward(
        self,
        input: Tensor | str | list[str],
        return_type: str | None = "logits",
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        logits_to_keep: int | Tensor | None = None,
        past_key_values: Any = None,
        *,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        loss_per_token: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Logits ``[batch, pos, vocab]`` (or the kept columns), like ``TransformerBridge``.

        ``return_type``: ``"logits"``, ``"logits_and_cache"`` (``(logits, cache)``: the Hugging
        Face cache to pass back as ``past_key_values``), ``"loss"``, ``"both"`` (``(logits,
        loss)``) or ``None``. With an ``attention_mask`` and no ``position_ids``, rows with
        padding before real tokens get positions counted over real tokens (as the bridge
        does). Other keyword arguments go to the Hugging Face model.
        """
        if return_type not in ("logits", "logits_and_cache", "loss", "both", None):
            raise ValueError(
                f"return_type must be 'logits', 'logits_and_cache', 'loss', 'both' or None, "
                f"not {return_type!r}."
            )
        embeds = isinstance(input, Tensor) and input.is_floating_point()
        if isinstance(input, (str, list)):
            input, text_mask = self._encode(input, prepend_bos, padding_side)
            if attention_mask is None and not bool(text_mask.all()):
                attention_mask = text_mask
        elif isinstance(input, Tensor) and input.dim() == 1 and not embeds:
            input = input[None]
        if (
            attention_mask is not None
            and position_ids is None
            and not embeds
            and self._accepts_position_ids
            and attention_mask.dim() == 2
            and attention_mask.shape[1] >= input.shape[1]
        ):
            position_ids = _positions_from_mask(attention_mask, input.shape[1])
        call: dict[str, Any] = dict(kwargs)
        call["inputs_embeds" if embeds else "input_ids"] = input
        if attention_mask is not None:
            call["attention_mask"] = attention_mask
        if position_ids is not None:
            call["position_ids"] = position_ids
        if logits_to_keep is not None:
            call["logits_to_keep"] = logits_to_keep
        if past_key_values is not None:
            call[self._cache_kwarg] = past_key_values
            call["use_cache"] = True
        if return_type == "logits_and_cache":
            call["use_cache"] = True
        with self._installed():
            output = self.original_model(**call)
        logits = output.logits
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if return_type == "logits_and_cache":
            cache = getattr(output, "cache", None)
            if cache is None:
                cache = getattr(output, "past_key_values", None)
            return logits, cache
        if embeds:
            raise ValueError("return_type='loss' needs token ids, not embeddings.")
        from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

        loss = lm_cross_entropy_loss(logits, input, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def __repr__(self) -> str:
        return f"HFHookedModel({self.cfg.architecture}, {self.cfg.n_layers} layers)"


def _positions_from_mask(attention_mask: Tensor, n_new: int) -> Tensor | None:
    """Positions counted over real tokens for rows with padding before a real token (the
    bridge's rule); ``None`` when every row is unpadded or right-padded."""
    mask = attention_mask.long()
    derived = (mask.cumsum(-1) - 1).clamp(min=0)
    arange = torch.arange(mask.shape[1], device=mask.device)
    needs = ((derived != arange) & (mask != 0)).any(dim=1, keepdim=True)
    if not bool(needs.any()):
        return None
    positions = torch.where(needs, derived, arange.expand_as(derived))
    return positions[:, mask.shape[1] - n_new :]
