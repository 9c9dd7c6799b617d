import json
import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from anchor_lens import Example
from anchor_lens.cli import main
from anchor_lens.diagnosis import diagnose, predicted_confusion, real_confusion


def test_predicted_confusion_is_a_normalised_distance_in_query_pca_space():
    # Queries vary along x only: keys differing only in y are indistinguishable to them.
    queries = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [2, 0, 0], [-2, 0, 0]])
    keys = torch.tensor([[0.0, 0, 0], [0, 5, 0], [1, 0, 0]])
    c = predicted_confusion(queries, keys, n_components=1)
    assert torch.diagonal(c).tolist() == [1.0, 1.0, 1.0]
    assert c[0, 1] == pytest.approx(0.0, abs=1e-6)  # same x: maximally confusable
    assert c[0, 2] == pytest.approx(1.0) and c[1, 2] == pytest.approx(1.0)
    assert torch.allclose(c, c.T)


def test_real_confusion_is_pairwise_auc():
    probs = torch.tensor(
        [[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.5, 0.1, 0.4]]
    )
    labels = torch.tensor([0, 0, 1, 2, 2])
    c = real_confusion(probs, labels)
    rows = [0, 1, 3, 4]  # gold 0 or 2
    score = probs[rows, 0] / (probs[rows, 0] + probs[rows, 2])
    assert c[0, 2] == pytest.approx(roc_auc_score([1, 1, 0, 0], score.numpy()))
    assert c[2, 0] == c[0, 2] and torch.diagonal(c).tolist() == [1.0, 1.0, 1.0]


def test_diagnose_on_a_gqa_model(tiny_llama):
    words = ["good", "bad", "fine", "odd", "sad", "long", "nice", "dull"]
    queries = [Example(w, i % 4) for i, w in enumerate(words)]
    demos = [
        Example("war news", 0),
        Example("cup final", 1),
        Example("stocks", 2),
        Example("new chip", 3),
    ]
    result = diagnose(tiny_llama, "agnews", queries, demos, layer=-1, progress=False)
    assert result.layer == tiny_llama.cfg.n_layers - 1
    assert len(result.predicted) == len(result.real) == 4
    assert -1 <= result.spearman <= 1 or math.isnan(result.spearman)
    assert len(result.most_confused("real")) == 2


def test_cli_diagnose(tiny_llama_folder, tmp_path):
    code = main(
        [
            "diagnose",
            "--model",
            str(tiny_llama_folder),
            "--n",
            "8",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 0
    out = json.loads((tmp_path / "diagnose.json").read_text())
    assert {"predicted", "real", "spearman", "layer"} <= set(out)
    assert (tmp_path / "confusion.png").stat().st_size > 1000
