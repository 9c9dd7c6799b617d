import inspect

import pytest
import torch
import torch.nn.functional as F

import anchor_lens as al
from anchor_lens import Example
from anchor_lens.hooks import (
    PatternCapture,
    SaliencyCapture,
    block_attention_hooks,
    pattern_hook_name,
    resolve_layers,
    scale_attention_hooks,
)
from anchor_lens.icl import target_logits

DEMOS = [Example("good fun", 1), Example("bad", 0), Example("fine", 1)]
QUERIES = [Example("ok", 1), Example("a long and very boring film", 0)]


@pytest.fixture(scope="module", params=["left", "right"])
def batch(request, tiny_tokenizer):
    return al.build_icl_batch(tiny_tokenizer, "sst2", DEMOS, QUERIES, padding_side=request.param)


def _logits(model, batch, hooks=()):
    return model.run_with_hooks(**batch.model_inputs(), fwd_hooks=list(hooks))


def _layers(model):
    return tuple(range(model.cfg.n_layers))


def test_hooks_that_change_nothing_leave_logits_bit_identical(tiny_model, batch):
    with torch.no_grad():
        plain = tiny_model(**batch.model_inputs())
    nobody = torch.full_like(batch.label_positions, -1)
    hooks = (
        SaliencyCapture(_layers(tiny_model)).hooks
        + block_attention_hooks(_layers(tiny_model), nobody)
        + scale_attention_hooks(
            {
                layer: torch.zeros(tiny_model.cfg.n_heads, batch.n_demos).exp()
                for layer in _layers(tiny_model)
            },
            batch.target_positions,
            batch.label_positions,
        )
        + PatternCapture(_layers(tiny_model)).hooks
    )
    edited = _logits(tiny_model, batch, hooks)
    assert torch.equal(plain, edited)


def _loss(model, batch, hooks):
    logits = target_logits(model, batch, hooks)[:, batch.label_token_ids]
    return F.cross_entropy(logits, batch.labels, reduction="sum")


def test_saliency_matches_plain_autograd_on_the_pattern(tiny_model, batch):
    layers = _layers(tiny_model)
    capture = SaliencyCapture(layers)
    saliency = capture.gradients(_loss(tiny_model, batch, capture.hooks))

    kept = {}

    def keep(pattern, hook):
        pattern.retain_grad()
        kept[hook.layer()] = pattern

    ref_hooks = [(pattern_hook_name(layer), keep) for layer in layers]
    _loss(tiny_model, batch, ref_hooks).backward()
    reference = torch.stack([kept[layer] * kept[layer].grad for layer in layers])
    n_pos = batch.input_ids.shape[1]
    assert saliency.shape == (len(layers), len(batch), tiny_model.cfg.n_heads, n_pos, n_pos)
    assert torch.allclose(saliency, reference, atol=1e-7)
    tiny_model.zero_grad(set_to_none=True)


# HF's Llama RMSNorm computes in float32 even in a float64 model, so its loss is only
# float32-accurate: a larger step keeps the finite difference's rounding error small.
@pytest.mark.parametrize("kind, eps, rel", [("gpt2", 1e-5, 1e-6), ("llama", 1e-3, 1e-3)])
def test_saliency_matches_a_finite_difference(tiny_tokenizer, kind, eps, rel):
    from .conftest import tiny_hf_model

    model = al.load_model(
        tiny_hf_model(kind, tiny_tokenizer), tokenizer=tiny_tokenizer, dtype=torch.float64
    )
    batch = al.build_icl_batch(model, "sst2", DEMOS, QUERIES[:1])
    capture = SaliencyCapture((1,))
    grads = capture.gradients(_loss(model, batch, capture.hooks))
    b, h = 0, 1
    i = int(batch.target_positions[0])
    j = int(batch.label_positions[0, 0])

    def nudge(delta):
        def hook(pattern, hook):
            pattern = pattern.clone()
            pattern[b, h, i, j] += delta
            return pattern

        return [(pattern_hook_name(1), hook)]

    with torch.no_grad():
        capture_a = PatternCapture((1,))
        _logits(model, batch, capture_a.hooks)
        up = _loss(model, batch, nudge(eps))
        down = _loss(model, batch, nudge(-eps))
    finite = capture_a.patterns[1][b, h, i, j] * (up - down) / (2 * eps)
    assert float(grads[0, b, h, i, j]) == pytest.approx(float(finite), rel=rel)
    assert abs(float(finite)) > 1e-6  # a real gradient, not 0 == 0


def test_isolated_rows_attend_only_to_themselves(tiny_model, batch):
    capture, plain = PatternCapture((0,)), PatternCapture((0,))
    with torch.no_grad():
        logits = _logits(
            tiny_model, batch, block_attention_hooks([0], batch.label_positions) + capture.hooks
        )
        _logits(tiny_model, batch, plain.hooks)
    assert not torch.isnan(logits).any()
    pattern, before = capture.patterns[0], plain.patterns[0]
    for b in range(len(batch)):
        labels = batch.label_positions[b].tolist()
        for p in labels:
            # One-hot on the diagonal: nothing earlier (text, padding) is attended to.
            expected = torch.zeros_like(pattern[b, :, p])
            expected[:, p] = 1.0
            assert torch.equal(pattern[b, :, p], expected)
            assert not torch.equal(before[b, :, p], expected)  # which it did before
        # Layer 0's other rows see only the (unchanged) embeddings: they must not move.
        real = batch.attention_mask[b].bool()
        others = [i for i in range(pattern.shape[-1]) if real[i] and i not in labels]
        assert torch.equal(pattern[b, :, others], before[b, :, others])


def test_isolation_changes_the_target_through_later_layers(tiny_model, batch):
    """Isolating label words in layer 0 reaches the target; in the last layer it cannot."""
    last = tiny_model.cfg.n_layers - 1
    with torch.no_grad():
        plain = target_logits(tiny_model, batch)
        first = target_logits(tiny_model, batch, block_attention_hooks([0], batch.label_positions))
        late = target_logits(
            tiny_model, batch, block_attention_hooks([last], batch.label_positions)
        )
    assert (first - plain).abs().max() > 1e-4
    assert torch.equal(late, plain)


def test_block_per_layer_positions(tiny_model, batch):
    calls = []

    def rows(layer):
        calls.append(layer)
        return batch.label_positions

    with torch.no_grad():
        _logits(tiny_model, batch, block_attention_hooks([0, 2], rows))
    assert calls == [0, 2]


def test_scale_attention_is_differentiable_and_targets_one_row(tiny_model, batch):
    n_heads = tiny_model.cfg.n_heads
    beta = torch.zeros(n_heads, batch.n_demos, requires_grad=True)
    capture = PatternCapture((1,))
    loss = _loss(
        tiny_model,
        batch,
        scale_attention_hooks({1: beta.exp()}, batch.target_positions, batch.label_positions)
        + capture.hooks,
    )
    (grad,) = torch.autograd.grad(loss, beta)
    assert grad.abs().sum() > 0
    with torch.no_grad():
        twice = PatternCapture((1,))
        _logits(
            tiny_model,
            batch,
            scale_attention_hooks({1: 2.0}, batch.target_positions, batch.label_positions)
            + twice.hooks,
        )
    plain, doubled = capture.patterns[1], twice.patterns[1]
    rows = torch.arange(len(batch))
    q = batch.target_positions
    for b in range(len(batch)):
        cols = batch.label_positions[b]
        assert torch.allclose(doubled[b, :, q[b], cols], 2 * plain[b, :, q[b], cols])
    other = torch.ones_like(plain, dtype=torch.bool)
    other[rows, :, q] = False
    assert torch.equal(doubled[other], plain[other])


def test_library_calls_keep_hooks_the_user_added(tiny_llama, batch):
    calls = []
    tiny_llama.add_hook(pattern_hook_name(0), lambda pattern, hook: calls.append(hook.layer()))
    try:
        al.predict(tiny_llama, batch)
        assert calls == [0]  # the user's hook ran inside predict
        with torch.no_grad():
            tiny_llama(**batch.model_inputs())
        assert calls == [0, 0]  # and is still registered afterwards
    finally:
        tiny_llama.reset_hooks()


# ------------------------------------------------------------------------------- error paths
def _pattern(b=2, h=4, q=6, k=6):
    return torch.rand(b, h, q, k).softmax(-1)


def test_scale_attention_names_both_shapes_when_beta_does_not_fit():
    q, keys = torch.tensor([5, 5]), torch.tensor([[1, 3, 4], [0, 2, 4]])  # 3 key positions
    pattern = _pattern(h=4)
    # The suite type-checks annotations at run time, which already rejects scales whose
    # position count disagrees with key_positions (a TypeError when the hooks are built);
    # without it (as users run) the hook's own ValueError must explain. Check both.
    unchecked = inspect.unwrap(scale_attention_hooks)
    for bad, shown, wanted in [
        (torch.ones(5, 3), r"\(5, 3\)", r"\[4, 3\]"),  # one head too many
        (torch.ones(4, 2), r"\(4, 2\)", r"\[4, 3\]"),  # one position too few
        (torch.ones(2), r"\(2,\)", r"\[3\]"),  # an all-heads vector of the wrong length
        (torch.ones(1, 4, 3), r"\(1, 4, 3\)", r"\[4, 3\]"),  # too many dimensions
    ]:
        ((_, hook),) = unchecked({1: bad}, q, keys)
        with pytest.raises(ValueError, match=rf"layer 1's scales have shape {shown}.*{wanted}"):
            hook(pattern, hook=None)
        with pytest.raises((ValueError, TypeError)):
            ((_, hook),) = scale_attention_hooks({1: bad}, q, keys)
            hook(pattern, hook=None)
    for good in (2.0, torch.ones(3), torch.ones(4, 3)):  # every documented shape is accepted
        ((_, hook),) = scale_attention_hooks({1: good}, q, keys)
        assert hook(pattern, hook=None).shape == pattern.shape


def test_scale_attention_shape_error_surfaces_from_a_real_model(tiny_model, batch):
    wrong_heads = torch.ones(tiny_model.cfg.n_heads + 1, batch.n_demos)
    hooks = scale_attention_hooks({0: wrong_heads}, batch.target_positions, batch.label_positions)
    with torch.no_grad(), pytest.raises(ValueError, match=f"{tiny_model.cfg.n_heads} heads"):
        _logits(tiny_model, batch, hooks)


@pytest.mark.parametrize("which", ["block", "scale", "capture"])
def test_position_hooks_refuse_a_kv_cache_forward(which):
    """With a KV cache the pattern has fewer query rows than key columns: refuse it."""
    rows = torch.tensor([[1, 3], [0, 2]])
    q = torch.tensor([5, 5])
    if which == "block":
        ((_, hook),) = block_attention_hooks([0], rows)
        name = "block_attention_hooks"
    elif which == "scale":
        ((_, hook),) = scale_attention_hooks({0: 2.0}, q, rows)
        name = "scale_attention_hooks"
    else:
        ((_, hook),) = PatternCapture((0,), query_positions=q).hooks
        name = "capture_pattern_hooks"
    with pytest.raises(ValueError, match=rf"{name}.*1 query rows and 6 key columns.*KV cache"):
        hook(_pattern(q=1, k=6), hook=None)
    hook(_pattern(q=6, k=6), hook=None)  # the full prompt is fine


def test_saliency_capture_refuses_no_grad(tiny_model, batch):
    capture = SaliencyCapture((0, 1))
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"torch\.no_grad"):
        _logits(tiny_model, batch, capture.hooks)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        _logits(tiny_model, batch, capture.hooks)
    # The analysis functions' way: enable_grad inside no_grad works.
    with torch.no_grad(), torch.enable_grad():
        loss = _loss(tiny_model, batch, capture.hooks)
    assert capture.gradients(loss).shape[0] == 2


def test_saliency_gradients_explain_what_is_missing(tiny_model, batch):
    never_run = SaliencyCapture((0, 2))
    with pytest.raises(
        RuntimeError, match=r"No attention pattern was captured for layers \[0, 2\]"
    ):
        never_run.gradients(torch.tensor(1.0, requires_grad=True))
    capture = SaliencyCapture((0,))
    loss = _loss(tiny_model, batch, capture.hooks)
    with pytest.raises(RuntimeError, match="carries no gradient"):
        capture.gradients(loss.detach())


def test_resolve_layers_checks_the_range(tiny_model):
    n = tiny_model.cfg.n_layers
    assert resolve_layers(tiny_model, [-1, 0]) == (n - 1, 0)
    assert resolve_layers(tiny_model, None) == tuple(range(n))
    for bad in (n, -n - 1):
        with pytest.raises(IndexError, match=f"Layer {bad} does not exist: the model has {n}"):
            resolve_layers(tiny_model, [bad])


def test_scale_attention_skips_minus_one_key_positions():
    pattern = _pattern(b=2, h=4, q=6, k=6)
    keys = torch.tensor([[1, 3], [2, -1]])  # the second row has one key position only
    ((_, hook),) = scale_attention_hooks({0: 2.0}, torch.tensor([5, 5]), keys)
    out = hook(pattern, hook=None)
    ratio = out[1, :, 5] / pattern[1, :, 5]
    expected = torch.ones(6)
    expected[2] = 2.0  # only column 2 is scaled; -1 scales nothing (not the last column)
    assert torch.allclose(ratio, expected.expand(4, -1))
