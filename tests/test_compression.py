import json

import pytest
import torch

import anchor_lens as al
from anchor_lens import Example
from anchor_lens.cli import main
from anchor_lens.compression import (
    anchor_keep_mask,
    compress_context,
    compressed_logits,
    random_keep_mask,
    run_compression,
    split_prompt,
    text_anchor_task,
)
from anchor_lens.hooks import scores_hook_name
from anchor_lens.icl import target_logits
from anchor_lens.prompts import TokenRole

from .conftest import tiny_gemma3

DEMOS = [Example("good fun", 1), Example("bad and slow", 0)]
QUERIES = [Example("ok", 1), Example("a long and very boring film", 0), Example("nice", 1)]


@pytest.fixture
def batch(tiny_model):
    return al.build_icl_batch(tiny_model, "sst2", DEMOS, QUERIES, padding_side="right")


def test_keeping_every_position_equals_the_full_context(tiny_model, batch):
    split = split_prompt(batch)
    everything = torch.ones(split, dtype=torch.bool)
    context = compress_context(tiny_model, batch, everything)
    with torch.no_grad():
        full = target_logits(tiny_model, batch)
    assert torch.allclose(compressed_logits(tiny_model, batch, context), full, atol=1e-5)


def test_anchor_cache_equals_masking_the_dropped_positions(tiny_model, batch):
    """Sliced-cache positions are right: same as a full forward with dropped keys masked."""
    split = split_prompt(batch)
    keep = anchor_keep_mask(batch, split)
    out = compressed_logits(tiny_model, batch, compress_context(tiny_model, batch, keep))

    def drop(scores, hook):
        # queries (positions >= split) may not see dropped prefix positions
        dropped = torch.zeros(scores.shape[-1], dtype=torch.bool)
        dropped[:split] = ~keep
        blocked = dropped[None, :] & (torch.arange(scores.shape[-2]) >= split)[:, None]
        return scores.masked_fill(blocked, torch.finfo(scores.dtype).min)

    hooks = [(scores_hook_name(layer), drop) for layer in range(tiny_model.cfg.n_layers)]
    with torch.no_grad():
        ref = target_logits(tiny_model, batch, hooks)
    assert torch.allclose(out, ref, atol=1e-5)


def test_cache_shim_leaves_no_hooks_behind(tiny_model, batch):
    """The cache-kwarg shim (transformers >= 5.24 passes ``cache=``) is removed after use."""
    before = {id(m): len(m._forward_pre_hooks) for m in tiny_model.modules()}
    context = compress_context(tiny_model, batch, torch.ones(split_prompt(batch), dtype=torch.bool))
    compressed_logits(tiny_model, batch, context)
    assert {id(m): len(m._forward_pre_hooks) for m in tiny_model.modules()} == before
    assert all(len(k) and k.shape[2] == len(context.kept) for k in context.keys)


def test_sliding_window_models_are_refused_with_the_reason(tiny_tokenizer):
    gemma = tiny_gemma3(tiny_tokenizer)
    batch = al.build_icl_batch(gemma, "sst2", DEMOS, QUERIES, padding_side="right")
    keep = torch.ones(split_prompt(batch), dtype=torch.bool)
    with pytest.raises(NotImplementedError, match="sliding-window attention"):
        compress_context(gemma, batch, keep)


def test_keep_masks(batch):
    split = split_prompt(batch)
    keep = anchor_keep_mask(batch, split)
    roles = batch.roles[0, :split]
    assert keep[batch.label_positions[0]].all()
    assert not keep[roles == TokenRole.TEXT].any()
    rand = random_keep_mask(batch, split, torch.Generator().manual_seed(0))
    assert not rand[batch.label_positions[0]].any()
    assert int((rand & (roles == TokenRole.TEXT)).sum()) == batch.n_demos
    assert int(rand.sum()) == int(keep.sum())


def test_split_needs_right_padding_and_shared_demos(tiny_model):
    left = al.build_icl_batch(tiny_model, "sst2", DEMOS, QUERIES)
    with pytest.raises(ValueError, match="right"):
        split_prompt(left)
    mixed = al.build_icl_batch(
        tiny_model, "sst2", [DEMOS, DEMOS[::-1]], QUERIES[:2], padding_side="right"
    )
    with pytest.raises(ValueError, match="shared"):
        split_prompt(mixed)


def test_text_anchor_template():
    task = text_anchor_task(al.get_task("sst2"))
    assert task.format_demo(Example("", 1)) == "Review:\nSentiment: Positive"


def test_run_compression_and_cli(tiny_llama, tiny_llama_folder, tmp_path):
    result = run_compression(
        tiny_llama, "sst2", queries=QUERIES, demonstrations=DEMOS, n_random=3, batch_size=2
    )
    assert result.methods["full_icl"]["label_loyalty"] == 1.0
    assert set(result.methods) == {
        "full_icl",
        "hidden_anchor",
        "text_anchor",
        "hidden_random",
        "hidden_random_top",
    }
    assert result.kept_positions < result.context_length and result.speedup > 0
    code = main(
        [
            "compress",
            "--model",
            str(tiny_llama_folder),
            "--n",
            "6",
            "--n-random",
            "2",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 0
    out = json.loads((tmp_path / "compress.json").read_text())
    for method in ("hidden_anchor", "text_anchor", "hidden_random", "hidden_random_top"):
        assert {"label_loyalty", "word_loyalty", "accuracy"} <= set(out["methods"][method])
    assert out["speedup"] > 0
