"""Figures in the style of *Label Words are Anchors* (Figs. 3, 4 and 5).

Each function draws on a given matplotlib ``Axes`` (or a new figure) and returns the figure, so
notebook users can compose them and the CLI can save them.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .analysis import DeepResult, FlowResult, IsolationResult
    from .diagnosis import DiagnosisResult
    from .long_context import NLLCurves, PasskeyResult

__all__ = [
    "plot_confusion",
    "plot_deep",
    "plot_flow",
    "plot_isolation",
    "plot_nll",
    "plot_passkey",
]


def _axes(ax: Axes | None, size=(5.0, 3.4)) -> tuple[Figure, Axes]:
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    return fig, ax


def plot_flow(flow: FlowResult, ax: Axes | None = None, title: str = "") -> Figure:
    """Fig. 3: normalised ``S_wp``, ``S_pq``, ``S_ww`` against the layer."""
    fig, ax = _axes(ax)
    layers = range(len(flow.S_wp))
    ax.plot(layers, flow.S_wp, label=r"$S_{wp}$ (text → label)")
    ax.plot(layers, flow.S_pq, label=r"$S_{pq}$ (label → target)")
    ax.plot(layers, flow.S_ww, label=r"$S_{ww}$ (rest)")
    ax.set(xlabel="layer", ylabel="normalised saliency", ylim=(0, 1), title=title)
    ax.legend(frameon=False)
    return fig


def plot_isolation(iso: IsolationResult, ax: Axes | None = None, title: str = "") -> Figure:
    """Fig. 4: label and word loyalty when label words / random positions are isolated."""
    import numpy as np

    fig, ax = _axes(ax)
    keys = ["label_first", "random_first", "label_last", "random_last"]
    names = [
        f"label words\nfirst {iso.k_layers}",
        f"random\nfirst {iso.k_layers}",
        f"label words\nlast {iso.k_layers}",
        f"random\nlast {iso.k_layers}",
    ]
    x = np.arange(len(keys))
    for offset, metric, label in (
        (-0.2, "label_loyalty", "label loyalty"),
        (0.2, "word_loyalty", f"word loyalty (top-{iso.top_k})"),
    ):
        ax.bar(x + offset, [iso.conditions[k][metric] for k in keys], width=0.4, label=label)
    ax.set_xticks(x, names)
    ax.set(ylabel="loyalty", ylim=(0, 1.05), title=title)
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    return fig


def plot_deep(deep: DeepResult, ax: Axes | None = None, title: str = "") -> Figure:
    """Fig. 5: AUCROC_l and the cumulative share R_l against the layer.

    Undefined values are left out, and the axes say why when nothing is defined.
    """
    fig, ax = _axes(ax)
    layers = range(len(deep.aucroc))
    nan = float("nan")
    ax.plot(layers, [nan if a is None else a for a in deep.aucroc], label=r"AUCROC$_l$")
    ax.plot(layers, [nan if r is None else r for r in deep.r_l], label=r"$R_l$")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="layer", ylabel="value", title=title)
    if deep.undefined_reason:
        ax.set_ylim(0, 1)
        ax.text(
            0.5,
            0.5,
            textwrap.fill(f"undefined: {deep.undefined_reason}", 48),
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "grey"},
        )
    ax.legend(frameon=False)
    return fig


def plot_confusion(diagnosis: DiagnosisResult, title: str = "") -> Figure:
    """Fig. 6: predicted (anchor distance) and real (pairwise AUC) confusion, side by side."""
    import matplotlib.pyplot as plt
    import numpy as np

    nan = float("nan")
    n = len(diagnosis.labels)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * n, 1.5 + 0.6 * n), layout="constrained")
    for ax, matrix, name in (
        (axes[0], diagnosis.predicted, f"predicted (layer {diagnosis.layer})"),
        (axes[1], diagnosis.real, "real (pairwise AUC)"),
    ):
        m = np.array([[nan if v is None else v for v in row] for row in matrix], dtype=float)
        image = ax.imshow(m, vmin=np.nanmin(m), vmax=1.0, cmap="viridis")
        ax.set_xticks(range(n), diagnosis.labels, rotation=45, ha="right")
        ax.set_yticks(range(n), diagnosis.labels)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_title(name)
        fig.colorbar(image, ax=ax, shrink=0.8)
    rho = "undefined" if diagnosis.spearman is None else f"{diagnosis.spearman:.2f}"
    fig.suptitle(f"{title}  Spearman ρ = {rho}".strip())
    return fig


def plot_nll(curves: NLLCurves, ax: Axes | None = None, title: str = "") -> Figure:
    """LM-Infinite Fig. 4: NLL per position bin for each mode; the dashed line marks ``L``."""
    fig, ax = _axes(ax, size=(6.0, 3.4))
    centres = [p + curves.bin_size / 2 for p in curves.positions]
    for mode, values in curves.nll.items():
        ax.plot(centres, values, label=mode)
    ax.axvline(curves.pretrain_length, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="position", ylabel="NLL (nats)", title=title)
    ax.legend(frameon=False)
    return fig


def plot_passkey(result: PasskeyResult, ax: Axes | None = None, title: str = "") -> Figure:
    """Passkey retrieval accuracy against prompt length for each mode."""
    fig, ax = _axes(ax)
    for mode, values in result.accuracy.items():
        ax.plot(result.lengths, values, marker="o", label=mode)
    ax.axvline(result.pretrain_length, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="prompt length (tokens)", ylabel="accuracy", ylim=(-0.05, 1.05), title=title)
    ax.legend(frameon=False)
    return fig
