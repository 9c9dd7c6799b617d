"""anchor-lens: the mechanisms of in-context learning, measurable in TransformerLens.

Built around *Label Words are Anchors* (Wang et al., EMNLP 2023).
"""

from .icl import EvalResult, Predictions, evaluate, label_scores, predict, run_icl
from .models import AttentionNotExposedError, check_attention_hooks, load_model
from .prompts import (
    ICLBatch,
    LabelWordError,
    PromptTooLongError,
    TokenRole,
    build_icl_batch,
    label_tokens,
    tokenizer_adds_bos,
)
from .tasks import TASKS, Example, Task, get_task, load_examples, sample_demonstrations

__version__ = "0.1.0"

__all__ = [
    "TASKS",
    "AttentionNotExposedError",
    "EvalResult",
    "Example",
    "ICLBatch",
    "LabelWordError",
    "Predictions",
    "PromptTooLongError",
    "Task",
    "TokenRole",
    "build_icl_batch",
    "check_attention_hooks",
    "evaluate",
    "get_task",
    "label_scores",
    "label_tokens",
    "load_examples",
    "load_model",
    "predict",
    "run_icl",
    "sample_demonstrations",
    "tokenizer_adds_bos",
]
