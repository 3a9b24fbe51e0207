"""viewer() and save_html(): a standalone page, checked as text and driven in a real headless Chromium
(playwright on the system's chromium)."""

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import attnhook as ah
from attnhook.errors import AttnHookWarning, RenderError
from attnhook.grid import Grid
from attnhook.html import save_html, viewer
from attnhook.maps import attention_maps, upsample

D, HEADS = 16, 2
WORDS = ["a", "red", "<circle>", "on", "grass"]
LOOKS = [3, 9, 14, 0, 6]   # cell of a 4 x 4 grid that the step of each word looks at


def recorded_maps() -> np.ndarray:
    """`(words, layers, heads, 4, 4)` from a stock decoder wired to look at cell LOOKS[t] at step t (layer 0:
    query = 3 * layer_norm(tgt), keys = memory; layer 1: a constant query)."""
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(D, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True)
    decoder = nn.TransformerDecoder(layer, num_layers=2).eval()
    with torch.no_grad():
        for i, block in enumerate(decoder.layers):
            block.self_attn.out_proj.weight.zero_()
            block.self_attn.out_proj.bias.zero_()
            w, b = block.multihead_attn.in_proj_weight, block.multihead_attn.in_proj_bias
            w[D:2 * D] = torch.eye(D)
            b.zero_()
            w[:D] = 3 * torch.eye(D) if i == 0 else 0
            if i == 1:
                b[:D] = torch.linspace(-1, 1, D)
    memory = torch.cat([torch.zeros(1, 1, D), 4 * torch.eye(D)[None]], dim=1)   # CLS + 16 cells
    with ah.record(decoder, sites="cross") as trace:
        decoder(torch.eye(D)[LOOKS][None], memory)
    return attention_maps(trace, Grid(4, 4, prefix=1), heads="all", layers="all")[0]


def picture(h=72, w=108) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], -1).astype(np.uint8)


def page_data(path: Path) -> dict:
    text = path.read_text()
    return json.loads(re.search(r'<script type="application/json" class="ah-data">(.*?)</script>', text,
                                re.S).group(1))


# --- the file ----------------------------------------------------------------------------------------------

def test_page_is_standalone_and_holds_words_maps_and_image(tmp_path):
    maps = recorded_maps()
    path = save_html(tmp_path / "v.html", picture(), WORDS, maps)
    text = path.read_text()
    assert not re.search(r"https?:|src=[\"']//|@import|url\(", text)    # nothing from the network
    assert "<circle>" not in text and "\\u003ccircle\\u003e" in text    # only in the data, escaped
    data = page_data(path)
    image = re.fullmatch(r"data:image/png;base64,(.+)", data["image"]).group(1)
    assert base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n"
    assert " id=" not in text                                          # no fixed ids: many viewers per page
    assert data["words"] == WORDS
    assert data["layers"] == ["mean", "layer 0", "layer 1"] and data["heads"] == ["mean", "head 0", "head 1"]
    stored = np.frombuffer(base64.b64decode(data["maps"]), np.uint8).reshape(5, 3, 3, 4, 4)
    for i, cell in enumerate(LOOKS):                                   # mean over heads of layer 0
        assert np.unravel_index(stored[i, 1, 0].argmax(), (4, 4)) == divmod(cell, 4)
    want = maps[:, 1, 0] / maps[:, 1, 0].max(axis=(-2, -1), keepdims=True)
    np.testing.assert_allclose(stored[:, 2, 1] / 255, want, atol=1 / 255)
    tops = np.frombuffer(base64.b64decode(data["tops"]), "<f4").reshape(5, 3, 3)
    np.testing.assert_allclose(tops[:, 2, 1], maps[:, 1, 0].max(axis=(-2, -1)), rtol=1e-6)
    assert (data["height"], data["width"]) == (256, 384)               # small images are shown larger


def test_page_refuses_bad_input_and_warns_on_blank_maps(tmp_path):
    maps = np.random.rand(2, 4, 4) / 16
    with pytest.raises(RenderError, match="3 words but 2 maps"):
        save_html(tmp_path / "v.html", picture(), ["a", "b", "c"], maps)
    with pytest.raises(RenderError, match=r"got shape \(4, 4\)"):
        save_html(tmp_path / "v.html", picture(), ["a"], maps[0])
    with pytest.raises(RenderError, match="do not fit the grid"):
        save_html(tmp_path / "v.html", picture(), ["a", "b"], maps, grid=Grid(3, 3))
    with pytest.raises(RenderError, match=">= 0"):
        save_html(tmp_path / "v.html", picture(), ["a", "b"], -maps)
    with pytest.raises(RenderError, match=r"RGB \(H, W, 3\) or grayscale"):
        save_html(tmp_path / "v.html", np.zeros((5, 72, 108)), ["a", "b"], maps)
    with pytest.warns(AttnHookWarning, match="'b'"):
        save_html(tmp_path / "v.html", picture(), ["a", "b"], np.stack([maps[0], 0 * maps[1]]))


    with pytest.raises(RenderError, match="sums? to more"):
        save_html(tmp_path / "v.html", picture(), ["a", "b"], 32 * maps)   # not attention mass
    with pytest.raises(RenderError, match="display_size"):
        save_html(tmp_path / "v.html", picture(), ["a", "b"], maps, display_size=100000)


def test_layer_labels_are_readable_with_the_module_path_kept_for_hover(tmp_path):
    maps = recorded_maps()
    data = page_data(save_html(tmp_path / "v.html", picture(), WORDS, maps,
                               layer_labels=["decoder.layers.0.multihead_attn", "decoder.layers.1.multihead_attn"]))
    assert data["layers"] == ["mean", "layer 0 \u00b7 multihead_attn", "layer 1 \u00b7 multihead_attn"]
    assert data["layerHover"][1:] == ["decoder.layers.0.multihead_attn", "decoder.layers.1.multihead_attn"]


# --- in a browser ------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by playwright (the system's chromium: `playwright install` is not needed)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); the viewer's browser "
                    "tests need it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture()
def open_page(browser):
    """open_page(path, width=900) -> a playwright page showing the file, every viewer started; page errors,
    dialogs and requests to anything but the file are collected in page.problems."""
    pages = []

    def open_(path: Path, width: int = 900):
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.problems = []
        page.on("pageerror", lambda e: page.problems.append(f"error: {e}"))
        page.on("dialog", lambda d: (page.problems.append(f"dialog: {d.message}"), d.dismiss()))
        page.on("request", lambda r: r.url.startswith(("file:", "data:")) or page.problems.append(f"fetch {r.url}"))
        page.goto(path.as_uri())
        page.wait_for_function("[...document.querySelectorAll('.attnhook-viewer')]"
                               ".every(v => v.dataset.ready === '1')", timeout=30000)
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.close()


def snapshot(page, index: int = 0) -> dict:
    return page.evaluate("""(i) => {
      const root = document.querySelectorAll('.attnhook-viewer')[i], v = root.attnhook;
      const c = root.querySelector('.ah-map'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let hash = 0; for (let k = 0; k < d.length; k++) hash = (hash * 31 + d[k]) | 0;
      const f = v.field; let best = 0;
      for (let k = 1; k < f.length; k++) if (f[k] > f[best]) best = k;
      return {hash, peak: [Math.floor(best / c.width), best % c.width], word: v.state.word, layer: v.state.layer,
              head: v.state.head, status: root.querySelector('.ah-status').textContent,
              on: root.querySelector('.ah-word.ah-on').textContent,
              hidden: getComputedStyle(c).visibility === 'hidden'};
    }""", index)


def test_clicking_a_word_shows_its_map_in_chromium(tmp_path, open_page):
    maps = recorded_maps()
    path = save_html(tmp_path / "viewer.html", picture(), WORDS, maps, layer_labels=["first", "second"])
    page = open_page(path)
    height, width = page_data(path)["height"], page_data(path)["width"]
    page.select_option(".ah-layer", "1")                               # layer 'first': steps look at LOOKS
    before = snapshot(page)
    assert before["word"] == 0 and before["on"] == "a" and before["layer"] == 1
    for i in (2, 4):
        page.locator(".ah-word").nth(i).click()                        # a real mouse click on the word
        after = snapshot(page)
        assert after["word"] == i and after["on"] == WORDS[i] and WORDS[i] in after["status"]
        assert after["hash"] != before["hash"], "the displayed map did not change"
        r, c = divmod(LOOKS[i], 4)                                      # its peak is on the cell it looked at
        assert (after["peak"][0] * 4 // height, after["peak"][1] * 4 // width) == (r, c)
        before = after
    # what the page computes is what upsample() computes: same smoothing, same alignment, same values
    field = np.asarray(page.evaluate("Array.from(document.querySelector('.attnhook-viewer').attnhook.field)"),
                       np.float32).reshape(height, width)
    want = upsample(maps[4, 0].mean(0), Grid(4, 4), (height, width))
    np.testing.assert_allclose(field, want, atol=0.01 * want.max())
    page.select_option(".ah-head", "2")                                # head 1 of layer 'first'
    head = snapshot(page)
    assert head["hash"] != before["hash"] and "head 1" in head["status"] and "first" in head["status"]
    assert page.problems == []


def test_keys_move_between_words_and_o_shows_the_original(tmp_path, open_page):
    page = open_page(save_html(tmp_path / "v.html", picture(), WORDS, recorded_maps()))
    page.locator(".attnhook-viewer").focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert snapshot(page)["word"] == 2
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("End")
    assert snapshot(page)["word"] == 4
    page.keyboard.press("o")
    state = snapshot(page)
    assert state["hidden"] and "original image" in state["status"]   # the map is off: the image as it is
    page.keyboard.press("o")
    assert not snapshot(page)["hidden"]


def test_overview_strip_and_heads_by_layers_grid(tmp_path, open_page):
    page = open_page(save_html(tmp_path / "v.html", picture(), WORDS, recorded_maps()))
    strip = page.locator(".ah-strip figure")
    assert strip.count() == len(WORDS)
    assert [strip.nth(i).inner_text() for i in range(len(WORDS))] == WORDS
    grid = page.locator(".ah-grid figure")
    assert grid.count() == 2 * HEADS                                   # layers x heads, without the means
    painted = page.evaluate("""() => [...document.querySelectorAll('.ah-strip canvas, .ah-grid canvas')].map(c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let s = 0;
        for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2]; return s; })""")
    assert all(v > 0 for v in painted)
    strip.nth(3).click()
    assert snapshot(page)["word"] == 3
    grid.nth(3).click()                                                # second layer, second head
    state = snapshot(page)
    assert (state["layer"], state["head"]) == (2, 2) and "layer 1" in state["status"] and "head 1" in state["status"]
    bar = page.locator(".ah-scale-label").inner_text()
    assert bar == "attention per cell (x uniform 1/16)" and page.locator(".ah-ticks span").count() >= 3


@pytest.mark.parametrize("width", [400, 1600])
def test_viewer_fits_the_window(tmp_path, open_page, width):
    image = np.zeros((300, 800, 3), np.uint8)                          # wide: display size 768
    maps = np.random.default_rng(0).dirichlet(np.ones(16), (3, 2, 2)).reshape(3, 2, 2, 4, 4)
    page = open_page(save_html(tmp_path / "v.html", image, ["a", "wide", "picture"], maps), width=width)
    box = page.evaluate("""() => { const r = (s) => document.querySelector(s).getBoundingClientRect();
        return {doc: document.documentElement.scrollWidth, stage: r('.ah-stage'), map: r('.ah-map'),
                grid: r('.ah-grid'), image: r('.ah-image')}; }""")
    assert box["doc"] <= width                                         # no horizontal scrolling
    assert box["stage"]["width"] <= width and abs(box["map"]["width"] - box["image"]["width"]) < 1
    assert abs(box["map"]["height"] - box["image"]["height"]) < 1      # the map stays on the picture
    if width == 1600:
        assert box["stage"]["width"] == 768 and box["grid"]["left"] >= box["stage"]["right"]   # side by side
    else:
        assert box["stage"]["width"] < 400 and box["grid"]["top"] >= box["stage"]["bottom"]   # stacked
    page.locator(".ah-word").nth(1).click()
    assert snapshot(page)["word"] == 1


def test_two_viewers_on_one_page_work_independently(tmp_path, open_page):
    maps = recorded_maps()
    one = viewer(picture(), WORDS, maps)
    two = viewer(picture(54, 54), ["x", "y", "z"], maps[:3, :, :, :, :])
    path = tmp_path / "two.html"
    path.write_text("<!doctype html><meta charset='utf-8'><body><p class='ah-word'>page text</p>"
                    f"{one.html}<p>between</p>{two.html}</body>", encoding="utf-8")
    page = open_page(path)
    assert page.locator(".attnhook-viewer").count() == 2
    page.locator(".attnhook-viewer").nth(1).locator(".ah-word").nth(2).click()
    assert snapshot(page, 0)["word"] == 0 and snapshot(page, 1)["word"] == 2
    page.locator(".attnhook-viewer").nth(0).focus()
    page.keyboard.press("ArrowRight")
    assert snapshot(page, 0)["word"] == 1 and snapshot(page, 1)["word"] == 2
    page.locator(".attnhook-viewer").nth(1).locator(".ah-layer").select_option("2")
    assert snapshot(page, 0)["layer"] == 0 and snapshot(page, 1)["layer"] == 2
    # the viewers' CSS stays inside them: a page element with the same class name is not restyled
    style = page.evaluate("() => { const s = getComputedStyle(document.querySelector('body > p.ah-word'));"
                          " return [s.cursor, s.whiteSpace, s.backgroundColor]; }")
    assert style == ["auto", "normal", "rgba(0, 0, 0, 0)"]
    assert page.problems == []


HOSTILE = ["<!--<script>", "</script>", "<!--", "<script>", "<img src=x onerror=window.pwned=1>",
           "\"'><svg onload=window.pwned=2>", "]]>", "\u2028\u2029", "&lt;b&gt;", "\ud800", "x\udfffy",
           "</style><script>window.pwned=3</script>", "{{ word }}", "${window.pwned=4}", "\\u003c/script>"]


def test_hostile_words_labels_and_titles_cannot_change_the_page(tmp_path, open_page):
    rng = np.random.default_rng(5)
    maps = rng.dirichlet(np.ones(16), (len(HOSTILE), 2, 2)).reshape(len(HOSTILE), 2, 2, 4, 4)
    path = save_html(tmp_path / "hostile.html", picture(), HOSTILE, maps, title="</title><script>window.pwned=5"
                     "</script><!--", layer_labels=["a.0.<!--<script>", "</script><img src=x onerror=alert(1)>"],
                     head_labels=["<b onmouseover=alert(2)>", "\ud800"])
    text = path.read_text(encoding="utf-8")
    assert text.count("<script") == 2 and text.count("</script>") == 2  # the data block and the viewer's own
    page = open_page(path)
    page.locator(".ah-word").nth(4).hover()
    page.locator(".ah-word").nth(5).click()
    page.keyboard.press("ArrowRight")
    shown = page.evaluate("""() => ({
        words: [...document.querySelectorAll('.ah-word')].map(s => s.textContent),
        layers: [...document.querySelectorAll('.ah-layer option')].map(o => o.textContent),
        title: document.querySelector('.ah-title').textContent, pwned: window.pwned === undefined ? null : window.pwned,
        extra: document.querySelectorAll('img:not(.ah-image), svg, b, script').length})""")
    clean = [w for w in HOSTILE if not any(0xD800 <= ord(ch) <= 0xDFFF for ch in w)]
    assert [w for w in shown["words"] if all(not 0xD800 <= ord(ch) <= 0xDFFF for ch in w)] == clean
    assert len(shown["words"]) == len(HOSTILE)                         # every word, shown as text
    assert shown["layers"][2] == "</script><img src=x onerror=alert(1)>"
    assert shown["title"].startswith("</title><script>")
    assert shown["pwned"] is None and shown["extra"] == 2              # only the viewer's two scripts
    assert page.problems == [] and snapshot(page)["word"] == 6


def test_a_trace_with_hostile_site_names_and_words_displays_safely(tmp_path, open_page):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({"<img src=x onerror=window[`pwned`]=7>": nn.TransformerDecoderLayer(
                D, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True)})

        def forward(self, x, memory):
            return next(iter(self.blocks.values()))(x, memory)

    model = Model().eval()
    with ah.record(model, sites="cross") as trace:
        model(torch.randn(1, 3, D), torch.randn(1, 16, D))
    trace.meta.update(words=[["<!--<script>", "</script>", "\ud800"]], grid=Grid(4, 4), image_size=[32, 32])
    path = tmp_path / "trace.html"
    path.write_text(f"<!doctype html><meta charset='utf-8'><body>{trace._repr_html_()}</body>", encoding="utf-8",
                    errors="strict")
    page = open_page(path)
    shown = page.evaluate("() => ({pwned: window.pwned === undefined ? null : window.pwned,"
                          " imgs: document.querySelectorAll('img:not(.ah-image)').length,"
                          " cell: document.querySelector('.attnhook-trace code').textContent,"
                          " words: [...document.querySelectorAll('.ah-word')].length})")
    assert shown == {"pwned": None, "imgs": 0, "cell": "blocks.<img src=x onerror=window[`pwned`]=7>.multihead_attn",
                     "words": 3}
    assert page.problems == []


# --- regions -----------------------------------------------------------------------------------------------

BOXES = [(2, 2, 40, 30), (30, 15, 90, 60), (60, 0, 108, 20)]
REGION_WEIGHTS = np.array([[0.2, 0.5, 0.05], [0.7, 0.1, 0.2]], np.float32)   # (words, regions)


def test_region_maps_travel_as_one_weight_per_box(tmp_path):
    from attnhook.grid import Regions

    path = save_html(tmp_path / "r.html", picture(), ["a", "dog"], REGION_WEIGHTS, grid=Regions(BOXES),
                     display_size=216)                                  # twice the 72 x 108 picture
    data = page_data(path)
    assert (data["rows"], data["cols"]) == (1, 3) and data["ticks"]["label"] == "attention per region (x uniform 1/3)"
    # the pixel span of each box: pixels whose centre lies inside, at the displayed size
    assert data["regions"]["big"] == [[4, 4, 80, 60], [60, 30, 180, 120], [120, 0, 216, 40]]
    with pytest.raises(RenderError, match="one weight per region"):
        viewer(picture(), ["a", "dog"], np.ones((2, 4)) / 4, grid=Regions(BOXES))


def test_region_boxes_are_filled_and_outlined_in_chromium(tmp_path, open_page):
    from attnhook.grid import Regions
    from attnhook.maps import paint_regions, region_outlines
    from attnhook.render import _lut

    regions = Regions(BOXES)
    path = save_html(tmp_path / "r.html", picture(), ["a", "dog"], REGION_WEIGHTS, grid=regions, normalize="max",
                     alpha=0.8, display_size=108)
    page = open_page(path)
    lut = _lut("inferno")
    for word in (0, 1):
        page.locator(".ah-word").nth(word).click()
        field = np.asarray(page.evaluate("Array.from(document.querySelector('.attnhook-viewer').attnhook.field)"),
                           np.float32).reshape(72, 108)
        want = paint_regions(REGION_WEIGHTS[word], regions, (72, 108))
        np.testing.assert_allclose(field, want, atol=REGION_WEIGHTS[word].max() / 255)
        rgba = np.asarray(page.evaluate("""() => Array.from(document.querySelector('.ah-map').getContext('2d')
            .getImageData(0, 0, 108, 72).data)"""), np.uint8).reshape(72, 108, 4)
        level = REGION_WEIGHTS[word] / REGION_WEIGHTS[word].max()
        strongest = int(level.argmax())
        for r in np.argsort(level, kind="stable"):                      # outlines, weakest first: the last wins
            mask = region_outlines(Regions([BOXES[r]]), (72, 108))
            if r == strongest:
                assert (rgba[mask][:, :3] == lut[int(round(level[r] * 255))]).all() and (rgba[mask][:, 3] == 255).all()
        x0, y0, x1, y1 = BOXES[strongest]                               # inside it: its color, at opacity alpha
        y, x = (y0 + y1) // 2, (x0 + x1) // 2
        assert tuple(rgba[y, x, :3]) == tuple(lut[255]) and abs(int(rgba[y, x, 3]) - round(255 * 0.8)) <= 1
        assert rgba[71, 107, 3] == 0                                    # under no box: the plain image
    assert page.problems == []


def test_a_trace_with_regions_in_its_meta_shows_the_viewer():
    from attnhook.grid import Regions

    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(D, HEADS, batch_first=True), 1).eval()
    with ah.record(decoder, sites="cross") as trace:
        decoder(torch.randn(1, 2, D), torch.randn(1, 1 + len(BOXES), D))
    trace.meta.update(words=[["a", "dog"]], grid=Regions(BOXES, prefix=1), image_size=[72, 108])
    shown = trace._repr_html_()
    assert "attnhook-viewer" in shown and "attention per region" in shown
