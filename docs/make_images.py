"""Make the pictures of docs/rendering.md with the project's own code: `python docs/make_images.py`.

The maps come from a real recording (`attnhook.record`) of a small hand-wired attention model: its keys are
per-cell features of the picture (color and shape masks, position), its queries one vector per word, and
its weights are set by hand rather than trained, so the pictures are reproducible without downloads. The
before/after picture uses the bundled demo model on a shapes-world scene. It also prints the measurements
behind the default sigma. The viewer screenshots need Debian's `chromium` and playwright.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from torch import nn

import attnhook as ah
from attnhook.grid import Grid
from attnhook.html import save_html
from attnhook.maps import SIGMA, attention_maps, upsample
from attnhook.render import overlay, plot_heads, plot_words, save_gif

OLD = dict(cmap="jet", alpha=0.5, blend="constant", normalize="max")   # the look of attnhook 0.1

OUT = Path(__file__).parent / "img"
H, W, ROWS, COLS = 120, 160, 6, 8                       # 20 x 20 pixel cells
WORDS = "a red circle left of a blue square".split()
# feature dims: head 0 sees [red, blue, circle, square], head 1 sees [left, right, background, -]
QUERIES = {
    "a": [0, 0, 0, 0, 0, 0, 1, 0], "of": [0, 0, 0, 0, 0, 0, 1, 0],
    "red": [1, 0, 0, 0, 0.5, 0, 0, 0], "circle": [0, 0, 1, 0, 0.5, 0, 0, 0],
    "left": [0, 0, 0, 0, 1, 0, 0, 0],
    "blue": [0, 1, 0, 0, 0, 0.5, 0, 0], "square": [0, 0, 0, 1, 0, 0.5, 0, 0],
}


def scene() -> tuple[np.ndarray, np.ndarray]:
    """The picture `(H, W, 3)` and the feature of each cell `(ROWS * COLS, 8)`."""
    y, x = np.mgrid[0:H, 0:W]
    image = Image.fromarray(np.stack([150 + x // 8, 190 + y // 6, 140 + 0 * x], -1).astype(np.uint8))
    circle, square = Image.new("L", (W, H)), Image.new("L", (W, H))
    ImageDraw.Draw(circle).ellipse((18, 28, 68, 78), fill=255)
    ImageDraw.Draw(square).rectangle((96, 50, 141, 95), fill=255)
    draw = ImageDraw.Draw(image)
    draw.ellipse((18, 28, 68, 78), fill=(215, 40, 40))
    draw.rectangle((96, 50, 141, 95), fill=(45, 80, 225))
    c, s = np.asarray(circle) / 255, np.asarray(square) / 255
    per_cell = lambda m: m.reshape(ROWS, H // ROWS, COLS, W // COLS).mean((1, 3)).ravel()  # noqa: E731
    left = np.tile(1 - (np.arange(COLS) + 0.5) / COLS, ROWS)
    objects = per_cell(c) + per_cell(s)
    features = np.stack([per_cell(c), per_cell(s), per_cell(c), per_cell(s), left * objects,
                         (1 - left) * objects, 1 - objects, 0 * left], -1)
    return np.asarray(image), features


def looker(gains=(6.0, 2.5)) -> nn.Module:
    """Two stock attention layers, 2 heads each: query = gain * word vector, key = cell feature."""
    class Looker(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.MultiheadAttention(8, 2, batch_first=True) for _ in gains)
            with torch.no_grad():
                for layer, gain in zip(self.layers, gains):
                    layer.in_proj_weight.copy_(torch.cat([gain * torch.eye(8), torch.eye(8), torch.eye(8)]))
                    layer.in_proj_bias.zero_()

        def forward(self, words, cells):
            for layer in self.layers:
                layer(words, cells, cells)                      # cross-attention: words look at cells

    return Looker().eval()


def recorded_maps(features: np.ndarray) -> np.ndarray:
    """`(words, layers, heads, ROWS, COLS)` recorded from the hand-wired model."""
    model = looker()
    words = torch.tensor([QUERIES[w] for w in WORDS], dtype=torch.float32)[None]
    with ah.record(model, sites="cross") as trace:
        model(words, torch.tensor(features, dtype=torch.float32)[None])
    return attention_maps(trace, Grid(ROWS, COLS), heads="all", layers="all")[0]


def sigma_table() -> None:
    """The measurements behind the default sigma: roundness of one cell's blob, and whether two cells two
    apart stay two peaks."""
    n, px = 9, 40
    print("sigma (cells) | half-max radius diagonal / axis | middle / peak, cells 2 apart")
    for sigma in (0, 1 / 3, 0.5, 0.75, 1.0, 1.25):
        one = np.zeros((n, n))
        one[4, 4] = 1
        up = upsample(one, Grid(n, n), (n * px, n * px), sigma=sigma)
        c = 4 * px + px // 2 - 1
        peak = up.max()
        axis = (up[c] >= peak / 2).sum() / 2
        diagonal = (np.array([up[c + k, c + k] for k in range(-c, n * px - c)]) >= peak / 2).sum() / 2 * np.sqrt(2)
        two = np.zeros((n, n))
        two[4, 3] = two[4, 5] = 1
        row = upsample(two, Grid(n, n), (n * px, n * px), sigma=sigma)[c]
        print(f"{sigma:13.2f} | {diagonal / axis:31.2f} | {row[c] / row.max():.2f}")


def sigma_figure(image: np.ndarray, one: np.ndarray) -> None:
    sigmas = [(0, "0 (bilinear)"), (1 / 3, "1/3 (tutorial)"), (SIGMA, f"{SIGMA} (default)"), (1.25, "1.25 (SAT)")]
    fig = Figure(figsize=(9.2, 2.1))
    FigureCanvasAgg(fig)
    for ax, (sigma, label) in zip(fig.subplots(1, 4), sigmas):
        ax.imshow(overlay(image, one, grid=Grid(ROWS, COLS), sigma=sigma))
        ax.set_title(f"sigma = {label}", fontsize=9)
        ax.set_axis_off()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86, wspace=0.04)
    fig.savefig(OUT / "sigma.png", dpi=80)


def viewer_screenshot(image: np.ndarray, maps: np.ndarray) -> None:
    """The viewer at 1280 and 420 pixels wide, on the word "circle"."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if chromium is None:
        print("chromium or playwright not found: viewer screenshots not made")
        return
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        page_path = save_html(Path(tmp) / "viewer.html", image, WORDS, maps,
                              layer_labels=["decoder.layers.0.cross_attn", "decoder.layers.1.cross_attn"])
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        for name, width in (("viewer.png", 1280), ("viewer-narrow.png", 420)):
            page = browser.new_page(viewport={"width": width, "height": 600})
            page.goto(page_path.as_uri())
            page.wait_for_function("document.querySelector('.attnhook-viewer').dataset.ready === '1'")
            page.locator(".ah-word").nth(2).click()
            page.locator(".attnhook-viewer").screenshot(path=str(OUT / name))
            page.close()
        browser.close()


def before_after() -> None:
    """The bundled demo transformer's map for a color word, drawn the 0.1 way and the default way."""
    from attnhook import demo

    model = demo.load("transformer")
    scenes = [s for s in demo.make_images(200, seed=11, size=(64, 96))
              if len(s.objects) == 2 and {o.color for o in s.objects} >= {"red", "green"}]
    scene = scenes[0]
    with ah.record(model, sites="cross", layers=-1) as trace:
        words = model.caption([scene])[0].split()
    grid = model.grid((64, 96))
    maps = attention_maps(trace, grid)[0, :len(words)]
    i = words.index("green")
    fig = Figure(figsize=(7.6, 1.9))
    FigureCanvasAgg(fig)
    panels = [(scene.image, "the image"), (overlay(scene.image, maps[i], grid=grid, **OLD), "0.1: jet, alpha 0.5"),
              (overlay(scene.image, maps[i], grid=grid), "now: opacity follows the map")]
    for ax, (picture, title) in zip(fig.subplots(1, 3), panels):
        ax.imshow(picture)
        ax.set_title(f"{title}", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"\u201cgreen\u201d in \u201c{' '.join(words)}\u201d", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.78, wspace=0.04)
    fig.savefig(OUT / "before-after.png", dpi=90)


def flat_and_peaked(image: np.ndarray) -> None:
    """A uniform map and a one-cell map under normalize="max" (0.1) and "mass" (the default)."""
    flat = np.full((ROWS, COLS), 1 / (ROWS * COLS))
    peaked = np.zeros((ROWS, COLS))
    peaked[2, 2] = 1
    maps = np.stack([flat, peaked])
    plot_words(image, ["uniform", "one cell"], maps, grid=Grid(ROWS, COLS), normalize="max", panel_size=1.8,
               title="normalize='max' (0.1): the flat map looks hot").savefig(OUT / "normalize-max.png", dpi=72)
    plot_words(image, ["uniform", "one cell"], maps, grid=Grid(ROWS, COLS), panel_size=1.8,
               title="normalize='mass' (default): the flat map looks flat").savefig(OUT / "normalize-mass.png",
                                                                                     dpi=72)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    image, features = scene()
    maps = recorded_maps(features)                             # (words, layers, heads, rows, cols)
    grid = Grid(ROWS, COLS)
    mean = maps.mean((1, 2))                                   # (words, rows, cols)
    plot_words(image, WORDS, mean, grid=grid, ncols=4, panel_size=2.0).savefig(OUT / "words.png", dpi=72)
    plot_words(image, WORDS, mean, grid=grid, ncols=4, panel_size=2.0, colorbar=False,
               **OLD).savefig(OUT / "words-old.png", dpi=72)
    plot_heads(image, maps[WORDS.index("red")], word="red", grid=grid,
               panel_size=1.8).savefig(OUT / "heads.png", dpi=72)
    overlay(image, mean[WORDS.index("square")], grid=grid).save(OUT / "overlay.png")
    overlay(image, mean[WORDS.index("square")], grid=grid, **OLD).save(OUT / "overlay-old.png")
    flat_and_peaked(image)
    before_after()
    sigma_figure(image, mean[WORDS.index("circle")])
    with tempfile.TemporaryDirectory() as tmp:
        gif = Image.open(save_gif(Path(tmp) / "caption.gif", image, WORDS, mean, grid=grid))
        gif.seek(WORDS.index("blue"))
        gif.convert("RGB").save(OUT / "gif-frame.png")
    viewer_screenshot(image, maps)
    sigma_table()
    for path in sorted(OUT.glob("*.png")):
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
