"""Small captioners written the way captioning repositories write them, for the recording tests.

None of them knows about attnhook. Each has an image encoder producing a grid of keys and a decoder that
writes tokens; random weights are enough, since the tests compare recorded weights against independent
recomputations rather than against trained behaviour.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BOS, VOCAB = 1, 12


class ConvEncoder(nn.Module):
    """Three stride-2 convolutions: a (B, 3, H, W) image becomes a (B, H/8 * W/8, d) grid of keys."""

    def __init__(self, d: int):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(3, d, 3, 2, 1), nn.ReLU(), nn.Conv2d(d, d, 3, 2, 1), nn.ReLU(),
                                   nn.Conv2d(d, d, 3, 2, 1))
        self.rows = nn.Parameter(torch.randn(16, d) * 0.5)
        self.cols = nn.Parameter(torch.randn(16, d) * 0.5)

    def forward(self, images):
        f = self.convs(images)  # (B, d, h, w)
        h, w = f.shape[-2:]
        f = f + (self.rows[:h, None] + self.cols[None, :w]).permute(2, 0, 1)
        return f.flatten(2).transpose(1, 2)  # (B, h*w, d)


class TransformerCaptioner(nn.Module):
    """Conv encoder + stock nn.TransformerDecoder; greedy decoding recomputes the whole prefix each step."""

    def __init__(self, d=32, heads=4, layers=2, batch_first=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.batch_first = batch_first
        self.encoder = ConvEncoder(d)
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(32, d) * 0.5)
        layer = nn.TransformerDecoderLayer(d, heads, dim_feedforward=64, dropout=0.0, batch_first=batch_first)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.head = nn.Linear(d, VOCAB)
        self.eval()

    def encode(self, images):
        memory = self.encoder(images)
        return memory if self.batch_first else memory.transpose(0, 1)

    def logits(self, tokens, memory, memory_key_padding_mask=None):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        if not self.batch_first:
            x = x.transpose(0, 1)
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        y = self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True,
                         memory_key_padding_mask=memory_key_padding_mask)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y)

    @torch.no_grad()
    def greedy(self, images, steps=6, memory_key_padding_mask=None):
        """Returns tokens (B, 1 + steps) and the logits of each step (B, steps, vocab)."""
        memory = self.encode(images)
        tokens = torch.full((images.shape[0], 1), BOS)
        out = []
        for _ in range(steps):
            logits = self.logits(tokens, memory, memory_key_padding_mask)[:, -1]
            out.append(logits)
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
        return tokens, torch.stack(out, 1)


class DetrStyleLayer(nn.Module):
    """A hand-written decoder layer in the DETR pattern: positional embeddings added to queries and keys,
    attention called with the default (head-averaged) weights and `[0]`. The attribute names do not say which
    attention is which, so attnhook has to decide from the call."""

    def __init__(self, d, heads):
        super().__init__()
        self.attn_a = nn.MultiheadAttention(d, heads, batch_first=True)
        self.attn_b = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, x, memory, pos, query_pos, cache=None):
        q = k = x + query_pos
        if cache is not None:  # incremental decoding: keys and values are the cached prefix plus the new ones
            past = cache.get(id(self))
            k, v = (q, x) if past is None else (torch.cat([past[0], q], 1), torch.cat([past[1], x], 1))
            cache[id(self)] = k, v
            x = self.norm1(x + self.attn_a(q, k, value=v)[0])
        else:
            causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            x = self.norm1(x + self.attn_a(q, k, value=x, attn_mask=causal)[0])
        x = self.norm2(x + self.attn_b(query=x + query_pos, key=memory + pos, value=memory)[0])
        return x + self.ff(x)


class DetrStyleCaptioner(nn.Module):
    """Hand-written layers with a key/value cache: decoding feeds one token per step."""

    def __init__(self, d=32, heads=4, layers=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = ConvEncoder(d)
        self.embed = nn.Embedding(VOCAB, d)
        self.query_pos = nn.Parameter(torch.randn(32, d) * 0.5)
        self.layers = nn.ModuleList(DetrStyleLayer(d, heads) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB)
        self.eval()

    def logits(self, tokens, memory, start=0, cache=None):
        x = self.embed(tokens)
        qp = self.query_pos[start: start + tokens.shape[1]]
        pos = torch.zeros_like(memory)
        for layer in self.layers:
            x = layer(x, memory, pos, qp, cache)
        return self.head(x)

    @torch.no_grad()
    def greedy(self, images, steps=6):
        """Incremental decoding with a cache: one query per call."""
        memory = self.encoder(images)
        tokens = torch.full((images.shape[0], 1), BOS)
        cache, out = {}, []
        for t in range(steps):
            logits = self.logits(tokens[:, -1:], memory, start=t, cache=cache)[:, -1]
            out.append(logits)
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
        return tokens, torch.stack(out, 1)


class AdditiveAttention(nn.Module):
    """Show, Attend and Tell attention: alpha = softmax(w . tanh(W_f f + W_h h))."""

    def __init__(self, d, hidden):
        super().__init__()
        self.feat, self.hid, self.score = nn.Linear(d, d), nn.Linear(hidden, d), nn.Linear(d, 1)

    def forward(self, feats, hidden):
        alpha = self.score(torch.tanh(self.feat(feats) + self.hid(hidden)[:, None])).squeeze(-1).softmax(-1)
        return (alpha[..., None] * feats).sum(1), alpha  # (B, d), (B, K)


class LSTMCaptioner(nn.Module):
    """CNN + LSTM with additive attention, one attention call per generated word."""

    def __init__(self, d=32, hidden=48, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = ConvEncoder(d)
        self.embed = nn.Embedding(VOCAB, d)
        self.attention = AdditiveAttention(d, hidden)
        self.cell = nn.LSTMCell(2 * d, hidden)
        self.head = nn.Linear(hidden, VOCAB)
        self.hidden = hidden
        self.eval()

    def step(self, feats, token, state):
        h, c = state
        context, _ = self.attention(feats, h)
        h, c = self.cell(torch.cat([self.embed(token), context], -1), (h, c))
        return self.head(h), (h, c)

    def start(self, images):
        feats = self.encoder(images)
        zeros = feats.new_zeros(feats.shape[0], self.hidden)
        return feats, (zeros, zeros.clone())

    @torch.no_grad()
    def greedy(self, images, steps=6):
        feats, state = self.start(images)
        token = torch.full((images.shape[0],), BOS)
        tokens, out = [token], []
        for _ in range(steps):
            logits, state = self.step(feats, token, state)
            token = logits.argmax(-1)
            tokens.append(token)
            out.append(logits)
        return torch.stack(tokens, 1), torch.stack(out, 1)

    @torch.no_grad()
    def teacher_forced(self, images, tokens):
        feats, state = self.start(images)
        out = []
        for t in range(tokens.shape[1]):
            logits, state = self.step(feats, tokens[:, t], state)
            out.append(logits)
        return torch.stack(out, 1)


def images(batch=2, size=(32, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *size, generator=g)


def mha_weights(mha: nn.MultiheadAttention, query, key, attn_mask=None, key_padding_mask=None):
    """Per-head softmax(QK^T / sqrt(d) + mask), computed from the module's projections, (B, H, L, S)."""
    if not mha.batch_first and query.dim() == 3:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    d, h = mha.embed_dim, mha.num_heads
    wq, wk = mha.in_proj_weight[:d], mha.in_proj_weight[d: 2 * d]
    bq, bk = mha.in_proj_bias[:d], mha.in_proj_bias[d: 2 * d]
    q = (query @ wq.T + bq).unflatten(-1, (h, d // h)).transpose(1, 2)
    k = (key @ wk.T + bk).unflatten(-1, (h, d // h)).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
    if attn_mask is not None:
        scores = scores + attn_mask
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None], float("-inf"))
    return scores.softmax(-1)


def additive_weights(att: AdditiveAttention, feats, hidden):
    return (att.score.weight @ torch.tanh(att.feat(feats) + att.hid(hidden)[:, None]).transpose(1, 2)
            + att.score.bias[:, None]).squeeze(1).softmax(-1)
