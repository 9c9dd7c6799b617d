"""Which of the findings of Wang et al. (2023, §2) hold on a run, and ``report.md``.

[`paper_findings`][anchor_lens.report.paper_findings] checks each claim against the results
of `anchor_lens.analysis`; a claim whose metric is undefined on the
run (AUCROC_l when one class is predicted) is neither held nor failed but "undefined".
"""

from __future__ import annotations

from dataclasses import dataclass

from .analysis import DeepResult, FlowResult, IsolationResult

__all__ = ["Finding", "findings_markdown", "findings_table", "paper_findings", "tally"]


@dataclass
class Finding:
    """One of the paper's claims checked on a run: does it hold, and the numbers behind it.

    ``holds`` is ``None`` when the claim cannot be checked on this run (its metric is
    undefined); ``evidence`` then says why.
    """

    claim: str
    holds: bool | None
    evidence: str

    @property
    def verdict(self) -> str:
        return {True: "yes", False: "no", None: "undefined"}[self.holds]


def paper_findings(flow: FlowResult, iso: IsolationResult, deep: DeepResult) -> list[Finding]:
    """Check the findings of §2 on results of this library.

    Shallow layers are the first third, deep layers the last third of the model.
    """
    import numpy as np

    n_layers = len(flow.S_wp)
    third = max(1, n_layers // 3)
    shallow, deep_l = slice(0, third), slice(n_layers - third, n_layers)

    def mean(xs, s):
        return float(np.mean(xs[s]))

    wp_sh, pq_sh = mean(flow.S_wp, shallow), mean(flow.S_pq, shallow)
    wp_dp, pq_dp, ww_dp = mean(flow.S_wp, deep_l), mean(flow.S_pq, deep_l), mean(flow.S_ww, deep_l)
    ww_all = float(np.mean(flow.S_ww))
    c = iso.conditions
    k = iso.k_layers
    half = n_layers // 2
    undefined = f"undefined: {deep.undefined_reason}"
    if deep.defined:
        auc = np.asarray(deep.aucroc, dtype=float)
        peak = int(np.argmax(auc))
        auc_finding = (peak >= half, f"peak AUCROC_l {auc[peak]:.2f} at layer {peak} of {n_layers}")
    else:
        auc_finding = (None, f"AUCROC_l {undefined}")
    r_half = deep.r_l[half - 1]
    if r_half is not None:
        r_finding = (r_half < 0.5, f"R_l at layer {half - 1}: {r_half:.2f}")
    else:
        r_finding = (None, f"R_l {undefined}")
    return [
        Finding(
            "Shallow layers: S_wp (text → label words) exceeds S_pq (label words → target).",
            wp_sh > pq_sh,
            f"layers 0–{third - 1}: mean S_wp {wp_sh:.2f} vs S_pq {pq_sh:.2f}",
        ),
        Finding(
            "Deep layers: S_pq dominates S_wp and S_ww.",
            pq_dp > max(wp_dp, ww_dp),
            f"layers {n_layers - third}–{n_layers - 1}: mean S_pq {pq_dp:.2f}, "
            f"S_wp {wp_dp:.2f}, S_ww {ww_dp:.2f}",
        ),
        Finding(
            "S_ww stays small (below a third of the normalised flow on average).",
            ww_all < 1 / 3,
            f"mean normalised S_ww over all layers {ww_all:.2f}",
        ),
        Finding(
            f"Isolating label words in the first {k} layers lowers label loyalty more than in "
            f"the last {k} layers or at random positions.",
            c["label_first"]["label_loyalty"]
            < min(c["label_last"]["label_loyalty"], c["random_first"]["label_loyalty"]),
            "label loyalty: "
            + ", ".join(f"{key} {v['label_loyalty']:.2f}" for key, v in c.items()),
        ),
        Finding(
            f"The same holds for word loyalty (top-{iso.top_k} Jaccard).",
            c["label_first"]["word_loyalty"]
            < min(c["label_last"]["word_loyalty"], c["random_first"]["word_loyalty"]),
            "word loyalty: " + ", ".join(f"{key} {v['word_loyalty']:.2f}" for key, v in c.items()),
        ),
        Finding(
            "AUCROC_l peaks in the deep half of the model (paper: ≈0.8 in deep layers).",
            *auc_finding,
        ),
        Finding(
            "R_l rises mostly in the middle and deep layers (less than half by mid-depth).",
            *r_finding,
        ),
    ]


def tally(findings: list[Finding]) -> tuple[int, int]:
    """``(held, checkable)``: how many findings hold, and how many could be checked at all."""
    return sum(f.holds is True for f in findings), sum(f.holds is not None for f in findings)


def findings_table(findings: list[Finding], header: str = "claim") -> list[str]:
    """The Markdown table of ``report.md``: each claim, its verdict, its evidence."""
    return [
        f"| {header} | holds | evidence |",
        "|---|---|---|",
        *(f"| {f.claim} | {f.verdict} | {f.evidence} |" for f in findings),
    ]


def findings_markdown(
    findings: list[Finding], *, model: str, task: str, n: int, extra: str = ""
) -> str:
    """A short ``report.md``: which of the paper's findings hold for this run."""
    held, checked = tally(findings)
    summary = f"{n} queries; {held} of {checked} checkable findings of Wang et al. (2023, §2) hold"
    if checked < len(findings):
        summary += f"; {len(findings) - checked} undefined on this run (see the table)"
    lines = [
        f"# Label words as anchors: {task} on {model}",
        "",
        summary + ".",
        "",
        *findings_table(findings, header="finding"),
    ]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"
