"""ICL classification tasks: templates, label words, data sources and demonstration sampling.

The four tasks of *Label Words are Anchors* (Wang et al. 2023, §2 "Experimental Settings" and
Appendix Table 4) are registered under ``sst2``, ``trec``, ``agnews`` and ``emoc``; any other
task is a [`Task`][anchor_lens.tasks.Task] built by the user (any template, label words and
columns).

A template holds ``{text}`` and ``{label}``; a demonstration is the filled template and the
query is the template cut just before ``{label}`` with trailing whitespace removed, so the
label word is the model's next token. Demonstrations and query are joined by ``separator``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from ._hub import HubUnreachableError, hub_offline_reason

__all__ = [
    "Example",
    "HubUnreachableError",
    "TASKS",
    "Task",
    "draw_per_class",
    "get_task",
    "load_examples",
    "sample_demonstrations",
]


@dataclass(frozen=True)
class Example:
    """One labelled input: ``text`` and its class index ``label`` (``-1`` when unknown)."""

    text: str
    label: int


@dataclass(frozen=True)
class Task:
    """A text-classification task posed as in-context learning.

    Attributes:
        name: Short identifier (used by the CLI's ``--task``).
        template: Demonstration format with ``{text}`` and ``{label}``, e.g.
            ``"Review: {text}\\nSentiment: {label}"``.
        label_words: One word per class, indexed by the dataset's label id.
        text_column: Column holding the input text.
        label_column: Column holding the integer class id.
        hub_id: Hugging Face dataset id used by [`load_examples`][anchor_lens.tasks.load_examples]
            when no file is given.
        hub_config: Dataset configuration name, if the hub dataset has several.
        demo_split: Hub split that demonstrations are drawn from.
        test_split: Hub split that queries are drawn from.
        separator: String placed between demonstrations and before the query.
        class_names: Display names of the classes (default: the label words).
    """

    name: str
    template: str
    label_words: tuple[str, ...]
    text_column: str = "text"
    label_column: str = "label"
    hub_id: str | None = None
    hub_config: str | None = None
    demo_split: str = "train"
    test_split: str = "test"
    separator: str = "\n"
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_words", tuple(self.label_words))
        for slot in ("{text}", "{label}"):
            if self.template.count(slot) != 1:
                raise ValueError(
                    f"Task {self.name!r}: the template must contain {slot} exactly once, got "
                    f"{self.template!r}."
                )
        if self.template.index("{text}") > self.template.index("{label}"):
            raise ValueError(
                f"Task {self.name!r}: {{text}} must come before {{label}} in the template, so "
                "the query can end where the label word would be predicted."
            )
        if len(self.label_words) < 2:
            raise ValueError(f"Task {self.name!r}: needs at least two label words.")
        if len(set(self.label_words)) != len(self.label_words):
            raise ValueError(f"Task {self.name!r}: label words must be distinct.")
        if any(not w.strip() or w != w.strip() for w in self.label_words):
            raise ValueError(
                f"Task {self.name!r}: label words must be non-empty and carry no surrounding "
                f"whitespace (the template supplies the space), got {self.label_words!r}."
            )
        if not self.class_names:
            object.__setattr__(self, "class_names", self.label_words)

    @property
    def n_classes(self) -> int:
        return len(self.label_words)

    @property
    def label_prefix(self) -> str:
        """The template up to ``{label}``, e.g. ``"Review: {text}\\nSentiment: "``."""
        return self.template[: self.template.index("{label}")]

    def segments(self, text: str, label: int | None) -> list[tuple[str, str]]:
        """Split one filled demonstration (``label`` given) or query into typed segments.

        Returns ``(kind, string)`` pairs with kind ``"format"``, ``"text"`` or ``"label"``.
        The query keeps the prefix up to ``{label}`` with trailing whitespace stripped.
        """
        template = self.template if label is not None else self.label_prefix.rstrip()
        out: list[tuple[str, str]] = []
        rest = template
        while rest:
            starts = [(rest.find(s), s) for s in ("{text}", "{label}") if s in rest]
            if not starts:
                out.append(("format", rest))
                break
            i, slot = min(starts)
            if i:
                out.append(("format", rest[:i]))
            if slot == "{text}":
                out.append(("text", text))
            else:
                out.append(("label", self.label_words[label]))
            rest = rest[i + len(slot) :]
        return out

    def format_demo(self, example: Example) -> str:
        return "".join(s for _, s in self.segments(example.text, example.label))

    def format_query(self, text: str) -> str:
        return "".join(s for _, s in self.segments(text, None))

    def with_label_words(self, label_words: Sequence[str]) -> Task:
        """The same task with other label words (for label-word ablations)."""
        return replace(self, label_words=tuple(label_words), class_names=())


#: The paper's four tasks (PAPERS.md §1 "Setup"), with their Hugging Face dataset ids.
TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "sst2",
            "Review: {text}\nSentiment: {label}",
            ("Negative", "Positive"),
            text_column="sentence",
            hub_id="stanfordnlp/sst2",
            test_split="validation",  # the hub's SST-2 test split has no labels
        ),
        Task(
            "trec",
            "Question: {text}\nAnswer Type: {label}",
            ("Abbreviation", "Entity", "Description", "Person", "Location", "Number"),
            label_column="coarse_label",
            hub_id="CogComp/trec",
            class_names=("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"),
        ),
        Task(
            "agnews",
            "Article: {text}\nAnswer: {label}",
            ("World", "Sports", "Business", "Technology"),
            hub_id="fancyzhx/ag_news",
        ),
        Task(
            "emoc",
            "Dialogue: {text}\nEmotion: {label}",
            ("Others", "Happy", "Sad", "Angry"),
            hub_id="SemEvalWorkshop/emo",
        ),
        # The embedded demo set (package data) uses the SST-2 format; load_examples(task) reads
        # it without any network.
        Task(
            "sentiment-demo",
            "Review: {text}\nSentiment: {label}",
            ("Negative", "Positive"),
            text_column="sentence",
        ),
    ]
}
_ALIASES = {"sst-2": "sst2", "ag_news": "agnews", "ag-news": "agnews", "emo": "emoc"}


def get_task(task: str | Task) -> Task:
    """Look up a registered task by name (case-insensitive), or return a
    [`Task`][anchor_lens.tasks.Task] as is."""
    if isinstance(task, Task):
        return task
    key = _ALIASES.get(task.lower(), task.lower())
    if key not in TASKS:
        raise KeyError(
            f"Unknown task {task!r}. Known tasks: {', '.join(sorted(TASKS))}. For your own "
            "task, build anchor_lens.Task(name, template, label_words, text_column=..., "
            "label_column=...)."
        )
    return TASKS[key]


_DATA_FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}


def _demo_file() -> Path:
    return Path(str(resources.files("anchor_lens").joinpath("data/sentiment_demo.jsonl")))


def _load_dataset(task: Task, source: str | Path | None, split: str | None):
    import datasets

    if source is None and task.hub_id is None:
        if task.name != "sentiment-demo":
            raise ValueError(
                f"Task {task.name!r} has no hub_id: pass the data file with source=... "
                "(or --data on the command line)."
            )
        source = _demo_file()
    if source is not None and (Path(source).exists() or Path(source).suffix in _DATA_FORMATS):
        path = Path(source)
        if path.is_dir():
            split = split or task.test_split
            files = sorted(p for p in path.glob(f"{split}.*") if p.suffix in _DATA_FORMATS)
            if not files:
                raise FileNotFoundError(
                    f"No '{split}.jsonl/json/csv/parquet' in {path}; name the file directly."
                )
            path = files[0]
        if not path.exists():
            raise FileNotFoundError(f"Data file not found: {path}")
        fmt = _DATA_FORMATS.get(path.suffix)
        if fmt is None:
            raise ValueError(
                f"Cannot read {path.name}: use one of {', '.join(sorted(_DATA_FORMATS))}."
            )
        if fmt != "parquet" and not _has_content(path):
            raise ValueError(
                f"Data file {path} is empty: it needs one example per row with the columns "
                f"{task.text_column!r} and {task.label_column!r}."
            )
        kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
        return datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    hub_id = str(source) if source is not None else task.hub_id
    config = task.hub_config if source is None else None
    split = split or task.test_split
    offline = hub_offline_reason()
    if offline is not None:
        where = (
            f"{source!r} is not a local file or folder, so it was taken as a hub dataset id, but"
            if source is not None
            else f"task {task.name!r} reads split {split!r} of {hub_id!r} from the hub, but"
        )
        raise HubUnreachableError(
            f"{where} the Hugging Face Hub cannot be reached ({offline}). Pass a local file "
            "in the hub's schema instead (source=... in Python, --data / --demo-data on the "
            "command line)."
        )
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # offline, unknown id, missing split: all need the same fix
        raise FileNotFoundError(
            f"Could not load split {split!r} of hub dataset {hub_id!r} ({type(err).__name__}: "
            f"{err}). Without network, pass a local file in the hub's schema (source=... in "
            "Python, --data on the command line)."
        ) from err


def _has_content(path: Path) -> bool:
    """Whether a text data file holds anything but whitespace (read in chunks, stops early)."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def load_examples(
    task: str | Task,
    source: str | Path | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Load labelled examples for ``task`` through 🤗 ``datasets``.

    Args:
        task: A task name or [`Task`][anchor_lens.tasks.Task].
        source: ``None`` for the task's hub dataset (or the embedded demo set for
            ``sentiment-demo``); a JSON/JSONL/CSV/TSV/Parquet file; a folder holding
            ``{split}.jsonl`` (etc.); or another hub id. Files use the hub's column names.
        split: Hub split, or file stem inside a folder; defaults to ``task.test_split``.
        limit: Keep only the first ``limit`` rows.

    Raises:
        KeyError: the text or label column is missing (the message lists the columns found).
        ValueError: a label id outside ``range(task.n_classes)``, or an empty file.
        FileNotFoundError: a missing file; ``HubUnreachableError`` (a subclass) when the data
            were to come from the hub and it cannot be reached (checked once, in seconds).
    """
    task = get_task(task)
    ds = _load_dataset(task, source, split)
    missing = [c for c in (task.text_column, task.label_column) if c not in ds.column_names]
    if missing:
        raise KeyError(
            f"Task {task.name!r} expects columns {task.text_column!r} (text) and "
            f"{task.label_column!r} (label); the data has {ds.column_names}. Build a Task with "
            "text_column=/label_column= that match your data."
        )
    if len(ds) == 0:
        raise ValueError(f"{source or task.hub_id} has no rows for task {task.name!r}.")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    texts, labels = ds[task.text_column], ds[task.label_column]
    out = []
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        label = int(label)
        if not 0 <= label < task.n_classes:
            raise ValueError(
                f"Row {i}: label {label} is outside 0..{task.n_classes - 1} for task "
                f"{task.name!r} ({task.n_classes} label words)."
            )
        out.append(Example(str(text).strip(), label))
    return out


def sample_demonstrations(
    pool: Sequence[Example],
    task: str | Task,
    k: int,
    *,
    seed: int,
    exclude: Sequence[Example] = (),
) -> list[Example]:
    """Draw ``k`` demonstrations per class from ``pool``, seeded, in shuffled order.

    Demonstrations never include an example of ``exclude`` (the queries), compared by text, so
    a query never sees itself as a demonstration. The paper uses k = 1 with seeds 42–46.

    Raises:
        ValueError: a class has fewer than ``k`` candidates left.
    """
    task = get_task(task)
    rng = random.Random(seed)
    banned = {e.text for e in exclude}
    by_class: list[list[Example]] = [[] for _ in range(task.n_classes)]
    for e in pool:
        if e.text not in banned:
            by_class[e.label].append(e)
    return draw_per_class(by_class, task, k, rng)


def draw_per_class(
    by_class: Sequence[Sequence[Example]], task: Task, k: int, rng: random.Random
) -> list[Example]:
    """``k`` examples of each class from ``by_class[c]``, drawn with ``rng``, in shuffled order.

    Raises:
        ValueError: a class has fewer than ``k`` candidates (the message names it and the fix).
    """
    demos: list[Example] = []
    for c, candidates in enumerate(by_class):
        if len(candidates) < k:
            raise ValueError(
                f"Class {c} ({task.label_words[c]!r}) has {len(candidates)} candidate "
                f"demonstrations outside the queries, fewer than k={k}. Use a larger "
                "demonstration pool (--demo-data) or fewer shots."
            )
        demos.extend(rng.sample(list(candidates), k))
    rng.shuffle(demos)
    return demos
