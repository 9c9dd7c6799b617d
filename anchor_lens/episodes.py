"""The paper's sampling protocol: where queries and demonstrations come from, and who sees what.

Wang et al. (2023, §2 "Experimental Settings"; the official ``attention_attr.py``) draw the
test queries with a seed and then, **for every query afresh**, ``k`` demonstrations per class
from the training split, in shuffled order. That is the default here (``mode="per_query"``):
each query is its own episode, so no single demonstration set decides every answer.
``mode="fixed"`` draws one set that all queries share. Anchor re-weighting and anchor-only
compression need it (a trained β or a compressed KV cache belongs to one context), and it is a
useful ablation; with a small model one set can dominate every prediction, so compare fixed sets
across several seeds.

Demonstrations never come from the queries. [`load_pools`][anchor_lens.episodes.load_pools]
takes them, in this order, from ``demo_data``; from the training file next to the query file
when ``data`` is a folder; from the task's training split on the hub; and only when none of
these can be had, from a disjoint, stratified part of the query data. ``Pools.demo_source``
says which, and every JSON file the CLI writes records it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ._hub import hub_offline_reason
from .tasks import Example, Task, draw_per_class, get_task, load_examples, sample_demonstrations

__all__ = [
    "Episode",
    "EpisodeMode",
    "Pools",
    "draw_episode",
    "load_pools",
    "sample_episode",
    "split_pool",
]

EpisodeMode = Literal["per_query", "fixed"]
_MODES = ("per_query", "fixed")


@dataclass(frozen=True)
class Pools:
    """Where queries are drawn from, where demonstrations are drawn from, and why.

    Attributes:
        queries: Candidate queries (the test data).
        demos: Candidate demonstrations, disjoint from ``queries`` unless the caller says so.
        demo_source: Where ``demos`` came from, in words (recorded in every JSON output).
        split_from_queries: ``demos`` were split off the query data because no training data
            was given or reachable.
    """

    queries: list[Example]
    demos: list[Example]
    demo_source: str
    split_from_queries: bool = False

    def to_json(self) -> dict:
        return {
            "demo_source": self.demo_source,
            "demo_pool_split_from_queries": self.split_from_queries,
            "query_pool_size": len(self.queries),
            "demo_pool_size": len(self.demos),
        }


def split_pool(
    examples: Sequence[Example], task: Task, fraction: float = 0.25, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """``(queries, demos)``: a seeded, class-stratified split of one labelled set.

    ``ceil(fraction · n_c)`` examples of each class ``c`` go to the demonstration pool (at
    least one whenever the class has two or more), the rest stay queries, in their order.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}.")
    rng = random.Random(seed)
    by_class: list[list[int]] = [[] for _ in range(task.n_classes)]
    for i, e in enumerate(examples):
        by_class[e.label].append(i)
    to_demo: set[int] = set()
    for members in by_class:
        if len(members) < 2:
            continue
        take = min(len(members) - 1, max(1, math.ceil(fraction * len(members))))
        to_demo.update(rng.sample(members, take))
    queries = [e for i, e in enumerate(examples) if i not in to_demo]
    demos = [e for i, e in enumerate(examples) if i in to_demo]
    return queries, demos


def _describe(source: str | Path | None, task: Task) -> str:
    if source is not None:
        return str(source)
    return f"hub dataset {task.hub_id!r}" if task.hub_id else "the embedded demo set"


def load_pools(
    task: Task,
    data: str | Path | None = None,
    demo_data: str | Path | None = None,
    *,
    demo_fraction: float = 0.25,
) -> Pools:
    """Query and demonstration pools for ``task``, never silently the same data.

    Queries come from ``data`` (a file, a folder holding ``{split}.jsonl``, or a hub id;
    default: the task's test split on the hub, or the embedded set for ``sentiment-demo``).
    Demonstrations come from the first of:

    1. ``demo_data``;
    2. the ``{task.demo_split}`` file beside the queries when ``data`` is a folder;
    3. the task's demonstration split on the hub, if the task has one and the hub answers;
    4. a seeded, class-stratified ``demo_fraction`` of the query data
       ([`split_pool`][anchor_lens.episodes.split_pool]), removed from the queries, with
       ``split_from_queries=True``.
    """
    queries = load_examples(task, data)
    if demo_data is not None:
        demos = load_examples(task, demo_data, split=task.demo_split)
        return Pools(queries, demos, f"--demo-data {demo_data}")
    if data is not None and Path(data).is_dir():
        beside = sorted(Path(data).glob(f"{task.demo_split}.*"))
        if beside:
            demos = load_examples(task, beside[0])
            where = f"{beside[0]} (the {task.demo_split} file beside the queries)"
            return Pools(queries, demos, where)
    why_not_hub = "the task has no hub dataset"
    if task.hub_id is not None:
        why_not_hub = hub_offline_reason()
        if data is None or why_not_hub is None:
            # Offline with no data at all, this raises HubUnreachableError: nothing to split.
            demos = load_examples(task, None, split=task.demo_split)
            where = f"split {task.demo_split!r} of hub dataset {task.hub_id!r}"
            return Pools(queries, demos, where)
        why_not_hub = f"the hub cannot be reached: {why_not_hub}"
    rest, demos = split_pool(queries, task, demo_fraction)
    return Pools(
        rest,
        demos,
        f"{len(demos)} of the {len(queries)} rows of {_describe(data, task)} held out as the "
        f"demonstration pool (stratified, seed 0; no training data given and {why_not_hub}); "
        f"queries come from the other {len(rest)}",
        split_from_queries=True,
    )


@dataclass
class Episode:
    """Queries and the demonstrations each one sees, for one seed.

    Attributes:
        queries: The drawn queries.
        demonstrations: One list per query (``mode="per_query"``), or one list shared by all
            queries (``mode="fixed"``). Every function that takes ``demonstrations`` accepts
            both forms.
        mode: ``"per_query"`` or ``"fixed"``.
        seed: The seed both draws used.
        shots: Demonstrations per class.
        pools: Where they came from.
    """

    queries: list[Example]
    demonstrations: list[list[Example]] | list[Example]
    mode: EpisodeMode
    seed: int
    shots: int
    pools: Pools | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return len(self.queries)

    def demos_for(self, i: int) -> list[Example]:
        """The demonstrations that query ``i`` sees."""
        return list(self.demonstrations[i] if self.mode == "per_query" else self.demonstrations)

    def to_json(self) -> dict:
        """The protocol and provenance, for results files (not the examples themselves)."""
        out = {"episode_mode": self.mode, "seed": self.seed, "shots": self.shots, "n": self.n}
        return out | (self.pools.to_json() if self.pools is not None else {})


def _per_query_demos(
    task: Task, queries: Sequence[Example], pool: Sequence[Example], shots: int, rng: random.Random
) -> list[list[Example]]:
    by_class: list[list[Example]] = [[] for _ in range(task.n_classes)]
    for e in pool:
        by_class[e.label].append(e)
    texts = [{e.text for e in members} for members in by_class]
    out = []
    for query in queries:
        # A query never sees itself: drop it from its class's candidates when it is there.
        candidates = [
            [e for e in members if e.text != query.text] if query.text in texts[c] else members
            for c, members in enumerate(by_class)
        ]
        out.append(draw_per_class(candidates, task, shots, rng))
    return out


def draw_episode(
    task: Task,
    pools: Pools,
    *,
    shots: int = 1,
    n: int | None = 200,
    seed: int = 42,
    mode: EpisodeMode = "per_query",
) -> Episode:
    """``n`` seeded queries from ``pools.queries`` and their demonstrations from ``pools.demos``.

    ``mode="per_query"`` (the paper's protocol) draws ``shots`` demonstrations per class afresh
    for every query, in shuffled order; ``mode="fixed"`` draws one such set for all queries.
    Either way the draw depends only on ``seed`` (not on batch size), and no query is ever its
    own demonstration.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1 query, got {n}.")
    if shots < 0:
        raise ValueError(f"shots must be 0 or more, got {shots}.")
    if not pools.queries:
        raise ValueError("The query pool is empty: give data with at least one row.")
    rng = random.Random(seed)
    candidates = list(pools.queries)
    queries = rng.sample(candidates, n) if n is not None and n < len(candidates) else candidates
    demonstrations: list[list[Example]] | list[Example]
    if mode == "fixed":
        demonstrations = (
            sample_demonstrations(pools.demos, task, shots, seed=seed, exclude=queries)
            if shots
            else []
        )
    else:
        demonstrations = _per_query_demos(task, queries, pools.demos, shots, rng)
    return Episode(queries, demonstrations, mode, seed, shots, pools)


def sample_episode(
    task: str | Task,
    *,
    data: str | Path | None = None,
    demo_data: str | Path | None = None,
    shots: int = 1,
    n: int | None = 200,
    seed: int = 42,
    mode: EpisodeMode = "per_query",
) -> Episode:
    """The paper's sampling protocol for one seed: [`load_pools`][anchor_lens.episodes.load_pools]
    then [`draw_episode`][anchor_lens.episodes.draw_episode]. ``task`` is a name or a
    [`Task`][anchor_lens.tasks.Task]: it is resolved here, once."""
    task = get_task(task)
    pools = load_pools(task, data, demo_data)
    return draw_episode(task, pools, shots=shots, n=n, seed=seed, mode=mode)
