#!/usr/bin/env python3
"""Check that every measured number in a notebook's prose is printed by the same notebook's run.

Usage::

    python scripts/prose_numbers.py                      # every notebooks/*.ipynb
    python scripts/prose_numbers.py notebooks/07_x.ipynb # only these files
    python scripts/prose_numbers.py --words              # also print each notebook's markdown word count

It prints one line per violation, ``path: cell N: "<context>" — 7.2x is printed by no output`` (``N`` is the
0-based index of the cell in the notebook), and exits 1 if there is any. tests/test_prose_numbers.py runs the same
check over the committed notebooks. Standard library only: it imports without torch or nbformat.

The rule
========

**Only markdown cells are checked.** Before a cell is scanned, these are removed (so numbers inside them are never
measured numbers):

* fenced code blocks (```` ``` ```` or ``~~~``) and inline code spans (`` `...` ``);
* LaTeX math: ``$$...$$``, ``$...$``, ``\\[...\\]``, ``\\(...\\)``;
* **cited** regions: from ``<!-- cited: SOURCE -->`` to ``<!-- /cited -->``, for figures quoted from a paper or
  another published source. SOURCE must not be empty (an empty one is itself a violation, "cited marker without a
  source"); a marker that is never closed runs to the end of the cell. Say the source in the visible text too;
* **given** regions: from ``<!-- given: REASON -->`` to ``<!-- /given -->``, for requirements and targets that are not
  measurements (same rules as ``cited``);
* every other HTML comment, HTML tags (their attributes), link targets ``](...)``, bare URLs, ISO dates
  (``2024-05-01``), and the section numbers that start a heading (``### 3.1 ...``).

**Measured-number candidates** in what remains:

* a number with a decimal point: ``0.728``, ``65.8``;
* a percentage: a number followed by ``%`` (or the word *percent*): ``65%``, ``65.8 %``;
* a ratio: a number followed by ``x`` (no space) or ``×``: ``1.04x``, ``7.2×``, ``2x`` (but ``28×28`` and ``3x3``, a
  number on both sides, are dimensions, not ratios);
* a time: a number followed by ``ns``, ``µs``, ``us``, ``ms``, ``s``, ``sec``, ``second(s)``, ``min``, ``minute(s)``,
  ``h``, ``hr``, ``hour(s)`` (with or without a space; each only as a whole word): ``54 s``, ``3.2ms``, ``15 hours``;
* a size: a number followed by ``B``, ``byte(s)``, ``KB``, ``kB``, ``KiB``, ``MB``, ``MiB``, ``GB``, ``GiB``, ``TB``,
  ``TiB``: ``150 MiB``, ``2 GB``.

Thousands separators (``4,000``, ``4_000``) and signs (``+0.3``, ``−0.2``) are parsed; values are compared without
their sign (prose "falls by 0.3" is matched by a printed ``-0.3``). In a range (``0.4 to 0.5``, ``37–47%``,
``2-3 s``) both ends are candidates, and the first end takes the second's unit; likewise ``98.7 ± 0.4%`` gives
``98.7%`` and ``0.4%``.

**Not candidates**: plain integers without a unit, percent sign or ratio (``600 test tasks``, ``K = 10``); numbers
glued to a word before or after them (``conv4``, ``v1.2``, ``AVX512``, ``1.2M``, ``3rd``); scientific notation
(``1e-3``, ``10^-3``, ``1.5 × 10^3``: constants of the setting); version numbers (two or more dots, ``2.15.0``, or a
decimal without a unit right after a word such as Python, torch, PyTorch, CUDA, cuDNN, nbval, JupyterLab, version,
v, metatut, numpy, wordfreq, Debian, Ubuntu, macOS, "compute capability", optionally with a comparison:
``torch>=2.4``; see :data:`VERSION_WORDS`); references (a decimal without a unit after section, sec., §, Table,
Figure, Fig., eq., equation, Algorithm, chapter, appendix, ...; also the later items of a list, ``sections 5.1 and
5.2``; see :data:`REFERENCE_WORDS`); arXiv identifiers (``1703.03400``, ``arXiv:1707.09835``: four digits, a dot, four
or five digits); decades (``1990s``); the level of a confidence interval (a percentage followed by *confidence*,
*CI*, *credible* or *interval*: ``95% confidence interval``).

**A candidate passes** when

(a) an output of the same notebook prints the same value at the prose's precision: some number printed by any
    output (stream text, ``text/plain``, ``text/markdown``, ``text/html`` with its tags removed, ``text/latex``; not
    images), once rounded to the candidate's number of decimals, equals the candidate. Prose ``83%`` is matched by a
    printed ``82.6``, ``82.6%`` or ``0.826`` (for a percentage the printed value × 100 also counts); prose ``0.4`` by
    a printed ``0.39``; prose ``7.2x`` is *not* matched by a printed ``6.08x``. Units are not converted: prose
    ``54 s`` needs a printed 54 (53.5 to 54.5), not ``0.9 min``. The outputs of ``Output`` widgets saved in the
    notebook's widget state count as outputs; or

(b) the same value appears as a literal in a code cell's source (a constant of the setting: ``ALPHA = 0.01``,
    ``mt.pick(ci=600, laptop=4_000)``); values are compared exactly (``4_000`` == ``4,000`` == ``4000``;
    ``1e-3`` == ``0.001``), and for a percentage the literal × 100 counts too (``acc > 0.9`` and "90%").

Whatever (a) and (b) say, a candidate in a sentence, table row or list item that names a publication ("et al.",
"the paper", "papers", "published") must be inside a ``cited`` region: a published figure is cited, a figure of
this run is generated; a typed number beside a paper's name could be either, and the coincidence of a printed
value would otherwise let a paper's figure pass.

A notebook with no outputs at all (never executed) fails on every candidate: "the notebook has no outputs: execute
it".

How to fix a violation: generate the sentence from the run's own results in a code cell
(``display(Markdown(f"... {speedup:.1f}x ..."))``), or print the number the prose quotes, or — for a figure quoted
from a paper — wrap it in ``<!-- cited: Authors Year, Table N -->`` ... ``<!-- /cited -->``.

**Prose length**: :func:`prose_word_count` counts a notebook's markdown words
(``len(re.findall(r"\\S+", source))`` summed over the markdown cells); the limit is :data:`WORD_LIMIT`.
"""
from __future__ import annotations

import argparse
import bisect
import html
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The notebooks checked when no path is given.
DEFAULT_GLOB = "notebooks/*.ipynb"
#: At most this many words of markdown prose per notebook.
WORD_LIMIT = 2000

#: A decimal right after one of these words (case-insensitive) is a version, not a measurement.
VERSION_WORDS = (
    "python", "torch", "pytorch", "cuda", "cudnn", "rocm", "nbval", "jupyterlab", "jupyter", "version",
    "versions", "v", "metatut", "numpy", "wordfreq", "debian", "ubuntu", "macos", "windows", "pip", "torchvision",
    "matplotlib", "ipywidgets", "nbformat", "nbclient", "pytest", "ruff", "tqdm", "pillow", "triton", "capability",
    "release", "sm", "opset", "driver",
)
#: A decimal right after one of these words (case-insensitive) is a reference to a part of a text.
REFERENCE_WORDS = (
    "section", "sections", "sec.", "secs.", "§", "§§", "table", "tables", "figure", "figures", "fig.", "figs.", "eq.",
    "eqs.", "equation", "equations", "algorithm", "alg.", "chapter", "chapters", "ch.", "appendix",
    "theorem", "lemma", "proposition", "corollary", "definition", "exercise", "exercises", "notebook", "notebooks",
    "listing",
)

_TIME_UNITS = {
    "ns", "µs", "μs", "us", "ms", "s", "sec", "secs", "second", "seconds", "min", "mins", "minute", "minutes",
    "h", "hr", "hrs", "hour", "hours",
}
_SIZE_UNITS = {"B", "byte", "bytes", "KB", "kB", "KiB", "MB", "MiB", "GB", "GiB", "TB", "TiB"}

# --- removal of what is never prose ---------------------------------------------------------------------------------
_FENCE = re.compile(r"^[ \t]*(```|~~~).*?(?:^[ \t]*\1[^\n]*$|\Z)", re.S | re.M)
_MARKER = re.compile(r"<!--\s*(cited|given)\b\s*:?(.*?)-->", re.S | re.I)
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_INLINE_CODE = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
_MATH = re.compile(
    r"\$\$.*?\$\$"                      # display math
    r"|\\\[.*?\\\]"                     # \[ ... \]
    r"|\\\(.*?\\\)"                     # \( ... \)
    r"|(?<![\\$])\$(?!\s)(?:[^$\\\n]|\\.|\n(?![ \t]*\n))+?(?<!\s)\$(?!\d)",  # $...$ (not "$5 and $6")
    re.S,
)
_LINK_TARGET = re.compile(r"\]\([^)\s]*(?:\s+\"[^\"]*\")?\)")
_LINK_DEF = re.compile(r"^[ \t]*\[[^\]]+\]:\s*\S+.*$", re.M)
_URL = re.compile(r"(?:https?://|ftp://|www\.)[^\s<>)\]]+", re.I)
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_DATE = re.compile(r"(?<!\d)\d{4}-\d{2}-\d{2}(?!\d)")
_HEADING_NUMBER = re.compile(r"^([ \t]*#{1,6}[ \t]+)[\d.]+", re.M)

# --- numbers ----------------------------------------------------------------------------------------------------------
_NUMBER = (
    r"(?:\d{1,3}(?:,\d{3})+(?![\d_])(?:\.\d+)?"   # 4,000 or 12,345.6
    r"|\d+(?:_\d+)*(?:\.\d+)*"                      # 4000, 4_000, 0.728, 2.15.0
    r"|\.\d+)"                                      # .5
)
_CANDIDATE = re.compile(
    r"(?<![\w.,/\\])"
    r"(?P<sign>[+\-−](?=[\d.]))?"
    r"(?P<num>" + _NUMBER + r")"
    r"(?P<exp>[eE][+\-−]?\d+(?!\w)|\s*\^\s*\{?\s*[+\-−]?\d+\s*\}?)?"
    r"(?P<unit>"
    r"\s?%|\s?percent\b|\s?per\s+cent\b"
    r"|\s?×(?!\s*\d)|x(?![\w\d])(?!\s*\d)"
    r"|\s?(?:ns|µs|μs|us|ms|secs?|seconds?|mins?|minutes?|hrs?|hours?|s|h)(?![\w/])"
    r"|\s?(?:bytes?|KiB|MiB|GiB|TiB|KB|kB|MB|GB|TB|B)(?!\w)"
    r")?",
)
_TIMES_TEN = re.compile(r"\s*[×x·*]\s*10\s*(?:\^|\*\*|[⁰¹²³⁴⁵⁶⁷⁸⁹⁻])")
_RANGE_NEXT = re.compile(r"\s*(?:–|—|-|to|and|±|\+/?-)\s*(?=[+\-−]?[\d.])")
_CONFIDENCE_AFTER = re.compile(r"\s*(?:confidence|CI|credible|interval|prediction interval)\b", re.I)
_OUTPUT_NUMBER = re.compile(
    r"(?<![\w.])[+\-−]?(?:\d{1,3}(?:,\d{3})+(?![\d_])(?:\.\d+)?|\d+(?:_\d+)*(?:\.\d*)?|\.\d+)(?:[eE][+\-−]?\d+)?"
)
_CODE_NUMBER = re.compile(r"(?<![\w.])(?:\d+(?:_\d+)*(?:\.\d*)?|\.\d+)(?:[eE][+\-]?\d+)?(?![\w.])")
_ARXIV = re.compile(r"^\d{4}\.\d{4,5}$")


def _words_pattern(words: tuple[str, ...], lists: bool) -> re.Pattern:
    alternatives = "|".join(
        (r"(?<![\w])" if w[0].isalnum() else "") + re.escape(w) for w in sorted(words, key=len, reverse=True)
    )
    # the word, optionally a comparison (torch>=2.4), with lists: earlier numbers of a list (sections 5.1 and 5.2)
    return re.compile(
        r"(?:" + alternatives + r")\s*(?:(?:[<>=!~]=|[<>≥≤:])\s*)?"
        + (r"(?:[\d.]+\s*(?:,|and|or|to|–|-)\s*)*" if lists else "") + "$",
        re.I,
    )


_VERSION_BEFORE = _words_pattern(VERSION_WORDS, lists=False)
_REFERENCE_BEFORE = _words_pattern(REFERENCE_WORDS, lists=True)
_ARXIV_BEFORE = re.compile(r"arxiv\s*:?\s*(?:abs/)?$", re.I)


@dataclass(frozen=True)
class Candidate:
    """A measured number in a markdown cell: its text as written, value, decimals, kind and context."""

    text: str
    value: float
    decimals: int
    kind: str  # "decimal", "percent", "ratio", "time", "size"
    context: str
    start: int = 0


@dataclass(frozen=True)
class Violation:
    """A number of the prose that the notebook does not back (or a malformed marker)."""

    path: str
    cell: int
    context: str
    number: str
    reason: str

    def __str__(self) -> str:
        if self.number:
            return f'{self.path}: cell {self.cell}: "{self.context}" — {self.number} {self.reason}'
        return f'{self.path}: cell {self.cell}: "{self.context}" — {self.reason}'


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _blank(match: re.Match) -> str:
    """Replace a removed region by one space per line it spanned (keeps line structure for ``^`` anchors)."""
    return " " + "\n" * match.group(0).count("\n")


def strip_markdown(source: str) -> tuple[str, list[tuple[str, str]]]:
    """The scannable prose of a markdown cell, and the marker problems found (``(context, reason)`` pairs).

    Removes fenced code, cited and given regions, HTML comments and tags, inline code, LaTeX math, link targets,
    bare URLs, ISO dates and heading numbers (see the module docstring).
    """
    problems: list[tuple[str, str]] = []
    text = _FENCE.sub(_blank, source)
    text = _INLINE_CODE.sub(_blank, text)
    # cited / given regions: from the opening marker to its closing one, or to the end of the cell
    out, pos = [], 0
    while True:
        m = _MARKER.search(text, pos)
        if not m:
            out.append(text[pos:])
            break
        out.append(text[pos:m.start()])
        kind, src = m.group(1).lower(), m.group(2).strip()
        if not src:
            problems.append((_squash(m.group(0)), f"{kind} marker without a source"
                             if kind == "cited" else "given marker without a reason"))
        close = re.compile(r"<!--\s*/\s*" + kind + r"\s*-->", re.I).search(text, m.end())
        end = close.end() if close else len(text)
        out.append(" " + "\n" * text[m.start():end].count("\n"))
        pos = end
    text = "".join(out)
    text = _COMMENT.sub(_blank, text)
    text = _MATH.sub(_blank, text)
    text = _LINK_TARGET.sub("]", text)
    text = _LINK_DEF.sub(" ", text)
    text = _URL.sub(" ", text)
    text = html.unescape(_HTML_TAG.sub(" ", text))
    text = _DATE.sub(" ", text)
    text = _HEADING_NUMBER.sub(lambda m: m.group(1), text)
    return text, problems


def _squash(s: str, limit: int = 90) -> str:
    s = re.sub(r"\s+", " ", s).strip()
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _parse(num: str) -> tuple[float, int]:
    """Value and number of decimals of ``4,000`` / ``4_000`` / ``0.728``."""
    clean = num.replace(",", "").replace("_", "")
    decimals = len(clean.split(".", 1)[1]) if "." in clean else 0
    return float(clean), decimals


def _kind(unit: str) -> str:
    u = unit.strip()
    if not u:
        return ""
    if u == "%" or u.lower().startswith("per"):
        return "percent"
    if u in ("x", "×"):
        return "ratio"
    if u in _TIME_UNITS:
        return "time"
    if u in _SIZE_UNITS:
        return "size"
    return ""


def _context(text: str, start: int, end: int, width: int = 45) -> str:
    a, b = max(0, start - width), min(len(text), end + width)
    # extend to word boundaries
    while a > 0 and not text[a - 1].isspace():
        a -= 1
    while b < len(text) and not text[b].isspace():
        b += 1
    return _squash(text[a:b], limit=140)


def find_candidates(text: str) -> list[Candidate]:
    """The measured-number candidates in already stripped prose (see :func:`strip_markdown`)."""
    found: list[Candidate] = []
    matches = list(_CANDIDATE.finditer(text))
    for i, m in enumerate(matches):
        num, unit = m.group("num"), m.group("unit") or ""
        if m.group("exp") or _TIMES_TEN.match(text, m.end("num")):
            continue  # 1e-3, 10^-3, 1.5 × 10^3: scientific notation, a constant of the setting
        if num.startswith(".") and m.start("num") > 0 and text[m.start("num") - 1].isalnum():
            continue
        if num.count(".") >= 2:
            continue  # 2.15.0: a version (or a section 3.1.2)
        if num.endswith("."):
            continue
        if _ARXIV.match(num):
            continue
        end = m.end()
        # glued to a following word that is no unit ("5D", "3rd", "64-bit" stays: "-" is no word char)
        if not unit and end < len(text) and (text[end].isalpha() or text[end] == "_"):
            continue
        kind = _kind(unit)
        if kind == "time" and unit == "s" and re.fullmatch(r"1[89]\d0|20\d0", num):
            continue  # the 1990s
        before = text[max(0, m.start() - 60):m.start()]
        if "." in num and not kind and (_VERSION_BEFORE.search(before) or _REFERENCE_BEFORE.search(before)):
            continue
        if _ARXIV_BEFORE.search(before):
            continue
        if kind == "percent" and _CONFIDENCE_AFTER.match(text, end):
            continue  # "a 95% confidence interval": a convention, not a measurement
        if not kind:
            # first end of a range takes the unit of the second: "37–47%", "2-3 s"
            rng = _RANGE_NEXT.match(text, end)
            if rng and i + 1 < len(matches) and matches[i + 1].start() == rng.end():
                nxt = matches[i + 1]
                if not nxt.group("exp") and _kind(nxt.group("unit") or ""):
                    kind = _kind(nxt.group("unit"))
        if not kind:
            if "." not in num:
                continue  # a plain integer is never a measurement
            kind = "decimal"
        value, decimals = _parse(num)
        found.append(Candidate(
            text=text[m.start():m.end()].strip(), value=value, decimals=decimals, kind=kind,
            context=_context(text, m.start(), m.end()), start=m.start(),
        ))
    return found


def _html_text(page: str) -> str:
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S | re.I)
    return html.unescape(_HTML_TAG.sub(" ", page))


def _output_texts(outputs: list) -> list[str]:
    texts = []
    for out in outputs or []:
        if out.get("output_type") == "stream":
            texts.append(_source({"source": out.get("text", "")}))
            continue
        data = out.get("data") or {}
        for mime in ("text/plain", "text/markdown", "text/latex"):
            if mime in data:
                texts.append(_source({"source": data[mime]}))
        if "text/html" in data:
            texts.append(_html_text(_source({"source": data["text/html"]})))
    return texts


def output_texts(nb: dict) -> list[str]:
    """Every text that the notebook's outputs print (code cells' outputs and saved ``Output`` widgets)."""
    texts: list[str] = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            texts += _output_texts(cell.get("outputs"))
    widgets = (nb.get("metadata") or {}).get("widgets") or {}
    for state in widgets.values():
        for model in ((state or {}).get("state") or {}).values():
            st = (model or {}).get("state") or {}
            if isinstance(st.get("outputs"), list):
                texts += _output_texts(st["outputs"])
    return texts


def _parse_any(token: str) -> float | None:
    clean = token.replace(",", "").replace("_", "").replace("−", "-")
    try:
        v = float(clean)
    except ValueError:
        return None
    return abs(v) if math.isfinite(v) else None


def output_numbers(nb: dict) -> list[float]:
    """The absolute values of all numbers the notebook's outputs print, sorted."""
    values = []
    for text in output_texts(nb):
        for tok in _OUTPUT_NUMBER.findall(text):
            # "1,234" is 1234, but "[100,200]" printed without spaces is two numbers: keep both readings
            for part in [tok] + (tok.split(",") if "," in tok else []):
                v = _parse_any(part)
                if v is not None:
                    values.append(v)
    return sorted(values)


def code_numbers(nb: dict) -> list[float]:
    """The absolute values of the numeric literals in the notebook's code cells, sorted."""
    values = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            for tok in _CODE_NUMBER.findall(_source(cell)):
                v = _parse_any(tok)
                if v is not None:
                    values.append(v)
    return sorted(values)


def _any_within(values: list[float], lo: float, hi: float) -> bool:
    i = bisect.bisect_left(values, lo)
    return i < len(values) and values[i] <= hi


def _printed(c: Candidate, printed: list[float]) -> bool:
    half = 0.5 * 10.0 ** (-c.decimals)
    lo, hi = abs(c.value) - half * (1 + 1e-9) - 1e-12, abs(c.value) + half * (1 + 1e-9) + 1e-12
    if _any_within(printed, lo, hi):
        return True
    return c.kind == "percent" and _any_within(printed, lo / 100, hi / 100)


def _in_code(c: Candidate, constants: list[float]) -> bool:
    v = abs(c.value)
    tol = 1e-9 * max(1.0, v)
    if _any_within(constants, v - tol, v + tol):
        return True
    return c.kind == "percent" and _any_within(constants, (v - tol) / 100, (v + tol) / 100)


_PUBLICATION = re.compile(r"\bet al\b|\bthe paper\b|\bpapers\b|\bpaper's\b|\bpublished\b", re.I)
_SENTENCE_END = re.compile(r"[.!?](?=\s+[A-Z(])|\n\s*\n|\n(?=\s*[|*-])")


def _sentence(text: str, start: int) -> str:
    """The sentence (or table row, or list item) of ``text`` around position ``start``."""
    a = 0
    for m in _SENTENCE_END.finditer(text, 0, start):
        a = m.end()
    m = _SENTENCE_END.search(text, start)
    return text[a:m.start() if m else len(text)]


def _names_publication(text: str, c: Candidate) -> bool:
    # "al." ends no sentence: look at the text around the number, across "et al." abbreviations
    return bool(_PUBLICATION.search(_sentence(text.replace("al. ", "al  "), c.start)))


def _load(nb_or_path) -> tuple[dict, str]:
    if isinstance(nb_or_path, dict):
        return nb_or_path, "<notebook>"
    p = Path(nb_or_path)
    with open(p, encoding="utf-8") as f:
        nb = json.load(f)
    try:
        shown = str(p.resolve().relative_to(ROOT))
    except ValueError:
        shown = str(nb_or_path)
    return nb, shown


def check_notebook(nb_or_path, path: str | None = None) -> list[Violation]:
    """Every violation of the rule (module docstring) in a notebook, given as a path or as its JSON dict."""
    nb, shown = _load(nb_or_path)
    shown = path or shown
    printed = output_numbers(nb)
    executed = bool(output_texts(nb)) or any(
        cell.get("outputs") for cell in nb.get("cells", []) if cell.get("cell_type") == "code"
    )
    constants = code_numbers(nb)
    violations = []
    for index, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "markdown":
            continue
        text, problems = strip_markdown(_source(cell))
        for context, reason in problems:
            violations.append(Violation(shown, index, context, "", reason))
        for c in find_candidates(text):
            if not executed:
                violations.append(Violation(shown, index, c.context, c.text,
                                            "is printed by no output (the notebook has no outputs: execute it)"))
            elif _names_publication(text, c):
                violations.append(Violation(shown, index, c.context, c.text,
                                            "sits in a sentence that names a publication: wrap a published figure in "
                                            "<!-- cited: SOURCE --> ... <!-- /cited -->, generate a figure of this run"))
            elif not (_printed(c, printed) or _in_code(c, constants)):
                violations.append(Violation(shown, index, c.context, c.text, "is printed by no output"))
    return violations


def prose_word_count(nb_or_path) -> int:
    """Words of markdown prose: ``len(re.findall(r"\\S+", source))`` summed over the markdown cells."""
    nb, _ = _load(nb_or_path)
    return sum(len(re.findall(r"\S+", _source(c))) for c in nb.get("cells", []) if c.get("cell_type") == "markdown")


def default_notebooks() -> list[Path]:
    return sorted(ROOT.glob(DEFAULT_GLOB))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help=f"default: {DEFAULT_GLOB}")
    parser.add_argument("--words", action="store_true", help="print each notebook's markdown word count")
    args = parser.parse_args(argv)
    paths = args.notebooks or default_notebooks()
    bad = 0
    for p in paths:
        violations = check_notebook(p)
        for v in violations:
            print(v)
        bad += len(violations)
        words = prose_word_count(p)
        _, shown = _load(p)
        if words > WORD_LIMIT:
            print(f"{shown}: {words:,} words of markdown prose (limit {WORD_LIMIT:,})")
            bad += 1
        elif args.words:
            print(f"{shown}: {words:,} words of markdown prose")
    if bad:
        print(f"{bad} problem(s) in {len(paths)} notebook(s)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
