"""Inputs longer than pre-training: per-position NLL and passkey retrieval (LM-Infinite §5).

Four ways to read a long input, named by ``mode``:

* ``"full"`` — ordinary attention over everything (fails past the pre-training length ``L``);
* ``"lm-infinite"`` — Λ attention with the distance limit, ``n_local = max_distance = L``;
* ``"window"`` — plain windowed attention of width ``L`` (no global tokens: fails too);
* ``"truncate"`` — passkey only: keep the last ``L`` tokens of the prompt.

Everything runs on the efficient path ([`forward_hidden`][anchor_lens.lminfinite.forward_hidden]),
so the
``n × n`` score matrix is never built and logits are unembedded chunk by chunk.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, Shaped
from torch import Tensor
from tqdm.auto import tqdm

from .lminfinite import LambdaAttention, forward_hidden, pretrain_length, unembed
from .models import plain_hf_model

__all__ = [
    "MODES",
    "NLLCurves",
    "PasskeyResult",
    "attention_for",
    "long_token_windows",
    "nll_curves",
    "passkey_accuracy",
    "passkey_prompt",
    "token_nll",
]

MODES = ("full", "lm-infinite", "window", "truncate")


def attention_for(
    mode: str, model, *, n_global: int = 10, length: int | None = None
) -> LambdaAttention | None:
    """The attention a ``mode`` runs with (``None``: full attention); ``length`` overrides ``L``."""
    length = length or pretrain_length(model)
    if mode in ("full", "truncate"):
        return None
    if mode == "lm-infinite":
        return LambdaAttention(n_global=n_global, n_local=length, max_distance=length)
    if mode == "window":
        return LambdaAttention.window(length)
    raise ValueError(f"Unknown mode {mode!r}; choose from {', '.join(MODES)}.")


def long_token_windows(
    tokenizer, texts: Iterable[str], length: int, n_windows: int, separator: str = "\n\n"
) -> Int[Tensor, "window length"]:
    """``n_windows`` disjoint runs of ``length`` tokens from ``texts`` joined by ``separator``.

    Raises:
        ValueError: the texts hold fewer than ``length · n_windows`` tokens.
    """
    needed = length * n_windows
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text + separator, add_special_tokens=False)["input_ids"]
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise ValueError(
            f"The text has {len(stream)} tokens; {n_windows} windows of {length} need {needed}. "
            "Give more text, fewer windows or a shorter length."
        )
    return torch.tensor(stream[:needed]).view(n_windows, length)


def token_nll(
    model: torch.nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention: LambdaAttention | None,
    chunk: int = 1024,
    *,
    attention_mask: Shaped[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos_minus_1"]:
    """``-log p(x_{t+1} | x_{≤t})`` at every position, unembedding ``chunk`` positions at a time.

    A padded batch must be padded on the right and pass its ``attention_mask`` (1 real,
    0 padding): entries whose target ``x_{t+1}`` is padding are NaN, and any other padding
    raises (see [`forward_hidden`][anchor_lens.lminfinite.forward_hidden]).
    """
    hf = plain_hf_model(model)
    device = next(hf.parameters()).device
    input_ids = input_ids.to(device)
    hidden = forward_hidden(hf, input_ids, attention, attention_mask=attention_mask)
    out = []
    with torch.no_grad():
        for start in range(0, input_ids.shape[1] - 1, chunk):
            stop = min(start + chunk, input_ids.shape[1] - 1)
            logits = unembed(hf, hidden[:, start:stop]).float()
            target = input_ids[:, start + 1 : stop + 1]
            out.append(F.cross_entropy(logits.transpose(1, 2), target, reduction="none"))
    nll = torch.cat(out, dim=1).cpu()
    if attention_mask is not None:
        nll = nll.masked_fill(~attention_mask[:, 1:].to(torch.bool).cpu(), float("nan"))
    return nll


@dataclass
class NLLCurves:
    """Mean NLL per position bin for each mode (Fig. 4 of LM-Infinite)."""

    bin_size: int
    length: int
    n_windows: int
    pretrain_length: int
    positions: list[int]
    nll: dict[str, list[float]]
    #: Mean NLL over positions ``< L`` and ``≥ L`` per mode.
    summary: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def nll_curves(
    model: torch.nn.Module,
    windows: Int[Tensor, "window length"],
    modes: Sequence[str] = ("full", "lm-infinite", "window"),
    *,
    bin_size: int = 256,
    n_global: int = 10,
    progress: bool = True,
) -> NLLCurves:
    """Per-position NLL of ``windows`` under each mode, averaged over windows and bins."""
    hf = plain_hf_model(model)
    length = pretrain_length(hf)
    n = windows.shape[1] - 1
    starts = list(range(0, n, bin_size))
    curves: dict[str, list[float]] = {}
    summary: dict[str, dict[str, float]] = {}
    if "truncate" in modes:
        raise ValueError("'truncate' has no per-position NLL; use it for passkey retrieval.")
    attentions = {mode: attention_for(mode, hf, n_global=n_global) for mode in modes}
    steps = [(mode, row) for mode in modes for row in range(windows.shape[0])]
    per_mode: dict[str, list[Tensor]] = {mode: [] for mode in modes}
    for mode, row in tqdm(steps, desc="NLL", disable=not progress):
        per_mode[mode].append(token_nll(hf, windows[row : row + 1], attentions[mode])[0])
    for mode in modes:
        nll = torch.stack(per_mode[mode]).mean(0)
        curves[mode] = [float(nll[s : s + bin_size].mean()) for s in starts]
        # Position t predicts token t+1; "past L" means the predicted token's position ≥ L.
        inside, past = nll[: length - 1], nll[length - 1 :]
        summary[mode] = {
            "mean_nll_within_L": float(inside.mean()),
            "mean_nll_past_L": float(past.mean()) if past.numel() else None,
        }
    return NLLCurves(bin_size, windows.shape[1], windows.shape[0], length, starts, curves, summary)


PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n"
)
PASSKEY_FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(
    tokenizer, length: int, depth: float, key: int
) -> tuple[Int[Tensor, " prompt"], Int[Tensor, " answer"]]:
    """A passkey prompt of about ``length`` tokens with the key at relative ``depth`` ∈ [0, 1].

    The standard test (Mohtashami & Jaggi 2023, used by LM-Infinite): filler sentences with one
    sentence giving a 5-digit key, then the question. Returns the prompt and the answer tokens.
    """

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    intro, filler, question = ids(PASSKEY_INTRO), ids(PASSKEY_FILLER), ids(PASSKEY_QUESTION)
    needle = ids(PASSKEY_NEEDLE.format(key=key))
    room = length - len(intro) - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"A passkey prompt needs more than {length} tokens.")
    n_filler = room // len(filler)
    before = round(depth * n_filler)
    body = intro + filler * before + needle + filler * (n_filler - before) + question
    return torch.tensor(body), torch.tensor(ids(f" {key}"))


@dataclass
class PasskeyResult:
    """Passkey retrieval accuracy per mode and prompt length."""

    lengths: list[int]
    n_trials: int
    pretrain_length: int
    accuracy: dict[str, list[float]]

    def to_json(self) -> dict:
        return asdict(self)


def passkey_accuracy(
    model: torch.nn.Module,
    tokenizer,
    lengths: Sequence[int],
    modes: Sequence[str] = ("full", "lm-infinite", "window", "truncate"),
    *,
    n_trials: int = 5,
    n_global: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> PasskeyResult:
    """Fraction of trials whose greedy continuation is the passkey, per mode and length.

    Greedy decoding yields the key exactly when every key token is the argmax given the
    correct tokens before it, so one teacher-forced forward per prompt decides it. Trial ``t``
    puts the key at depth ``t / (n_trials - 1)`` (evenly from the start to the end) with a key
    drawn from ``seed``; every mode sees the same prompts.
    """
    hf = plain_hf_model(model)
    device = next(hf.parameters()).device
    limit = pretrain_length(hf)
    rng = random.Random(seed)
    trials = [
        (length, t / max(1, n_trials - 1), rng.randrange(10_000, 100_000))
        for length in lengths
        for t in range(n_trials)
    ]
    hits: dict[str, dict[int, int]] = {mode: dict.fromkeys(lengths, 0) for mode in modes}
    steps = [(mode, trial) for trial in trials for mode in modes]
    for mode, (length, depth, key) in tqdm(steps, desc="passkey", disable=not progress):
        prompt, answer = passkey_prompt(tokenizer, length, depth, key)
        if mode == "truncate":
            prompt = prompt[-(limit - len(answer)) :]
        ids = torch.cat([prompt, answer]).to(device)[None]
        hidden = forward_hidden(hf, ids, attention_for(mode, hf, n_global=n_global))
        with torch.no_grad():
            guess = unembed(hf, hidden[:, -len(answer) - 1 : -1]).argmax(-1)[0].cpu()
        hits[mode][length] += int(torch.equal(guess, answer))
    accuracy = {mode: [hits[mode][n] / n_trials for n in lengths] for mode in modes}
    return PasskeyResult(list(lengths), n_trials, limit, accuracy)
