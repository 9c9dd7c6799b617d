"""Tokenised ICL prompts with the positions the anchor analyses need.

For a prompt of demonstrations ``d_1 … d_K`` and a query, Wang et al. (2023, §2.1) name three
kinds of position: ``p_k``, the label-word token of demonstration ``k`` (the *anchors*);
``q``, the target position (the last token, whose next-token logits give the prediction); and
``w``, every other token. Anchor-only compression (§3.2) additionally keeps the *formatting*
tokens (``Review``, ``:``, ``\\n``, ``Sentiment``, ``:``) of each demonstration.

[`build_icl_batch`][anchor_lens.prompts.build_icl_batch] builds the prompt from typed segments
(format / text / label), tokenises
it once with character offsets, and maps every token back to its segment, so the positions are
exact for any fast tokenizer (BPE with ``Ġ`` spaces, SentencePiece with ``▁``) and survive
left or right padding.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .tasks import Example, Task, get_task

__all__ = [
    "ICLBatch",
    "LabelTokens",
    "LabelWordError",
    "LabelWordWarning",
    "PromptTooLongError",
    "TokenRole",
    "build_icl_batch",
    "label_tokens",
    "resolve_bos",
    "tokenizer_adds_bos",
]


class TokenRole(IntEnum):
    """What a token of an ICL prompt is (``ICLBatch.roles``)."""

    PAD = -1
    SPECIAL = 0  #: BOS and other special tokens added by the tokenizer policy
    FORMAT = 1  #: template literals and separators ("Review", ":", "\n", ...)
    TEXT = 2  #: the input text of a demonstration or of the query
    LABEL = 3  #: the label word of a demonstration (all of its tokens)


class LabelWordError(ValueError):
    """A label word cannot serve as an anchor with this tokenizer and template."""


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the model's context window."""


class LabelWordWarning(UserWarning):
    """A label word is several tokens, and only its first one is scored."""


def _warn_multi_token(tokenizer, task: Task, lt: LabelTokens) -> None:
    split = [
        (word, tokenizer.convert_ids_to_tokens(list(ids)))
        for word, ids in zip(task.label_words, lt.words, strict=True)
        if len(ids) > 1
    ]
    if split:
        described = "; ".join(f"{w!r} -> {toks} (scored: {toks[0]!r})" for w, toks in split)
        warnings.warn(
            f"Task {task.name!r}: label words of several tokens, only the first token is "
            f"scored and used as the anchor, as in the paper: {described}. To score whole "
            "words use scoring='full_word' (--scoring full_word); to avoid the split choose "
            "single-token label words (Task.with_label_words, --label-words).",
            LabelWordWarning,
            stacklevel=3,
        )


@dataclass(frozen=True)
class LabelTokens:
    """How the label words tokenise right after the template's label prefix.

    Attributes:
        first: First token id of each label word (the paper's anchor and prediction token).
        words: All token ids of each label word, for whole-word scoring.
    """

    first: tuple[int, ...]
    words: tuple[tuple[int, ...], ...]


def _tokenizer_of(model_or_tokenizer: Any):
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    return tok if tok is not None else model_or_tokenizer


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is a slow tokenizer without character offsets; load "
            "the fast one (AutoTokenizer.from_pretrained(..., use_fast=True))."
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _first_token_at(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the token that holds character ``char`` (offsets may include a leading space).

    Offsets of one text are non-decreasing, so this is a binary search on the token ends.
    """
    i = bisect.bisect_right([end for _, end in offsets], char)
    if i == len(offsets):
        raise IndexError(char)
    return i


def label_tokens(tokenizer: Any, task: Task) -> LabelTokens:
    """Token ids of each label word as it follows the template's label prefix.

    Each word is tokenised inside the literal text that precedes it in the template (e.g.
    ``"\\nSentiment: Positive"``), so the tokenizer's leading-space convention (``ĠPositive``,
    ``▁Positive``) is the one the prompt itself uses.
    """
    tokenizer = _tokenizer_of(tokenizer)
    prefix = task.label_prefix.split("{text}")[-1]
    first, words = [], []
    for word in task.label_words:
        ids, offsets = _encode(tokenizer, prefix + word)
        start = _first_token_at(offsets, len(prefix))
        words.append(tuple(ids[start:]))
        first.append(ids[start])
    return LabelTokens(tuple(first), tuple(words))


@dataclass
class ICLBatch:
    """A padded batch of ICL prompts and every position the anchor analyses need.

    Positions index the padded sequence, so they can be used directly on hook tensors.

    Attributes:
        input_ids: Token ids, padded.
        attention_mask: 1 for real tokens, 0 for padding.
        position_ids: 0-based position of each real token (padding gets 0); pass them to the
            model so left padding does not shift absolute or rotary positions.
        roles: [`TokenRole`][anchor_lens.prompts.TokenRole] of every token.
        demo_index: Demonstration each token belongs to (0…K-1), K for the query, -1 for
            padding and special tokens. A separator belongs to the demonstration before it.
        label_positions: ``p_k`` — the first token of demonstration k's label word.
        demo_labels: Class of each demonstration.
        target_positions: ``q`` — the last real token of each prompt.
        labels: Gold class of each query (-1 if unknown).
        label_token_ids: First token of each label word (prediction is restricted to these).
        label_word_ids: All tokens of each label word (for whole-word scoring).
        prompts: The prompt strings.
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"]
    roles: Int[Tensor, "batch pos"]
    demo_index: Int[Tensor, "batch pos"]
    label_positions: Int[Tensor, "batch demo"]
    demo_labels: Int[Tensor, "batch demo"]
    target_positions: Int[Tensor, " batch"]
    labels: Int[Tensor, " batch"]
    label_token_ids: Int[Tensor, " n_class"]
    label_word_ids: tuple[tuple[int, ...], ...]
    prompts: list[str]
    padding_side: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_demos(self) -> int:
        return self.label_positions.shape[1]

    @property
    def format_mask(self) -> Bool[Tensor, "batch pos"]:
        """Formatting tokens (template literals and separators) — kept by anchor compression."""
        return self.roles == TokenRole.FORMAT

    @property
    def label_mask(self) -> Bool[Tensor, "batch pos"]:
        """The anchor tokens ``p_k`` only (first token of each demonstration's label word)."""
        mask = torch.zeros_like(self.roles, dtype=torch.bool)
        return mask.scatter(1, self.label_positions, True)

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for the bridge: ``model(**batch.model_inputs())``."""
        return {
            "input": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }

    def to(self, device: str | torch.device) -> ICLBatch:
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
            for f in fields(self)
        }
        return ICLBatch(**moved)

    def __getitem__(self, index: int | slice) -> ICLBatch:
        """Rows ``index`` of the batch (padding columns are kept)."""
        if not isinstance(index, slice):
            index = slice(index, index + 1)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("label_token_ids", "label_word_ids", "padding_side"):
                out[f.name] = value
            else:
                out[f.name] = value[index]
        return ICLBatch(**out)


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts a BOS token in front of a text by itself."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def resolve_bos(model_or_tokenizer: Any, prepend_bos: bool | None = None) -> int | None:
    """The BOS token id a prompt starts with, or ``None`` when it starts with none.

    ``prepend_bos=None`` follows the model (TransformerLens' ``cfg.default_prepend_bos``) or,
    for a bare tokenizer, what the tokenizer itself does; ``True`` needs a tokenizer with a
    BOS token. [`build_icl_batch`][anchor_lens.prompts.build_icl_batch] uses the same rule.
    """
    tokenizer = _tokenizer_of(model_or_tokenizer)
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise ValueError("prepend_bos=True but the tokenizer defines no bos_token.")
    if prepend_bos is None:
        cfg = getattr(model_or_tokenizer, "cfg", None)
        if cfg is not None:
            # TransformerLens' own switch, so prompts match model.to_tokens(...); load_model
            # sets it to what the model's native tokenizer does.
            prepend_bos = bool(getattr(cfg, "default_prepend_bos", True))
        else:
            prepend_bos = tokenizer_adds_bos(tokenizer)
    return bos if prepend_bos else None


def build_icl_batch(
    model_or_tokenizer: Any,
    task: str | Task,
    demonstrations: Sequence[Example] | Sequence[Sequence[Example]],
    queries: Sequence[Example | str],
    *,
    padding_side: Literal["left", "right"] = "left",
    prepend_bos: bool | None = None,
    max_length: int | None = None,
    check_label_collisions: bool = True,
) -> ICLBatch:
    """Tokenise ICL prompts ``d_1 \\n … d_K \\n query`` and locate anchors, formats and target.

    Args:
        model_or_tokenizer: A TransformerBridge (its tokenizer and ``cfg.n_ctx`` are used) or a
            fast Hugging Face tokenizer.
        task: Task name or [`Task`][anchor_lens.tasks.Task].
        demonstrations: One list shared by every query, or one list per query (same length).
        queries: Examples (gold label kept) or raw strings (label -1).
        padding_side: ``"left"`` puts every target at the last column (cheaper prediction);
            ``"right"`` keeps real tokens at the same columns as an unpadded prompt.
        prepend_bos: Whether the prompt starts with the BOS token. ``None`` follows
            ``model.cfg.default_prepend_bos`` (as ``model.to_tokens`` does;
            [`load_model`][anchor_lens.models.load_model]
            sets it to the native tokenizer's convention) when a model is given, else what
            the tokenizer does by itself.
        max_length: Context limit; defaults to the model's ``cfg.n_ctx`` when a model is given.
        check_label_collisions: First-token scoring (the paper's): raise if two label words
            share their first token, and warn (``LabelWordWarning``) which token is scored
            when a label word splits into several. Whole-word scoring turns this off.

    Raises:
        LabelWordError: a label word does not appear as its own token(s) in a demonstration,
            or two label words share a first token.
        PromptTooLongError: a prompt is longer than ``max_length``.
    """
    task = get_task(task)
    tokenizer = _tokenizer_of(model_or_tokenizer)
    if max_length is None and hasattr(model_or_tokenizer, "cfg"):
        max_length = model_or_tokenizer.cfg.n_ctx
    if not queries:
        raise ValueError("build_icl_batch needs at least one query.")
    per_query = [list(demonstrations)] * len(queries)
    if demonstrations and not isinstance(demonstrations[0], Example):
        per_query = [list(d) for d in demonstrations]
        if len(per_query) != len(queries):
            raise ValueError(
                f"Got {len(per_query)} demonstration lists for {len(queries)} queries."
            )
    if len({len(d) for d in per_query}) != 1:
        raise ValueError("Every query needs the same number of demonstrations.")

    lt = label_tokens(tokenizer, task)
    if check_label_collisions and len(set(lt.first)) != len(lt.first):
        clash = [
            (task.label_words[i], task.label_words[j])
            for i in range(task.n_classes)
            for j in range(i + 1, task.n_classes)
            if lt.first[i] == lt.first[j]
        ]
        raise LabelWordError(
            f"Label words {clash} start with the same token "
            f"{tokenizer.convert_ids_to_tokens(lt.first[task.label_words.index(clash[0][0])])!r}, "
            "so first-token prediction cannot tell them apart. Choose other label words "
            "(Task.with_label_words) or score whole words (label_scoring='full_word')."
        )
    if check_label_collisions:
        _warn_multi_token(tokenizer, task, lt)
    bos = resolve_bos(model_or_tokenizer, prepend_bos)

    rows = [
        _tokenise_prompt(tokenizer, task, demos, query, lt, bos)
        for demos, query in zip(per_query, queries, strict=True)
    ]
    longest = max(len(r["ids"]) for r in rows)
    if max_length is not None and longest > max_length:
        worst = max(range(len(rows)), key=lambda i: len(rows[i]["ids"]))
        raise PromptTooLongError(
            f"Prompt {worst} has {longest} tokens but the model's context is {max_length}. Use "
            "fewer demonstrations (shots), shorter texts, or a model with a longer context."
        )
    return _pad(rows, tokenizer, lt, padding_side, longest)


def _tokenise_prompt(tokenizer, task: Task, demos, query, lt: LabelTokens, bos):
    query = query if isinstance(query, Example) else Example(str(query), -1)
    # (role, demo index, string) for every piece of the prompt, in order.
    pieces: list[tuple[TokenRole, int, str]] = []
    for k, demo in enumerate(demos):
        for kind, s in task.segments(demo.text, demo.label):
            pieces.append((TokenRole[kind.upper()], k, s))
        pieces.append((TokenRole.FORMAT, k, task.separator))
    for kind, s in task.segments(query.text, None):
        pieces.append((TokenRole[kind.upper()], len(demos), s))

    prompt = "".join(s for _, _, s in pieces)
    ids, offsets = _encode(tokenizer, prompt)
    ends = [end for _, end in offsets]
    starts = [start for start, _ in offsets]
    roles = [int(TokenRole.FORMAT)] * len(ids)
    demo_of = [0] * len(ids)
    label_pos: list[int] = []
    cursor = 0
    for role, k, s in pieces:
        start, end = cursor, cursor + len(s)
        cursor = end
        if not s:
            continue
        # Tokens whose characters touch this piece take its role; text wins over formatting
        # when a token straddles both (a merged "word:" is not a pure formatting token).
        span = range(bisect.bisect_right(ends, start), bisect.bisect_left(starts, end))
        for i in span:
            if role == TokenRole.LABEL or roles[i] != TokenRole.TEXT:
                roles[i] = int(role)
            demo_of[i] = k
        if role == TokenRole.LABEL:
            word = task.label_words[demos[k].label]
            pos = span[0] if len(span) else -1
            if pos < 0 or ids[pos] != lt.first[demos[k].label] or offsets[pos][0] < start - 1:
                got = tokenizer.convert_ids_to_tokens(ids[pos]) if pos >= 0 else None
                raise LabelWordError(
                    f"Label word {word!r} of demonstration {k} is not a token of its own in the "
                    f"prompt (the token there is {got!r}, expected "
                    f"{tokenizer.convert_ids_to_tokens(lt.first[demos[k].label])!r}): it merges "
                    "with the template text around {label}. Put whitespace or a separator "
                    "around {label} in the template, or choose label words that tokenise on "
                    "their own."
                )
            label_pos.append(pos)
    if bos is not None:
        ids, offsets = [bos, *ids], [(0, 0), *offsets]
        roles = [int(TokenRole.SPECIAL), *roles]
        demo_of = [-1, *demo_of]
        label_pos = [p + 1 for p in label_pos]
    return {
        "prompt": prompt,
        "ids": ids,
        "roles": roles,
        "demo_of": demo_of,
        "label_pos": label_pos,
        "demo_labels": [d.label for d in demos],
        "label": query.label,
    }


def _pad(rows, tokenizer, lt: LabelTokens, padding_side: str, width: int) -> ICLBatch:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    roles = torch.full((n, width), int(TokenRole.PAD), dtype=torch.long)
    demo_index = torch.full((n, width), -1, dtype=torch.long)
    label_positions, targets = [], []
    for b, row in enumerate(rows):
        length = len(row["ids"])
        shift = width - length if padding_side == "left" else 0
        cols = slice(shift, shift + length)
        input_ids[b, cols] = torch.tensor(row["ids"])
        mask[b, cols] = 1
        roles[b, cols] = torch.tensor(row["roles"])
        demo_index[b, cols] = torch.tensor(row["demo_of"])
        label_positions.append([p + shift for p in row["label_pos"]])
        targets.append(shift + length - 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ICLBatch(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        roles=roles,
        demo_index=demo_index,
        label_positions=torch.tensor(label_positions, dtype=torch.long).reshape(n, -1),
        demo_labels=torch.tensor([r["demo_labels"] for r in rows], dtype=torch.long).reshape(n, -1),
        target_positions=torch.tensor(targets, dtype=torch.long),
        labels=torch.tensor([r["label"] for r in rows], dtype=torch.long),
        label_token_ids=torch.tensor(lt.first, dtype=torch.long),
        label_word_ids=lt.words,
        prompts=[r["prompt"] for r in rows],
        padding_side=padding_side,
    )
