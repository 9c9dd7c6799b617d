"""The experiment runner: journal, resume after a kill, config checks, torchrun sharding."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from anchor_lens.cli import main
from anchor_lens.runner import (
    Journal,
    JournalMismatchError,
    OutputConfig,
    UnitExperiment,
    option,
    run_experiment,
)

REPO = Path(__file__).resolve().parents[1]


def _run(tiny_llama_folder, out, *extra):
    argv = ["evaluate", "--model", str(tiny_llama_folder), "--n", "12", "--seed", "1", "2"]
    return main([*argv, "--batch-size", "4", "--out", str(out), "--quiet", *extra])


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def _journal_lines(out):
    return [
        line
        for path in sorted((out / "journal").glob("rank*.jsonl"))
        for line in path.read_text().splitlines()[1:]
    ]


def test_journal_keeps_every_record_and_a_manifest(tiny_llama_folder, tmp_path):
    out = tmp_path / "run"
    assert _run(tiny_llama_folder, out) == 0
    assert len(_journal_lines(out)) == 24  # 12 queries x 2 seeds
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["experiment"] == "evaluate" and manifest["processes"] == 1
    assert manifest["seeds"] == [1, 2] and manifest["records_resumed"] == 0
    assert set(manifest["versions"]) == {"anchor-lens", "torch", "transformers", "transformer-lens"}
    assert manifest["model"]["content_hash"] and manifest["config"]["n"] == 12
    assert manifest["demonstrations"]["demo_pool_split_from_queries"] is True


def test_resume_skips_done_records_and_ends_identical(tiny_llama_folder, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _run(tiny_llama_folder, full) == 0
    assert _run(tiny_llama_folder, cut) == 0
    # Keep the header and 9 records, and tear the 10th in the middle of its line.
    path = cut / "journal" / "rank0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:10]) + lines[10][: len(lines[10]) // 2])
    (cut / "metrics.json").unlink()
    assert _run(tiny_llama_folder, cut) == 0
    manifest = json.loads((cut / "manifest.json").read_text())
    # Batches of 4: two whole batches are kept; the third (1 record + 1 torn) is recomputed.
    assert manifest["records_resumed"] == 8
    a, b = _metrics(full), _metrics(cut)
    assert a["seeds"] == b["seeds"] and a["accuracy"] == b["accuracy"]
    # The recomputed batch repeats a record that survived the kill, identically.
    assert set(_journal_lines(full)) == set(_journal_lines(cut))


def test_a_different_config_refuses_to_resume(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(tiny_llama_folder, out) == 0
    assert _run(tiny_llama_folder, out, "--shots", "2") == 2
    err = capsys.readouterr().err
    assert "another config" in err and "'shots': (1, 2)" in err and "another --out" in err
    # Run-only options (quiet, device) may change on resume; the batch size sets the padding.
    assert main(["evaluate", "--model", str(tiny_llama_folder), "--n", "12", "--seed", "1", "2",
                 "--batch-size", "4", "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip


def test_journal_refuses_a_corrupt_line_before_the_last(tmp_path):
    journal = Journal(tmp_path, "evaluate", {"n": 1})
    journal.append([{"seed": 0, "index": 0}, {"seed": 0, "index": 1}])
    journal.close()
    lines = journal.path.read_text().splitlines()
    journal.path.write_text("\n".join([lines[0], "{not json", lines[2]]) + "\n")
    with pytest.raises(ValueError, match="not the last line"):
        journal.load()
    with pytest.raises(JournalMismatchError):
        Journal(tmp_path, "evaluate", {"n": 2}).load()


# ---------------------------------------------------------------------------- unit experiments
@dataclass
class SquaresConfig(OutputConfig):
    k: list[int] = option([1, 2, 3, 4], help="numbers to square", nargs="+")
    offset: int = option(0, help="added to every square")


class Squares(UnitExperiment):
    """A toy unit experiment: no model, one unit per number; counts what it computes."""

    name = "squares"
    config_cls = SquaresConfig

    def __init__(self, fail_at: int | None = None):
        self.computed: list[int] = []
        self.fail_at = fail_at

    def units(self, ctx):
        return [{"k": k} for k in ctx.config.k]

    def run_unit(self, ctx, unit):
        if unit["k"] == self.fail_at:
            raise KeyboardInterrupt  # a kill between units
        self.computed.append(unit["k"])
        return {"square": unit["k"] ** 2 + ctx.config.offset, "undefined": None}

    def finish(self, ctx, records):
        return records


def test_unit_experiment_journals_resumes_and_keeps_unit_order(tmp_path):
    config = SquaresConfig(out=tmp_path, k=[3, 1, 2, 5], quiet=True)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(Squares(fail_at=2), config)
    assert len(_journal_lines(tmp_path)) == 2  # units 3 and 1 survived the "kill"
    again = Squares()
    records = run_experiment(again, config)
    assert again.computed == [2, 5]  # only what the journal lacked
    assert records == [{"k": k, "square": k * k, "undefined": None} for k in (3, 1, 2, 5)]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["experiment"] == "squares" and manifest["records_resumed"] == 2
    assert manifest["model"] is None and manifest["config"]["k"] == [3, 1, 2, 5]
    # A torn last line is dropped and its unit computed again.
    path = tmp_path / "journal" / "rank0.jsonl"
    path.write_text(path.read_text()[:-5])
    third = Squares()
    assert run_experiment(third, config) == records and third.computed == [5]
    with pytest.raises(JournalMismatchError, match="'offset': \\(0, 1\\)"):
        run_experiment(Squares(), SquaresConfig(out=tmp_path, k=[3, 1, 2, 5], offset=1))


def test_reweight_resumes_per_seed(tiny_llama_folder, tmp_path):
    """Whole-context commands journal one record per seed: a lost seed is recomputed alone,
    and the results equal an uninterrupted run's."""
    args = ["reweight", "--model", str(tiny_llama_folder), "--n", "6", "--seed", "1", "2"]
    args += ["--train-per-class", "1", "--epochs", "1", "--quiet"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*args, "--out", str(full)]) == 0
    assert main([*args, "--out", str(cut)]) == 0
    path = cut / "journal" / "rank0.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))  # seed 2 lost
    (cut / "reweight.json").unlink()
    assert main([*args, "--out", str(cut)]) == 0
    assert json.loads((cut / "manifest.json").read_text())["records_resumed"] == 1
    a = json.loads((full / "reweight.json").read_text())
    b = json.loads((cut / "reweight.json").read_text())
    assert a == b and [s["seed"] for s in a["seeds"]] == [1, 2]
    assert (cut / "beta_seed1.safetensors").is_file() and (cut / "beta_seed2.safetensors").is_file()


def _cli(*args, env=None):
    return [sys.executable, "-m", "anchor_lens", *args]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tiny_llama_folder, tmp_path):
    """Kill the process for real while it writes the journal, then run the same command."""
    args = ["evaluate", "--model", str(tiny_llama_folder), "--n", "40", "--seed", "1", "2", "3"]
    args += ["--batch-size", "2", "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli(*args, "--out", str(tmp_path / "cut")), env=env, cwd=REPO)
    journal = tmp_path / "cut" / "journal" / "rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) > 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: give it more work"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(journal.read_text().splitlines()) - 1
    assert 0 < partial < 120
    subprocess.run(_cli(*args, "--out", str(tmp_path / "cut")), check=True, env=env, cwd=REPO)
    subprocess.run(_cli(*args, "--out", str(tmp_path / "full")), check=True, env=env, cwd=REPO)
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert a["seeds"] == b["seeds"]
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert manifest["records_resumed"] >= partial - 1


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tiny_llama_folder, tmp_path):
    """The documented form: torchrun --nproc-per-node 2 -m anchor_lens -- evaluate --n 60 ..."""
    common = ["--model", str(tiny_llama_folder), "--n", "30", "--seed", "5", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    for command in ("evaluate", "analyze"):
        two, one = tmp_path / f"{command}-2", tmp_path / f"{command}-1"
        extra = ["--k-layers", "1"] if command == "analyze" else []  # the tiny model: 3 layers
        launch = [*torchrun, "-m", "anchor_lens", "--", command, *common, *extra]
        subprocess.run([*launch, "--out", str(two)], check=True, env=env, cwd=REPO, timeout=600)
        assert main([command, *common, *extra, "--out", str(one)]) == 0
        assert json.loads((two / "manifest.json").read_text())["processes"] == 2
        assert len(list((two / "journal").glob("rank*.jsonl"))) == 2
        if command == "evaluate":
            a, b = _metrics(one), _metrics(two)
            assert a["seeds"]["5"]["predictions"] == b["seeds"]["5"]["predictions"]
            assert a["accuracy"] == b["accuracy"]
        else:
            for name in ("flow", "isolation", "deep"):
                a = json.loads((one / f"{name}.json").read_text())
                b = json.loads((two / f"{name}.json").read_text())
                _close(a, b, name)


@pytest.mark.slow
def test_accelerate_launch_two_processes_equal_one(tiny_llama_folder, tmp_path):
    """``accelerate launch`` sets the same environment as torchrun: per-query records shard by
    batch, whole-context commands by seed (each rank trains its own seeds' β). On CPU the
    form is ``--multi_gpu`` (its torchrun launcher); ``--cpu --num_processes 2`` would start
    one process only (multi-CPU accelerate needs MPI)."""
    common = ["--model", str(tiny_llama_folder), "--n", "12", "--seed", "1", "2", "--quiet"]
    per_command = {"evaluate": [], "reweight": ["--train-per-class", "1", "--epochs", "1"]}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "-m"]
    for command, extra in per_command.items():
        two, one = tmp_path / f"{command}-2", tmp_path / f"{command}-1"
        argv = ["anchor_lens", "--", command, *common, *extra, "--out", str(two)]
        subprocess.run([*launch, *argv], check=True, env=env, cwd=REPO, timeout=600)
        assert main([command, *common, *extra, "--out", str(one)]) == 0
        assert json.loads((two / "manifest.json").read_text())["processes"] == 2
        ranks = sorted((two / "journal").glob("rank*.jsonl"))
        assert [len(p.read_text().splitlines()) > 1 for p in ranks] == [True, True]
        name = "metrics.json" if command == "evaluate" else "reweight.json"
        a = json.loads((one / name).read_text())
        b = json.loads((two / name).read_text())
        _close(a, b, name)


def _close(a, b, where, tol=1e-5):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}", tol)
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]", tol)
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= tol * max(1.0, abs(a)), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_bfloat16_model_accumulates_metrics_in_float32(tiny_llama_folder):
    """bf16 weights: flows and class attention stay within bf16's precision of float32."""
    import torch

    import anchor_lens as al

    ep = al.sample_episode("sentiment-demo", n=6, seed=0)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = al.load_model(str(tiny_llama_folder), dtype=dtype)
        flow = al.analysis.information_flow(
            model, "sst2", ep.queries, ep.demonstrations, progress=False
        )
        deep = al.analysis.batch_deep_scores(
            model,
            al.build_icl_batch(model, "sst2", ep.demonstrations, ep.queries),
            range(model.cfg.n_layers),
            2,
        )
        assert deep[0].dtype == torch.float32
        results[dtype] = (torch.tensor(flow.S_wp_raw + flow.S_pq_raw + flow.S_ww_raw), deep[0])
    (f32, d32), (b16, d16) = results[torch.float32], results[torch.bfloat16]
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 ≈ 0.004), compounded through layers.
    assert torch.allclose(b16, f32, rtol=0.1, atol=1e-4)
    assert torch.allclose(d16, d32, rtol=0.05, atol=1e-3)


def test_analyze_records_equal_the_separate_analysis_functions(tiny_llama):
    """The runner's one-pass Analyze gives what information_flow / isolation / deep_layer_auc
    give with their own forwards."""
    from anchor_lens import analysis
    from anchor_lens.episodes import load_pools
    from anchor_lens.experiments import Analyze, AnalyzeConfig
    from anchor_lens.runner import Context
    from anchor_lens.tasks import get_task

    task = get_task("sentiment-demo")
    pools = load_pools(task)
    ep = al_draw(task, pools)
    config = AnalyzeConfig(out=Path("unused"), k_layers=1, batch_size=3)
    ctx = Context(config, task, pools, model=tiny_llama)
    records = Analyze().records(ctx, ep, list(range(ep.n)))
    flow = analysis.information_flow(tiny_llama, task, ep.queries, ep.demonstrations, batch_size=3,
                                     progress=False)  # fmt: skip
    iso = analysis.isolation(tiny_llama, task, ep.queries, ep.demonstrations, k_layers=1,
                             seed=ep.seed, batch_size=3, progress=False)  # fmt: skip
    deep = analysis.deep_layer_auc(tiny_llama, task, ep.queries, ep.demonstrations, batch_size=3,
                                   progress=False)  # fmt: skip
    for key in ("S_wp", "S_pq", "S_ww"):
        mean = [sum(r["flow"][key][layer] for r in records) / ep.n for layer in range(3)]
        assert mean == pytest.approx(getattr(flow, f"{key}_raw"), rel=1e-5, abs=1e-9)
    for key, v in iso.conditions.items():
        agree = sum(r["isolation"][key][0] for r in records) / ep.n
        jacc = sum(r["isolation"][key][1] for r in records) / ep.n
        assert (agree, jacc) == pytest.approx((v["label_loyalty"], v["word_loyalty"]), abs=1e-6)
    counts = [sum(r["prediction"] == c for r in records) for c in range(2)]
    assert counts == list(deep.predicted_classes.values())
    import torch

    scores = torch.tensor([r["class_attention"] for r in records]).transpose(0, 1)
    preds = torch.tensor([r["prediction"] for r in records])
    ours = analysis.deep_result(scores, preds, task)
    _close(ours.aucroc, deep.aucroc, "aucroc")


def al_draw(task, pools):
    from anchor_lens.episodes import draw_episode

    return draw_episode(task, pools, n=9, seed=3)
