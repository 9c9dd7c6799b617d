"""anchor-lens' Hugging Face backend (`HFHookedModel`) against Hugging Face and the bridge.

GPT-J and OPT are the models the backend exists for (their TransformerLens bridges drop
attention edits); GPT-2 and Llama (grouped-query attention) are controls on which the bridge
honours edits, so the wrapper must agree with it there.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import anchor_lens as al
from anchor_lens import Example, analysis
from anchor_lens.compression import anchor_keep_mask, compress_context, compressed_logits
from anchor_lens.hf_hooked import HFHookedModel
from anchor_lens.hooks import (
    PatternCapture,
    SaliencyCapture,
    block_attention_hooks,
    scale_attention_hooks,
)
from anchor_lens.icl import target_logits

from .conftest import tiny_hf_model

DEMOS = [Example("good fun", 1), Example("bad", 0), Example("fine", 1)]
QUERIES = [Example("ok", 1), Example("a long and very boring film", 0)]
KINDS = ["gpt2", "llama", "gptj", "opt"]
CONTROLS = ["gpt2", "llama"]  # the bridge honours edits on these
DROPPED = ["gptj", "opt"]  # the bridge drops edits on these


def _hf(kind: str, tokenizer, seed: int = 0):
    """A tiny random causal LM in eval mode with eager attention."""
    if kind != "opt":
        model = tiny_hf_model(kind, tokenizer, seed=seed)
    else:
        from transformers import OPTConfig, OPTForCausalLM

        config = OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        model = OPTForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    return model


def _wrapped(kind: str, tokenizer) -> HFHookedModel:
    return al.load_model(_hf(kind, tokenizer), tokenizer=tokenizer, backend="hf")


@pytest.fixture(scope="module", params=["left", "right"])
def batch(request, tiny_tokenizer):
    return al.build_icl_batch(tiny_tokenizer, "sst2", DEMOS, QUERIES, padding_side=request.param)


@pytest.fixture(scope="module")
def left_batch(tiny_tokenizer):
    return al.build_icl_batch(tiny_tokenizer, "sst2", DEMOS, QUERIES, padding_side="left")


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer):
    """kind -> (bridge or None, wrapper, the wrapper's Hugging Face model), built once."""
    out = {}
    for kind in KINDS:
        bridge = None
        if kind in CONTROLS:
            bridge = al.load_model(_hf(kind, tiny_tokenizer), tokenizer=tiny_tokenizer)
        wrapper = _wrapped(kind, tiny_tokenizer)
        out[kind] = (bridge, wrapper, wrapper.original_model)
    return out


def _edit_hooks(model, batch):
    """Isolation of label words in layers 0-1 (pre-softmax) + target re-weighting (post)."""
    n_heads = model.cfg.n_heads
    scales = {
        layer: torch.linspace(0.2, 3.0, n_heads * batch.n_demos).reshape(n_heads, -1)
        for layer in range(model.cfg.n_layers)
    }
    return block_attention_hooks([0, 1], batch.label_positions), scale_attention_hooks(
        scales, batch.target_positions, batch.label_positions
    )


# ------------------------------------------------------------------------------ (1) no hooks


@pytest.mark.parametrize("kind", KINDS)
def test_no_hooks_equals_hugging_face_eager(pairs, kind, batch):
    _, wrapper, hf = pairs[kind]
    inputs = batch.model_inputs()
    with torch.no_grad():
        ref = hf(
            input_ids=inputs["input"],
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
        ).logits
        got = wrapper(**inputs)
        kept = target_logits(wrapper, batch)
    assert hf.config._attn_implementation == "eager"  # switched back after the call
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-5
    rows = torch.arange(len(batch))
    assert (kept - ref[rows, batch.target_positions]).abs().max() < 1e-5


@pytest.mark.parametrize("kind", CONTROLS)
def test_no_hooks_equals_the_bridge(pairs, kind, batch):
    bridge, wrapper, _ = pairs[kind]
    with torch.no_grad():
        diff = (wrapper(**batch.model_inputs()) - bridge(**batch.model_inputs())).abs().max()
    assert diff < 1e-5


def test_positions_are_derived_from_the_mask_like_the_bridge(pairs, left_batch):
    bridge, wrapper, _ = pairs["llama"]
    inputs = {k: v for k, v in left_batch.model_inputs().items() if k != "position_ids"}
    with torch.no_grad():
        assert (wrapper(**inputs) - bridge(**inputs)).abs().max() < 1e-5


# ------------------------------------------------------------------------------- (2) edits


@pytest.mark.parametrize("kind", CONTROLS)
def test_edits_match_the_bridge(pairs, kind, batch):
    bridge, wrapper, _ = pairs[kind]
    block, scale = _edit_hooks(wrapper, batch)
    with torch.no_grad():
        plain = target_logits(wrapper, batch)
        for hooks in (block, scale, block + scale):
            edited = target_logits(wrapper, batch, hooks)
            assert (edited - plain).abs().max() > 1e-3  # the edit does something
            assert (edited - target_logits(bridge, batch, hooks)).abs().max() < 1e-4


def _blocked_mask(batch, layers_all: bool, dtype=torch.float32) -> torch.Tensor:
    """The 4D additive mask that isolates label words: causal, padding and blocked entries."""
    n = batch.input_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = causal[None] & batch.attention_mask.bool()[:, None, :]
    isolated = al.hooks.positions_mask(batch.label_positions, n)
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-1)
    allowed = allowed & ~(isolated[:, :, None] & earlier)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


@pytest.mark.parametrize("kind", KINDS)
def test_score_edits_equal_hugging_face_with_a_4d_mask(pairs, kind, batch):
    """Isolating label words in every layer == HF eager with those entries masked out."""
    _, wrapper, hf = pairs[kind]
    hooks = block_attention_hooks(range(wrapper.cfg.n_layers), batch.label_positions)
    with torch.no_grad():
        got = wrapper.run_with_hooks(**batch.model_inputs(), fwd_hooks=hooks)
        plain = wrapper(**batch.model_inputs())
        ref = hf(
            input_ids=batch.input_ids,
            attention_mask=_blocked_mask(batch, True),
            position_ids=batch.position_ids,
        ).logits
    real = batch.attention_mask.bool()  # padded rows differ: their own mask differs
    assert (got - plain)[real].abs().max() > 1e-3
    assert (got - ref)[real].abs().max() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_pattern_edits_equal_hugging_face_with_its_pattern_edited(pairs, kind, batch, monkeypatch):
    """Re-weighting through hook_pattern == HF's own eager attention with its softmax output
    edited (caught where it passes through attention dropout)."""
    _, wrapper, hf = pairs[kind]
    _, hooks = _edit_hooks(wrapper, batch)
    with torch.no_grad():
        got = target_logits(wrapper, batch, hooks)
        plain = target_logits(wrapper, batch)
    edits = [fn for _, fn in hooks]
    seen = []
    dropout = F.dropout

    def edited_dropout(x, p=0.5, training=True, inplace=False):
        if x.dim() == 4:  # the attention pattern, once per layer in order
            x = edits[len(seen)](x, hook=None)
            seen.append(x.shape)
        return dropout(x, p, training, inplace)

    monkeypatch.setattr(torch.nn.functional, "dropout", edited_dropout)
    with torch.no_grad():
        ref = hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits[torch.arange(len(batch)), batch.target_positions]
    assert len(seen) == wrapper.cfg.n_layers
    assert (got - plain).abs().max() > 1e-3
    assert (got - ref).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore:A hook on .*returned a modified tensor:UserWarning")
@pytest.mark.parametrize("kind", DROPPED)
def test_the_bridge_drops_edits_that_the_wrapper_honours(tiny_tokenizer, kind):
    with pytest.raises(al.AttentionNotExposedError, match="does not change the output"):
        al.load_model(_hf(kind, tiny_tokenizer), tokenizer=tiny_tokenizer, backend="bridge")
    al.check_attention_hooks(_wrapped(kind, tiny_tokenizer))


# ---------------------------------------------------------------------------- (3) saliency


@pytest.mark.parametrize("kind", CONTROLS)
def test_saliency_matches_the_bridge(pairs, kind, batch):
    bridge, wrapper, _ = pairs[kind]
    layers = tuple(range(wrapper.cfg.n_layers))
    grads = []
    for model in (bridge, wrapper):
        capture = SaliencyCapture(layers)
        logits = target_logits(model, batch, capture.hooks)[:, batch.label_token_ids]
        grads.append(capture.gradients(F.cross_entropy(logits, batch.labels, reduction="sum")))
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", CONTROLS)
def test_q_k_v_z_match_the_bridge(pairs, kind, left_batch):
    """hook_q/k (before rotary, kv heads under GQA), hook_v and hook_z equal the bridge's."""
    store = {}

    def grab(key):
        def hook(t, hook):
            store[key] = t.detach()

        return hook

    names = [f"blocks.1.attn.hook_{x}" for x in ("q", "k", "v", "z")]
    for tag, model in zip(("bridge", "hf"), pairs[kind][:2], strict=True):
        with torch.no_grad():
            target_logits(model, left_batch, [(n, grab((tag, n))) for n in names])
    for name in names:
        bridge_value, hf_value = store[("bridge", name)], store[("hf", name)]
        assert hf_value.shape == bridge_value.shape
        assert (hf_value - bridge_value).abs().max() < 1e-5


# ------------------------------------------------------------------- (4) analyses and more


@pytest.mark.parametrize("kind", DROPPED)
def test_analyses_run_on_gptj_and_opt(pairs, kind):
    _, model, _ = pairs[kind]
    n_layers = model.cfg.n_layers
    queries = [*QUERIES, Example("great", 1), Example("awful", 0)]
    flow = analysis.information_flow(model, "sst2", queries, DEMOS, progress=False)
    assert len(flow.S_wp) == n_layers and flow.n == 4
    # Saliency reaches the target from every layer; in the last layer the label words' own
    # outputs no longer reach it, so S_wp is 0 there (as on the bridge).
    assert all(v > 0 for v in flow.S_pq_raw) and flow.S_wp_raw[0] > 0 == flow.S_wp_raw[-1]
    iso = analysis.isolation(model, "sst2", queries, DEMOS, k_layers=1, progress=False)
    for values in iso.conditions.values():
        assert 0.0 <= values["label_loyalty"] <= 1.0 and 0.0 <= values["word_loyalty"] <= 1.0
    # Isolating label words in a layer changes the next-token distribution of a random model.
    assert iso.conditions["label_first"]["word_loyalty"] < 1.0
    deep = analysis.deep_layer_auc(model, "sst2", queries, DEMOS, progress=False)
    assert len(deep.aucroc) == n_layers
    result = al.evaluate(model, "sst2", queries, DEMOS, progress=False)
    assert result.n == 4 and sum(result.predicted_counts) == 4
    assert list(deep.predicted_classes.values()) == result.predicted_counts
    full = al.evaluate(model, "sst2", queries, DEMOS, scoring="full_word", progress=False)
    assert full.n == 4


@pytest.mark.parametrize("kind", DROPPED)
def test_reweighting_diagnosis_and_compression_run_on_gptj_and_opt(pairs, kind):
    from anchor_lens import compression, diagnosis, reweighting

    _, model, _ = pairs[kind]
    train = [Example("great", 1), Example("awful", 0)]
    module, losses = reweighting.train_reweighting(
        model, "sst2", DEMOS, train, epochs=2, progress=False
    )
    assert losses[1] < losses[0]  # β learns on the wrapper (gradients reach hook_pattern)
    assert all(p.grad is None for p in model.parameters())
    queries = [*QUERIES, *train]
    diag = diagnosis.diagnose(model, "sst2", queries, DEMOS[:2], layer=1, progress=False)
    assert diag.layer == 1 and len(diag.predicted) == 2
    result = compression.run_compression(
        model, "sst2", queries=queries, demonstrations=DEMOS[:2], n_random=2
    )
    assert result is not None


@pytest.mark.parametrize("kind", DROPPED)
def test_pattern_capture_rows_sum_to_one(pairs, kind, left_batch):
    _, model, _ = pairs[kind]
    capture = PatternCapture((0, 1))
    with torch.no_grad():
        target_logits(model, left_batch, capture.hooks)
    pattern = capture.stacked()
    assert pattern.shape[2:] == (model.cfg.n_heads, *left_batch.input_ids.shape[1:] * 2)
    real = left_batch.attention_mask.bool()
    sums = pattern.sum(-1)[:, real[:, None].expand(-1, model.cfg.n_heads, -1)]
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_compression(pairs, kind):
    """Anchor-only continuation through the KV cache == Hugging Face on the whole prompt with
    the dropped prefix positions hidden from the query tokens (a 4D mask)."""
    _, model, hf = pairs[kind]
    batch = al.build_icl_batch(model, "sst2", DEMOS, QUERIES, padding_side="right")
    keep = anchor_keep_mask(batch, split := al.compression.split_prompt(batch))
    got = compressed_logits(model, batch, compress_context(model, batch, keep))
    n = batch.input_ids.shape[1]
    visible = torch.ones(n, dtype=torch.bool)
    visible[:split] = keep
    is_query = torch.arange(n) >= split
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & (visible[None] | ~is_query[:, None])
    allowed = allowed[None] & batch.attention_mask.bool()[:, None, :]
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
    positions = torch.arange(n)[None].expand(len(batch), -1)
    with torch.no_grad():
        full = hf(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions).logits
    last = batch.attention_mask.sum(-1) - 1
    assert keep.sum() < split  # something was dropped
    assert (got - full[torch.arange(len(batch)), last]).abs().max() < 1e-5


# ---------------------------------------------------------------------------- the interface


def test_load_model_backends(tiny_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    for kind, name in (("gptj", "GPTJ"), ("opt", "OPT")):
        with pytest.warns(UserWarning, match=f"{name}.*Hugging Face backend"):
            model = al.load_model(_hf(kind, tiny_tokenizer), tokenizer=tiny_tokenizer)
        assert isinstance(model, HFHookedModel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf = al.load_model(_hf("gpt2", tiny_tokenizer), tokenizer=tiny_tokenizer, backend="hf")
        auto = al.load_model(_hf("llama", tiny_tokenizer), tokenizer=tiny_tokenizer)
    assert isinstance(hf, HFHookedModel) and isinstance(auto, TransformerBridge)
    with pytest.raises(ValueError, match="backend"):
        al.load_model(_hf("gpt2", tiny_tokenizer), tokenizer=tiny_tokenizer, backend="tl")


def test_load_model_from_a_folder(tiny_tokenizer, tmp_path):
    model = _hf("gptj", tiny_tokenizer)
    model.config.architectures = ["GPTJForCausalLM"]
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="GPTJForCausalLM"):
        loaded = al.load_model(str(tmp_path))
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert (loaded(tokens) - model(tokens).logits).abs().max() < 1e-5


def test_config_and_interface(pairs, tiny_tokenizer):
    bridge, wrapper, _ = pairs["llama"]
    for field in ("n_layers", "n_heads", "n_key_value_heads", "d_head", "d_vocab", "n_ctx"):
        assert getattr(wrapper.cfg, field) == getattr(bridge.cfg, field), field
    assert wrapper.cfg.device == bridge.cfg.device and wrapper.cfg.dtype == torch.float32
    assert wrapper.cfg.architecture == "LlamaForCausalLM"
    assert wrapper.cfg.default_prepend_bos is False
    gptj = pairs["gptj"][1].cfg
    assert (gptj.n_layers, gptj.n_heads, gptj.n_key_value_heads, gptj.d_head) == (2, 4, None, 16)
    assert gptj.positional_embedding_type == "rotary"
    assert pairs["opt"][1].cfg.positional_embedding_type == "standard"
    # Text input, loss and the cache follow the bridge's conventions.
    tokens = wrapper.to_tokens("good fun")
    assert torch.equal(tokens[0], torch.tensor(tiny_tokenizer("good fun")["input_ids"]))
    with torch.no_grad():
        assert torch.equal(wrapper("good fun"), wrapper(tokens))
        loss = wrapper(tokens, return_type="loss")
        logits, cache = wrapper(tokens, return_type="logits_and_cache")
    assert torch.isclose(loss, F.cross_entropy(logits[0, :-1], tokens[0, 1:]))
    assert cache.get_seq_length() == tokens.shape[1]
    _, activations = wrapper.run_with_cache(tokens, names_filter=lambda n: "pattern" in n)
    assert sorted(activations) == [f"blocks.{layer}.attn.hook_pattern" for layer in range(3)]


def test_unknown_hook_names_list_the_valid_ones(pairs):
    _, wrapper, _ = pairs["gptj"]
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(KeyError, match="hook_attn_scores"):
        wrapper.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_rot_q", lambda t, hook: t)])
    with pytest.raises(KeyError, match="hook_pattern"):
        wrapper.add_hook("blocks.9.attn.hook_pattern", lambda t, hook: t)
    # Nothing is left attached after a failed call.
    assert not any(hp.has_hooks() for hp in wrapper.hook_dict.values())


def test_hooks_see_layer_and_name_and_backward_hooks_fire(pairs):
    _, wrapper, _ = pairs["opt"]
    seen, grads = [], []

    def fwd(t, hook):
        seen.append((hook.name, hook.layer()))

    def bwd(grad, hook):
        grads.append(hook.layer())

    tokens = torch.tensor([[1, 2, 3, 4]])
    with wrapper.hooks(
        fwd_hooks=[(lambda n: n.endswith("hook_pattern"), fwd)],
        bwd_hooks=[("blocks.1.attn.hook_attn_scores", bwd)],
    ):
        wrapper(tokens).sum().backward()
    assert seen == [("blocks.0.attn.hook_pattern", 0), ("blocks.1.attn.hook_pattern", 1)]
    assert grads == [1]
    wrapper.zero_grad(set_to_none=True)


def test_q_edits_change_logits(pairs, left_batch):
    for kind in DROPPED:
        _, wrapper, _ = pairs[kind]
        with torch.no_grad():
            plain = target_logits(wrapper, left_batch)
            edited = target_logits(
                wrapper, left_batch, [("blocks.0.attn.hook_q", lambda t, hook: t * 2.0)]
            )
        assert (edited - plain).abs().max() > 1e-4


def test_lm_infinite_window_on_the_wrapper(pairs):
    """LM-Infinite's Λ mask (no distance limit) runs as hooks and as the blocked path."""
    from anchor_lens import lminfinite

    _, wrapper, _ = pairs["gptj"]
    attention = lminfinite.LambdaAttention(n_global=2, n_local=4, max_distance=None)
    ids = torch.arange(3, 23)[None]
    with torch.no_grad():
        hooked = wrapper.run_with_hooks(
            ids, fwd_hooks=lminfinite.lambda_attention_hooks(wrapper, attention)
        )
        blocked = lminfinite.unembed(
            wrapper, lminfinite.forward_hidden(wrapper, ids, attention=attention)
        )
    assert (hooked - blocked).abs().max() < 1e-4
    with pytest.raises(lminfinite.RotaryNotFoundError):
        lminfinite.lambda_attention_hooks(
            wrapper, lminfinite.LambdaAttention(n_global=2, n_local=4, max_distance=4)
        )


@pytest.mark.filterwarnings("ignore:A hook on .*returned a modified tensor:UserWarning")
def test_auto_falls_back_when_an_unlisted_bridge_drops_edits(tiny_tokenizer, monkeypatch):
    """An architecture missing from BRIDGE_DROPS_EDITS is caught by the edit check."""
    monkeypatch.setattr(al.models, "BRIDGE_DROPS_EDITS", frozenset())
    reference = _hf("gptj", tiny_tokenizer)
    with pytest.warns(UserWarning, match="Falling back"):
        model = al.load_model(_hf("gptj", tiny_tokenizer), tokenizer=tiny_tokenizer)
    assert isinstance(model, HFHookedModel)
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert (model(tokens) - reference(tokens).logits).abs().max() < 1e-5


def test_a_model_a_bridge_already_wrapped_gets_a_weight_sharing_twin(pairs, tiny_tokenizer):
    bridge, _, _ = pairs["llama"]
    model = al.load_model(bridge.original_model, tokenizer=tiny_tokenizer, backend="hf")
    assert model.original_model is not bridge.original_model
    assert {p.data_ptr() for p in model.parameters()} <= {p.data_ptr() for p in bridge.parameters()}
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert (model(tokens) - bridge(tokens)).abs().max() < 1e-5
