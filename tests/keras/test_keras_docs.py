"""Every code block of docs/keras.md runs, on this process' Keras backend."""

import re
from pathlib import Path

import matplotlib
import pytest

PAGE = Path(__file__).parents[2] / "docs" / "keras.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_docs_block_runs(index, monkeypatch, tmp_path):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"docs/keras.md block {index}", "exec"), {"__name__": f"keras_md_{index}"})


def test_page_has_blocks():
    assert len(BLOCKS) >= 2
