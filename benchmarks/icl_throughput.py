"""ICL prediction throughput on the default model: batching and padding side.

Baseline: one query per forward pass (no padding). Compared: batches of B queries with left
padding (target in the last column, one unembedded position) and with right padding.
Prints examples/s and the ratio to the baseline; predictions must agree.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import anchor_lens as al

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def timed(model, queries, demos, **kw):
    al.evaluate(model, "sst2", queries[:4], demos, progress=False, **kw)  # warm-up
    start = time.perf_counter()
    result = al.evaluate(model, "sst2", queries, demos, progress=False, **kw)
    return len(queries) / (time.perf_counter() - start), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    model = al.load_model(args.model)
    test = al.load_examples("sst2", args.data, split="validation", limit=args.n)
    pool = al.load_examples("sst2", args.data, split="train")
    demos = al.sample_demonstrations(pool, "sst2", 1, seed=42, exclude=test)
    print(f"torch threads: {torch.get_num_threads()}, model: {args.model}, n={len(test)}")

    base, ref = timed(model, test, demos, batch_size=1)
    print(f"one at a time          {base:6.2f} ex/s   1.00x")
    for side in ("left", "right"):
        speed, res = timed(model, test, demos, batch_size=args.batch_size, padding_side=side)
        same = res.predictions == ref.predictions
        print(
            f"batch {args.batch_size:<2} {side:<5} padding {speed:6.2f} ex/s   {speed / base:.2f}x"
            f"   predictions identical: {same}"
        )


if __name__ == "__main__":
    main()
