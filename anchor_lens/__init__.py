"""anchor-lens: the mechanisms of in-context learning, measurable in TransformerLens.

Built around *Label Words are Anchors* (Wang et al., EMNLP 2023).
"""

from . import analysis, dualform, episodes, hooks, metrics, momentum, plateau, report
from .episodes import Episode, Pools, draw_episode, load_pools, sample_episode
from .hf_hooked import HFHookedModel
from .icl import (
    EvalResult,
    Predictions,
    evaluate,
    label_scores,
    predict,
    run_icl,
    target_logits,
)
from .models import AttentionNotExposedError, check_attention_hooks, check_model_source, load_model
from .prompts import (
    ICLBatch,
    LabelWordError,
    LabelWordWarning,
    PromptTooLongError,
    TokenRole,
    build_icl_batch,
    label_tokens,
    tokenizer_adds_bos,
)
from .tasks import (
    TASKS,
    Example,
    HubUnreachableError,
    Task,
    get_task,
    load_examples,
    sample_demonstrations,
)

__version__ = "0.1.0"

__all__ = [
    "TASKS",
    "AttentionNotExposedError",
    "Episode",
    "EvalResult",
    "Example",
    "HFHookedModel",
    "HubUnreachableError",
    "ICLBatch",
    "LabelWordError",
    "LabelWordWarning",
    "Pools",
    "Predictions",
    "PromptTooLongError",
    "Task",
    "TokenRole",
    "analysis",
    "build_icl_batch",
    "check_attention_hooks",
    "check_model_source",
    "draw_episode",
    "dualform",
    "episodes",
    "evaluate",
    "get_task",
    "hooks",
    "label_scores",
    "label_tokens",
    "load_examples",
    "load_model",
    "load_pools",
    "metrics",
    "momentum",
    "plateau",
    "predict",
    "report",
    "run_icl",
    "sample_demonstrations",
    "sample_episode",
    "target_logits",
    "tokenizer_adds_bos",
]
