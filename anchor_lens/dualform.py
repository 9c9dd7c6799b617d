"""ICL as implicit fine-tuning (Dai et al., Findings of ACL 2023): ZSL, ICL and K/V fine-tuning.

Dai et al. write linear attention to the demonstration tokens ``X'`` as a weight update,

    F_ICL(q) = W_V [X'; X] (W_K [X'; X])ᵀ q = W_ZSL q + ΔW_ICL q,
    ΔW_ICL = Σ_i (W_V x'_i)(W_K x'_i)ᵀ,

the *dual form* of one gradient step on a linear layer, ``ΔW = Σ_i e_i x'_iᵀ`` (so
``ΔW q = Σ_i e_i (x'_iᵀ q)``: attention over the training inputs). They compare three settings
on the same queries:

* **ZSL** — the query alone; **ICL** — the demonstrations, then the query;
* **FT** — the ZSL prompt on the model after fine-tuning only the attention **K and V
  projections** (weights and biases) with plain SGD, constant lr, batch 1, one epoch, one step
  per demonstration in demonstration order, on the mean token NLL of the formatted
  demonstration ([`kv_finetuned`][anchor_lens.dualform.kv_finetuned]; the model is restored
  bit-exactly afterwards).

and four measurements at the *recorded token* (the last token; the official code appends the
first label token and records there, ``record_at="label_token"``), per layer, then averaged:

* **Rec2FTP** = #(ZSL wrong ∧ FT right ∧ ICL right) / #(ZSL wrong ∧ FT right)
  ([`rec2ftp`][anchor_lens.dualform.rec2ftp]);
* **SimAOU** = cos(h_ICL − h_ZSL, h_FT − h_ZSL), ``h`` the L2-normalised attention output
  after the output projection (``blocks.{l}.hook_attn_out``)
  ([`simaou`][anchor_lens.dualform.simaou]);
* **SimAM** = cos of the pre-softmax scores from the recorded token to the query's own tokens,
  per head: ICL vs FT ("after") against ICL vs ZSL ("before")
  ([`simam`][anchor_lens.dualform.simam]);
* **Kendall** τ between ICL's attention to the demonstration tokens and FT's dual-form attention
  to the training tokens, the FT model's query vector dotted with each training token's query
  vector (``q·q``, as the official code computes it), at token and example level
  ([`kendall_per_layer`][anchor_lens.dualform.kendall_per_layer]).

**Rotary models.** Query vectors are taken from ``hook_q`` (before rotary) or ``hook_rot_q``
(after). Kendall's ``q·q`` defaults to ``"pre_rotary"``: it dots vectors of *different
sequences* (a training demonstration and the ZSL prompt), whose absolute positions are
unrelated, and after rotary the product would depend on that arbitrary offset. SimAM defaults to
``"post_rotary"``, the scores the model actually uses (``hook_attn_scores``): the recorded token
and the query's own tokens are at the same relative offsets in the ZSL, ICL and FT prompts, so
the rotation is the same in all three. ``"pre_rotary"`` SimAM is ``q·k/√d_head`` from ``hook_q``
and ``hook_k``. On models without rotary both variants read the same vectors.

[`compare_settings`][anchor_lens.dualform.compare_settings] runs everything for one
demonstration set over a grid of learning rates and returns every metric at every lr (on a small
model the lr with the best validation accuracy can leave FT's predictions equal to ZSL's, so
Rec2FTP is 0/0: undefined, ``None``, with its counts).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from .icl import target_logits
from .prompts import ICLBatch, build_icl_batch, resolve_bos
from .tasks import Example, Task, get_task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DualFormResult",
    "FineTuneTrace",
    "KVParameter",
    "Rec2FTP",
    "SettingCapture",
    "capture_setting",
    "check_lrs",
    "compare_settings",
    "dual_attention",
    "dual_form_batch",
    "dual_form_findings",
    "dual_form_markdown",
    "kendall_per_layer",
    "kv_finetuned",
    "kv_parameters",
    "layer_summary",
    "plot_dual_form",
    "plot_lr_sweep",
    "rec2ftp",
    "simam",
    "simaou",
    "simaou_random",
    "summarise_seeds",
]

QueryVector = Literal["pre_rotary", "post_rotary"]
RecordAt = Literal["last", "label_token"]


# ---------------------------------------------------------------------------- K/V parameters
@dataclass
class KVParameter:
    """One tensor that FT trains: a K or V projection's weight or bias.

    Attributes:
        name: The parameter's name in ``model.named_parameters()``.
        layer: Its layer.
        param: The parameter itself.
        mask: For a fused QKV projection (GPT-2's ``c_attn``), ``True`` on the K and V entries
            (the Q part gets no update); ``None`` when the whole tensor is K or V.
    """

    name: str
    layer: int
    param: nn.Parameter = field(repr=False)
    mask: Tensor | None = field(default=None, repr=False)


_LAYER = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks)\.(\d+)\.")
_SPLIT = re.compile(r"\.(?:k|v|k_proj|v_proj|key|value)\.(?:weight|bias)$")
_FUSED = re.compile(r"\.(?:c_attn|qkv)\.(?:weight|bias)$")


def kv_parameters(model) -> list[KVParameter]:
    """The attention K and V projections of every layer (weights and biases), in layer order.

    Separate projections (Llama's ``k_proj``/``v_proj``, the bridge's GPT-2 ``k``/``v``) are
    trained whole; under grouped-query attention these are the shared kv heads. A fused QKV
    projection (GPT-2's ``c_attn``, e.g. with ``backend="hf"``) is used only where a layer has no
    separate ones, with a mask that keeps its Q part fixed. Tied tensors appear once.
    """
    cfg = model.cfg
    d_head, n_heads = cfg.d_head, cfg.n_heads
    q_size = n_heads * d_head
    kv_size = (getattr(cfg, "n_key_value_heads", None) or n_heads) * d_head
    split: list[KVParameter] = []
    fused: list[KVParameter] = []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        plain = name.replace("._original_component", "")
        layer = _LAYER.search(plain)
        if layer is None or id(param) in seen:
            continue
        if _SPLIT.search(plain):
            split.append(KVParameter(name, int(layer.group(1)), param))
            seen.add(id(param))
        elif _FUSED.search(plain):
            total = q_size + 2 * kv_size
            dims = [d for d, size in enumerate(param.shape) if size == total]
            if not dims:
                continue
            index = torch.arange(total, device=param.device) >= q_size
            shape = [1] * param.dim()
            shape[dims[-1]] = total
            fused.append(KVParameter(name, int(layer.group(1)), param, index.reshape(shape)))
            seen.add(id(param))
    layers_split = {p.layer for p in split}
    out = split + [p for p in fused if p.layer not in layers_split]
    if not out:
        raise ValueError(
            f"Found no attention K/V projection in {type(model).__name__} (looked for k_proj/"
            "v_proj, k/v, key/value, or a fused c_attn/qkv in each layer): K/V fine-tuning "
            "cannot be run on this architecture."
        )
    return sorted(out, key=lambda p: p.layer)


# ------------------------------------------------------------------------------ fine-tuning
@dataclass
class FineTuneTrace:
    """What K/V fine-tuning on one demonstration set recorded.

    Attributes:
        lr: The SGD learning rate.
        losses: Mean token NLL of each demonstration, before its step.
        train_queries: Per layer, the query vector (all heads concatenated, ``/√d_head``) of
            every training token (BOS excluded), recorded in each step's forward *before* that
            step's update: the keys of FT's dual-form attention, ``[layer, token, d_q]``.
        token_demo: The demonstration each training token belongs to, ``[token]``.
        train_ids: The token ids of each demonstration (BOS excluded).
        relative_update: ``‖θ_FT − θ‖ / ‖θ‖`` over every trained K/V entry.
    """

    lr: float
    losses: list[float]
    train_queries: Float[Tensor, "layer token d_q"]
    token_demo: Int[Tensor, " token"]
    train_ids: list[list[int]]
    relative_update: float


def _query_hook(model, layer: int, variant: QueryVector) -> str:
    rotated = f"blocks.{layer}.attn.hook_rot_q"
    if variant == "post_rotary" and rotated in model.hook_dict:
        return rotated
    if variant not in ("pre_rotary", "post_rotary"):
        raise ValueError(f"query vector must be 'pre_rotary' or 'post_rotary', not {variant!r}.")
    return f"blocks.{layer}.attn.hook_q"


def _demo_ids(model, task: Task, demo: Example) -> tuple[list[int], int]:
    """Token ids of the formatted demonstration, with the model's BOS policy; BOS count."""
    ids = model.tokenizer(task.format_demo(demo), add_special_tokens=False)["input_ids"]
    bos = resolve_bos(model)
    return ([bos] if bos is not None else []) + list(ids), int(bos is not None)


def _sgd_step(
    model,
    params: Sequence[KVParameter],
    ids: list[int],
    lr: float,
    keep_from: int,
    query_vector: QueryVector,
) -> tuple[float, Float[Tensor, "layer token d_q"]]:
    """One SGD step ``θ ← θ − lr ∇θ L`` on the K/V tensors; the step's query vectors."""
    n_layers = model.cfg.n_layers
    queries: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(q: Float[Tensor, "batch pos head d_head"], hook) -> None:
            scaled = q[0, keep_from:].detach().float() / math.sqrt(q.shape[-1])
            queries[layer] = scaled.reshape(scaled.shape[0], -1).cpu()

        return hook

    hooks = [(_query_hook(model, layer, query_vector), keep(layer)) for layer in range(n_layers)]
    x = torch.tensor([ids], device=model.cfg.device)
    with torch.enable_grad():
        logits = model.run_with_hooks(x, fwd_hooks=hooks)
        loss = F.cross_entropy(logits[0, :-1].float(), x[0, 1:])
        grads = torch.autograd.grad(loss, [p.param for p in params])
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if p.mask is not None:
                g = torch.where(p.mask, g, torch.zeros_like(g))
            p.param.copy_(p.param - lr * g)
    return float(loss.detach()), torch.stack([queries[layer] for layer in range(n_layers)])


@contextmanager
def kv_finetuned(
    model,
    task: str | Task,
    demonstrations: Sequence[Example],
    lr: float,
    *,
    query_vector: QueryVector = "pre_rotary",
) -> Iterator[FineTuneTrace]:
    """The model fine-tuned on ``demonstrations`` (K/V only), restored bit-exactly on exit.

    One SGD step ``θ ← θ − lr · ∇θ L`` per demonstration, in the given order (batch 1, one
    epoch), ``L`` the mean token NLL of the template-formatted demonstration (with the model's
    BOS policy; every token after the first is a target). Only the tensors of
    [`kv_parameters`][anchor_lens.dualform.kv_parameters] change (a fused QKV keeps its Q part);
    every other parameter is untouched and gets no gradient. On exit, even after an error, the
    K/V tensors are copied back from saved clones and every ``requires_grad`` flag is restored,
    so the model is bit-identical to before::

        with kv_finetuned(model, "sst2", demos, lr=1e-3) as trace:
            ft_logits = target_logits(model, zsl_batch)
    """
    task = get_task(task)
    params = kv_parameters(model)
    saved = [p.param.detach().clone() for p in params]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.param.requires_grad_(True)
        losses, queries, owners, all_ids = [], [], [], []
        for k, demo in enumerate(demonstrations):
            ids, n_bos = _demo_ids(model, task, demo)
            loss, q = _sgd_step(model, params, ids, lr, n_bos, query_vector)
            losses.append(loss)
            queries.append(q)
            owners += [k] * q.shape[1]
            all_ids.append(ids[n_bos:])
        with torch.no_grad():
            change = sum(
                _masked_sq(p.param - s, p.mask) for p, s in zip(params, saved, strict=True)
            )
            size = sum(_masked_sq(s, p.mask) for p, s in zip(params, saved, strict=True))
        yield FineTuneTrace(
            lr=lr,
            losses=losses,
            train_queries=torch.cat(queries, dim=1),
            token_demo=torch.tensor(owners, dtype=torch.long),
            train_ids=all_ids,
            relative_update=math.sqrt(change / size) if size > 0 else 0.0,
        )
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.param.copy_(s)
        for p, flag in flags:
            p.requires_grad_(flag)


def _masked_sq(t: Tensor, mask: Tensor | None) -> float:
    t = t.double()
    return float((t if mask is None else torch.where(mask, t, 0)).square().sum())


# --------------------------------------------------------------------------------- capture
def dual_form_batch(
    model,
    task: str | Task,
    demonstrations: Sequence[Example],
    queries: Sequence[Example],
    *,
    record_at: RecordAt = "last",
) -> tuple[ICLBatch, Int[Tensor, " batch"]]:
    """A left-padded batch for ZSL (no demonstrations) or ICL, and the recorded positions.

    ``record_at="last"`` (the paper) records at the last token, where the prediction is read.
    ``"label_token"`` (the official code) appends the first token of the first label word to
    every prompt and records there; the prediction is still read one position earlier.
    """
    task = get_task(task)
    batch = build_icl_batch(model, task, list(demonstrations), list(queries))
    if record_at == "last":
        return batch.to(model.cfg.device), batch.target_positions.to(model.cfg.device)
    if record_at != "label_token":
        raise ValueError(f"record_at must be 'last' or 'label_token', not {record_at!r}.")

    def extend(t: Tensor, value: Tensor | int) -> Tensor:
        col = value if isinstance(value, Tensor) else torch.full_like(t[:, :1], value)
        return torch.cat([t, col.reshape(-1, 1).to(t.dtype)], dim=1)

    n = len(batch)
    appended = replace(
        batch,
        input_ids=extend(batch.input_ids, batch.label_token_ids[0].expand(n)),
        attention_mask=extend(batch.attention_mask, 1),
        position_ids=extend(batch.position_ids, batch.position_ids[:, -1] + 1),
        roles=extend(batch.roles, batch.roles[:, -1]),
        demo_index=extend(batch.demo_index, batch.n_demos),
    )
    return appended.to(model.cfg.device), (batch.target_positions + 1).to(model.cfg.device)


@dataclass
class SettingCapture:
    """What one setting (ZSL, ICL or FT) gives for a batch, at the recorded token, per layer.

    Attributes:
        label_logits: First-token logits of the label words where the prediction is read.
        attn_out: Attention output after the output projection, before the residual add
            (``blocks.{l}.hook_attn_out``).
        query: Query vector, all heads concatenated, ``/√d_head`` (``hook_q`` or
            ``hook_rot_q``).
        scores: Pre-softmax scores from the recorded token to every position, per head
            (``hook_attn_scores``, or ``q·k/√d_head`` from ``hook_q``/``hook_k``).
    """

    label_logits: Float[Tensor, "batch n_class"]
    attn_out: Float[Tensor, "layer batch d_model"]
    query: Float[Tensor, "layer batch d_q"]
    scores: Float[Tensor, "layer batch head pos"]

    @property
    def predicted(self) -> Int[Tensor, " batch"]:
        return self.label_logits.argmax(-1)


@torch.no_grad()
def capture_setting(
    model,
    batch: ICLBatch,
    recorded: Int[Tensor, " batch"],
    *,
    query_vector: QueryVector = "pre_rotary",
    scores_from: QueryVector = "post_rotary",
) -> SettingCapture:
    """Run ``batch`` once and keep, per layer, what the dual-form metrics read (float32, CPU).

    ``query_vector`` picks the query read for Kendall's dual-form attention; ``scores_from``
    the score rows read by SimAM and by Kendall's ICL side (``"post_rotary"``: the model's own
    ``hook_attn_scores``).
    """
    n_layers = model.cfg.n_layers
    rows = torch.arange(len(batch), device=recorded.device)
    kept: dict[tuple[str, int], Tensor] = {}

    def at_recorded(kind: str, layer: int):
        def hook(x: Tensor, hook) -> None:
            kept[kind, layer] = x[rows, recorded].detach()

        return hook

    def score_row(layer: int):
        def hook(scores: Float[Tensor, "batch head q k"], hook) -> None:
            kept["scores", layer] = scores[rows, :, recorded].detach()

        return hook

    def keep_all(kind: str, layer: int):
        def hook(x: Tensor, hook) -> None:
            kept[kind, layer] = x.detach()

        return hook

    hooks = []
    for layer in range(n_layers):
        hooks.append((f"blocks.{layer}.hook_attn_out", at_recorded("out", layer)))
        hooks.append((_query_hook(model, layer, query_vector), at_recorded("q", layer)))
        if scores_from == "post_rotary":
            hooks.append((f"blocks.{layer}.attn.hook_attn_scores", score_row(layer)))
        else:
            hooks.append((f"blocks.{layer}.attn.hook_q", at_recorded("q_pre", layer)))
            hooks.append((f"blocks.{layer}.attn.hook_k", keep_all("k_pre", layer)))
    logits = target_logits(model, batch, hooks).float()
    label_logits = logits[:, batch.label_token_ids.to(logits.device)]
    out, query, scores = [], [], []
    for layer in range(n_layers):
        out.append(kept["out", layer].float())
        q = kept["q", layer].float()
        query.append(q.reshape(q.shape[0], -1) / math.sqrt(q.shape[-1]))
        if scores_from == "post_rotary":
            scores.append(kept["scores", layer].float())
        else:
            q_pre, k = kept["q_pre", layer].float(), kept["k_pre", layer].float()
            k = k.repeat_interleave(q_pre.shape[1] // k.shape[2], dim=2)  # GQA
            scores.append(torch.einsum("bhd,bphd->bhp", q_pre, k) / math.sqrt(q_pre.shape[-1]))
    return SettingCapture(
        label_logits.cpu(),
        torch.stack(out).cpu(),
        torch.stack(query).cpu(),
        torch.stack(scores).cpu(),
    )


# --------------------------------------------------------------------------------- metrics
@dataclass
class Rec2FTP:
    """Rec2FTP with its counts; ``value`` is ``None`` when no query is ZSL-wrong and FT-right.

    Attributes:
        value: ``n_both / n_ft`` (a fraction, not a percentage), or ``None`` for 0/0.
        n_both: #(ZSL wrong ∧ FT right ∧ ICL right).
        n_ft: #(ZSL wrong ∧ FT right).
        n_icl: #(ZSL wrong ∧ ICL right), for the chance level ``n_icl / #(ZSL wrong)``.
        n_zsl_wrong: #(ZSL wrong).
    """

    value: float | None
    n_both: int
    n_ft: int
    n_icl: int
    n_zsl_wrong: int

    @property
    def chance(self) -> float | None:
        """Rec2FTP if FT's fixes were a random subset of the ZSL errors: #(ICL fixes)/#(wrong)."""
        return self.n_icl / self.n_zsl_wrong if self.n_zsl_wrong else None

    def to_json(self) -> dict:
        return asdict(self) | {"chance": self.chance}


def rec2ftp(
    zsl_correct: Bool[Tensor, " n"], ft_correct: Bool[Tensor, " n"], icl_correct: Bool[Tensor, " n"]
) -> Rec2FTP:
    """``Rec2FTP = #(ZSL wrong ∧ FT right ∧ ICL right) / #(ZSL wrong ∧ FT right)`` (Dai et al.
    §5.1): how many of the queries that fine-tuning fixes ICL fixes too."""
    wrong = ~zsl_correct
    n_ft = int((wrong & ft_correct).sum())
    n_both = int((wrong & ft_correct & icl_correct).sum())
    n_icl = int((wrong & icl_correct).sum())
    value = n_both / n_ft if n_ft else None
    return Rec2FTP(value, n_both, n_ft, n_icl, int(wrong.sum()))


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine along the last axis; NaN where either vector is zero (undefined, not 0)."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def simaou(
    h_zsl: Float[Tensor, "layer n d_model"],
    h_icl: Float[Tensor, "layer n d_model"],
    h_ft: Float[Tensor, "layer n d_model"],
) -> Float[Tensor, "layer n"]:
    """SimAOU per layer and example (§5.2): ``cos(ĥ_ICL − ĥ_ZSL, ĥ_FT − ĥ_ZSL)``, ``ĥ = h/‖h‖``.

    ``h`` is the attention output at the recorded token. NaN where FT leaves ``h``
    exactly unchanged (a zero update has no direction).
    """
    zsl, icl, ft = (F.normalize(h.double(), dim=-1) for h in (h_zsl, h_icl, h_ft))
    return _cosine(icl - zsl, ft - zsl)


def simaou_random(
    h_zsl: Float[Tensor, "layer n d_model"],
    h_icl: Float[Tensor, "layer n d_model"],
    kind: Literal["uniform", "gaussian"],
    generator: torch.Generator,
) -> Float[Tensor, "layer n"]:
    """SimAOU's random baseline: ``cos(ĥ_ICL − ĥ_ZSL, r)``.

    ``"uniform"`` is the official code's ``r ~ U[0, 1)^d``: not centred, so the cosine
    measures how much the ICL update points along the all-ones direction and need not be near
    0. ``"gaussian"`` (``r ~ N(0, I)``, isotropic) has expectation exactly 0 for any update: the
    fairer control.
    """
    delta = F.normalize(h_icl.double(), dim=-1) - F.normalize(h_zsl.double(), dim=-1)
    if kind == "uniform":
        r = torch.rand(delta.shape, generator=generator, dtype=torch.float64)
    elif kind == "gaussian":
        r = torch.randn(delta.shape, generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"kind must be 'uniform' or 'gaussian', not {kind!r}.")
    return _cosine(delta, r)


def simam(
    a: Float[Tensor, "layer n head w"],
    b: Float[Tensor, "layer n head w"],
    mask: Bool[Tensor, "n w"],
) -> Float[Tensor, "layer n"]:
    """SimAM per layer and example (§5.3): cosine of two settings' pre-softmax score rows over
    the query's own tokens (``mask``), per head, averaged over heads.

    ``simam(icl, ft, mask)`` is "after", ``simam(icl, zsl, mask)`` "before".
    """
    keep = mask[None, :, None, :]
    per_head = _cosine(torch.where(keep, a, 0), torch.where(keep, b, 0))
    return per_head.mean(-1)


def dual_attention(
    ft_query: Float[Tensor, "layer n d_q"], train_queries: Float[Tensor, "layer token d_q"]
) -> Float[Tensor, "layer n token"]:
    """FT's dual-form attention logits (the official code's ``q·q``): the FT model's query
    vector at the recorded token of the ZSL prompt dotted with every training token's query
    vector (both ``/√d_head``, all heads concatenated)."""
    return torch.einsum("lnd,ltd->lnt", ft_query.double(), train_queries.double())


def kendall_per_layer(
    icl_logits: Float[Tensor, "layer n token"],
    ft_logits: Float[Tensor, "layer n token"],
    token_demo: Int[Tensor, " token"] | None = None,
) -> Float[Tensor, "layer n"]:
    """Kendall's τ (``scipy.stats.kendalltau``, τ-b) between ICL's attention to the
    demonstration tokens and FT's dual-form attention to the training tokens (§5.4).

    Both logits are softmaxed over the tokens. With ``token_demo`` (each token's demonstration)
    the weights are first summed per demonstration (the example-level variant). NaN where τ is
    undefined (a constant vector).
    """
    from scipy.stats import kendalltau

    a = icl_logits.double().softmax(-1)
    b = ft_logits.double().softmax(-1)
    if token_demo is not None:
        n_demo = int(token_demo.max()) + 1
        index = token_demo.to(a.device).expand_as(a)
        a = a.new_zeros(*a.shape[:2], n_demo).scatter_add(-1, index, a)
        b = b.new_zeros(*b.shape[:2], n_demo).scatter_add(-1, index, b)
    a_np, b_np = a.numpy(), b.numpy()
    out = np.full(a.shape[:2], np.nan)
    for layer in range(a.shape[0]):
        for i in range(a.shape[1]):
            tau = kendalltau(a_np[layer, i], b_np[layer, i]).statistic
            out[layer, i] = tau
    return torch.from_numpy(out)


def layer_summary(values: Float[Tensor, "layer n"]) -> dict:
    """``{"per_layer": [...], "mean": x}``: the mean over examples per layer, then over layers.

    NaN entries (undefined for that example) are left out; a layer with none defined is
    ``None``, and so is the mean when no layer is defined.
    """
    per_layer: list[float | None] = []
    for row in values.double():
        ok = row[~row.isnan()]
        per_layer.append(float(ok.mean()) if len(ok) else None)
    defined = [v for v in per_layer if v is not None]
    return {"per_layer": per_layer, "mean": float(np.mean(defined)) if defined else None}


# ------------------------------------------------------------------------------ comparison
@dataclass
class _Captured:
    """One setting over all queries: per-example tensors ready for the metrics."""

    predicted: Int[Tensor, " n"]
    attn_out: Float[Tensor, "layer n d_model"]
    query: Float[Tensor, "layer n d_q"]
    query_scores: list[Tensor]  # per example: [layer, head, w_i], the query's own tokens
    query_ids: list[Tensor]  # per example: the query's own token ids (to check alignment)
    demo_logits: Tensor | None = None  # [layer, n, token]: ICL scores to training tokens


def _run_setting(
    model,
    task: Task,
    demonstrations: Sequence[Example],
    queries: Sequence[Example],
    *,
    record_at: RecordAt,
    query_vector: QueryVector,
    scores_from: QueryVector,
    batch_size: int,
    train_ids: list[list[int]] | None = None,
) -> _Captured:
    preds, outs, qs, q_scores, q_ids, demo_logits = [], [], [], [], [], []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        batch, recorded = dual_form_batch(model, task, demonstrations, chunk, record_at=record_at)
        cap = capture_setting(
            model, batch, recorded, query_vector=query_vector, scores_from=scores_from
        )
        preds.append(cap.predicted)
        outs.append(cap.attn_out)
        qs.append(cap.query)
        ids, demo_index = batch.input_ids.cpu(), batch.demo_index.cpu()
        for b in range(len(chunk)):
            own = (demo_index[b] == batch.n_demos).nonzero().flatten()
            q_scores.append(cap.scores[:, b][:, :, own])
            q_ids.append(ids[b, own])
        if train_ids is not None:
            positions = _training_positions(ids, demo_index, train_ids)
            index = positions[None, :, None, :].expand(
                cap.scores.shape[0], -1, cap.scores.shape[2], -1
            )
            demo_logits.append(cap.scores.gather(-1, index).sum(2))
    return _Captured(
        torch.cat(preds),
        torch.cat(outs, dim=1),
        torch.cat(qs, dim=1),
        q_scores,
        q_ids,
        torch.cat(demo_logits, dim=1) if train_ids is not None else None,
    )


def _training_positions(
    ids: Int[Tensor, "batch pos"], demo_index: Int[Tensor, "batch pos"], train_ids: list[list[int]]
) -> Int[Tensor, "batch token"]:
    """Where each training token sits in each ICL prompt (separators and BOS left out).

    Demonstration ``k`` occupies the positions with ``demo_index == k``: its formatted tokens,
    then the separator. Its training tokens must be the first of them, token for token.
    """
    out = []
    for b in range(ids.shape[0]):
        row = []
        for k, expected in enumerate(train_ids):
            span = (demo_index[b] == k).nonzero().flatten()
            got = ids[b, span[: len(expected)]].tolist()
            if got != expected:
                raise ValueError(
                    f"Demonstration {k} tokenises differently inside the ICL prompt ({got}) "
                    f"and on its own ({expected}), so ICL's attention to its tokens cannot be "
                    "matched with FT's training tokens (Kendall). Use a separator that the "
                    "tokenizer keeps apart from the template (e.g. a newline)."
                )
            row.append(span[: len(expected)])
        out.append(torch.cat(row))
    return torch.stack(out)


def _simam_inputs(
    icl: _Captured, other: _Captured
) -> tuple[Float[Tensor, "layer n head w"], Float[Tensor, "layer n head w"], Bool[Tensor, "n w"]]:
    """Right-aligned, zero-padded score rows over the query's own tokens, and their mask."""
    width = max(s.shape[-1] for s in icl.query_scores)
    n = len(icl.query_scores)
    layers, heads = icl.query_scores[0].shape[:2]
    a = torch.zeros(layers, n, heads, width)
    b = torch.zeros(layers, n, heads, width)
    mask = torch.zeros(n, width, dtype=torch.bool)
    for i, (sa, sb) in enumerate(zip(icl.query_scores, other.query_scores, strict=True)):
        if not torch.equal(icl.query_ids[i], other.query_ids[i]):
            raise ValueError(
                f"Query {i} tokenises differently after the demonstrations than on its own, so "
                "its score rows cannot be compared token by token (SimAM)."
            )
        w = sa.shape[-1]
        a[:, i, :, width - w :] = sa
        b[:, i, :, width - w :] = sb
        mask[i, width - w :] = True
    return a, b, mask


@dataclass
class DualFormResult:
    """ZSL, ICL and FT on one demonstration set, every metric at every learning rate.

    Attributes:
        lrs: The grid.
        selected_lr: The lr with the highest validation accuracy (ties: the smallest lr).
        accuracy: ``{"zsl", "icl", "zsl_validation"}`` accuracies on the queries / validation.
        grid: One dict per lr: ``lr``, ``relative_update``, ``losses``, ``validation_accuracy``,
            ``ft_accuracy``, ``n_changed`` (FT predictions that differ from ZSL's),
            ``rec2ftp``, ``simaou``, ``simam_after``, ``kendall_token``, ``kendall_example``
            (``{"per_layer", "mean"}``, ``None`` where undefined).
        baselines: lr-independent controls: ``simam_before``, ``simaou_uniform``,
            ``simaou_gaussian``, ``kendall_random_token``, ``kendall_random_example``.
        n: Queries; ``n_validation``: validation examples; ``n_kendall``: queries in Kendall.
        n_train_tokens: Training tokens of the dual form (= ICL demonstration tokens).
        settings: Recorded position, query-vector variants, shots.
    """

    lrs: list[float]
    selected_lr: float
    accuracy: dict
    grid: list[dict]
    baselines: dict
    n: int
    n_validation: int
    n_kendall: int
    n_train_tokens: int
    settings: dict

    @property
    def selected(self) -> dict:
        """The grid entry of the selected lr."""
        return self.grid[self.lrs.index(self.selected_lr)]

    def to_json(self) -> dict:
        return asdict(self)


def _accuracy(predicted: Tensor, queries: Sequence[Example]) -> float:
    labels = torch.tensor([q.label for q in queries])
    return float((predicted == labels).double().mean())


def check_lrs(lrs: Sequence[float]) -> list[float]:
    """The lr grid as floats; at least one, none negative (``lr = 0`` is FT = ZSL)."""
    lrs = [float(lr) for lr in lrs]
    if not lrs:
        raise ValueError("compare_settings needs at least one learning rate (--lrs).")
    if any(lr < 0 or not math.isfinite(lr) for lr in lrs):
        raise ValueError(
            f"Learning rates must be finite and >= 0 (an SGD step θ − lr·∇), got {lrs} (--lrs)."
        )
    return lrs


def compare_settings(
    model,
    task: str | Task,
    demonstrations: Sequence[Example],
    queries: Sequence[Example],
    validation: Sequence[Example],
    lrs: Sequence[float],
    *,
    record_at: RecordAt = "last",
    kendall_query: QueryVector = "pre_rotary",
    simam_scores: QueryVector = "post_rotary",
    kendall_n: int | None = 100,
    batch_size: int = 8,
    seed: int = 0,
) -> DualFormResult:
    """ZSL, ICL and FT (one K/V fine-tuning per lr in ``lrs``) on the same queries; every metric.

    ``demonstrations`` are the ICL context and FT's training set, in the same order;
    ``validation`` (disjoint from ``queries``) chooses the lr by FT's zero-shot accuracy.
    Kendall uses the first ``kendall_n`` queries (the paper: 100; ``None``: all). ``seed`` seeds
    the random baselines. The model is unchanged afterwards.
    """
    task = get_task(task)
    lrs = check_lrs(lrs)
    common = dict(
        record_at=record_at,
        query_vector=kendall_query,
        scores_from=simam_scores,
        batch_size=batch_size,
    )
    train_ids = [_demo_ids(model, task, d) for d in demonstrations]
    train_ids = [ids[n_bos:] for ids, n_bos in train_ids]
    zsl = _run_setting(model, task, [], queries, **common)
    icl = _run_setting(model, task, demonstrations, queries, train_ids=train_ids, **common)
    zsl_val = _run_setting(model, task, [], validation, **common)
    correct = {
        "zsl": zsl.predicted == torch.tensor([q.label for q in queries]),
        "icl": icl.predicted == torch.tensor([q.label for q in queries]),
    }
    generator = torch.Generator().manual_seed(seed)
    a_before, b_before, mask = _simam_inputs(icl, zsl)
    k_n = len(queries) if kendall_n is None else min(kendall_n, len(queries))
    icl_demo = icl.demo_logits[:, :k_n]
    token_demo = torch.cat([torch.full((len(t),), k) for k, t in enumerate(train_ids)])
    random_logits = torch.rand(icl_demo.shape, generator=generator, dtype=torch.float64).log()
    baselines = {
        "simam_before": layer_summary(simam(a_before, b_before, mask)),
        "simaou_uniform": layer_summary(
            simaou_random(zsl.attn_out, icl.attn_out, "uniform", generator)
        ),
        "simaou_gaussian": layer_summary(
            simaou_random(zsl.attn_out, icl.attn_out, "gaussian", generator)
        ),
        # log of a uniform vector: its softmax is the uniform vector normalised (same ranks)
        "kendall_random_token": layer_summary(kendall_per_layer(icl_demo, random_logits)),
        "kendall_random_example": layer_summary(
            kendall_per_layer(icl_demo, random_logits, token_demo)
        ),
    }
    grid = []
    for lr in lrs:
        with kv_finetuned(model, task, demonstrations, lr, query_vector=kendall_query) as trace:
            ft = _run_setting(model, task, [], queries, **common)
            ft_val = _run_setting(model, task, [], validation, **common)
        ft_correct = ft.predicted == torch.tensor([q.label for q in queries])
        a_after, b_after, _ = _simam_inputs(icl, ft)
        dual = dual_attention(ft.query[:, :k_n], trace.train_queries)
        grid.append(
            {
                "lr": lr,
                "relative_update": trace.relative_update,
                "losses": trace.losses,
                "validation_accuracy": _accuracy(ft_val.predicted, validation),
                "ft_accuracy": _accuracy(ft.predicted, queries),
                "n_changed": int((ft.predicted != zsl.predicted).sum()),
                "rec2ftp": rec2ftp(correct["zsl"], ft_correct, correct["icl"]).to_json(),
                "simaou": layer_summary(simaou(zsl.attn_out, icl.attn_out, ft.attn_out)),
                "simam_after": layer_summary(simam(a_after, b_after, mask)),
                "kendall_token": layer_summary(kendall_per_layer(icl_demo, dual)),
                "kendall_example": layer_summary(kendall_per_layer(icl_demo, dual, token_demo)),
            }
        )
    best = max(g["validation_accuracy"] for g in grid)
    selected = min(g["lr"] for g in grid if g["validation_accuracy"] == best)
    return DualFormResult(
        lrs=lrs,
        selected_lr=selected,
        accuracy={
            "zsl": _accuracy(zsl.predicted, queries),
            "icl": _accuracy(icl.predicted, queries),
            "zsl_validation": _accuracy(zsl_val.predicted, validation),
        },
        grid=grid,
        baselines=baselines,
        n=len(queries),
        n_validation=len(validation),
        n_kendall=k_n,
        n_train_tokens=len(token_demo),
        settings={
            "record_at": record_at,
            "kendall_query": kendall_query,
            "simam_scores": simam_scores,
            "n_demonstrations": len(demonstrations),
        },
    )


# ---------------------------------------------------------------------------------- figures
def plot_dual_form(summary: dict, title: str = "") -> Figure:
    """SimAOU, SimAM and Kendall per layer at the selected lr, each beside its baseline.

    ``summary`` is a [`DualFormResult`][anchor_lens.dualform.DualFormResult]'s JSON (or the
    seed-averaged one the CLI writes): ``selected`` (a grid entry) and ``baselines``.
    """
    import matplotlib.pyplot as plt

    nan = float("nan")

    def values(entry: dict) -> list[float]:
        return [nan if v is None else v for v in entry["per_layer"]]

    sel, base = summary["selected"], summary["baselines"]
    panels = [
        ("SimAOU", [("ICL·FT update", sel["simaou"]), ("uniform [0,1)", base["simaou_uniform"]),
                    ("Gaussian", base["simaou_gaussian"])]),
        ("SimAM", [("after (ICL vs FT)", sel["simam_after"]),
                   ("before (ICL vs ZSL)", base["simam_before"])]),
        ("Kendall τ", [("token", sel["kendall_token"]), ("example", sel["kendall_example"]),
                       ("random (token)", base["kendall_random_token"])]),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.4), layout="constrained")
    for ax, (name, lines) in zip(axes, panels, strict=True):
        for label, entry in lines:
            ax.plot(range(len(entry["per_layer"])), values(entry), label=label)
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="layer", ylabel=name, title=name)
        ax.legend(frameon=False, fontsize=8)
    lr = summary["selected"]["lr"]
    lrs = ", ".join(f"{x:g}" for x in (lr if isinstance(lr, list) else [lr]))
    fig.suptitle(f"{title}  (selected lr {lrs})".strip())
    return fig


def plot_lr_sweep(summary: dict, title: str = "") -> Figure:
    """Every metric against the size of the K/V update (``‖Δθ‖/‖θ‖``), one point per lr."""
    import matplotlib.pyplot as plt

    grid = summary["grid"]
    x = [g["relative_update"] for g in grid]
    nan = float("nan")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.4), layout="constrained")
    for key, label in (
        ("simaou", "SimAOU"),
        ("simam_after", "SimAM after"),
        ("kendall_token", "Kendall (token)"),
        ("kendall_example", "Kendall (example)"),
    ):
        y = [nan if g[key]["mean"] is None else g[key]["mean"] for g in grid]
        left.plot(x, y, marker="o", label=label)
    left.axhline(summary["baselines"]["simam_before"]["mean"], color="grey", ls="--", lw=0.8,
                 label="SimAM before")  # fmt: skip
    left.set(xscale="log", xlabel="relative K/V update ‖Δθ‖/‖θ‖", ylabel="metric")
    left.legend(frameon=False, fontsize=8)
    rec = [nan if g["rec2ftp"]["value"] is None else g["rec2ftp"]["value"] for g in grid]
    right.plot(x, [g["ft_accuracy"] for g in grid], marker="o", label="FT accuracy")
    right.plot(x, rec, marker="s", label="Rec2FTP")
    right.axhline(summary["accuracy"]["zsl"], color="grey", ls=":", label="ZSL accuracy")
    right.axhline(summary["accuracy"]["icl"], color="k", ls=":", label="ICL accuracy")
    right.set(xscale="log", xlabel="relative K/V update ‖Δθ‖/‖θ‖", ylim=(-0.05, 1.05))
    right.legend(frameon=False, fontsize=8)
    fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------ seeds and report
def _mean_layers(entries: list[dict]) -> dict:
    """Seed average of ``{"per_layer", "mean"}`` summaries (undefined entries left out)."""
    per_layer: list[float | None] = []
    for values in zip(*(e["per_layer"] for e in entries), strict=True):
        ok = [v for v in values if v is not None]
        per_layer.append(float(np.mean(ok)) if ok else None)
    defined = [v for v in per_layer if v is not None]
    return {"per_layer": per_layer, "mean": float(np.mean(defined)) if defined else None}


def _pooled_rec2ftp(entries: list[dict]) -> dict:
    counts = {k: sum(e[k] for e in entries) for k in ("n_both", "n_ft", "n_icl", "n_zsl_wrong")}
    value = counts["n_both"] / counts["n_ft"] if counts["n_ft"] else None
    chance = counts["n_icl"] / counts["n_zsl_wrong"] if counts["n_zsl_wrong"] else None
    return {"value": value, **counts, "chance": chance}


_LAYERED = ("simaou", "simam_after", "kendall_token", "kendall_example")


def _merge_entries(entries: list[dict]) -> dict:
    lrs = [e["lr"] for e in entries]
    out = {
        "lr": lrs if len(set(lrs)) > 1 else lrs[0],
        "rec2ftp": _pooled_rec2ftp([e["rec2ftp"] for e in entries]),
        "n_changed": sum(e["n_changed"] for e in entries),
    }
    for key in ("relative_update", "validation_accuracy", "ft_accuracy"):
        out[key] = float(np.mean([e[key] for e in entries]))
    for key in _LAYERED:
        out[key] = _mean_layers([e[key] for e in entries])
    return out


def summarise_seeds(records: list[dict]) -> dict:
    """Average [`DualFormResult`][anchor_lens.dualform.DualFormResult] JSONs over seeds.

    Layer curves are averaged per layer over the seeds where they are defined, then over
    layers; Rec2FTP pools the counts of every seed (``None`` when no query is fixed by FT);
    ``selected`` merges each seed's own selected lr.
    """
    lrs = records[0]["lrs"]
    selected = [r["grid"][r["lrs"].index(r["selected_lr"])] for r in records]
    return {
        "lrs": lrs,
        "n": records[0]["n"],
        "n_seeds": len(records),
        "selected_lrs": [r["selected_lr"] for r in records],
        "accuracy": {
            "zsl": float(np.mean([r["accuracy"]["zsl"] for r in records])),
            "icl": float(np.mean([r["accuracy"]["icl"] for r in records])),
            "ft_selected": float(np.mean([s["ft_accuracy"] for s in selected])),
        },
        "selected": _merge_entries(selected),
        "grid": [_merge_entries([r["grid"][i] for r in records]) for i in range(len(lrs))],
        "baselines": {
            key: _mean_layers([r["baselines"][key] for r in records])
            for key in records[0]["baselines"]
        },
    }


def _f(value: float | None, spec: str = ".3f") -> str:
    return "undefined" if value is None else format(value, spec)


#: How far SimAOU, SimAM "after" and Kendall's τ must exceed their baselines for a claim to
#: hold (the paper: 0.19–0.23 against ≈ 0; SimAM 0.43–0.44 against 0.34–0.36); a difference
#: inside it is noise at the n measured here, or an FT update too small to matter.
CLEAR_MARGIN = 0.05


def dual_form_findings(summary: dict) -> list:
    """The paper's four claims checked on a seed-averaged summary, at the selected lr.

    SimAOU and Kendall must beat their random baselines (Gaussian; uniform) and SimAM "after"
    must beat "before" by more than ``CLEAR_MARGIN``; Rec2FTP must exceed its chance level
    (the share of ZSL errors that ICL fixes), and is undefined when FT fixes nothing.
    """
    from .report import Finding

    sel, base = summary["selected"], summary["baselines"]

    def above(value, reference, margin: float = 0.0) -> bool | None:
        return None if value is None or reference is None else value > reference + margin

    def spread(key: str) -> str:
        values = [g[key]["mean"] for g in summary["grid"] if g[key]["mean"] is not None]
        return f" (over the lr grid: {min(values):.3f} to {max(values):.3f})" if values else ""

    rec = sel["rec2ftp"]
    return [
        Finding(
            "SimAOU: ICL's and FT's updates of the attention output point the same way "
            f"(above the random baseline ≈ 0 by more than {CLEAR_MARGIN}).",
            above(sel["simaou"]["mean"], base["simaou_gaussian"]["mean"], CLEAR_MARGIN),
            f"SimAOU {_f(sel['simaou']['mean'])}{spread('simaou')}; random Gaussian "
            f"{_f(base['simaou_gaussian']['mean'])}, uniform [0,1) (official) "
            f"{_f(base['simaou_uniform']['mean'])}",
        ),
        Finding(
            "SimAM: ICL's attention scores are closer to FT's than to ZSL's (after > before by "
            f"more than {CLEAR_MARGIN}).",
            above(sel["simam_after"]["mean"], base["simam_before"]["mean"], CLEAR_MARGIN),
            f"after {_f(sel['simam_after']['mean'])}{spread('simam_after')}; before "
            f"{_f(base['simam_before']['mean'])}",
        ),
        Finding(
            "Kendall: ICL's attention to demonstration tokens ranks them as FT's dual-form "
            f"attention ranks its training tokens (τ above random by more than {CLEAR_MARGIN}).",
            above(sel["kendall_token"]["mean"], base["kendall_random_token"]["mean"], CLEAR_MARGIN),
            f"token τ {_f(sel['kendall_token']['mean'])}{spread('kendall_token')} vs random "
            f"{_f(base['kendall_random_token']['mean'])}; example τ "
            f"{_f(sel['kendall_example']['mean'])} vs random "
            f"{_f(base['kendall_random_example']['mean'])}",
        ),
        Finding(
            "Rec2FTP: ICL also fixes most queries that FT fixes (above the chance level "
            "#(ZSL wrong ∧ ICL right)/#(ZSL wrong)).",
            above(rec["value"], rec["chance"]),
            f"Rec2FTP {_f(rec['value'])} = {rec['n_both']}/{rec['n_ft']}, chance "
            f"{_f(rec['chance'])} = {rec['n_icl']}/{rec['n_zsl_wrong']}",
        ),
    ]


def dual_form_markdown(
    summary: dict, *, model: str, task: str, extra: str = "", findings: list | None = None
) -> str:
    """``report.md``: the four claims, then every metric across the lr grid.

    ``findings`` are [`dual_form_findings`][anchor_lens.dualform.dual_form_findings]
    ``(summary)``, computed here unless given.
    """
    from .report import findings_table, tally

    findings = dual_form_findings(summary) if findings is None else findings
    held, checked = tally(findings)
    acc = summary["accuracy"]
    lines = [
        f"# ICL as implicit fine-tuning (Dai et al.): {task} on {model}",
        "",
        f"{summary['n']} queries × {summary['n_seeds']} seed(s); {held} of {checked} checkable "
        f"claims hold at the selected lr ({', '.join(f'{lr:g}' for lr in summary['selected_lrs'])}"
        f" per seed). Accuracy ZSL {acc['zsl']:.3f}, FT {acc['ft_selected']:.3f}, ICL "
        f"{acc['icl']:.3f}.",
        "",
        *findings_table(findings),
        "",
        "Every lr of the grid (seed means; Rec2FTP pools the seeds' counts):",
        "",
        "| lr | ‖Δθ‖/‖θ‖ | val. acc. | FT acc. | changed | Rec2FTP | SimAOU | SimAM after "
        "| Kendall token | Kendall example |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in summary["grid"]:
        r = g["rec2ftp"]
        lines.append(
            f"| {g['lr']:g} | {g['relative_update']:.2e} | {g['validation_accuracy']:.3f} | "
            f"{g['ft_accuracy']:.3f} | {g['n_changed']} | {_f(r['value'])} "
            f"({r['n_both']}/{r['n_ft']}) | {_f(g['simaou']['mean'])} | "
            f"{_f(g['simam_after']['mean'])} | {_f(g['kendall_token']['mean'])} | "
            f"{_f(g['kendall_example']['mean'])} |"
        )
    base = summary["baselines"]
    lines += [
        "",
        f"Baselines: SimAM before {_f(base['simam_before']['mean'])}; SimAOU random Gaussian "
        f"{_f(base['simaou_gaussian']['mean'])} (centred: the fair control), uniform [0,1) "
        f"{_f(base['simaou_uniform']['mean'])} (the official code's; not centred); Kendall "
        f"random token {_f(base['kendall_random_token']['mean'])}, example "
        f"{_f(base['kendall_random_example']['mean'])}.",
    ]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"
