"""Momentum attention (Dai et al. §6) as hooks, against a naive O(n²) reference."""

import pytest
import torch

import anchor_lens as al
from anchor_lens.momentum import momentum_attention_hooks, momentum_term

DEMOS = [al.Example("good fun", 1), al.Example("bad", 0)]
QUERIES = [al.Example("great", 1), al.Example("a long and awful film", 0)]


def _naive(v: torch.Tensor, eta: float) -> torch.Tensor:
    """Σ_{i<t} η^{t−i} v_i with an explicit [pos, pos] weight matrix."""
    n = v.shape[1]
    t = torch.arange(n)
    power = (t[:, None] - t[None, :]).clamp(min=0).to(v.dtype)
    weights = torch.where(t[:, None] > t[None, :], eta**power, torch.zeros(()))
    return torch.einsum("ti,bihd->bthd", weights.to(v.dtype), v)


def test_momentum_term_matches_naive():
    v = torch.randn(2, 9, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for eta in (0.0, 0.3, 0.9):
        torch.testing.assert_close(momentum_term(v, eta), _naive(v, eta))


def test_hook_adds_the_momentum_of_every_head(tiny_model):
    """z after the hook = z + Σ η^{t−i} v_i, kv heads repeated under GQA (tiny llama)."""
    batch = al.build_icl_batch(tiny_model, "sst2", DEMOS, QUERIES[:1])
    inputs = batch.model_inputs()
    seen = {}

    def keep(name):
        def hook(x, hook):
            seen[name] = x.detach().clone()

        return hook

    layer, eta = 1, 0.4
    plain = [("blocks.1.attn.hook_v", keep("v")), ("blocks.1.attn.hook_z", keep("z"))]
    with torch.no_grad():
        tiny_model.run_with_hooks(**inputs, fwd_hooks=plain)
        moattn = momentum_attention_hooks([layer], eta) + [("blocks.1.attn.hook_z", keep("z2"))]
        # layer 1 sees unchanged inputs: only layer 1 and later are edited
        tiny_model.run_with_hooks(**inputs, fwd_hooks=moattn)
    v = seen["v"].double()
    v = v.repeat_interleave(seen["z"].shape[2] // v.shape[2], dim=2)
    expected = seen["z"].double() + _naive(v, eta)
    torch.testing.assert_close(seen["z2"].double(), expected, atol=1e-5, rtol=1e-5)


def test_eta_zero_leaves_logits_unchanged(tiny_model):
    batch = al.build_icl_batch(tiny_model, "sst2", DEMOS, QUERIES)
    with torch.no_grad():
        plain = al.target_logits(tiny_model, batch)
        hooked = al.target_logits(tiny_model, batch, momentum_attention_hooks(range(3), 0.0))
        edited = al.target_logits(tiny_model, batch, momentum_attention_hooks(range(3), 0.5))
    assert torch.equal(plain, hooked)
    assert not torch.allclose(plain, edited)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding(tiny_model, side):
    """Padded rows give the logits of the same prompt run alone (left padding needs the mask)."""
    batch = al.build_icl_batch(tiny_model, "sst2", DEMOS, QUERIES, padding_side=side)
    short = al.build_icl_batch(tiny_model, "sst2", DEMOS, QUERIES[:1])
    assert batch.attention_mask[0].sum() < batch.attention_mask.shape[1]  # row 0 is padded
    mask = batch.attention_mask if side == "left" else None
    with torch.no_grad():
        padded = al.target_logits(
            tiny_model, batch, momentum_attention_hooks(range(3), 0.5, attention_mask=mask)
        )
        alone = al.target_logits(tiny_model, short, momentum_attention_hooks(range(3), 0.5))
    torch.testing.assert_close(padded[0], alone[0], atol=1e-4, rtol=1e-4)


def test_rejects_eta_outside_range():
    with pytest.raises(ValueError, match="eta"):
        momentum_attention_hooks([0], 1.0)
