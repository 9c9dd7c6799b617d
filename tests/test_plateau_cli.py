"""``anchor-lens plateau``: the whole comparison on a tiny setting, resumed, and its checks."""

from __future__ import annotations

import json

import pytest

from anchor_lens.cli import main
from anchor_lens.plateau.curves import PlateauLength
from anchor_lens.plateau.experiment import plateau_findings, summarize_strategies

TINY = [
    "plateau", "--pairs", "8", "--steps", "20", "--eval-every", "10", "--eval-sequences",
    "32", "--probe-every", "20", "--warmup-steps", "10", "--layers", "1", "--d-model", "16",
    "--heads", "2", "--batch-size", "16", "--seed", "0", "1", "--quiet",
    "--strategy", "baseline", "aux",
]  # fmt: skip


def test_plateau_command_writes_everything_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    for name in ("curves.json", "plateau.json", "report.md", "manifest.json"):
        assert (out / name).is_file(), name
    for name in ("accuracy.png", "weights_probe.png", "context_probe.png", "plateau_length.png"):
        assert (out / name).stat().st_size > 1000, name
    curves = json.loads((out / "curves.json").read_text())  # standard JSON: no NaN
    runs = curves["runs"]
    assert [(r["strategy"], r["seed"]) for r in runs] == [
        (s, seed) for s in ("baseline", "aux") for seed in (0, 1)
    ]
    assert runs[0]["steps"] == [0, 10, 20] and len(runs[0]["accuracy"][0]) == 8
    summary = json.loads((out / "plateau.json").read_text())["strategies"]
    assert set(summary) == {"baseline", "aux"}
    assert summary["baseline"]["plateau"]["n_runs"] == 2
    report = (out / "report.md").read_text()
    assert "auxiliary loss on the weights component shortens" in report and "| aux |" in report
    assert "plateau" in capsys.readouterr().out
    # The same command again: every run comes from the journal, nothing is retrained.
    assert main([*TINY, "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["records_resumed"] == 4
    assert json.loads((out / "curves.json").read_text())["runs"] == runs


def test_plateau_command_checks_options_first(tmp_path, capsys):
    bad = [*TINY[:-3], "--out", str(tmp_path), "--strategy", "warmup", "--warmup-steps", "50"]
    assert main(bad) == 2
    assert "warmup_steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*TINY, "--out", str(tmp_path), "--strategy", "curriculum"])


def _record(strategy: str, seed: int, length: int | None, total: int = 1000) -> dict:
    final = 0.9 if length is not None else 0.26
    plateau = PlateauLength(length, 0.5, final, 0.25, length is not None, total)
    return {
        "strategy": strategy,
        "seed": seed,
        "late": [0.25, final],
        "weights_probe": [0.6, 0.5 if strategy == "baseline" else 0.8],
        "context_probe": [0.3, 0.4],
        "plateau": plateau.to_json(),
        "wall_s": 1.0,
    }


def test_findings_compare_strategies_by_standard_errors():
    records = [
        *(_record("baseline", s, n) for s, n in enumerate([800, 900, 1000])),
        *(_record("aux", s, n) for s, n in enumerate([300, 350, 400])),  # clearly shorter
        *(_record("mixed", s, n) for s, n in enumerate([700, 1000, 950])),  # within noise
        *(_record("warmup", s, None) for s in range(3)),  # never escapes: counted at 1000
    ]
    findings = {
        f.claim.split()[0]: f
        for f in plateau_findings(summarize_strategies(records), eval_every=100)
    }
    assert findings["Training"].holds is True  # a 900-step plateau
    assert findings["On"].holds is True  # weights probe 0.6 -> 0.5 on the baseline
    assert findings["An"].holds is True  # aux
    assert findings["Mixing"].holds is False
    assert findings["Warming"].holds is False
    assert "censored" not in findings["Warming"].evidence


def test_weights_claims_are_undefined_without_a_probe_trajectory():
    """Probed at step 0 only (--probe-every > --steps): no lowest or final value exists, so the
    weights-component claims are undefined, not false; never probed (the linear task): absent."""
    once = [_record(s, i, 500) | {"weights_probe": [0.6, None]} for s in ("baseline", "aux")
            for i in range(2)]  # fmt: skip
    findings = {f.claim: f for f in plateau_findings(summarize_strategies(once), eval_every=100)}
    weights = [f for c, f in findings.items() if "falls below" in c or "strengthens" in c]
    assert len(weights) == 2 and all(f.holds is None for f in weights)
    assert all("--probe-every" in f.evidence for f in weights)
    never = [r | {"weights_probe": [None, None]} for r in once]
    claims = [f.claim for f in plateau_findings(summarize_strategies(never), eval_every=100)]
    assert not any("falls below" in c or "strengthens" in c for c in claims)
