"""Cost per query of the dual-form comparison (ZSL + ICL + FT) against three plain forwards.

* **Three plain forwards** — what comparing ZSL, ICL and FT cannot do without: the bridge's
  forward (no hooks, ``target_logits``) on the ZSL prompts, the ICL prompts, and the ZSL prompts
  again (for the fine-tuned model), batched.
* **The comparison** — [`compare_settings`][anchor_lens.dualform.compare_settings] with one lr
  on the same queries: the three settings with every capture hook (attention output, query
  vectors, score rows per layer), K/V fine-tuning (one forward + backward per demonstration,
  restored afterwards), the validation prompts that choose the lr, and every metric (Kendall
  on all queries). Each further lr of a grid adds fine-tuning, the FT and validation forwards
  and the metrics, not the ZSL and ICL forwards: the script times a 3-lr grid too.

Run from the repository root: ``.venv/bin/python benchmarks/dual_form_cost.py [--n 16]``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from saliency import best_of  # the same median-of-repeats timer (run as a script)

from anchor_lens.dualform import compare_settings
from anchor_lens.episodes import sample_episode
from anchor_lens.icl import target_logits
from anchor_lens.models import load_model
from anchor_lens.prompts import build_icl_batch
from anchor_lens.tasks import get_task, sample_demonstrations

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--shots", type=int, default=4, help="demonstrations per class")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    model = load_model(args.model)
    task = get_task("sst2")
    episode = sample_episode(
        task,
        data=args.data / "validation.jsonl",
        demo_data=args.data / "train.jsonl",
        n=args.n,
        shots=args.shots,
        mode="fixed",
    )
    queries, demos = episode.queries, episode.demonstrations
    validation = sample_demonstrations(
        episode.pools.demos, task, 1, seed=43, exclude=[*queries, *demos]
    )
    chunks = [queries[i : i + args.batch_size] for i in range(0, len(queries), args.batch_size)]
    zsl = [build_icl_batch(model, task, [], c) for c in chunks]
    icl = [build_icl_batch(model, task, demos, c) for c in chunks]

    @torch.no_grad()
    def plain():
        for batch in [*zsl, *icl, *zsl]:
            target_logits(model, batch)

    def comparison(lrs):
        return lambda: compare_settings(
            model, task, demos, queries, validation, lrs,
            batch_size=args.batch_size, kendall_n=None,
        )  # fmt: skip

    print(
        f"torch threads {torch.get_num_threads()}, model {args.model}, n={len(queries)}, "
        f"{len(demos)} demonstrations, batch {args.batch_size}, ICL prompt ≈"
        f"{icl[0].input_ids.shape[1]} tokens, {len(validation)} validation prompts"
    )
    plain()  # warm-up
    # Interleaved repeats (median of each): a load that comes and goes on a shared machine
    # then falls on all three alike.
    timings: dict[str, list[float]] = {"plain": [], "one": [], "three": []}
    for _ in range(args.repeats):
        timings["plain"].append(best_of(plain, 1))
        timings["one"].append(best_of(comparison([0.1]), 1))
        timings["three"].append(best_of(comparison([0.01, 0.1, 1.0]), 1))
    t_plain, t_one, t_three = (statistics.median(timings[k]) / len(queries) for k in timings)
    print(f"three plain forwards (ZSL, ICL, FT)   {t_plain:6.3f} s/query  1.00x")
    print(f"comparison, one lr (anchor-lens)      {t_one:6.3f} s/query  {t_one / t_plain:.2f}x")
    extra = (t_three - t_one) / 2
    print(f"comparison, three lrs                 {t_three:6.3f} s/query  "
          f"{t_three / t_plain:.2f}x (each further lr {extra:.3f} s/query)")  # fmt: skip


if __name__ == "__main__":
    main()
