"""The sampling protocol: per-query episodes, fixed sets, and where demonstrations come from."""

import json

import pytest

import anchor_lens as al
from anchor_lens import Example
from anchor_lens.episodes import Pools, draw_episode, load_pools, sample_episode, split_pool
from anchor_lens.tasks import get_task

SST2 = get_task("sst2")

POOL = [Example(f"demo {i}", i % 2) for i in range(40)]
TEST = [Example(f"query {i}", i % 2) for i in range(30)]


def _write(path, rows):
    lines = (json.dumps({"sentence": e.text, "label": e.label}) + "\n" for e in rows)
    path.write_text("".join(lines))
    return path


def test_per_query_episodes_draw_fresh_demonstrations_for_every_query():
    pools = Pools(TEST, POOL, "test")
    ep = draw_episode(SST2, pools, shots=2, n=20, seed=0)
    assert ep.mode == "per_query" and ep.n == 20 and len(ep.demonstrations) == 20
    for demos in ep.demonstrations:
        assert sorted(e.label for e in demos) == [0, 0, 1, 1]
        assert all(e in POOL for e in demos)
    # Fresh sets: with 20 candidates per class, 20 queries do not all see the same pair.
    assert len({tuple(e.text for e in d) for d in ep.demonstrations}) > 10
    # Shuffled order: both class orders occur.
    assert len({tuple(e.label for e in d) for d in ep.demonstrations}) > 1


def test_episodes_are_reproducible_and_seeded():
    pools = Pools(TEST, POOL, "test")
    a = draw_episode(SST2, pools, n=10, seed=1)
    assert a.queries == draw_episode(SST2, pools, n=10, seed=1).queries
    assert a.demonstrations == draw_episode(SST2, pools, n=10, seed=1).demonstrations
    assert a.demonstrations != draw_episode(SST2, pools, n=10, seed=2).demonstrations


def test_fixed_mode_shares_one_set():
    ep = draw_episode(SST2, Pools(TEST, POOL, "test"), shots=1, n=5, seed=0, mode="fixed")
    assert isinstance(ep.demonstrations[0], Example) and len(ep.demonstrations) == 2
    assert all(ep.demos_for(i) == ep.demonstrations for i in range(5))


def test_a_query_never_sees_itself():
    # Pool and queries are the same list: each query must be left out of its own draws.
    same = [Example(f"x{i}", i % 2) for i in range(4)]
    ep = draw_episode(SST2, Pools(same, same, "same"), shots=1, n=None, seed=0)
    for query, demos in zip(ep.queries, ep.demonstrations, strict=True):
        assert query not in demos


def test_draw_episode_errors():
    pools = Pools(TEST, POOL, "test")
    with pytest.raises(ValueError, match="n must be at least 1"):
        draw_episode(SST2, pools, n=0)
    with pytest.raises((ValueError, TypeError), match="mode"):  # TypeError: the type checker
        draw_episode(SST2, pools, mode="shared")
    with pytest.raises(ValueError, match="fewer than k=30"):
        draw_episode(SST2, pools, shots=30)
    with pytest.raises(ValueError, match="query pool is empty"):
        draw_episode(SST2, Pools([], POOL, "test"))


def test_split_pool_is_stratified_disjoint_and_fixed():
    queries, demos = split_pool(TEST, SST2, fraction=0.25)
    assert sorted(e.label for e in demos) == [0] * 4 + [1] * 4  # ceil(0.25 * 15) per class
    assert not set(queries) & set(demos) and len(queries) + len(demos) == len(TEST)
    assert split_pool(TEST, SST2, fraction=0.25) == (queries, demos)


def test_pools_prefer_demo_data_then_the_folder_then_split(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub's train split cannot be had
    test_file = _write(tmp_path / "validation.jsonl", TEST)
    train_file = _write(tmp_path / "train.jsonl", POOL)

    pools = load_pools(SST2, test_file, train_file)
    assert pools.demos == POOL and pools.queries == TEST and not pools.split_from_queries

    folder = load_pools(SST2, tmp_path)  # validation.jsonl is sst2's test split
    assert folder.demos == POOL and "train.jsonl" in folder.demo_source

    alone = load_pools(SST2, test_file)
    assert alone.split_from_queries and "HF_HUB_OFFLINE" in alone.demo_source
    assert not set(alone.queries) & set(alone.demos)
    assert len(alone.queries) + len(alone.demos) == len(TEST)
    assert alone.to_json()["demo_pool_split_from_queries"] is True


def test_embedded_default_splits_its_own_pool():
    pools = load_pools(get_task("sentiment-demo"))
    assert pools.split_from_queries and "embedded demo set" in pools.demo_source
    assert not {e.text for e in pools.queries} & {e.text for e in pools.demos}


def test_sample_episode_records_its_protocol():
    ep = sample_episode("sentiment-demo", n=8, seed=3)
    record = ep.to_json()
    assert record["episode_mode"] == "per_query" and record["n"] == 8 and record["seed"] == 3
    assert record["demo_pool_split_from_queries"] is True
    json.dumps(record, allow_nan=False)


def test_hub_offline_fails_fast_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(al.tasks.HubUnreachableError, match="--data"):
        al.load_examples("sst2")


def test_empty_data_file_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        al.load_examples("sst2", empty)


class _CountingRegistry(dict):
    def __init__(self, *args):
        super().__init__(*args)
        self.lookups = 0

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)


def test_a_task_name_is_resolved_once_at_the_entry_point(tmp_path, monkeypatch, tiny_model):
    """Entry points take a name or a Task and resolve it once; the layers below take the Task."""
    import anchor_lens.tasks

    registry = _CountingRegistry(anchor_lens.tasks.TASKS)
    monkeypatch.setattr(anchor_lens.tasks, "TASKS", registry)
    test_file = _write(tmp_path / "test.jsonl", TEST)
    train_file = _write(tmp_path / "train.jsonl", POOL)
    ep = sample_episode("sst2", data=test_file, demo_data=train_file, n=4, seed=0)
    assert registry.lookups == 1
    al.analysis.deep_layer_auc(tiny_model, "sst2", ep.queries, ep.demonstrations, progress=False)
    assert registry.lookups == 2
