"""Learning plateaus (Fu et al., ICML 2024): tasks, model hooks, probes, curves, strategies."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from anchor_lens.plateau import (
    FactorTask,
    LinearTask,
    PlateauModelConfig,
    TrainConfig,
    attention_off_hooks,
    build_model,
    encode_pairs,
    fit_probe,
    item_representations,
    plateau_length,
    strategy_batch,
    summarize_lengths,
    train,
    training_loss,
)

SMALL = PlateauModelConfig(n_layers=2, d_model=16, n_heads=2)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: a second thread only adds synchronisation, and on a busy machine
    # oversubscribed threads make each small op many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task() -> FactorTask:
    return FactorTask(n_factors=3, n_values=4, n_maps=50, n_pairs=8, d_item=16)


# ------------------------------------------------------------------------------------ tasks
def test_labels_follow_the_sampled_map(task):
    batch = task.sample(64, torch.Generator().manual_seed(0))
    for b in range(len(batch)):
        f, k = int(batch.factor[b]), int(batch.map_index[b])
        expected = task.maps[k, f][batch.values[b, :, f]]
        assert torch.equal(batch.y[b], expected)
        # Items of a sequence are distinct training items, and x is the item's embedding.
        rows = [task.item_values.tolist().index(v) for v in batch.values[b].tolist()]
        assert len(set(rows)) == task.n_pairs
        assert set(rows) <= set(task.train_items.tolist())
        assert torch.equal(batch.x[b], task.items[rows])


def test_maps_are_permutations_and_dfix_uses_one_map(task):
    assert torch.equal(task.maps.sort(-1).values, torch.arange(4).expand(50, 3, 4))
    easy = task.with_maps(1)
    batch = easy.sample(128, torch.Generator().manual_seed(1))
    assert batch.map_index.eq(0).all()
    assert torch.equal(easy.maps[0], task.maps[0])  # D_fix is map 0 of the same world
    assert torch.equal(easy.items, task.items)
    # Under D_fix an item's label depends only on (factor, item): the map never varies.
    for f in range(3):
        rows = batch.factor == f
        assert torch.equal(batch.y[rows], task.maps[0, f][batch.values[rows][..., f]])


def test_generation_is_seeded_and_splits_are_disjoint(task):
    a = task.sample(8, torch.Generator().manual_seed(3))
    b = task.sample(8, torch.Generator().manual_seed(3))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not set(task.train_items.tolist()) & set(task.test_items.tolist())
    test = task.sample(8, torch.Generator().manual_seed(3), split="test", distinct=False)
    held_out = set(map(tuple, task.item_values[task.test_items].tolist()))
    assert set(map(tuple, test.values.flatten(0, 1).tolist())) <= held_out
    tiny = FactorTask(n_factors=2, n_values=4, n_pairs=8)  # 16 items, 3 held out
    with pytest.raises(ValueError, match="lower n_pairs"):
        tiny.sample(2, split="test")
    with pytest.raises(ValueError, match="lower n_pairs"):
        FactorTask(n_factors=2, n_values=2, n_pairs=8)


def test_entangled_items_hide_the_factors_from_a_linear_readout():
    def raw_probe(a: float) -> float:
        t = FactorTask(n_factors=3, n_values=4, entangle=a)
        tr, te = t.train_items, t.test_items
        return fit_probe(t.items[tr], t.item_values[tr], t.items[te], t.item_values[te], 4).accuracy

    assert raw_probe(0.0) > 0.95
    assert raw_probe(1.0) < 0.8


def test_linear_task():
    lin = LinearTask(d=4, n_pairs=6)
    batch = lin.sample(5, torch.Generator().manual_seed(0))
    assert torch.allclose(batch.y, torch.einsum("bnd,bd->bn", batch.x, batch.w))
    fixed = lin.with_maps(1).sample(5, torch.Generator().manual_seed(0))
    assert torch.equal(fixed.w, fixed.w[:1].expand(5, 4))


# ------------------------------------------------------------------------- model and hooks
def test_encode_pairs_interleaves_items_and_labels(task):
    batch = task.sample(2, torch.Generator().manual_seed(0))
    inputs = encode_pairs(batch.x, batch.y, 4)
    assert inputs.shape == (2, 16, 16 + 4)
    assert torch.equal(inputs[:, 0::2, :16], batch.x)
    assert torch.equal(inputs[:, 1::2, 16:].argmax(-1), batch.y)
    assert inputs[:, 0::2, 16:].eq(0).all() and inputs[:, 1::2, :16].eq(0).all()


def test_model_has_canonical_hook_points_and_is_causal(task):
    model = build_model(task, SMALL)
    for name in (
        "blocks.0.attn.hook_pattern",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_resid_post",
        "blocks.0.ln1.hook_normalized",
    ):
        assert name in model.hook_dict
    batch = task.sample(2, torch.Generator().manual_seed(0))
    inputs = encode_pairs(batch.x, batch.y, 4)
    out = model(inputs)
    changed = inputs.clone()
    changed[:, 5:] += 1.0
    assert torch.allclose(model(changed)[:, :5], out[:, :5], atol=1e-6)  # no look-ahead
    _, cache = model.run_with_cache(inputs)
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, 2, 16, 16)


def test_attention_off_makes_positions_independent(task):
    model = build_model(task, SMALL)
    batch = task.sample(2, torch.Generator().manual_seed(0))
    other = task.sample(2, torch.Generator().manual_seed(1))
    other.x[:, 3], other.y[:, 3] = batch.x[:, 3], batch.y[:, 3]  # only pair 3 is shared

    def resid(b, attention):
        return item_representations(model, b, layer=-1, attention=attention)[:, 3]

    assert torch.allclose(resid(batch, False), resid(other, False), atol=1e-5)
    assert not torch.allclose(resid(batch, True), resid(other, True), atol=1e-3)
    # The official replacement: attn_out equals the attention's input (LN1 of resid_pre).
    inputs = encode_pairs(batch.x, batch.y, 4)
    seen = {}
    grab = [
        ("blocks.0.ln1.hook_normalized", lambda t, hook: seen.__setitem__("in", t.clone())),
        ("blocks.0.hook_attn_out", lambda t, hook: seen.__setitem__("out", t.clone())),
    ]
    model.run_with_hooks(inputs, fwd_hooks=attention_off_hooks([0]) + grab)
    assert torch.equal(seen["in"], seen["out"])
    zero = attention_off_hooks([0], replace="zero") + grab
    model.run_with_hooks(inputs, fwd_hooks=zero)
    assert seen["out"].eq(0).all()


# ---------------------------------------------------------------------------------- probes
def test_probe_reads_a_hand_built_representation():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(4, (600, 2), generator=g)
    # Each factor value has a direction; noise on top. A linear probe must read both.
    dirs = torch.randn(2, 4, 12, generator=g)
    h = dirs[0, values[:, 0]] + dirs[1, values[:, 1]] + 0.1 * torch.randn(600, 12, generator=g)
    good = fit_probe(h[:400], values[:400], h[400:], values[400:], 4)
    assert good.accuracy > 0.95 and len(good.per_target) == 2
    noise = torch.randn(600, 12, generator=g)
    bad = fit_probe(noise[:400], values[:400], noise[400:], values[400:], 4)
    assert bad.accuracy < 0.45  # chance 0.25


# ---------------------------------------------------------------------------------- curves
def test_plateau_length_on_synthetic_curves():
    steps = list(range(0, 2001, 100))
    # Flat at chance until 1000, then up to 0.95: half the gain (0.6) is passed at 1100.
    acc = [0.25 if s <= 1000 else min(0.95, 0.25 + 0.0035 * (s - 1000)) for s in steps]
    p = plateau_length(steps, acc, 0.25)
    assert p.escaped and p.length == 1100
    assert math.isclose(p.threshold, 0.6)
    flat = plateau_length(steps, [0.26] * len(steps), 0.25)
    assert not flat.escaped and flat.length is None and flat.total_steps == 2000
    summary = summarize_lengths([p, flat, p])
    assert summary["n_escaped"] == 2 and summary["mean"] == 1100 and summary["sd"] == 0
    assert summary["lower_bound_mean"] == pytest.approx((1100 * 2 + 2000) / 3)
    with pytest.raises(ValueError, match="one accuracy per logged step"):
        plateau_length([0, 1], [0.3], 0.25)


# ------------------------------------------------------------------------------ strategies
def test_each_strategy_changes_what_it_should(task):
    easy = task.with_maps(1)

    def batch(strategy, step, **kw):
        cfg = TrainConfig(strategy=strategy, steps=100, batch_size=40, warmup_steps=10, **kw)
        return strategy_batch(task, easy, cfg, step, torch.Generator().manual_seed(0))

    assert batch("warmup", 0).map_index.eq(0).all()  # D_fix while warming up
    assert batch("warmup", 10).map_index.ne(0).any()  # the target task after
    assert torch.equal(batch("warmup", 10).y, batch("baseline", 10).y)
    mixed = batch("mixed", 50, mix_fraction=0.25)
    assert len(mixed) == 40 and mixed.map_index[:10].eq(0).all()
    assert mixed.map_index[10:].ne(0).any()
    assert batch("baseline", 0).map_index.ne(0).any()

    model = build_model(task, SMALL)
    b = batch("aux", 0)
    plain, parts = training_loss(model, b)
    assert set(parts) == {"main"}
    with_aux, parts = training_loss(model, b, aux_weight=0.1)
    assert set(parts) == {"main", "aux"}
    assert with_aux.item() == pytest.approx(plain.item() + 0.1 * parts["aux"], rel=1e-5)
    with pytest.raises(ValueError, match="choose one of"):
        TrainConfig(strategy="curriculum")
    with pytest.raises(ValueError, match="multiple"):
        TrainConfig(eval_every=100, probe_every=250)


def test_every_strategy_starts_from_the_same_weights(task):
    a, b = build_model(task, SMALL, seed=3), build_model(task, SMALL, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


# -------------------------------------------------------------------------------- training
def test_short_training_run_lowers_the_loss_and_is_reproducible(task):
    cfg = TrainConfig(
        steps=60, batch_size=32, lr=3e-3, eval_every=20, eval_sequences=32, probe_every=60
    )
    result, _ = train(task.with_maps(1), cfg, SMALL, progress=False)
    assert result.steps == [0, 20, 40, 60]
    assert result.loss[-1] < result.loss[1] - 0.1
    assert result.weights_probe[0] is not None and result.weights_probe[1] is None
    again, _ = train(task.with_maps(1), cfg, SMALL, progress=False)
    assert again.loss == result.loss
    json.dumps(result.to_json(), allow_nan=False)


def test_checkpoint_resume_equals_an_uninterrupted_run(task, tmp_path, monkeypatch):
    tr = importlib.import_module("anchor_lens.plateau.train")  # the package exports train()

    cfg = TrainConfig(
        strategy="mixed", steps=30, batch_size=16, eval_every=10, eval_sequences=16, probe_every=0
    )
    whole, _ = train(task, cfg, SMALL, progress=False)
    original = tr.strategy_batch

    def dies_at_25(task_, easy, cfg_, step, g):
        if step == 25:
            raise KeyboardInterrupt
        return original(task_, easy, cfg_, step, g)

    monkeypatch.setattr(tr, "strategy_batch", dies_at_25)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(task, cfg, SMALL, progress=False, checkpoint=ckpt, checkpoint_every=10)
    monkeypatch.setattr(tr, "strategy_batch", original)
    resumed, _ = train(task, cfg, SMALL, progress=False, checkpoint=ckpt, checkpoint_every=10)
    assert resumed.steps == whole.steps
    assert resumed.late == pytest.approx(whole.late)
    assert resumed.loss == pytest.approx(whole.loss)
    other = TrainConfig(strategy="mixed", steps=31, batch_size=16, eval_every=10, probe_every=0)
    with pytest.raises(ValueError, match="another config"):
        train(task, other, SMALL, progress=False, checkpoint=ckpt)


def test_linear_task_trains(task):
    cfg = TrainConfig(
        strategy="aux", steps=40, batch_size=32, lr=3e-3, eval_every=20, eval_sequences=32
    )
    result, _ = train(LinearTask(d=4, n_pairs=8), cfg, SMALL, progress=False)
    assert result.loss[-1] < result.loss[1]
    assert result.weights_probe == [None, None, None]  # probes are for the factor task
