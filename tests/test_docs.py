"""Every Python block of README.md and docs/*.md runs, in order, page by page, as a reader would paste them.

Conventions a page follows:
- A fenced block whose info string is `python` runs; `python setup` marks the page's setup block: at most one per
  page, the first Python block, visible in the page (it builds the bundled model, or a tiny random
  transformers model, and an image). Nothing else is defined for a page: each page starts from an empty namespace.
- A block whose first line starts with `>>>` runs as a doctest, in the same namespace.
- `<!-- docs-requires: keras, transformers -->` anywhere in a page: the page is skipped when one of those modules
  is not installed (the only way a page is skipped).
- Blocks run in a fresh temporary folder (files they write land there), with matplotlib's figures closed after.
"""

from __future__ import annotations

import doctest
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")
REQUIRES = re.compile(r"<!--\s*docs-requires:\s*(?P<names>[\w.,\s-]+?)\s*-->")


def blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, info string, code) of every fenced block, in order."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, close, body = i + 1, m["fence"], []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(close):
            body.append(lines[i][len(m["indent"]):])
            i += 1
        found.append((start, m["info"].strip(), "\n".join(body) + "\n"))
        i += 1
    return found


def python_blocks(page: Path) -> list[tuple[int, str, str]]:
    return [(n, info, code) for n, info, code in blocks(page.read_text())
            if info.split()[:1] == ["python"]]


def requirements(page: Path) -> list[str]:
    return [name for m in REQUIRES.finditer(page.read_text()) for name in re.split(r"[,\s]+", m["names"]) if name]


# pages whose blocks need a backend chosen before an import: their own runner runs them once per backend
OWN_RUNNER = {"keras.md": "tests/keras/test_keras_docs.py (through tests/test_keras.py, once per Keras backend)"}
RUN = [p for p in PAGES if python_blocks(p) and p.name not in OWN_RUNNER]


@pytest.mark.parametrize("page", RUN, ids=[p.name for p in RUN])
def test_every_python_block_of_the_page_runs_in_order(page, tmp_path, monkeypatch):
    missing = [name for name in requirements(page) if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{page.name} declares docs-requires: {', '.join(missing)} (not installed)")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    try:
        for line, _, code in python_blocks(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            if code.lstrip().startswith(">>>"):
                test = doctest.DocTestParser().get_doctest(code, namespace, where, where, line)
                result = runner.run(test, clear_globs=False)
                assert result.failed == 0, f"doctest block at {where} failed (output above)"
            else:
                exec(compile(code, where, "exec"), namespace)  # noqa: S102 -- the docs' own code
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_a_page_has_at_most_one_setup_block_and_it_comes_first(page):
    found = python_blocks(page)
    setups = [n for n, (_, info, _) in enumerate(found) if info.split()[1:2] == ["setup"]]
    assert setups in ([], [0]), f"{page.name}: setup blocks at Python blocks {setups}; at most one, the first"
    for _, info, _ in found:
        assert info in ("python", "python setup"), f"{page.name}: unknown info string {info!r}"


def test_the_runner_reads_fences_setup_and_requirements():
    text = ("<!-- docs-requires: keras, transformers -->\n"
            "```python setup\nx = 1\n```\n\n```text\nnot code\n```\n  ```python\n  y = x + 1\n  ```\n")
    assert [(info, code) for _, info, code in blocks(text)] == [("python setup", "x = 1\n"), ("text", "not code\n"),
                                                               ("python", "y = x + 1\n")]
    names = [n for m in REQUIRES.finditer(text) for n in re.split(r"[,\s]+", m["names"]) if n]
    assert names == ["keras", "transformers"]
