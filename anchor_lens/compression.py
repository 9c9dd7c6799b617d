"""Anchor-only context compression (Wang et al. 2023, §3.2, Tables 2 and 3).

If the label words carry the demonstrations' information, the model should not need the
rest of the demonstrations' hidden states. *Hidden_anchor* runs the demonstrations once,
keeps the KV cache only at the formatting tokens and the label words, and answers every query
on that small cache. Baselines:

* ``Text_anchor`` — the anchors as *text*: ``Review:\\nSentiment: Positive\\n…`` with the
  inputs removed, run as an ordinary prompt;
* ``Hidden_random`` — like Hidden_anchor, but each label word's hidden state is swapped for
  that of a random text token of its own demonstration;
* ``Hidden_random-top`` — the best (by label loyalty) of ``n_random`` such draws.

Queries continue at the positions they would have in the full prompt (position ids start at
the original context length), so rotary and absolute position embeddings see the same
distances as without compression.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from . import metrics
from .episodes import Pools, draw_episode, load_pools
from .icl import target_logits
from .prompts import ICLBatch, TokenRole, build_icl_batch
from .tasks import Example, Task, get_task

__all__ = [
    "CompressedContext",
    "CompressionResult",
    "anchor_keep_mask",
    "compress_context",
    "compressed_logits",
    "random_keep_mask",
    "run_compression",
    "split_prompt",
    "text_anchor_task",
]


@dataclass
class CompressedContext:
    """A demonstration prefix's KV cache restricted to the kept positions.

    Attributes:
        keys, values: One ``[1, kv_head, kept, d_head]`` tensor per layer.
        kept: Positions of the prefix that were kept.
        context_length: Length of the full prefix (queries continue from here).
    """

    keys: list[Tensor]
    values: list[Tensor]
    kept: Int[Tensor, " kept"]
    context_length: int

    def cache_for(self, batch_size: int):
        """A fresh ``DynamicCache`` holding this context for ``batch_size`` queries."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            cache.update(
                k.expand(batch_size, -1, -1, -1).contiguous(),
                v.expand(batch_size, -1, -1, -1).contiguous(),
                layer,
            )
        return cache


def split_prompt(batch: ICLBatch) -> int:
    """Index of the first query token, identical for every row of a right-padded batch.

    The prefix (demonstrations and separators) must tokenise the same in every row, which
    holds when all queries share one demonstration set.
    """
    if batch.padding_side != "right":
        raise ValueError("split_prompt needs a right-padded batch (padding_side='right').")
    is_query = batch.demo_index == batch.n_demos
    starts = is_query.int().argmax(-1)
    split = int(starts[0])
    if (
        not (starts == split).all()
        or not (batch.input_ids[:, :split] == batch.input_ids[0, :split]).all()
    ):
        raise ValueError(
            "The demonstration prefix differs between queries: compression needs one shared "
            "demonstration set."
        )
    return split


def anchor_keep_mask(batch: ICLBatch, split: int) -> Bool[Tensor, " prefix"]:
    """Hidden_anchor: formatting tokens, label words and special tokens (BOS) of the prefix."""
    roles = batch.roles[0, :split]
    return (roles == TokenRole.FORMAT) | (roles == TokenRole.LABEL) | (roles == TokenRole.SPECIAL)


def random_keep_mask(
    batch: ICLBatch, split: int, generator: torch.Generator
) -> Bool[Tensor, " prefix"]:
    """Hidden_random: like [`anchor_keep_mask`][anchor_lens.compression.anchor_keep_mask], each
    label word swapped for a random
    text token of its own demonstration."""
    roles = batch.roles[0, :split].cpu()
    demo = batch.demo_index[0, :split].cpu()
    keep = (roles == TokenRole.FORMAT) | (roles == TokenRole.SPECIAL)
    for k in range(batch.n_demos):
        candidates = ((roles == TokenRole.TEXT) & (demo == k)).nonzero().flatten()
        if len(candidates) == 0:
            raise ValueError(f"Demonstration {k} has no text token to draw.")
        keep[candidates[torch.randint(len(candidates), (1,), generator=generator)]] = True
    return keep.to(batch.input_ids.device)


def _cache_to_past_key_values(module, args, kwargs):
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs = dict(kwargs)
        kwargs["past_key_values"] = kwargs.pop("cache")
        return args, kwargs
    return None


@contextmanager
def _attention_reads_cache(model) -> Iterator[None]:
    """Let the bridge's attention find the KV cache under whichever name transformers uses.

    From transformers 5.24 the decoder layers hand the cache to their attention as ``cache=``
    (``past_key_values`` is deprecated), but TransformerLens' bridge attention
    (``AttentionBridge._update_kv_cache``, up to at least 4.3) looks only for
    ``past_key_values``/``layer_past``: it neither fills the cache nor reads a cache passed
    in, silently. This renames ``cache`` back to ``past_key_values`` on the way into every
    bridge attention module; on older transformers (which pass ``past_key_values``) it does
    nothing.
    """
    handles = [
        module.register_forward_pre_hook(_cache_to_past_key_values, with_kwargs=True)
        for module in model.modules()
        if hasattr(module, "_update_kv_cache")
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def compress_context(model, batch: ICLBatch, keep: Bool[Tensor, " prefix"]) -> CompressedContext:
    """Run the demonstration prefix once and keep its KV cache at ``keep`` positions."""
    split = split_prompt(batch)
    prefix = batch.input_ids[:1, :split]
    with _attention_reads_cache(model):
        _, cache = model(
            prefix,
            attention_mask=torch.ones_like(prefix),
            position_ids=torch.arange(split, device=prefix.device)[None],
            return_type="logits_and_cache",
            logits_to_keep=1,
        )
    windowed = [i for i, layer in enumerate(cache.layers) if hasattr(layer, "sliding_window")]
    if windowed:
        # A sliding-window layer caches only its last window, and its mask compares cache
        # indices, which a sliced cache no longer maps to positions.
        raise NotImplementedError(
            f"Anchor-only compression needs full-attention layers; layers {windowed} of this "
            "model use sliding-window attention (e.g. Gemma 3, Mistral). Use a model without "
            "sliding-window layers (Llama, Qwen2, GPT-2, Pythia)."
        )
    filled = [cache.get_seq_length(i) for i in range(len(cache.layers))]
    if len(filled) != model.cfg.n_layers or any(n != split for n in filled):
        raise RuntimeError(
            f"The model's KV cache was not filled (cached lengths {filled}, expected "
            f"{split} in each of {model.cfg.n_layers} layers): this TransformerLens/"
            "transformers pair does not pass the cache through the bridge's attention."
        )
    kept = keep.nonzero().flatten().to(prefix.device)
    keys = [layer.keys[:, :, kept] for layer in cache.layers]
    values = [layer.values[:, :, kept] for layer in cache.layers]
    return CompressedContext(keys, values, kept, split)


@torch.no_grad()
def compressed_logits(
    model, batch: ICLBatch, context: CompressedContext
) -> Float[Tensor, "batch vocab"]:
    """Next-token logits at each query's last token, attending only to ``context``."""
    split = context.context_length
    ids = batch.input_ids[:, split:]
    mask = batch.attention_mask[:, split:]
    n, n_q = ids.shape
    positions = (split + torch.arange(n_q, device=ids.device))[None].expand(n, -1)
    full_mask = torch.cat([mask.new_ones(n, len(context.kept)), mask], dim=1)
    cache = context.cache_for(n)
    with _attention_reads_cache(model):
        logits = model(
            ids,
            past_key_values=cache,
            attention_mask=full_mask,
            position_ids=positions,
        )
    if cache.get_seq_length() != len(context.kept) + n_q:
        raise RuntimeError(
            "The queries did not attend to the compressed context (the KV cache was not "
            "extended): this TransformerLens/transformers pair does not pass the cache "
            "through the bridge's attention."
        )
    last = mask.sum(-1) - 1
    return logits[torch.arange(n, device=ids.device), last]


def text_anchor_task(task: Task) -> Task:
    """The task with ``{text}`` (and the space before it) removed from the template."""
    template = task.template.replace(" {text}", "{text}")
    return dataclasses.replace(task, name=f"{task.name}-text-anchor", template=template)


@dataclass
class CompressionResult:
    """Tables 2-3 for one run: per method, loyalty to full ICL, accuracy, and speed."""

    methods: dict[str, dict[str, float]]
    n: int
    seed: int
    kept_positions: int
    context_length: int
    seconds_full: float
    seconds_anchor: float
    speedup: float
    episode: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _score(ref: Tensor, out: Tensor, label_ids: Tensor, labels: Tensor, top_k: int) -> dict:
    ref_pred = ref[:, label_ids].argmax(-1)
    pred = out[:, label_ids].argmax(-1)
    return {
        "label_loyalty": metrics.label_loyalty(ref_pred, pred),
        "word_loyalty": metrics.word_loyalty(ref, out, top_k),
        "accuracy": float((pred == labels).float().mean()),
    }


def run_compression(
    model,
    task: str | Task,
    *,
    data: str | Path | None = None,
    demo_data: str | Path | None = None,
    pools: Pools | None = None,
    queries: Sequence[Example] | None = None,
    demonstrations: Sequence[Example] | None = None,
    n: int | None = 200,
    seed: int = 42,
    n_random: int = 20,
    top_k: int = 5,
    batch_size: int = 8,
) -> CompressionResult:
    """Full ICL vs Hidden_anchor, Text_anchor, Hidden_random and Hidden_random-top.

    One demonstration per class (or the given ``demonstrations``) shared by all queries
    (``mode="fixed"``: the compressed cache is the one context every query reads).
    Speed: wall time of full ICL over all queries against building the anchor cache once plus
    answering every query on it, in batches of ``batch_size``, after one warm-up of each.
    ``hidden_random`` is the mean over the ``n_random`` draws, ``hidden_random_top`` the draw
    with the highest label loyalty.
    """
    task = get_task(task)
    episode = None
    if queries is None or demonstrations is None:
        pools = pools if pools is not None else load_pools(task, data, demo_data)
        episode = draw_episode(task, pools, shots=1, n=n, seed=seed, mode="fixed")
        queries, demonstrations = episode.queries, episode.demonstrations
    chunks = [queries[i : i + batch_size] for i in range(0, len(queries), batch_size)]
    batches = [
        build_icl_batch(model, task, demonstrations, c, padding_side="right").to(model.cfg.device)
        for c in chunks
    ]
    label_ids = batches[0].label_token_ids
    labels = torch.cat([b.labels for b in batches])

    with torch.no_grad():
        split = split_prompt(batches[0])
        # Warm both paths up so neither timing pays for first-call allocations.
        target_logits(model, batches[0])
        warm = compress_context(model, batches[0], anchor_keep_mask(batches[0], split))
        compressed_logits(model, batches[0], warm)

        start = time.perf_counter()
        full = torch.cat([target_logits(model, b).float() for b in batches])
        seconds_full = time.perf_counter() - start

        start = time.perf_counter()
        anchor_ctx = compress_context(model, batches[0], anchor_keep_mask(batches[0], split))
        anchor = torch.cat([compressed_logits(model, b, anchor_ctx).float() for b in batches])
        seconds_anchor = time.perf_counter() - start

        text_task = text_anchor_task(task)
        text = torch.cat(
            [
                target_logits(
                    model, build_icl_batch(model, text_task, demonstrations, c).to(model.cfg.device)
                ).float()
                for c in chunks
            ]
        )

        generator = torch.Generator().manual_seed(seed)
        draws = []
        for _ in range(n_random):
            ctx = compress_context(
                model, batches[0], random_keep_mask(batches[0], split, generator)
            )
            out = torch.cat([compressed_logits(model, b, ctx).float() for b in batches])
            draws.append(_score(full, out, label_ids, labels, top_k))

    methods = {
        "full_icl": _score(full, full, label_ids, labels, top_k),
        "hidden_anchor": _score(full, anchor, label_ids, labels, top_k),
        "text_anchor": _score(full, text, label_ids, labels, top_k),
        "hidden_random": {key: sum(d[key] for d in draws) / len(draws) for key in draws[0]},
        "hidden_random_top": max(draws, key=lambda d: (d["label_loyalty"], d["word_loyalty"])),
    }
    return CompressionResult(
        methods=methods,
        n=len(labels),
        seed=seed,
        kept_positions=len(anchor_ctx.kept),
        context_length=split,
        seconds_full=seconds_full,
        seconds_anchor=seconds_anchor,
        speedup=seconds_full / seconds_anchor,
        episode=episode.to_json() if episode is not None else None,
    )
