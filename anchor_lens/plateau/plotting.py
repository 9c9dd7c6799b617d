"""Figures of the plateau experiment: curves per strategy, the weights component, lengths.

Each function takes the per-run records of ``anchor-lens plateau`` (``curves.json``) and
returns a matplotlib figure, like `anchor_lens.plotting`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plotting import _axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_accuracy", "plot_plateau_lengths", "plot_probe"]


def _by_strategy(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["strategy"], []).append(r)
    return out


def _curve(records: list[dict], key: str, ax: Axes, ylabel: str, chance: float | None) -> None:
    import numpy as np

    for i, (strategy, runs) in enumerate(_by_strategy(records).items()):
        color = f"C{i}"
        rows = [
            [(s, v) for s, v in zip(r["steps"], r[key], strict=True) if v is not None] for r in runs
        ]
        steps = [s for s, _ in rows[0]]
        values = np.array([[v for _, v in row] for row in rows], dtype=float)
        for row in values:
            ax.plot(steps, row, color=color, lw=0.5, alpha=0.35)
        ax.plot(steps, values.mean(0), color=color, lw=2, label=f"{strategy} (n={len(runs)})")
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=0.8, label="chance")
    ax.set(xlabel="optimizer step", ylabel=ylabel)
    ax.legend(frameon=False, fontsize=8)


def plot_accuracy(
    records: list[dict], chance: float, ax: Axes | None = None, title: str = ""
) -> Figure:
    """Held-out ICL accuracy on the late pairs against the step: mean per strategy, thin lines
    per seed."""
    fig, ax = _axes(ax, size=(6.0, 3.6))
    _curve(records, "late", ax, "ICL accuracy (late pairs)", chance)
    ax.set_title(title)
    return fig


def plot_probe(
    records: list[dict], key: str = "weights_probe", ax: Axes | None = None, title: str = ""
) -> Figure:
    """A probe's held-out accuracy against the step (``weights_probe`` or ``context_probe``)."""
    fig, ax = _axes(ax, size=(6.0, 3.6))
    name = "weights component" if key == "weights_probe" else "context component"
    _curve(records, key, ax, f"{name} probe accuracy", None)
    ax.set_title(title)
    return fig


def plot_plateau_lengths(summary: dict, ax: Axes | None = None, title: str = "") -> Figure:
    """Plateau length per strategy: mean ± sd bars, one dot per seed, censored runs as ×."""
    fig, ax = _axes(ax)
    for i, s in enumerate(summary.values()):
        lengths = s["plateau"]["lengths"]
        total = s["total_steps"]
        done = [v for v in lengths if v is not None]
        if s["plateau"]["mean"] is not None:
            ax.bar(
                i,
                s["plateau"]["mean"],
                yerr=s["plateau"]["sd"] or 0,
                color=f"C{i}",
                alpha=0.5,
                capsize=4,
            )
        ax.scatter([i] * len(done), done, color=f"C{i}", s=12, zorder=3)
        n_cens = len(lengths) - len(done)
        if n_cens:
            ax.scatter([i] * n_cens, [total] * n_cens, marker="x", color="k", s=20, zorder=3)
    ax.set_xticks(range(len(summary)), list(summary))
    ax.set(ylabel="plateau length (steps)", title=title)
    return fig
