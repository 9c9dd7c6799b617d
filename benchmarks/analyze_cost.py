"""Cost per query of `anchor-lens analyze` against two baselines, in one process.

* **Unavoidable passes** — what the §2 analysis cannot do without, batched, in plain
  `transformers` (eager attention): one forward + backward to the attention probabilities
  (saliency, Eq. 1) and four forwards with an edited attention mask (isolation: label / random
  positions × first / last k layers). Goal: analyze ≤ 1.3× this.
* **Per-example baseline** — the approach of the paper's code, written here in plain
  `transformers`: every query alone, a forward + backward with `output_attentions` for the
  saliency, a forward for the reference prediction, a forward with attentions for the
  deep-layer rows, and the four isolation forwards. Goal: analyze ≥ 2× faster.

The analyze side is the runner's per-query record step (`Analyze.records`: one saliency pass
that also gives the reference logits and class attention and keeps what the last k blocks
received, then the four isolation passes, of which the two last-k ones run only those k blocks)
on the same queries, in batches. Run from the repository root:
`.venv/bin/python benchmarks/analyze_cost.py [--n 16 --batch-size 4]`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from saliency import best_of  # the same median-of-repeats timer (run as a script)

from anchor_lens.episodes import sample_episode
from anchor_lens.experiments import Analyze, AnalyzeConfig
from anchor_lens.models import load_model, plain_hf_model
from anchor_lens.prompts import build_icl_batch
from anchor_lens.runner import Context

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def edited_mask(batch, rows: torch.Tensor) -> torch.Tensor:
    """A 4-D additive mask (causal + padding) with ``rows`` blocked from earlier keys."""
    n = batch.input_ids.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & batch.attention_mask.bool()[:, None]
    blocked = torch.zeros_like(allowed)
    blocked.scatter_(1, rows[:, :, None].expand(-1, -1, n), True)
    allowed &= ~(blocked & torch.ones(n, n, dtype=torch.bool).tril(-1))
    allowed |= torch.eye(n, dtype=torch.bool)  # never a fully masked row
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def hf_passes(hf, batch, *, saliency: bool, isolation: bool, reference: bool, deep: bool):
    """The plain-transformers passes for one batch (all layers' masks alike: same cost)."""
    ids, pos = batch.input_ids, batch.position_ids
    mask2d = batch.attention_mask
    rows = batch.label_positions
    if saliency:
        # Frozen weights, as the paper's code: the graph starts at the input embeddings.
        emb = hf.get_input_embeddings()(ids).detach().requires_grad_()
        out = hf(inputs_embeds=emb, attention_mask=mask2d, position_ids=pos, output_attentions=True)
        for a in out.attentions:
            a.retain_grad()
        logits = out.logits[torch.arange(len(batch)), batch.target_positions]
        F.cross_entropy(logits[:, batch.label_token_ids], batch.labels, reduction="sum").backward()
        _ = [(a * a.grad).sum(1).abs() for a in out.attentions]
    with torch.no_grad():
        if reference:
            hf(input_ids=ids, attention_mask=mask2d, position_ids=pos)
        if deep:
            hf(input_ids=ids, attention_mask=mask2d, position_ids=pos, output_attentions=True)
        if isolation:
            mask = edited_mask(batch, rows)
            for _ in range(4):
                hf(input_ids=ids, attention_mask=mask, position_ids=pos)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    bridge = load_model(args.model)
    hf = plain_hf_model(bridge)
    hf.set_attn_implementation("eager")
    for p in hf.parameters():
        p.requires_grad_(False)
    episode = sample_episode(
        "sst2", data=args.data / "validation.jsonl", demo_data=args.data / "train.jsonl", n=args.n
    )
    from anchor_lens.tasks import get_task

    task = get_task("sst2")
    config = AnalyzeConfig(out=Path("unused"), batch_size=args.batch_size)
    ctx = Context(config, task, episode.pools, model=bridge)
    chunks = [
        list(range(i, min(i + args.batch_size, episode.n)))
        for i in range(0, episode.n, args.batch_size)
    ]
    batches = [
        build_icl_batch(
            bridge, task, [episode.demos_for(i) for i in c], [episode.queries[i] for i in c]
        )
        for c in chunks
    ]
    singles = [
        build_icl_batch(bridge, task, [episode.demos_for(i)], [episode.queries[i]])
        for i in range(episode.n)
    ]

    def analyze():
        for c in chunks:
            Analyze().records(ctx, episode, c)

    def unavoidable():
        for b in batches:
            hf_passes(hf, b, saliency=True, isolation=True, reference=False, deep=False)

    def per_example():
        for b in singles:
            hf_passes(hf, b, saliency=True, isolation=True, reference=True, deep=True)

    print(
        f"torch threads {torch.get_num_threads()}, model {args.model}, n={episode.n}, "
        f"batch {args.batch_size}, prompt length ≈{batches[0].input_ids.shape[1]} tokens"
    )
    analyze()  # warm-up
    t_analyze = best_of(analyze, args.repeats) / episode.n
    t_unavoidable = best_of(unavoidable, args.repeats) / episode.n
    t_baseline = best_of(per_example, args.repeats) / episode.n
    print(f"unavoidable passes (plain HF, batched)  {t_unavoidable:6.3f} s/query  1.00x")
    print(f"analyze records (anchor-lens, batched)  {t_analyze:6.3f} s/query  "
          f"{t_analyze / t_unavoidable:.2f}x the unavoidable passes (goal <= 1.3x)")  # fmt: skip
    print(f"per-example plain HF (paper's approach) {t_baseline:6.3f} s/query  "
          f"analyze is {t_baseline / t_analyze:.2f}x faster (goal >= 2x)")  # fmt: skip


if __name__ == "__main__":
    main()
