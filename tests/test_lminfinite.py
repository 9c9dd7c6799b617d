"""LM-Infinite: the hook version, the blocked path and a loop reference agree."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import anchor_lens as al
from anchor_lens.cli import main
from anchor_lens.hooks import PatternCapture
from anchor_lens.lminfinite import (
    LambdaAttention,
    RotaryNotFoundError,
    _Runtime,
    forward_hidden,
    lambda_attention_forward,
    lambda_attention_hooks,
    lambda_scores,
    pretrain_length,
    rope_inv_freq,
    rotate,
    unembed,
)
from anchor_lens.long_context import (
    long_token_windows,
    nll_curves,
    passkey_accuracy,
    passkey_prompt,
    token_nll,
)
from anchor_lens.models import plain_hf_model

from .conftest import tiny_gemma3, tiny_hf_model

INV_FREQ = 1.0 / (100.0 ** (torch.arange(0, 8, 2) / 8))  # head dim 8, fully rotary

CONFIGS = [
    LambdaAttention(n_global=3, n_local=8, max_distance=12, block_size=5),
    LambdaAttention(n_global=3, n_local=8, max_distance=None, block_size=4),
    LambdaAttention(n_global=0, n_local=6, max_distance=None, block_size=7),  # windowed
    LambdaAttention(n_global=2, n_local=5, max_distance=3, block_size=64),  # limit < n_local
    LambdaAttention(n_global=4, n_local=64, max_distance=16, block_size=3),  # n < window
]


def loop_reference(q, k, v, attention: LambdaAttention, scaling: float):
    """LM-Infinite by its definition, one (query, key) pair at a time, from *unrotated* q, k."""
    batch, heads, n, _ = q.shape
    k, v = (t.repeat_interleave(heads // k.shape[1], dim=1) for t in (k, v))
    out = torch.zeros_like(q)

    def at(x, position):  # x rotated to an absolute position
        return rotate(x[:, :, None], torch.tensor([position]), INV_FREQ)[:, :, 0]

    for i in range(n):
        logits, values = [], []
        for j in range(i + 1):
            if i - j < attention.n_local:
                logit = (at(q[:, :, i], i) * at(k[:, :, j], j)).sum(-1)
            elif j < attention.n_global:
                if attention.max_distance is None:
                    logit = (at(q[:, :, i], i) * at(k[:, :, j], j)).sum(-1)
                else:
                    logit = (at(q[:, :, i], min(i, attention.max_distance)) * k[:, :, j]).sum(-1)
            else:
                continue
            logits.append(logit * scaling)
            values.append(v[:, :, j])
        probs = torch.softmax(torch.stack(logits, -1), -1)
        out[:, :, i] = torch.einsum("bhj,bhjd->bhd", probs, torch.stack(values, 2))
    return out


@pytest.mark.parametrize("attention", CONFIGS, ids=str)
def test_blocked_and_score_versions_match_the_loop_reference(attention):
    torch.manual_seed(0)
    n, scaling = 23, 8**-0.5
    q, k, v = torch.randn(2, 4, n, 8), torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8)
    expected = loop_reference(q, k, v, attention, scaling)
    positions = torch.arange(n)
    q_rot, k_rot = rotate(q, positions, INV_FREQ), rotate(k, positions, INV_FREQ)

    module = SimpleNamespace(layer_idx=0, scaling=scaling)
    blocked, _ = lambda_attention_forward(
        module, q_rot, k_rot, v, None, lm_infinite=_Runtime(attention, {0: INV_FREQ})
    )
    torch.testing.assert_close(blocked.transpose(1, 2), expected, atol=1e-5, rtol=1e-5)

    k_full = k_rot.repeat_interleave(2, dim=1)
    scores = q_rot @ k_full.transpose(-1, -2) * scaling
    edited = lambda_scores(
        scores,
        q_rot,
        k_full,
        attention,
        inv_freq=INV_FREQ,
        scaling=scaling,
        q_positions=positions,
        k_positions=positions,
    )
    dense = torch.softmax(edited, -1) @ v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)


def test_no_row_is_ever_fully_masked():
    scores = torch.zeros(1, 1, 6, 6)
    edited = lambda_scores(
        scores,
        None,
        None,
        LambdaAttention(n_global=0, n_local=1),
        q_positions=torch.arange(6),
        k_positions=torch.arange(6),
    )
    assert torch.isfinite(torch.softmax(edited, -1)).all()
    assert torch.equal(torch.softmax(edited, -1)[0, 0], torch.eye(6))


@pytest.fixture(scope="module")
def short_llama(tiny_tokenizer):
    """A tiny rotary GQA Llama whose pre-training length is 24 positions."""
    hf = tiny_hf_model("llama", tiny_tokenizer)
    hf.config.max_position_embeddings = 24
    return al.load_model(hf, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="module")
def ids(short_llama):
    torch.manual_seed(1)
    return torch.randint(3, short_llama.cfg.d_vocab, (2, 40))


@pytest.mark.parametrize(
    "attention",
    [
        LambdaAttention(n_global=3, n_local=8, max_distance=24, block_size=5),
        LambdaAttention(n_global=0, n_local=8, max_distance=None, block_size=16),
        LambdaAttention(n_global=2, n_local=24, max_distance=24),
    ],
    ids=str,
)
def test_hooks_equal_the_blocked_path_on_a_model(short_llama, ids, attention):
    with torch.no_grad():
        hooked = short_llama.run_with_hooks(
            ids, fwd_hooks=lambda_attention_hooks(short_llama, attention)
        )
    blocked = unembed(short_llama, forward_hidden(short_llama, ids, attention))
    plain = short_llama(ids)
    torch.testing.assert_close(blocked, hooked, atol=1e-4, rtol=1e-4)
    assert (hooked - plain).abs().max() > 1e-2  # the window is shorter than the input


def test_a_window_covering_everything_changes_nothing(short_llama, ids):
    covering = LambdaAttention(n_global=4, n_local=ids.shape[1], max_distance=24)
    with torch.no_grad():
        plain = short_llama(ids)
        hooked = short_llama.run_with_hooks(
            ids, fwd_hooks=lambda_attention_hooks(short_llama, covering)
        )
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)
    blocked = unembed(short_llama, forward_hidden(short_llama, ids, covering))
    torch.testing.assert_close(blocked, plain, atol=1e-4, rtol=1e-4)
    full = unembed(short_llama, forward_hidden(short_llama, ids, None))
    torch.testing.assert_close(full, plain, atol=1e-4, rtol=1e-4)


def test_right_padding_leaves_real_positions_unchanged(short_llama, ids):
    attention = LambdaAttention(n_global=3, n_local=8, max_distance=24)
    short = ids[1, :29]
    padded = torch.stack([ids[0], torch.cat([short, torch.full((11,), 2)])])
    alone = unembed(short_llama, forward_hidden(short_llama, short[None], attention))
    batched = unembed(short_llama, forward_hidden(short_llama, padded, attention))
    torch.testing.assert_close(batched[1, :29], alone[0], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        hooked = short_llama.run_with_hooks(
            padded, fwd_hooks=lambda_attention_hooks(short_llama, attention)
        )
    torch.testing.assert_close(hooked[1, :29], alone[0], atol=1e-4, rtol=1e-4)


def test_a_right_padding_mask_is_accepted_and_matches_prompts_alone(short_llama, ids):
    attention = LambdaAttention(n_global=3, n_local=8, max_distance=24)
    short = ids[1, :29]
    padded = torch.stack([ids[0], torch.cat([short, torch.full((11,), 2)])])
    mask = torch.ones_like(padded)
    mask[1, 29:] = 0
    for lam in (attention, None):
        alone = unembed(short_llama, forward_hidden(short_llama, short[None], lam))
        hidden = forward_hidden(short_llama, padded, lam, attention_mask=mask)
        batched = unembed(short_llama, hidden)
        torch.testing.assert_close(batched[1, :29], alone[0], atol=1e-4, rtol=1e-4)
    nll = token_nll(short_llama, padded, attention, attention_mask=mask)
    alone = token_nll(short_llama, short[None], attention)
    torch.testing.assert_close(nll[1, :28], alone[0], atol=1e-4, rtol=1e-4)
    assert nll[1, 28:].isnan().all() and not nll[0].isnan().any()


def test_left_padding_is_refused_before_computing(short_llama, ids):
    hf = plain_hf_model(short_llama)
    ran = []
    handle = hf.model.embed_tokens.register_forward_hook(lambda *args: ran.append(1))
    left = torch.ones_like(ids)
    left[1, :11] = 0
    gap = torch.ones_like(ids)
    gap[0, 5] = 0
    try:
        for mask in (left, gap):
            for lam in (LambdaAttention(n_global=3, n_local=8, max_distance=24), None):
                with pytest.raises(ValueError, match=r"padding before real tokens.*pad on the"):
                    forward_hidden(hf, ids, lam, attention_mask=mask)
        with pytest.raises(ValueError, match=r"row\(s\) \[1\].*one at a time"):
            token_nll(hf, ids, None, attention_mask=left)
        # ValueError, or jaxtyping's TypeCheckError (a TypeError) when annotations are checked
        with pytest.raises((ValueError, TypeError), match="attention_mask"):
            forward_hidden(hf, ids, None, attention_mask=left[:, :-1])
    finally:
        handle.remove()
    assert not ran


def test_both_paths_refuse_attention_logit_softcapping(tiny_tokenizer):
    model = tiny_gemma3(tiny_tokenizer, max_positions=24)
    ids = torch.randint(3, model.cfg.d_vocab, (1, 12))
    attention = LambdaAttention(n_global=2, n_local=4, max_distance=8)
    hf = plain_hf_model(model)
    for target in (model.original_model.config, hf.config):
        target.attn_logit_softcapping = 50.0
    message = r"does not support logit soft-capping.*attn_logit_softcapping=50.0"
    with pytest.raises(NotImplementedError, match=message):
        lambda_attention_hooks(model, attention)
    with pytest.raises(NotImplementedError, match=message):
        forward_hidden(hf, ids, attention)
    forward_hidden(hf, ids, None)  # only LM-Infinite attention is refused
    for target in (model.original_model.config, hf.config):
        target.attn_logit_softcapping = None
    hf.model.layers[1].self_attn.attn_logit_softcapping = 30.0  # set on a module only
    with pytest.raises(NotImplementedError, match="attn_logit_softcapping=30.0"):
        forward_hidden(hf, ids, attention)
    module = SimpleNamespace(layer_idx=0, scaling=1.0, attn_logit_softcapping=50.0)
    x = torch.zeros(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match=message):
        lambda_attention_forward(
            module, x, x, x, None, lm_infinite=_Runtime(LambdaAttention(1, 2), {})
        )


def test_hooks_compose_with_pattern_capture(short_llama, ids):
    attention = LambdaAttention(n_global=2, n_local=5, max_distance=24)
    capture = PatternCapture(layers=(0,))
    with torch.no_grad():
        short_llama.run_with_hooks(
            ids, fwd_hooks=lambda_attention_hooks(short_llama, attention) + capture.hooks
        )
    pattern = capture.patterns[0][0, 0]
    i = ids.shape[1] - 1
    seen = pattern[i].nonzero().flatten().tolist()
    assert seen == [0, 1, *range(i - 4, i + 1)]  # two global tokens + a band of five


def test_plain_hf_model_shares_the_bridge_weights(short_llama, ids):
    twin = plain_hf_model(short_llama)
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, short_llama(ids), atol=1e-5, rtol=1e-5)
    embed = short_llama.original_model.model.embed_tokens
    assert twin.model.embed_tokens.weight.data_ptr() == embed.weight.data_ptr()
    assert plain_hf_model(twin) is twin


def test_errors_name_the_fix(short_llama, tiny_tokenizer):
    module = SimpleNamespace(layer_idx=0, scaling=1.0)
    x = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="forward_hidden"):
        lambda_attention_forward(module, x, x, x, None)
    with pytest.raises(ValueError, match="pad on the right"):
        lambda_attention_forward(
            module,
            x,
            x,
            x,
            None,
            lm_infinite=_Runtime(LambdaAttention(1, 2), {}),
            position_ids=torch.tensor([[0, 0, 1, 2]]),
        )
    gpt2 = al.load_model(tiny_hf_model("gpt2", tiny_tokenizer), tokenizer=tiny_tokenizer)
    with pytest.raises(RotaryNotFoundError, match="max_distance=None"):
        lambda_attention_hooks(gpt2, LambdaAttention(2, 4, max_distance=8))
    assert len(lambda_attention_hooks(gpt2, LambdaAttention(2, 4))) == gpt2.cfg.n_layers
    with pytest.raises(ValueError, match="n_local"):
        LambdaAttention(n_global=1, n_local=0)
    assert rope_inv_freq(short_llama, 0).shape == (short_llama.cfg.d_head // 2,)
    assert pretrain_length(short_llama) == 24


def test_token_nll_is_the_cross_entropy_of_the_logits(short_llama, ids):
    with torch.no_grad():
        logits = short_llama(ids)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
    )
    got = token_nll(short_llama, ids, None, chunk=7)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_passkey_prompt_and_windows(tiny_tokenizer, short_llama):
    prompt, answer = passkey_prompt(tiny_tokenizer, 300, 0.5, 12345)
    assert 250 <= len(prompt) <= 300
    text = tiny_tokenizer.decode(prompt)
    assert text.count("12345") == 2 and text.endswith("The pass key is")
    assert tiny_tokenizer.decode(answer).strip() == "12345"
    with pytest.raises(ValueError, match="more text"):
        long_token_windows(tiny_tokenizer, ["a short text"], 100, 2)
    windows = long_token_windows(tiny_tokenizer, ["one two three four"] * 50, 30, 3)
    assert windows.shape == (3, 30)
    with pytest.raises(ValueError, match="passkey"):
        nll_curves(short_llama, windows, modes=("full", "truncate"), progress=False)
    curves = nll_curves(short_llama, windows[:, :30], bin_size=8, progress=False)
    assert set(curves.nll) == {"full", "lm-infinite", "window"}
    assert len(curves.nll["full"]) == len(curves.positions) == 4
    result = passkey_accuracy(short_llama, tiny_tokenizer, [200], n_trials=2, progress=False)
    assert set(result.accuracy) == {"full", "lm-infinite", "window", "truncate"}
    assert all(0.0 <= a[0] <= 1.0 for a in result.accuracy.values())


def test_long_context_cli(tiny_llama_folder, tmp_path):
    out = tmp_path / "lc"
    text = tmp_path / "long.txt"
    text.write_text(" ".join(["the movie was great and the plot was fine"] * 300))
    code = main(
        [
            "long-context",
            "--model",
            str(tiny_llama_folder),
            "--text",
            str(text),
            "--length",
            "600",
            "--passkey-lengths",
            "300",
            "--passkey-trials",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    payload = json.loads((out / "long_context.json").read_text())
    assert payload["pretrain_length"] == 512
    assert set(payload["nll"]["summary"]) == {"full", "lm-infinite", "window"}
    assert (out / "nll.png").exists() and (out / "passkey.png").exists()


@pytest.mark.slow
def test_smollm2_hooks_equal_the_blocked_path(smollm2):
    ids = smollm2.to_tokens("The quick brown fox jumps over the lazy dog. " * 6)[:, :64]
    attention = LambdaAttention(n_global=4, n_local=16, max_distance=32, block_size=24)
    with torch.no_grad():
        hooked = smollm2.run_with_hooks(ids, fwd_hooks=lambda_attention_hooks(smollm2, attention))
    blocked = unembed(smollm2, forward_hidden(smollm2, ids, attention))
    torch.testing.assert_close(blocked, hooked, atol=2e-3, rtol=1e-3)


def test_gemma3_sliding_layers_keep_their_window(tiny_tokenizer):
    """Gemma 3: Λ attention on the global layers, the model's own window on sliding layers."""
    model = tiny_gemma3(tiny_tokenizer, max_positions=24)
    ids = torch.randint(3, model.cfg.d_vocab, (2, 40))
    attention = LambdaAttention(n_global=3, n_local=8, max_distance=24, block_size=5)
    hooks = lambda_attention_hooks(model, attention)
    assert {name.split(".")[1] for name, _ in hooks} == {"1", "3"}
    with torch.no_grad():
        plain = model(ids)
        hooked = model.run_with_hooks(ids, fwd_hooks=hooks)
    blocked = unembed(model, forward_hidden(model, ids, attention))
    torch.testing.assert_close(blocked, hooked, atol=1e-4, rtol=1e-4)
    assert (hooked - plain).abs().max() > 1e-2
    covering = LambdaAttention(n_global=2, n_local=40, max_distance=24)
    blocked = unembed(model, forward_hidden(model, ids, covering))
    torch.testing.assert_close(blocked, plain, atol=1e-4, rtol=1e-4)
