"""Fail when the built docs site shows Sphinx roles or unresolved cross-references as text.

Usage: python scripts/check_site.py SITE_DIR

mkdocstrings does not understand Sphinx roles: a docstring written with
``:class:`Foo` `` renders as the literal text ":class:" followed by a code span, not as a
link. Cross-references go in mkdocstrings/autorefs syntax instead
(``[`Foo`][anchor_lens.module.Foo]``); one that does not resolve is left on the page as
``[Foo][anchor_lens.module.Foo]``. This script reads every HTML page of the built site and
reports either kind of leftover with its file, line and a snippet; it exits 1 if there is one.

What is searched: the visible text of the HTML pages, outside ``<code>``, ``<pre>``,
``<kbd>``, ``<samp>``, ``<script>`` and ``<style>``. A role written inside a code span or
code block is deliberate (a page showing what *not* to write); a broken role is always in
prose, because the backticks around its target become the code span after it. Attribute
values (``title``, ``href``) are not visible text and are not searched. The search index
(``search/search_index.json``) and other non-HTML files are skipped: the index is built from
the same pages, so a leftover role in it is already reported from its page, while it also
holds code blocks' text without their markup, where a role may legitimately appear.
"""

from __future__ import annotations

import bisect
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

ROLES = ("class", "func", "meth", "mod", "attr", "exc", "obj", "data")

# ":class:", ":py:class:" -- not preceded by a letter, digit or colon, so that e.g. a URL
# scheme or "x::class:" run together is not mistaken for a role.
ROLE_RE = re.compile(r"(?<![\w:])(?::py)?:(?:" + "|".join(ROLES) + r"):")
# An autorefs reference left as text: "][anchor_lens.tasks.Task]" (a dotted identifier).
UNRESOLVED_RE = re.compile(r"\]\[[A-Za-z_]\w*(?:\.\w+)+\]")

# Text inside these elements is code (or not text at all) and is not searched.
SKIP_TAGS = {"code", "pre", "kbd", "samp", "script", "style"}
# Stands for a skipped element in the searched text.
CODE = "\N{WHITE SQUARE}"


class _TextCollector(HTMLParser):
    """The page's visible text in pieces: (searched text, text shown in reports, HTML line).

    A skipped element is one piece: CODE in the searched text, its own text between
    backticks in the report, so that a snippet reads like the docstring it came from.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.pieces: list[list] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in SKIP_TAGS:
            if self._skip_depth == 0:
                self.pieces.append([CODE, "`", self.getpos()[0]])
            self._skip_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in SKIP_TAGS and self._skip_depth:
            self._skip_depth -= 1
            if self._skip_depth == 0:
                self.pieces[-1][1] += "`"

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            self.pieces[-1][1] += data
        else:
            self.pieces.append([data, data, self.getpos()[0]])


def problems(page: Path) -> list[tuple[int, str, str]]:
    """(HTML line, what, snippet) for each leftover role or unresolved reference in a page."""
    collector = _TextCollector()
    collector.feed(page.read_text(encoding="utf-8", errors="replace"))
    collector.close()
    searched, shown = "", ""
    starts, shown_starts = [], []
    for text, display, _ in collector.pieces:
        starts.append(len(searched))
        shown_starts.append(len(shown))
        searched += text
        shown += display

    def where(offset: int) -> tuple[int, int]:
        # Matches start and end in plain text pieces, where both texts agree.
        i = bisect.bisect_right(starts, offset) - 1
        return collector.pieces[i][2], shown_starts[i] + offset - starts[i]

    found = []
    for kind, pattern in (("Sphinx role", ROLE_RE), ("unresolved cross-reference", UNRESOLVED_RE)):
        for match in pattern.finditer(searched):
            line, start = where(match.start())
            end = where(match.end() - 1)[1] + 1
            snippet = " ".join(shown[max(0, start - 60) : end + 60].split())
            found.append((line, match.start(), f"{kind} {match.group()}", snippet))
    return [(line, what, snippet) for line, _, what, snippet in sorted(found)]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    site = Path(argv[1])
    pages = sorted(site.rglob("*.html"))
    if not pages:
        # An empty or wrong directory must not pass as "nothing found".
        print(f"check_site: no HTML pages under {site}", file=sys.stderr)
        return 2
    count = 0
    for page in pages:
        for line, what, snippet in problems(page):
            count += 1
            print(f"{page.relative_to(site)}:{line}: {what} in rendered text: ...{snippet}...")
    if count:
        print(
            f"check_site: {count} leftover(s) in {site}. Write cross-references as "
            "[`name`][anchor_lens.module.name] (and document the target in docs/api.md); "
            "external objects as plain code spans.",
            file=sys.stderr,
        )
        return 1
    print(f"check_site: {len(pages)} pages, no Sphinx roles or unresolved cross-references")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
