"""Saliency cost on the default model.

1. Saliency for all layers (ones-placeholder hooks, gradients of the placeholders only)
   against a plain forward + backward of the same batch and loss (weights' gradients, no
   hooks). Goal: ≤ 1.1×.
2. information_flow batched (padding) against one example at a time. Goal: ≥ 1.5× examples/s.
Both baselines run in this process; the script prints the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import anchor_lens as al
from anchor_lens import analysis
from anchor_lens.episodes import sample_episode
from anchor_lens.hooks import SaliencyCapture
from anchor_lens.icl import target_logits

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--n", type=int, default=16, help="queries for the throughput part")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    model = al.load_model(args.model)
    episode = sample_episode(
        "sst2",
        data=args.data / "validation.jsonl",
        demo_data=args.data / "train.jsonl",
        shots=1,
        n=args.n,
        seed=42,
        mode="fixed",  # one shared set: the batch below reuses it
    )
    queries, demos = episode.queries, episode.demonstrations
    batch = al.build_icl_batch(model, "sst2", demos, queries[: args.batch_size])
    layers = tuple(range(model.cfg.n_layers))
    print(
        f"torch threads {torch.get_num_threads()}, model {args.model}, "
        f"batch {tuple(batch.input_ids.shape)}"
    )

    def loss_of(hooks=()):
        logits = target_logits(model, batch, hooks)[:, batch.label_token_ids]
        return F.cross_entropy(logits, batch.labels, reduction="sum")

    def plain():
        model.zero_grad(set_to_none=True)
        loss_of().backward()

    def saliency():
        capture = SaliencyCapture(layers)
        capture.saliency(loss_of(capture.hooks))

    plain()
    saliency()  # warm-up
    t_plain = best_of(plain, args.repeats)
    t_sal = best_of(saliency, args.repeats)
    model.zero_grad(set_to_none=True)
    print(f"plain forward+backward   {t_plain:6.2f} s   1.00x")
    print(
        f"saliency, all {len(layers)} layers {t_sal:6.2f} s   {t_sal / t_plain:.2f}x"
        "  (goal <= 1.10x)"
    )

    def flow(batch_size):
        return lambda: analysis.information_flow(
            model, "sst2", queries, demos, batch_size=batch_size, progress=False
        )

    t_one = best_of(flow(1), 1)
    t_batched = best_of(flow(args.batch_size), 1)
    one, batched = len(queries) / t_one, len(queries) / t_batched
    print(f"information_flow, 1 at a time   {one:5.2f} ex/s   1.00x")
    print(
        f"information_flow, batch {args.batch_size}       {batched:5.2f} ex/s   "
        f"{batched / one:.2f}x  (goal >= 1.50x)"
    )


if __name__ == "__main__":
    main()
