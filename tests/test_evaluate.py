import json

import pytest
import torch

import anchor_lens as al
from anchor_lens import Example
from anchor_lens.cli import main

DEMOS = [Example("good fun", 1), Example("bad", 0)]
QUERIES = [Example("ok", 1), Example("a long and very boring film", 0), Example("nice", 1)]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_prediction_reads_label_logits_at_the_target(tiny_model, padding_side):
    batch = al.build_icl_batch(tiny_model, "sst2", DEMOS, QUERIES, padding_side=padding_side)
    pred = al.predict(tiny_model, batch)
    with torch.no_grad():
        logits = tiny_model(**batch.model_inputs())
    at_target = logits[torch.arange(len(batch)), batch.target_positions]
    assert torch.allclose(pred.label_logits, at_target[:, batch.label_token_ids], atol=1e-5)
    mass = at_target.softmax(-1)[:, batch.label_token_ids].sum(-1)
    assert torch.allclose(pred.label_mass, mass, atol=1e-6)
    assert pred.labels.tolist() == [1, 0, 1]


def test_full_word_scoring_matches_manual_chain_rule(tiny_llama, tiny_tokenizer):
    task = al.Task("clash", "Review: {text}\nSentiment: {label}", ("Positive", "Positivexyz"))
    words = al.label_tokens(tiny_tokenizer, task).words
    batch = al.build_icl_batch(
        tiny_llama, task, [Example("good", 0)], ["bad", "so so"], check_label_collisions=False
    )
    pred = al.predict(tiny_llama, batch, scoring="full_word")
    for b in range(len(batch)):
        real = batch.input_ids[b][batch.attention_mask[b].bool()]
        for c, word in enumerate(words):
            ids = torch.cat([real, torch.tensor(word)])[None]
            with torch.no_grad():
                logprobs = tiny_llama(ids).log_softmax(-1)[0]
            n = len(real)
            manual = sum(logprobs[n - 1 + j, t] for j, t in enumerate(word))
            assert torch.allclose(pred.label_logits[b, c], manual, atol=1e-4)


def test_evaluate_zero_and_few_shot(tiny_model):
    zero = al.evaluate(tiny_model, "sst2", QUERIES, [], progress=False)
    few = al.evaluate(tiny_model, "sst2", QUERIES, DEMOS, batch_size=2, progress=False)
    for result in (zero, few):
        assert result.n == 3 and len(result.predictions) == 3
        acc = sum(p == y for p, y in zip(result.predictions, result.labels, strict=True)) / 3
        assert result.accuracy == pytest.approx(acc)
    # Batching does not change predictions.
    one_by_one = al.evaluate(tiny_model, "sst2", QUERIES, DEMOS, batch_size=1, progress=False)
    assert torch.allclose(
        torch.tensor(one_by_one.label_probs), torch.tensor(few.label_probs), atol=1e-5
    )


@pytest.mark.parametrize("mode", ["per_query", "fixed"])
def test_run_icl_keeps_queries_and_demonstrations_apart(tiny_llama, monkeypatch, mode):
    from anchor_lens import icl

    seen = {}
    original = icl.evaluate

    def spy(model, task, queries, demos, **kw):
        seen["queries"], seen["demos"] = queries, demos
        return original(model, task, queries, demos, **kw)

    monkeypatch.setattr(icl, "evaluate", spy)
    result = al.run_icl(
        tiny_llama, "sentiment-demo", shots=2, n=20, seed=3, mode=mode, progress=False
    )
    assert result.n == 20 and sum(result.predicted_counts) == 20
    per_query = seen["demos"] if mode == "per_query" else [seen["demos"]] * 20
    assert len(per_query) == 20 and all(len(d) == 4 for d in per_query)
    query_texts = {e.text for e in seen["queries"]}
    assert not {e.text for d in per_query for e in d} & query_texts
    if mode == "per_query":
        assert len({tuple(e.text for e in d) for d in per_query}) > 1


def test_per_query_batches_equal_one_prompt_at_a_time(tiny_model):
    """Per-query demonstrations are batched with padding; batching changes nothing."""
    ep = al.sample_episode("sentiment-demo", n=6, seed=0)
    batched = al.evaluate(tiny_model, "sst2", ep.queries, ep.demonstrations, progress=False)
    for i, query in enumerate(ep.queries):
        alone = al.evaluate(tiny_model, "sst2", [query], ep.demos_for(i), progress=False)
        assert torch.allclose(
            torch.tensor(alone.label_probs[0]), torch.tensor(batched.label_probs[i]), atol=1e-5
        )


def test_evaluate_refuses_no_queries(tiny_llama):
    with pytest.raises(ValueError, match="at least one query"):
        al.evaluate(tiny_llama, "sst2", [], DEMOS, progress=False)


def test_cli_evaluate_on_a_local_model(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "evaluate",
            "--model",
            str(tiny_llama_folder),
            "--n",
            "10",
            "--seed",
            "1",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 10 and 0 <= metrics["accuracy"] <= 1
    assert set(metrics["seeds"]) == {"1", "2"}
    assert "accuracy" in capsys.readouterr().out


def test_cli_errors_are_one_line(tiny_llama_folder, tmp_path, capsys):
    code = main(
        ["evaluate", "--model", str(tiny_llama_folder), "--task", "imdb", "--out", str(tmp_path)]
    )
    assert code == 2
    assert "Unknown task 'imdb'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_default_runs_the_embedded_demo(tmp_path):
    assert main(["evaluate", "--n", "16", "--out", str(tmp_path), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["task"] == "sentiment-demo" and metrics["model"] == "default"
    assert metrics["n"] == 16 and metrics["label_mass"] > 0.5


@pytest.mark.slow
def test_default_model_does_one_shot_icl_on_sst2(smollm2, data_dir):
    result = al.run_icl(
        smollm2,
        "sst2",
        data=data_dir / "sst2" / "validation.jsonl",
        demo_data=data_dir / "sst2" / "train.jsonl",
        shots=1,
        n=48,
        seed=42,
        progress=False,
    )
    # A model that ignores the format puts little mass on the label words and sits at chance.
    assert result.label_mass > 0.3
    assert result.accuracy > 0.55
