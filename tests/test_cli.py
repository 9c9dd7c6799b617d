"""The command line as a new user meets it: help, checks before the model load, strict JSON."""

import json

import pytest
import torch

import anchor_lens.models
from anchor_lens.cli import _build_parser, main

COMMANDS = ["evaluate", "analyze", "reweight", "compress", "diagnose", "long-context"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(anchor_lens.models, "load_model", refuse)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_its_default(command):
    sub = _build_parser()._subparsers._group_actions[0].choices[command]
    text = sub.format_help()
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings} has no help"
        if action.default not in (None, False) and action.required is False:
            assert "default" in action.help or "(default:" in text, action.option_strings
    assert "(default: 'default')" in text or "(default: default)" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "--task", "imdb"], "Unknown task 'imdb'"),
        (["evaluate", "--data", "missing.jsonl"], "Data file not found"),
        (["analyze", "--data", "{empty}"], "is empty"),
        (["evaluate", "--model", "./no/such/folder"], "No model at './no/such/folder'"),
        (["evaluate", "--label-words", "Bad"], "--label-words got 1 words"),
        (["reweight", "--task", "sst2"], "Hugging Face Hub cannot be reached"),
        (["dual-form", "--lrs", "0.1", "-0.1"], "must be finite and >= 0"),
        (["plateau", "--pairs", "1"], "n_pairs must be at least 2 (--pairs)"),
        *(
            pytest.param(
                [command, "--device", "cuda"],
                "sees no cuda device",
                marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there"),
            )
            for command in ("evaluate", "plateau")
        ),
    ],
)
def test_mistakes_are_reported_before_any_model_load(
    argv, message, tmp_path, capsys, monkeypatch, no_model_load
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    argv = [a.replace("{empty}", str(empty)) for a in argv]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # a note on the data may come first
    assert last.startswith("anchor-lens: error:") and message in last
    assert "Traceback" not in capsys.readouterr().err


def test_hub_model_offline_fails_fast(tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["evaluate", "--model", "someone/not-cached-model", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot be reached (HF_HUB_OFFLINE is set)" in err and "'default'" in err


@pytest.mark.parametrize("value", ["0", "-3"])
def test_n_must_be_positive(value, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--n", value, "--out", str(tmp_path)])
    assert "must be at least 1" in capsys.readouterr().err


def test_evaluate_writes_strict_json_with_its_protocol(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["evaluate", "--model", str(tiny_llama_folder), "--n", "10", "--seed", "1", "2"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    text = (out / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert metrics["n"] == 10 and set(metrics["seeds"]) == {"1", "2"}
    assert metrics["episode_mode"] == "per_query"
    assert metrics["demo_pool_split_from_queries"] is True
    assert "embedded demo set" in metrics["demo_source"]
    assert sum(metrics["predicted_counts"].values()) == 20
    captured = capsys.readouterr()
    assert "demonstration pool" in captured.err and "accuracy" in captured.out


def test_label_words_replace_the_tasks(tiny_llama_folder, tmp_path):
    out = tmp_path / "run"
    argv = ["evaluate", "--model", str(tiny_llama_folder), "--n", "4", "--quiet"]
    assert main([*argv, "--label-words", "bad", "good", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["label_words"] == ["bad", "good"]
