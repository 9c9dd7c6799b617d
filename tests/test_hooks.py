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
    capture = PatternCapture((0,))
    with torch.no_grad():
        logits = _logits(
            tiny_model, batch, block_attention_hooks([0], batch.label_positions) + capture.hooks
        )
    assert not torch.isnan(logits).any()
    pattern = capture.patterns[0]
    for b in range(len(batch)):
        for p in batch.label_positions[b]:
            row = pattern[b, :, p]
            assert torch.allclose(row[:, p], torch.ones(row.shape[0]))
            assert float(row.sum(-1).max()) == pytest.approx(1.0)


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
