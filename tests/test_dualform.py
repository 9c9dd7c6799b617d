"""ICL as implicit fine-tuning (Dai et al.): K/V fine-tuning, capture and the four metrics."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau

import anchor_lens as al
from anchor_lens import Example
from anchor_lens import dualform as df

from .conftest import tiny_hf_model

DEMOS = [Example("good fun", 1), Example("bad", 0), Example("lovely", 1)]
QUERIES = [Example("great", 1), Example("awful", 0), Example("dull", 0), Example("fine", 1)]
VALIDATION = [Example("nice", 1), Example("boring", 0)]


def _state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _reference_step(model, ids: list[int], params, lr: float) -> list[torch.Tensor]:
    """θ − lr·∇θ L computed here, independently of the library's step."""
    x = torch.tensor([ids])
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in params:
        p.param.requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits[0, :-1].float(), x[0, 1:])
    grads = torch.autograd.grad(loss, [p.param for p in params])
    for p, flag in flags:
        p.requires_grad_(flag)
    out = []
    for p, g in zip(params, grads, strict=True):
        if p.mask is not None:
            g = torch.where(p.mask, g, torch.zeros_like(g))
        out.append((p.param - lr * g).detach())
    return out


# ------------------------------------------------------------------------------ parameters
def test_kv_parameters_gpt2_and_llama_gqa(tiny_model):
    params = df.kv_parameters(tiny_model)
    cfg = tiny_model.cfg
    kv_heads = cfg.n_key_value_heads or cfg.n_heads
    assert sorted({p.layer for p in params}) == list(range(cfg.n_layers))
    assert all(p.mask is None for p in params)  # the bridge splits GPT-2's c_attn into k and v
    weights = [p for p in params if p.name.endswith("weight")]
    assert len(weights) == 2 * cfg.n_layers
    # Under GQA the trained tensors are the shared kv heads: [n_kv_heads * d_head, d_model].
    assert all(kv_heads * cfg.d_head in p.param.shape for p in weights)
    assert all(("k" in p.name.split(".")[-3]) or ("v" in p.name.split(".")[-3]) for p in weights)


def test_sgd_step_is_exact_and_everything_else_bit_identical(tiny_model):
    before = _state(tiny_model)
    flags = [p.requires_grad for p in tiny_model.parameters()]
    params = df.kv_parameters(tiny_model)
    trained = {id(p.param) for p in params}
    ids, _ = df._demo_ids(tiny_model, al.get_task("sst2"), DEMOS[0])
    expected = _reference_step(tiny_model, ids, params, lr=0.05)
    with df.kv_finetuned(tiny_model, "sst2", DEMOS[:1], lr=0.05) as trace:
        for p, want in zip(params, expected, strict=True):
            assert torch.equal(p.param, want), p.name
            assert not torch.equal(p.param, before[p.name]), p.name
        storages = {p.param.untyped_storage().data_ptr() for p in params}
        for name, p in tiny_model.named_parameters():
            if id(p) in trained or p.untyped_storage().data_ptr() in storages:
                continue  # GPT-2's fused qkv shares memory with k and v: its q view is checked
            assert torch.equal(p, before[name]), name
            assert p.grad is None
    assert trace.relative_update > 0 and len(trace.losses) == 1
    for name, p in tiny_model.named_parameters():  # restored bit-exactly
        assert torch.equal(p, before[name]), name
    assert [p.requires_grad for p in tiny_model.parameters()] == flags


def test_steps_follow_demonstration_order(tiny_llama):
    """Two steps equal step(demo 0) then step(demo 1); the reverse order gives other weights."""
    task = al.get_task("sst2")
    params = df.kv_parameters(tiny_llama)
    saved = [p.param.detach().clone() for p in params]
    ids = [df._demo_ids(tiny_llama, task, d)[0] for d in DEMOS[:2]]
    first = _reference_step(tiny_llama, ids[0], params, lr=0.1)
    with torch.no_grad():
        for p, w in zip(params, first, strict=True):
            p.param.copy_(w)
    expected = _reference_step(tiny_llama, ids[1], params, lr=0.1)
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.param.copy_(s)
    with df.kv_finetuned(tiny_llama, task, DEMOS[:2], lr=0.1) as trace:
        assert all(torch.equal(p.param, w) for p, w in zip(params, expected, strict=True))
        assert trace.token_demo.tolist() == [0] * len(ids[0]) + [1] * len(ids[1])
    with df.kv_finetuned(tiny_llama, task, DEMOS[:2][::-1], lr=0.1):
        assert not all(torch.equal(p.param, w) for p, w in zip(params, expected, strict=True))


def test_fused_c_attn_trains_only_its_kv_slices(tiny_tokenizer):
    """GPT-2 on the Hugging Face backend keeps one fused c_attn: the Q part gets no update."""
    model = al.load_model(
        tiny_hf_model("gpt2", tiny_tokenizer), tokenizer=tiny_tokenizer, backend="hf"
    )
    params = df.kv_parameters(model)
    assert all("c_attn" in p.name and p.mask is not None for p in params)
    d = model.cfg.n_heads * model.cfg.d_head
    weight = next(p for p in params if p.name.endswith("weight"))
    before = weight.param.detach().clone()
    ids, _ = df._demo_ids(model, al.get_task("sst2"), DEMOS[0])
    expected = _reference_step(model, ids, params, lr=0.5)
    with df.kv_finetuned(model, "sst2", DEMOS[:1], lr=0.5):
        for p, want in zip(params, expected, strict=True):
            assert torch.equal(p.param, want)
        assert torch.equal(weight.param[:, :d], before[:, :d])  # Q columns untouched
        assert not torch.equal(weight.param[:, d : 2 * d], before[:, d : 2 * d])  # K
        assert not torch.equal(weight.param[:, 2 * d :], before[:, 2 * d :])  # V
    assert torch.equal(weight.param, before)


def test_restored_after_an_error(tiny_llama):
    before = _state(tiny_llama)
    with pytest.raises(RuntimeError, match="boom"):
        with df.kv_finetuned(tiny_llama, "sst2", DEMOS, lr=1.0):
            raise RuntimeError("boom")
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.named_parameters())


def test_dual_form_identity_on_a_linear_layer():
    """One SGD step on a linear layer equals linear attention over the training inputs:
    W' q = W q + Σ_i (−lr e_i)(x_iᵀ q), e_i = ∂L/∂(W x_i) (Dai et al., Eqs. 5–7)."""
    torch.manual_seed(0)
    d_in, d_out, n = 5, 3, 7
    layer = torch.nn.Linear(d_in, d_out, bias=False).double()
    x = torch.randn(n, d_in, dtype=torch.float64)
    target = torch.randn(n, d_out, dtype=torch.float64)
    q = torch.randn(d_in, dtype=torch.float64)
    out = layer(x)
    loss = ((out - target) ** 2).sum()
    errors = torch.autograd.grad(loss, out, retain_graph=True)[0]  # e_i, [n, d_out]
    grad = torch.autograd.grad(loss, layer.weight)[0]
    lr = 0.01
    fine_tuned = (layer.weight - lr * grad).detach() @ q
    values, keys = -lr * errors, x
    linear_attention = (values * (keys @ q)[:, None]).sum(0)  # no softmax
    zero_shot = layer.weight.detach() @ q
    torch.testing.assert_close(fine_tuned, zero_shot + linear_attention, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------- metrics
def test_rec2ftp_matches_the_formula_and_is_undefined_at_zero():
    rng = np.random.default_rng(0)
    zsl, ft, icl = (torch.from_numpy(rng.random(50) < 0.5) for _ in range(3))
    r = df.rec2ftp(zsl, ft, icl)
    both = sum((not a) and b and c for a, b, c in zip(zsl, ft, icl, strict=True))
    ft_fix = sum((not a) and b for a, b in zip(zsl, ft, strict=True))
    assert (r.n_both, r.n_ft) == (both, ft_fix) and r.value == pytest.approx(both / ft_fix)
    assert r.chance == pytest.approx(int((~zsl & icl).sum()) / int((~zsl).sum()))
    same = df.rec2ftp(zsl, zsl, icl)  # FT = ZSL: no query fixed by FT
    assert same.value is None and same.n_ft == 0
    json.dumps(same.to_json(), allow_nan=False)


def _np_cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_simaou_against_the_formula():
    g = torch.Generator().manual_seed(1)
    h = [torch.randn(3, 4, 8, generator=g) for _ in range(3)]
    got = df.simaou(*h)
    for layer in range(3):
        for i in range(4):
            z, c, f = (x[layer, i].double().numpy() for x in h)
            z, c, f = (v / np.linalg.norm(v) for v in (z, c, f))
            assert got[layer, i] == pytest.approx(_np_cos(c - z, f - z), abs=1e-12)
    same = df.simaou(h[0], h[1], h[0])  # FT changed nothing: undefined, not 0
    assert same.isnan().all()
    assert df.layer_summary(same) == {"per_layer": [None] * 3, "mean": None}


def test_simaou_random_baselines():
    g = torch.Generator().manual_seed(2)
    zsl, icl = torch.randn(2, 400, 64, generator=g), torch.randn(2, 400, 64, generator=g)
    icl = icl + 3.0  # an update with a large mean component
    gauss = df.simaou_random(zsl, icl, "gaussian", torch.Generator().manual_seed(0))
    uniform = df.simaou_random(zsl, icl, "uniform", torch.Generator().manual_seed(0))
    assert abs(float(gauss.mean())) < 0.02  # centred: chance level is 0 for any update
    assert float(uniform.mean()) > 0.3  # not centred: it measures the all-ones direction
    r = torch.rand(2, 400, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    delta = F.normalize(icl.double(), dim=-1) - F.normalize(zsl.double(), dim=-1)
    torch.testing.assert_close(uniform, F.cosine_similarity(delta, r, dim=-1))


def test_simam_against_the_formula():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 4, 6, generator=g), torch.randn(2, 3, 4, 6, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    got = df.simam(a, b, mask)
    for layer in range(2):
        for i in range(3):
            keep = mask[i].numpy()
            heads = [
                _np_cos(a[layer, i, h].numpy()[keep], b[layer, i, h].numpy()[keep])
                for h in range(4)
            ]
            assert got[layer, i] == pytest.approx(np.mean(heads), abs=1e-6)


def test_kendall_against_scipy_token_and_example_level():
    g = torch.Generator().manual_seed(4)
    icl, ft = torch.randn(2, 3, 9, generator=g), torch.randn(2, 3, 9, generator=g)
    owner = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    token = df.kendall_per_layer(icl, ft)
    example = df.kendall_per_layer(icl, ft, owner)
    for layer in range(2):
        for i in range(3):
            a = torch.softmax(icl[layer, i].double(), -1).numpy()
            b = torch.softmax(ft[layer, i].double(), -1).numpy()
            assert token[layer, i] == pytest.approx(kendalltau(a, b).statistic)
            # no ties: τ = (concordant − discordant) / (n choose 2)
            pairs = [(x, y) for x in range(9) for y in range(x + 1, 9)]
            s = sum(np.sign(a[x] - a[y]) * np.sign(b[x] - b[y]) for x, y in pairs)
            assert token[layer, i] == pytest.approx(s / len(pairs))
            sa = [a[owner.numpy() == k].sum() for k in range(3)]
            sb = [b[owner.numpy() == k].sum() for k in range(3)]
            assert example[layer, i] == pytest.approx(kendalltau(sa, sb).statistic)


def test_dual_attention_is_query_dot_query():
    g = torch.Generator().manual_seed(5)
    ft_q, train_q = torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    got = df.dual_attention(ft_q, train_q)
    torch.testing.assert_close(got, (ft_q.double() @ train_q.double().transpose(1, 2)))


# ------------------------------------------------------------------------------- capture
def test_query_vector_variants(tiny_model):
    batch, recorded = df.dual_form_batch(tiny_model, "sst2", DEMOS, QUERIES[:2])
    pre = df.capture_setting(tiny_model, batch, recorded, query_vector="pre_rotary")
    post = df.capture_setting(tiny_model, batch, recorded, query_vector="post_rotary")
    scores_pre = df.capture_setting(tiny_model, batch, recorded, scores_from="pre_rotary")
    rotary = tiny_model.cfg.positional_embedding_type == "rotary"
    assert torch.equal(pre.query, post.query) != rotary
    assert torch.equal(pre.attn_out, post.attn_out)
    own = batch.attention_mask.bool().cpu()[None, :, None, :].expand_as(pre.scores)
    same = torch.allclose(pre.scores[own], scores_pre.scores[own], atol=1e-5)
    assert same != rotary  # without rotary, q·k/√d from hook_q/hook_k is hook_attn_scores


def test_label_token_recording(tiny_model):
    last, rec_last = df.dual_form_batch(tiny_model, "sst2", DEMOS, QUERIES)
    appended, rec = df.dual_form_batch(tiny_model, "sst2", DEMOS, QUERIES, record_at="label_token")
    assert torch.equal(rec, rec_last + 1)
    assert (appended.input_ids[:, -1] == appended.label_token_ids[0]).all()
    a = df.capture_setting(tiny_model, last, rec_last)
    b = df.capture_setting(tiny_model, appended, rec)
    torch.testing.assert_close(a.label_logits, b.label_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a.attn_out, b.attn_out)


def test_compare_settings_end_to_end(tiny_model):
    before = _state(tiny_model)
    result = df.compare_settings(
        tiny_model, "sst2", DEMOS, QUERIES, VALIDATION, [0.0, 0.5], batch_size=3, kendall_n=3
    )
    out = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert out["n"] == 4 and out["n_kendall"] == 3 and len(out["grid"]) == 2
    zero, big = out["grid"]
    # lr = 0: FT is ZSL, so FT fixes nothing (Rec2FTP 0/0) and its update has no direction.
    assert zero["n_changed"] == 0 and zero["relative_update"] == 0.0
    assert zero["rec2ftp"]["value"] is None and zero["rec2ftp"]["n_ft"] == 0
    assert zero["simaou"]["mean"] is None
    assert big["relative_update"] > 0 and big["simaou"]["mean"] is not None
    n_layers = tiny_model.cfg.n_layers
    for key in ("simaou", "simam_after", "kendall_token", "kendall_example"):
        assert len(big[key]["per_layer"]) == n_layers
    assert len(out["baselines"]["simam_before"]["per_layer"]) == n_layers
    assert result.selected_lr in (0.0, 0.5)
    assert out["n_train_tokens"] == sum(
        len(df._demo_ids(tiny_model, al.get_task("sst2"), d)[0])
        - df._demo_ids(tiny_model, al.get_task("sst2"), d)[1]
        for d in DEMOS
    )
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())


@pytest.mark.slow
def test_dual_form_on_smollm2(smollm2):
    """The real tokenizer: training tokens align with the ICL prompt; SmolLM2 restored."""
    before = {n: p.detach().clone() for n, p in smollm2.named_parameters() if ".0." in n}
    result = df.compare_settings(
        smollm2, "sst2", DEMOS[:2], QUERIES[:2], VALIDATION[:2], [1e-3], kendall_n=2,
        record_at="label_token",
    )  # fmt: skip
    sel = result.selected
    assert math.isfinite(sel["kendall_token"]["mean"])
    assert len(sel["simaou"]["per_layer"]) == 30
    assert all(torch.equal(p, before[n]) for n, p in smollm2.named_parameters() if n in before)


def test_cli_dual_form(tiny_llama_folder, tmp_path):
    from anchor_lens.cli import main

    args = ["dual-form", "--model", str(tiny_llama_folder), "--n", "4", "--shots", "1"]
    args += ["--lrs", "0.01", "0.5", "--validation-per-class", "1", "--kendall-n", "2"]
    args += ["--momentum-eta", "0.3", "--seed", "1", "2", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    out = json.loads((tmp_path / "dual_form.json").read_text())
    assert out["lrs"] == [0.01, 0.5] and out["n"] == 4 and out["n_seeds"] == 2
    assert len(out["grid"]) == 2 and len(out["seeds"]) == 2
    assert out["selected"]["simaou"]["per_layer"] and "rec2ftp" in out["selected"]
    assert [m["layers"] for m in out["momentum"]] == ["none", "all", "shallow", "deep"]
    report = (tmp_path / "report.md").read_text()
    assert "SimAM" in report and "| 0.5 |" in report and "inference time" in report
    assert (tmp_path / "fig_dual_form.png").is_file() and (tmp_path / "fig_lr_sweep.png").is_file()
    assert main(args) == 0  # resumed: every seed is in the journal


def test_findings_need_a_clear_margin_and_say_undefined():
    layer = lambda v: {"per_layer": [v], "mean": v}  # noqa: E731
    entry = {
        "lr": 0.1, "simaou": layer(0.04), "simam_after": layer(0.5),
        "kendall_token": layer(0.2), "kendall_example": layer(0.1),
        "rec2ftp": {"value": None, "n_both": 0, "n_ft": 0, "n_icl": 3, "n_zsl_wrong": 5,
                    "chance": 0.6},
    }  # fmt: skip
    summary = {
        "selected": entry,
        "grid": [entry],
        "baselines": {
            "simaou_gaussian": layer(0.0), "simaou_uniform": layer(0.02),
            "simam_before": layer(0.4), "kendall_random_token": layer(0.0),
            "kendall_random_example": layer(0.0),
        },
    }  # fmt: skip
    verdicts = [f.holds for f in df.dual_form_findings(summary)]
    assert verdicts == [False, True, True, None]  # SimAOU 0.04: inside the 0.05 margin


def test_tiny_gemma3_one_kv_head_and_sliding_layers(tiny_tokenizer):
    from .conftest import tiny_gemma3

    model = tiny_gemma3(tiny_tokenizer)
    params = df.kv_parameters(model)
    assert len(params) == 2 * model.cfg.n_layers  # k_proj, v_proj (no bias); q/k norms kept
    assert all(p.param.shape[0] == model.cfg.d_head for p in params)  # one kv head
    before = _state(model)
    result = df.compare_settings(model, "sst2", DEMOS, QUERIES, VALIDATION, [0.5], kendall_n=4)
    assert result.selected["simaou"]["mean"] is not None
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_cli_dual_form_shrinks_validation_to_a_small_pool(tiny_llama_folder, tmp_path, capsys):
    """The embedded set's pool (8 per class) cannot give 4 demonstrations and 8 validation
    examples per class: the lr is chosen on what is left, and the run says so."""
    from anchor_lens.cli import main

    args = ["dual-form", "--model", str(tiny_llama_folder), "--n", "4", "--lrs", "0.01"]
    assert main([*args, "--kendall-n", "2", "--out", str(tmp_path), "--quiet"]) == 0
    assert "leaves 4 validation example(s) per class" in capsys.readouterr().err
    assert json.loads((tmp_path / "dual_form.json").read_text())["seeds"][0]["n_validation"] == 8
    too_many = ["--shots", "8", "--out", str(tmp_path / "empty"), "--quiet"]
    assert main([*args, *too_many]) == 2
    assert "--demo-data" in capsys.readouterr().err
