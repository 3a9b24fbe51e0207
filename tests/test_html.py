"""save_html(): a standalone page, checked as text and clicked in a real headless Chromium."""

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import attnhook as ah
from attnhook.errors import AttnHookWarning, RenderError
from attnhook.grid import Grid
from attnhook.html import save_html
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
    return json.loads(re.search(r'<script id="attnhook-data" type="application/json">(.*?)</script>', text,
                                re.S).group(1).replace("<\\/", "</"))


# --- the file ----------------------------------------------------------------------------------------------

def test_page_is_standalone_and_holds_words_maps_and_image(tmp_path):
    maps = recorded_maps()
    path = save_html(tmp_path / "v.html", picture(), WORDS, maps)
    text = path.read_text()
    assert not re.search(r"https?:|src=[\"']//|@import|url\(", text)    # nothing from the network
    assert "&lt;circle&gt;" in text and "<circle>" not in text.split("<script")[0]
    image = re.search(r'src="data:image/png;base64,([^"]+)"', text).group(1)
    assert base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n"
    data = page_data(path)
    assert data["words"] == WORDS
    assert data["layers"] == ["mean", "layer 0", "layer 1"] and data["heads"] == ["mean", "head 0", "head 1"]
    stored = np.frombuffer(base64.b64decode(data["maps"]), np.uint8).reshape(5, 3, 3, 4, 4)
    for i, cell in enumerate(LOOKS):                                   # mean over heads of layer 0
        assert np.unravel_index(stored[i, 1, 0].argmax(), (4, 4)) == divmod(cell, 4)
    want = maps[:, 1, 0] / maps[:, 1, 0].max(axis=(-2, -1), keepdims=True)
    np.testing.assert_allclose(stored[:, 2, 1] / 255, want, atol=1 / 255)
    assert (data["height"], data["width"]) == (256, 384)               # small images are shown larger


def test_page_refuses_bad_input_and_warns_on_blank_maps(tmp_path):
    maps = np.random.rand(2, 4, 4)
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


# --- in a browser ------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


class DevTools:
    """The smallest Chrome DevTools Protocol client: one page, over a stdlib websocket."""

    def __init__(self, url: str):
        parts = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        payload = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        n = len(payload)
        size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 65536 \
            else bytes([0x80 | 127]) + n.to_bytes(8, "big")
        self.sock.sendall(b"\x81" + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            message = json.loads(self._receive())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def click(self, x: float, y: float):
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            data += chunk
        return data

    def _receive(self) -> str:
        parts = []
        while True:
            first, second = self._exact(2)
            n = second & 0x7F
            if n == 126:
                n = int.from_bytes(self._exact(2), "big")
            elif n == 127:
                n = int.from_bytes(self._exact(8), "big")
            data = self._exact(n)
            if first & 0x0F in (0, 1, 2):
                parts.append(data)
                if first & 0x80:
                    return b"".join(parts).decode()


@pytest.fixture()
def browser_page():
    """Open a file in headless Chromium; yield a function url -> DevTools of that page."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); the viewer's browser "
                    "test needs it")
    profile = tempfile.mkdtemp(prefix="attnhook-chromium-")
    processes = []

    def open_page(url: str) -> DevTools:
        proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                 "--window-size=900,900", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(proc)
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
                pages = [t for t in json.load(reply) if t["type"] == "page" and t["url"].startswith("file:")]
            if pages:
                return DevTools(pages[0]["webSocketDebuggerUrl"])
            if time.monotonic() > deadline:
                raise RuntimeError("chromium opened no page")
            time.sleep(0.05)

    yield open_page
    for proc in processes:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(profile, ignore_errors=True)


SNAPSHOT = """(() => {
  const c = document.getElementById("map"), d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let hash = 0; for (let i = 0; i < d.length; i++) hash = (hash * 31 + d[i]) | 0;
  const f = attnhookViewer.field; let best = 0;
  for (let i = 1; i < f.length; i++) if (f[i] > f[best]) best = i;
  return {hash, peak: [Math.floor(best / c.width), best % c.width], word: attnhookViewer.state.word,
          status: document.getElementById("status").textContent, on: document.querySelector(".word.on").textContent};
})()"""


def test_clicking_a_word_shows_its_map_in_chromium(tmp_path, browser_page):
    maps = recorded_maps()
    image = picture()
    path = save_html(tmp_path / "viewer.html", image, WORDS, maps, layer_labels=["first", "second"])
    page = browser_page(path.as_uri())
    deadline = time.monotonic() + 30
    while not page.evaluate("document.readyState === 'complete' && !!window.attnhookViewer"):
        assert time.monotonic() < deadline, "the viewer did not start"
        time.sleep(0.05)
    height, width = page_data(path)["height"], page_data(path)["width"]
    page.evaluate("(() => { const s = document.getElementById('layer'); s.value = '1';"
                  " s.dispatchEvent(new Event('change')); })()")               # layer 'first': steps look at LOOKS
    before = page.evaluate(SNAPSHOT)
    assert before["word"] == 0 and before["on"] == "a"

    for i in (2, 4):
        box = page.evaluate(f"(() => {{ const r = document.querySelectorAll('.word')[{i}].getBoundingClientRect();"
                            " return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        page.click(*box)                                                # a real mouse click on the word
        after = page.evaluate(SNAPSHOT)
        assert after["word"] == i and after["on"] == WORDS[i] and WORDS[i] in after["status"]
        assert after["hash"] != before["hash"], "the displayed map did not change"
        r, c = divmod(LOOKS[i], 4)                                      # its peak is on the cell it looked at
        assert (after["peak"][0] * 4 // height, after["peak"][1] * 4 // width) == (r, c)
        before = after

    # what the page computes is what upsample() computes: same smoothing, same alignment
    field = np.asarray(page.evaluate("Array.from(attnhookViewer.field)"), np.float32).reshape(height, width)
    want = upsample(maps[4, 0].mean(0), Grid(4, 4), (height, width))
    np.testing.assert_allclose(field / field.max(), want / want.max(), atol=0.01)

    page.evaluate("(() => { const s = document.getElementById('head'); s.value = '2';"
                  " s.dispatchEvent(new Event('change')); })()")               # head 1 of layer 'first'
    head = page.evaluate(SNAPSHOT)
    assert head["hash"] != before["hash"] and "head 1" in head["status"] and "first" in head["status"]
