"""Time per query of anchor-only compression (Hidden_anchor) against full ICL prompts.

The demonstrations' KV cache is built once per demonstration set (as in the paper, §3.2) and
its cost is included; both paths run the same queries in the same batches after a warm-up.
Prints seconds per query for each and the speed-up.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import anchor_lens as al
from anchor_lens.compression import (
    anchor_keep_mask,
    compress_context,
    compressed_logits,
    split_prompt,
)
from anchor_lens.episodes import sample_episode
from anchor_lens.icl import target_logits

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = {  # task -> (queries, demonstrations) in ../shared/data
    "sst2": ("sst2/validation.jsonl", "sst2/train.jsonl"),
    "trec": ("trec/train.jsonl", None),
    "agnews": ("ag_news/validation.jsonl", "ag_news/train.jsonl"),
    "emoc": ("emo/validation.jsonl", "emo/train.jsonl"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--tasks", nargs="+", default=list(FILES))
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    model = al.load_model(args.model)
    print(f"torch threads {torch.get_num_threads()}, model {args.model}, n={args.n}")
    print("task    context  kept  full s/query  anchor s/query  speed-up")
    for task in args.tasks:
        data, demo_data = FILES[task]
        episode = sample_episode(
            task,
            data=DATA / data,
            demo_data=demo_data and DATA / demo_data,
            n=args.n,
            seed=42,
            mode="fixed",  # the compressed cache is one context
        )
        queries, demos = episode.queries, episode.demonstrations
        batches = [
            al.build_icl_batch(
                model, task, demos, queries[i : i + args.batch_size], padding_side="right"
            )
            for i in range(0, len(queries), args.batch_size)
        ]
        split = split_prompt(batches[0])
        keep = anchor_keep_mask(batches[0], split)
        with torch.no_grad():
            target_logits(model, batches[0])
            compressed_logits(model, batches[0], compress_context(model, batches[0], keep))
            start = time.perf_counter()
            for b in batches:
                target_logits(model, b)
            full = (time.perf_counter() - start) / len(queries)
            start = time.perf_counter()
            context = compress_context(model, batches[0], keep)
            for b in batches:
                compressed_logits(model, b, context)
            anchor = (time.perf_counter() - start) / len(queries)
        print(
            f"{task:7s} {split:7d} {int(keep.sum()):5d} {full:13.3f} {anchor:15.3f} "
            f"{full / anchor:8.2f}x"
        )


if __name__ == "__main__":
    main()
