"""In a real notebook (nbclient running an ipykernel): a figure shows without `%matplotlib`, viewers show inline
(two of them, independent, each one working in Chromium), and a trace shows as HTML."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install nbformat nbclient ipykernel (the test extra)")
nbclient = pytest.importorskip("nbclient", reason="pip install nbclient ipykernel (the test extra)")
pytest.importorskip("ipykernel", reason="pip install ipykernel (the test extra)")

CELLS = [
    """import attnhook as ah
from attnhook import demo
from attnhook.html import viewer
from attnhook.maps import attention_maps
from attnhook.render import plot_words
model = demo.load("transformer")
scenes = demo.make_images(2, seed=7, size=(64, 96))
with ah.record(model, sites="cross") as trace:
    captions = model.caption(scenes)
grid = model.grid((64, 96))
print(captions)""",
    """words = captions[0].split()
plot_words(scenes[0].image, words, attention_maps(trace, grid)[0, :len(words)], grid=grid)""",
    """every = attention_maps(trace, grid, heads="all", layers="all")     # (batch, steps, layers, heads, rows, cols)
viewer(scenes[0].image, words, every[0, :len(words)], grid=grid, layer_labels=trace.sites)""",
    """other = captions[1].split()
viewer(scenes[1].image, other, every[1, :len(other)], grid=grid, layer_labels=trace.sites)""",
    """trace""",
]


@pytest.fixture(scope="module")
def notebook():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3").execute()
    return nb


def outputs(cell, kind: str) -> list:
    return [o for o in cell.outputs if o.output_type == kind]


def test_notebook_records_the_demo_model(notebook):
    from attnhook import demo

    printed = "".join(o.text for o in outputs(notebook.cells[0], "stream"))
    scenes = demo.make_images(2, seed=7, size=(64, 96))
    assert printed.strip() == repr([s.caption for s in scenes])        # the bundled model captions them right


def test_a_figure_displays_without_matplotlib_magic(notebook):
    (result,) = outputs(notebook.cells[1], "execute_result")
    assert "image/png" in result.data
    import base64
    assert base64.b64decode(result.data["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_viewers_and_the_trace_display_inline(notebook):
    pages = [outputs(notebook.cells[i], "execute_result")[0].data["text/html"] for i in (2, 3)]
    assert all('class="attnhook-viewer"' in p for p in pages)
    keys = [p.split('data-attnhook="', 1)[1].split('"', 1)[0] for p in pages]
    assert keys[0] != keys[1]
    assert "layer 1 \\u00b7 cross" in pages[0]                             # readable site labels (escaped JSON)
    trace = outputs(notebook.cells[4], "execute_result")[0].data
    assert "decoder.layers.1.multihead_attn" in trace["text/html"] and "Trace(" in trace["text/plain"]


def test_two_notebook_viewers_work_in_chromium(notebook, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    pages = [outputs(notebook.cells[i], "execute_result")[0].data["text/html"] for i in (2, 3)]
    path = Path(tmp_path / "notebook.html")
    path.write_text("<!doctype html><meta charset='utf-8'><body>" + "<hr>".join(pages) + "</body>", encoding="utf-8")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        page.wait_for_function("[...document.querySelectorAll('.attnhook-viewer')].every(v => v.dataset.ready)")
        page.locator(".attnhook-viewer").nth(1).locator(".ah-word").nth(2).click()
        words = page.evaluate("[...document.querySelectorAll('.attnhook-viewer')].map(v => v.attnhook.state.word)")
        browser.close()
    assert words == [0, 2] and errors == []
