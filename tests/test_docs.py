"""Every Python block in README.md and docs/ runs as written, and the README's links resolve.

Each block runs alone in a fresh interpreter (a block may choose its own Keras backend), in a
temporary folder, under the backend of the test run unless the block sets one.
"""

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
