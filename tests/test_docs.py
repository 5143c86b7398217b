"""Every Python block in README.md and docs/ runs as written, the README's links resolve, and
figures quote their sources.

Each block runs alone in a fresh interpreter (a block may choose its own Keras backend), in a
temporary folder, under the backend of the test run unless the block sets one.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _blocks():
    for page in PAGES:
        text = page.read_text()
        for number, match in enumerate(BLOCK.finditer(text), start=1):
            line = text[: match.start()].count("\n") + 1
            yield pytest.param(match.group(1), id=f"{page.relative_to(ROOT)}:{line}#{number}")


def test_every_page_has_a_python_block_or_none_is_expected():
    with_code = {page.name for page in PAGES if BLOCK.search(page.read_text())}
    assert {"README.md", "layer.md", "population.md", "folding.md", "export.md"} <= with_code


@pytest.mark.parametrize("code", list(_blocks()))
def test_python_block_runs(code, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert process.returncode == 0, (
        f"the block failed:\n{code}\n--- stderr:\n{process.stderr[-3000:]}"
    )


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    targets = [t for t in LINK.findall(text) if "://" not in t]
    assert targets, "the README links to its docs"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


# Figures are quoted from benchmarks/results/ by a convention these tests keep:
# - a docs section (a heading to the next) that names a results file quotes, in its tables and its
#   prose, only figures that file holds, to the digits shown: a number with decimals followed by
#   x, %, ms or s; figures of the paper are quoted inside "(paper: ...)";
# - a README paragraph's ratios (0.79x) are quoted from the docs pages it links to, which name
#   their results files.
RESULTS = ROOT / "benchmarks" / "results"
RESULT_FILE = re.compile(r"benchmarks/results/([\w.-]+?)\.(json|md|\{json,md\})")
FIGURE = re.compile(r"(?<![\w.])(\d+\.\d+)(x|%| ms\b| s\b)")
RATIO = re.compile(r"(?<![\w.])\d+\.\d+x\b")
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?")


def _numbers(name):
    """Every number in a results file: JSON values, and numbers inside its strings or text."""
    text = (RESULTS / name).read_text()
    if not name.endswith(".json"):
        return [float(n) for n in NUMBER.findall(text)]
    found = []

    def walk(value):
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str):
            found.extend(float(n) for n in NUMBER.findall(value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found.append(float(value))

    walk(json.loads(text))
    return found


def _quotes(figure, unit, numbers):
    """Whether `figure` (as written, with `unit`) is one of `numbers` to the digits shown: a
    fraction may be quoted as a percentage, seconds as milliseconds."""
    value, digits = float(figure), len(figure.split(".")[1])
    half = 0.5 * 10.0 ** -digits + 1e-9  # half a unit of the last digit shown, either way
    scales = {"%": (1, 100), " ms": (1, 1000)}.get(unit, (1,))
    return any(abs(number * scale - value) <= half for number in numbers for scale in scales)


def _results_files(text):
    """The results files `text` names: `benchmarks/results/NAME.json`, `.md`, or `.{json,md}`
    (both)."""
    names = set()
    for stem, extension in RESULT_FILE.findall(text):
        extensions = ("json", "md") if extension.startswith("{") else (extension,)
        names.update(f"{stem}.{ext}" for ext in extensions)
    return sorted(names)


def _sections():
    for page in PAGES[1:]:
        for section in re.split(r"\n(?=#{1,6} )", page.read_text()):
            yield page, section


def test_named_results_files_exist():
    missing = sorted({(page.name, name) for page, section in _sections()
                      for name in _results_files(section) if not (RESULTS / name).exists()})
    assert not missing, f"pages name results files that do not exist: {missing}"


PAPER = re.compile(r"\(paper: [^)]*\)")


def _unquoted(section):
    """The figures of `section` (tables and prose) in no results file it names."""
    names = _results_files(section)
    if not names:
        return []
    numbers = [n for name in names if (RESULTS / name).exists() for n in _numbers(name)]
    return [f"{match.group(0)} (from {names})"
            for match in FIGURE.finditer(PAPER.sub("", section))
            if not _quotes(*match.groups(), numbers)]


def test_sections_quote_only_figures_of_the_results_files_they_name():
    absent = [f"{page.name}: {quote}" for page, section in _sections()
              for quote in _unquoted(section)]
    assert not absent, f"figures in no results file their section names: {absent}"


def test_unquoted_figures_are_found():
    section = ("## Speed\n`benchmarks/results/fold.json`: ResNet50 folds in 0.65 s, 0.79x at "
               "batch 1; prose may not add 9.99x (paper: 73.0% is the paper's).\n")
    assert _unquoted(section) == ["9.99x (from ['fold.json'])"]


def test_quotes_check_can_fail():
    assert _quotes("0.79", "x", [0.790]) and _quotes("0.82", " s", [0.815])
    assert _quotes("98.22", "%", [0.9822]) and _quotes("60.1", " ms", [60.08])
    assert not _quotes("0.80", "x", [0.79, 0.748]) and not _quotes("3.7", " s", [0.45, 0.5])


def test_readme_ratios_come_from_the_docs_pages_they_link_to():
    unsourced = []
    for paragraph in re.split(r"\n\s*\n", (ROOT / "README.md").read_text()):
        ratios = RATIO.findall(paragraph)
        pages = [ROOT / t for t in LINK.findall(paragraph) if t.startswith("docs/")]
        text = " ".join(page.read_text() for page in pages if page.exists())
        unsourced += [ratio for ratio in ratios if ratio not in text]
    assert not unsourced, f"README ratios on no docs page their paragraph links to: {unsourced}"
