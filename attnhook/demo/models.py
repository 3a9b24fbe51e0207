"""Two tiny shapes-world captioners, written the way captioning repositories write them.

`TransformerCaptioner`: a convolutional encoder turns the image into a grid of keys, one per 8 x 8 pixel cell,
with a 2D sine position embedding that fits any grid; a stock `nn.TransformerDecoder` writes the caption,
greedily, recomputing the whole prefix under a causal mask at every step.

`ShowAttendTell`: the same kind of encoder on a finer grid (one key per 4 x 4 cell), and an LSTM decoder that
attends over it with additive attention (`AdditiveAttention`, which returns `(context, alpha)`), one step at a
time. attnhook records it through the `AttentionSpec` registered below.

Neither encoder mixes cells beyond a small receptive field (no encoder self-attention): each key describes
its own part of the image. Images go in as `(batch, 3, H, W)` floats in [0, 1], or anything `to_tensor()`
takes; H and W must be multiples of the model's cell (`model.grid(size)` says so if not).
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch
from torch import nn

from ..grid import Grid
from ..registry import AttentionSpec, register
from .shapes import COLORS, SHAPES, DemoError

SPECIALS = ("<pad>", "<bos>", "<eos>")
VOCAB = SPECIALS + ("a", "and") + tuple(COLORS) + SHAPES
PAD, BOS, EOS = 0, 1, 2
MAX_LEN = 12  # tokens after <bos>: three objects (11 words) and <eos>


def to_tensor(images) -> torch.Tensor:
    """Images as one `(batch, 3, H, W)` float tensor in [0, 1].

    Takes a `(batch, H, W, 3)` uint8 array, a list of `(H, W, 3)` uint8 arrays or `Scene`s of one size, or a
    `(batch, 3, H, W)` float tensor (returned as is).

    Example:
        >>> from attnhook.demo.shapes import make_images
        >>> to_tensor(make_images(2, size=(64, 96))).shape
        torch.Size([2, 3, 64, 96])
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise DemoError(f"Expected a (batch, 3, H, W) float tensor, got {images.dtype} {tuple(images.shape)}. "
                            "Pass (batch, H, W, 3) uint8 arrays to have them converted.")
        return images
    if isinstance(images, (list, tuple)):
        images = [getattr(i, "image", i) for i in images]
        if len({np.shape(i) for i in images}) != 1:
            raise DemoError(f"All images of a batch must have one size, got {sorted({np.shape(i) for i in images})}. "
                            "Caption each size as its own batch.")
        images = np.stack(images)
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise DemoError(f"Expected (batch, H, W, 3) uint8 images, got {array.dtype} {array.shape}. "
                        "Add a batch axis with images[None] for a single image.")
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255


def encode_captions(captions: list[str], length: int = MAX_LEN + 1) -> torch.Tensor:
    """Captions as `(batch, length)` token ids: `<bos>`, the words, `<eos>`, then `<pad>`.

    Example:
        >>> encode_captions(["a red circle"], length=6)
        tensor([[ 1,  3,  5, 10,  2,  0]])
    """
    ids = torch.full((len(captions), length), PAD)
    for i, caption in enumerate(captions):
        words = caption.split()
        unknown = [w for w in words if w not in VOCAB[len(SPECIALS):]]
        if unknown or len(words) + 2 > length:
            raise DemoError(f"Caption {caption!r} cannot be encoded: unknown words {unknown} or more than "
                            f"{length - 2} words. The vocabulary is {list(VOCAB[len(SPECIALS):])}.")
        ids[i, :len(words) + 2] = torch.tensor([BOS] + [VOCAB.index(w) for w in words] + [EOS])
    return ids


def decode_tokens(tokens: torch.Tensor) -> list[str]:
    """Token ids `(batch, steps)` back to captions, stopping at `<eos>`; `<bos>` and `<pad>` are skipped.

    Example:
        >>> decode_tokens(torch.tensor([[1, 3, 5, 10, 2, 3]]))
        ['a red circle']
    """
    captions = []
    for row in tokens.tolist():
        words = []
        for t in row:
            if t == EOS:
                break
            if t not in (BOS, PAD):
                words.append(VOCAB[t])
        captions.append(" ".join(words))
    return captions


def position_embedding(rows: int, cols: int, dim: int) -> torch.Tensor:
    """2D sine position embedding `(rows * cols, dim)`, row-major: half the channels encode the row, half the
    column, so it is defined for any grid.

    Example:
        >>> position_embedding(8, 12, 64).shape
        torch.Size([96, 64])
    """
    quarter = dim // 4
    freq = torch.exp(-math.log(100.0) * torch.arange(quarter) / quarter)  # periods from 2*pi to ~600 cells

    def sines(n: int) -> torch.Tensor:
        angle = torch.arange(n, dtype=torch.float32)[:, None] * freq
        return torch.cat([angle.sin(), angle.cos()], dim=1)  # (n, dim / 2)

    r, c = sines(rows), sines(cols)
    return torch.cat([r[:, None].expand(rows, cols, -1), c[None].expand(rows, cols, -1)], -1).reshape(rows * cols, dim)


class ConvEncoder(nn.Module):
    """Image `(B, 3, H, W)` -> keys `(B, H/stride * W/stride, dim)`, row-major, one per `stride` x `stride` cell.

    Stride-2 4 x 4 convolutions (padding 1) down to `stride`, then `reach` 3 x 3 convolutions, then a 1 x 1
    projection: key (r, c) sees a square centered on its cell's center, `3 * stride - 2 + 2 * stride * reach`
    pixels wide (22 for stride 8, 18 for stride 4 with reach 1). Odd stride-2 kernels would center it on the
    cell's top-left corner, half a cell off the grid the maps are drawn on. Then the 2D sine position
    embedding. Nothing mixes cells beyond the receptive field.
    """

    def __init__(self, dim: int = 64, width: int = 48, stride: int = 8, reach: int = 0):
        super().__init__()
        if stride not in (2, 4, 8, 16):
            raise DemoError(f"stride must be 2, 4, 8 or 16 pixels, got {stride!r}.")
        downs = stride.bit_length() - 1
        channels = [3, width // 2] + [width] * (downs - 1)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.GELU()]
        for _ in range(reach):
            layers += [nn.Conv2d(width, width, 3, 1, 1), nn.GELU()]
        self.convs = nn.Sequential(*layers, nn.Conv2d(width, dim, 1))
        self.dim, self.stride = dim, stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.convs(images - 0.5)  # (B, dim, rows, cols)
        rows, cols = features.shape[-2:]
        keys = features.flatten(2).transpose(1, 2)  # (B, rows * cols, dim)
        return keys + position_embedding(rows, cols, self.dim).to(keys)

    def grid(self, image_size: tuple[int, int]) -> Grid:
        """Where the keys lie on an image of `image_size = (height, width)`."""
        height, width = image_size
        step = self.stride
        if height % step or width % step:
            raise DemoError(f"This demo model takes images whose sides are multiples of {step} pixels, got "
                            f"{height} x {width}. Crop or resize the image.")
        return Grid(height // step, width // step, rule=f"demo encoder: one key per {step} x {step} pixel cell")


class _Captioner(nn.Module):
    """What both demo models share: `caption()`, `grid()`, and the vocabulary."""

    vocab = VOCAB
    encoder: ConvEncoder

    def grid(self, image_size: tuple[int, int]) -> Grid:
        """The key grid for an image of `image_size = (height, width)`.

        Example:
            >>> TransformerCaptioner().grid((64, 96))
            Grid(rows=8, cols=12, prefix=0, suffix=0, rule='demo encoder: one key per 8 x 8 pixel cell', box=None)
        """
        return self.encoder.grid((image_size[0], image_size[1]))

    def generate(self, images: torch.Tensor, max_len: int = MAX_LEN) -> torch.Tensor:
        """Greedy token ids `(B, 1 + steps)`: each model's own decoding loop."""
        raise NotImplementedError

    @torch.no_grad()
    def caption(self, images, max_len: int = MAX_LEN) -> list[str]:
        """Greedy captions for a batch of images of one size (see `to_tensor()` for what images can be)."""
        images = to_tensor(images)
        self.grid((images.shape[-2], images.shape[-1]))
        return decode_tokens(self.generate(images, max_len))


class TransformerCaptioner(_Captioner):
    """Conv encoder + `nn.TransformerDecoder`; greedy decoding recomputes the whole prefix every step.

    Example:
        >>> from attnhook.demo.shapes import make_images
        >>> model = TransformerCaptioner().eval()                 # untrained
        >>> images = to_tensor(make_images(2, size=(64, 96)))
        >>> tokens = encode_captions(["a red circle", "a blue square"])
        >>> model(images, tokens[:, :-1]).shape                   # (batch, steps, vocab)
        torch.Size([2, 12, 13])
        >>> len(model.caption(images))
        2
    """

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, ff: int = 128, width: int = 48,
                 stride: int = 8, reach: int = 0):
        super().__init__()
        self.config = dict(dim=dim, heads=heads, layers=layers, ff=ff, width=width, stride=stride, reach=reach)
        self.encoder = ConvEncoder(dim, width, stride, reach)
        self.embed = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(torch.randn(MAX_LEN + 1, dim) * 0.1)
        layer = nn.TransformerDecoderLayer(dim, heads, ff, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.head = nn.Linear(dim, len(VOCAB))

    def decode(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits `(B, L, vocab)` for the tokens `(B, L)` given the encoder keys `(B, K, dim)`, causally."""
        length = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:length]
        causal = nn.Transformer.generate_square_subsequent_mask(length)
        return self.head(self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits `(B, L, vocab)`; row i predicts token i + 1."""
        return self.decode(self.encoder(images), tokens)

    def generate(self, images: torch.Tensor, max_len: int = MAX_LEN) -> torch.Tensor:
        """Greedy token ids `(B, 1 + steps)`, starting with `<bos>`; stops when every row has written `<eos>`."""
        memory = self.encoder(images)
        tokens = torch.full((images.shape[0], 1), BOS)
        done = torch.zeros(images.shape[0], dtype=torch.bool)
        for _ in range(max_len):
            nxt = self.decode(memory, tokens)[:, -1].argmax(-1)
            nxt = torch.where(done, PAD, nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if done.all():
                break
        return tokens


class AdditiveAttention(nn.Module):
    """Bahdanau attention over the image keys: `forward(keys (B, K, d), hidden (B, h)) -> (context (B, d),
    alpha (B, K))`, alpha a softmax over the keys.

    `projected`, the keys through `self.keys`, can be passed in by a caller that attends to the same keys at
    every step, to project them once.
    """

    def __init__(self, key_dim: int, hidden_dim: int, att_dim: int):
        super().__init__()
        self.keys = nn.Linear(key_dim, att_dim)
        self.query = nn.Linear(hidden_dim, att_dim)
        self.score = nn.Linear(att_dim, 1)

    def forward(self, keys: torch.Tensor, hidden: torch.Tensor, projected: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if projected is None:
            projected = self.keys(keys)
        scores = self.score(torch.tanh(projected + self.query(hidden)[:, None])).squeeze(-1)
        alpha = scores.softmax(-1)
        return (alpha[..., None] * keys).sum(1), alpha


ADDITIVE = register(AttentionSpec(
    name="demo.AdditiveAttention",
    match=AdditiveAttention,
    read=lambda call: call.output[1],  # alpha (B, K): one head, one query
    kind="cross",
    heads=lambda module: 1,
))


class AttendStep(nn.Module):
    """One decoding step of the Show-Attend-Tell decoder.

    Attend over the keys with the previous hidden state; feed the LSTM cell the previous word and *where* it
    looked (the position embedding averaged under the attention); score the next word from the new hidden
    state and *what* it saw (the context). Xu et al. feed the context itself to the LSTM; then the state
    carries what the color step saw into the shape step, whose attention is free to look anywhere (measured
    on variants of that design and initialisation seeds: 1% to 73% of shape words pointed inside their
    object; see docs/demo.md).
    """

    def __init__(self, dim: int, hidden: int, embed: int):
        super().__init__()
        self.attention = AdditiveAttention(dim, hidden, hidden)
        self.lstm = nn.LSTMCell(embed + dim, hidden)
        self.out = nn.Linear(hidden + dim, len(VOCAB))

    def forward(self, keys, word, state, places, projected=None):
        """keys `(B, K, dim)`, word `(B, embed)`, state `(h, c)`, places `(K, dim)` -> logits `(B, vocab)`,
        new state, alpha `(B, K)`."""
        context, alpha = self.attention(keys, state[0], projected)
        h, c = self.lstm(torch.cat([word, alpha @ places], -1), state)
        return self.out(torch.cat([h, context], -1)), (h, c), alpha


class ShowAttendTell(_Captioner):
    """Conv encoder + LSTM decoder with additive attention, one step per token.

    The decoder is a stack of one step module (`layers.0`), so layer selectors such as `layers=-1` pick its
    attention like any decoder layer. Its attention has no query axis: record one decoding run per
    `attnhook.record()` block, or call `trace.new_sequence()` between runs.

    Example:
        >>> from attnhook.demo.shapes import make_images
        >>> model = ShowAttendTell().eval()                      # untrained
        >>> images = to_tensor(make_images(2, size=(96, 64)))
        >>> tokens = encode_captions(["a red circle", "a blue square"])
        >>> model(images, tokens[:, :-1]).shape                   # (batch, steps, vocab)
        torch.Size([2, 12, 13])
        >>> model.grid((96, 64)).rows, model.grid((96, 64)).cols  # one key per 4 x 4 pixel cell
        (24, 16)
    """

    def __init__(self, dim: int = 64, hidden: int = 128, embed: int = 32, width: int = 48,
                 stride: int = 4, reach: int = 1):
        super().__init__()
        self.config = dict(dim=dim, hidden=hidden, embed=embed, width=width, stride=stride, reach=reach)
        self.encoder = ConvEncoder(dim, width, stride, reach)
        self.embed = nn.Embedding(len(VOCAB), embed)
        self.init_h = nn.Linear(dim, hidden)
        self.init_c = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList([AttendStep(dim, hidden, embed)])

    def _start(self, images):
        keys = self.encoder(images)
        grid = self.grid(tuple(images.shape[-2:]))
        places = position_embedding(grid.rows, grid.cols, self.encoder.dim)
        mean = keys.mean(1)
        state = torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))
        step = cast(AttendStep, self.layers[0])
        return keys, places, step.attention.keys(keys), state

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits `(B, L, vocab)`; step i reads token i and predicts token i + 1."""
        keys, places, projected, state = self._start(images)
        logits = []
        for word in self.embed(tokens).unbind(1):
            out, state, _ = self.layers[0](keys, word, state, places, projected)
            logits.append(out)
        return torch.stack(logits, 1)

    def generate(self, images: torch.Tensor, max_len: int = MAX_LEN) -> torch.Tensor:
        """Greedy token ids `(B, 1 + steps)`, starting with `<bos>`; stops when every row has written `<eos>`."""
        keys, places, projected, state = self._start(images)
        tokens = torch.full((images.shape[0], 1), BOS)
        done = torch.zeros(images.shape[0], dtype=torch.bool)
        for _ in range(max_len):
            out, state, _ = self.layers[0](keys, self.embed(tokens[:, -1]), state, places, projected)
            nxt = torch.where(done, PAD, out.argmax(-1))
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if done.all():
                break
        return tokens


MODELS = {"transformer": TransformerCaptioner, "sat": ShowAttendTell}
