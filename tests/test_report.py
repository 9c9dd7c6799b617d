"""Findings, report and figure when a metric is undefined (the model predicts one class)."""

import json

import matplotlib

matplotlib.use("Agg")

from anchor_lens import analysis, plotting, report  # noqa: E402

N_LAYERS = 6


def _flow():
    return analysis.FlowResult(
        S_wp=[0.6, 0.6, 0.5, 0.2, 0.1, 0.1],
        S_pq=[0.1, 0.1, 0.3, 0.7, 0.8, 0.85],
        S_ww=[0.3, 0.3, 0.2, 0.1, 0.1, 0.05],
        S_wp_raw=[0.0] * N_LAYERS,
        S_pq_raw=[0.0] * N_LAYERS,
        S_ww_raw=[0.0] * N_LAYERS,
        n=4,
        loss_target="gold",
    )


def _iso():
    loyal = {"label_loyalty": 1.0, "word_loyalty": 0.9}
    conditions = {
        "label_first": {"label_loyalty": 0.5, "word_loyalty": 0.2},
        "label_last": loyal,
        "random_first": loyal,
        "random_last": loyal,
    }
    return analysis.IsolationResult(conditions, {}, 2, 5, 4, 0)


def _single_class_deep():
    return analysis.DeepResult(
        aucroc=[None] * N_LAYERS,
        r_l=[None] * N_LAYERS,
        n=4,
        predicted_classes={"Negative": 0, "Positive": 4},
        undefined_reason="the model predicted 'Positive' for all 4 queries, so there is no "
        "second class to rank against (ROC AUC needs both)",
    )


def test_undefined_auc_is_reported_as_undefined_not_as_failing():
    findings = report.paper_findings(_flow(), _iso(), _single_class_deep())
    verdicts = {f.claim.split(" ")[0]: f.verdict for f in findings}
    assert verdicts["AUCROC_l"] == "undefined" and verdicts["R_l"] == "undefined"
    assert [f.verdict for f in findings[:5]] == ["yes"] * 5
    text = report.findings_markdown(findings, model="m", task="t", n=4)
    assert "5 of 5 checkable findings" in text and "2 undefined on this run" in text
    assert "| undefined | AUCROC_l undefined: the model predicted 'Positive'" in text


def test_undefined_auc_is_null_in_strict_json():
    text = json.dumps(_single_class_deep().to_json(), allow_nan=False)
    assert json.loads(text)["aucroc"] == [None] * N_LAYERS


def test_the_figure_says_why_it_is_empty():
    fig = plotting.plot_deep(_single_class_deep())
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any(t.startswith("undefined: the model predicted 'Positive'") for t in texts)


def test_a_defined_run_has_no_annotation():
    deep = analysis.DeepResult(
        aucroc=[0.5, 0.6, 0.7, 0.8, 0.9, 0.8], r_l=[0.0] * N_LAYERS, n=4, predicted_classes={}
    )
    assert not plotting.plot_deep(deep).axes[0].texts
    findings = report.paper_findings(_flow(), _iso(), deep)
    assert findings[5].holds is True and "peak AUCROC_l 0.90 at layer 4" in findings[5].evidence
