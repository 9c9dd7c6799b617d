import json

import torch
import torch.nn.functional as F

import anchor_lens as al
from anchor_lens import Example
from anchor_lens.cli import main
from anchor_lens.icl import target_logits
from anchor_lens.reweighting import AnchorReweighting, frozen, train_reweighting

DEMOS = [Example("good fun", 1), Example("bad", 0)]
TRAIN = [Example("great", 1), Example("awful", 0), Example("lovely", 1), Example("dull", 0)]


def test_zero_beta_leaves_logits_unchanged(tiny_model):
    batch = al.build_icl_batch(tiny_model, "sst2", DEMOS, TRAIN)
    module = AnchorReweighting.for_model(tiny_model, batch.n_demos)
    assert module.beta.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads, 2)
    with torch.no_grad():
        assert torch.equal(
            target_logits(tiny_model, batch), target_logits(tiny_model, batch, module.hooks(batch))
        )


def test_gradients_reach_beta_only(tiny_llama):
    batch = al.build_icl_batch(tiny_llama, "sst2", DEMOS, TRAIN[:2])
    module = AnchorReweighting.for_model(tiny_llama, batch.n_demos)
    with frozen(tiny_llama):
        logits = target_logits(tiny_llama, batch, module.hooks(batch))
        F.cross_entropy(logits[:, batch.label_token_ids], batch.labels).backward()
    assert module.beta.grad is not None and module.beta.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_llama.parameters())
    assert all(p.requires_grad for p in tiny_llama.parameters())  # restored


def test_training_changes_beta_and_round_trips(tiny_llama, tmp_path):
    module, losses = train_reweighting(
        tiny_llama, "sst2", DEMOS, TRAIN, epochs=3, lr=0.05, progress=False
    )
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert module.beta.abs().sum() > 0
    module.save(tmp_path / "beta.safetensors")
    loaded = AnchorReweighting.load(tmp_path / "beta.safetensors")
    assert torch.equal(loaded.beta, module.beta.detach())
    batch = al.build_icl_batch(tiny_llama, "sst2", DEMOS, TRAIN)
    with torch.no_grad():
        a = target_logits(tiny_llama, batch, module.hooks(batch))
        b = target_logits(tiny_llama, batch, loaded.hooks(batch))
        plain = target_logits(tiny_llama, batch)
    assert torch.equal(a, b) and not torch.equal(a, plain)


def test_cli_reweight(tiny_llama_folder, tmp_path):
    code = main(
        [
            "reweight",
            "--model",
            str(tiny_llama_folder),
            "--n",
            "6",
            "--epochs",
            "1",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 0
    out = json.loads((tmp_path / "reweight.json").read_text())
    assert {"accuracy_1shot", "accuracy_5shot", "accuracy_reweighted", "n"} <= set(out)
    assert out["n"] == 6
    assert AnchorReweighting.load(tmp_path / "beta_seed42.safetensors").beta.shape[2] == 2
