"""Learning plateaus of in-context learning (Fu et al., ICML 2024), measurable.

* `tasks` — the synthetic factor task (``F`` factors × ``V`` values, ``m`` label maps, ``N``
  pairs; ``m = 1`` is ``D_fix``) and the linear-function task, generated on the fly.
* `model` — a small GPT-2-style transformer with TransformerLens hook points.
* `probes` — the attention-off hook, the weights- and context-component probes.
* `curves` — the plateau length of a logged curve (our documented definition).
* `train` — training with the four strategies (baseline, warm-up, mixed, auxiliary loss).
* `experiment` — the ``anchor-lens plateau`` command: runs, figures and ``report.md``.
"""

from .curves import PlateauLength, late_accuracy, plateau_length, summarize_lengths
from .model import PlateauModelConfig, PlateauTransformer, encode_pairs
from .probes import (
    ProbeResult,
    attention_off_hooks,
    context_component_probe,
    fit_probe,
    item_representations,
    weights_component_probe,
)
from .tasks import FactorBatch, FactorTask, LinearBatch, LinearTask
from .train import (
    STRATEGIES,
    TrainConfig,
    TrainResult,
    build_model,
    eval_split,
    evaluate_icl,
    strategy_batch,
    train,
    training_loss,
)

__all__ = [
    "STRATEGIES",
    "FactorBatch",
    "FactorTask",
    "LinearBatch",
    "LinearTask",
    "PlateauLength",
    "PlateauModelConfig",
    "PlateauTransformer",
    "ProbeResult",
    "TrainConfig",
    "TrainResult",
    "attention_off_hooks",
    "build_model",
    "context_component_probe",
    "encode_pairs",
    "eval_split",
    "evaluate_icl",
    "fit_probe",
    "item_representations",
    "late_accuracy",
    "plateau_length",
    "strategy_batch",
    "summarize_lengths",
    "train",
    "training_loss",
    "weights_component_probe",
]
