"""Decoding loops as real captioning repositories write them, for the position tests (tests/test_loops.py).

Written from descriptions of those systems, none knows about attnhook: a fixed-slot template loop (CATR), a
meshed-memory decoder that calls its cross-attention once per encoder level, beam search in the user's own
loop (Show-Attend-Tell's tutorial; a GPT-2 prefix captioner's generate_beam), memory slots in an encoder
self-attention, and a layer that runs its cross-attention before its self-attention.
"""

from __future__ import annotations

import torch
from torch import nn

from captioners import BOS, VOCAB, ConvEncoder, LSTMCaptioner

END = 2


class Recorder:
    """A plain pre-hook, independent of attnhook: keeps each call's query, key and masks."""

    def __init__(self, module: nn.MultiheadAttention):
        self.calls: list[dict] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask"]
        seen = dict(zip(names, args))
        seen.update(kwargs)
        self.calls.append({k: seen.get(k) for k in ("query", "key", "attn_mask", "key_padding_mask")})

    def remove(self):
        self.handle.remove()


class TemplateCaptioner(nn.Module):
    """CATR pattern: the whole model reruns every step on a fixed-slot caption; unfilled slots are masked by
    the decoder self-attention's key padding mask (True = padding) and a causal mask; step i reads slot i.
    Sequence-first tensors, an encoder self-attention over the image features, as in DETR/CATR."""

    def __init__(self, d=32, heads=4, slots=24, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.slots = slots
        self.backbone = ConvEncoder(d)
        self.encoder = nn.TransformerEncoderLayer(d, heads, 64, dropout=0.0)
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(slots, 1, d) * 0.5)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, heads, 64, dropout=0.0), 2)
        self.head = nn.Linear(d, VOCAB)
        self.eval()

    def forward(self, images, caption, cap_mask):
        memory = self.encoder(self.backbone(images).transpose(0, 1))  # (K, B, d)
        x = self.embed(caption).transpose(0, 1) + self.pos
        causal = nn.Transformer.generate_square_subsequent_mask(self.slots)
        y = self.decoder(x, memory, tgt_mask=causal, tgt_key_padding_mask=cap_mask)
        return self.head(y.transpose(0, 1))  # (B, slots, vocab)

    @torch.no_grad()
    def caption(self, images, steps):
        batch = images.shape[0]
        caption = torch.zeros(batch, self.slots, dtype=torch.long)
        cap_mask = torch.ones(batch, self.slots, dtype=torch.bool)
        caption[:, 0], cap_mask[:, 0] = BOS, False
        for i in range(steps):
            predictions = self(images, caption, cap_mask)[:, i]
            caption[:, i + 1] = predictions.argmax(-1)
            cap_mask[:, i + 1] = False
        return caption[:, : steps + 1]


class MeshedLayer(nn.Module):
    """Meshed-memory decoder layer: cached self-attention, then one cross-attention module called once per
    encoder level with the same queries, the results mixed by learned gates."""

    def __init__(self, d, heads, levels):
        super().__init__()
        self.self_att = nn.MultiheadAttention(d, heads, batch_first=True)
        self.enc_att = nn.MultiheadAttention(d, heads, batch_first=True)
        self.gates = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(levels))
        self.norm = nn.LayerNorm(d)

    def forward(self, x, levels, cache):
        past = cache.get(id(self))
        keys = x if past is None else torch.cat([past, x], 1)
        cache[id(self)] = keys
        self_att = self.norm(x + self.self_att(x, keys, keys, need_weights=False)[0])
        mixed = 0
        for gate, memory in zip(self.gates, levels):
            attended = self.enc_att(self_att, memory, memory)[0]
            mixed = mixed + torch.sigmoid(gate(torch.cat([self_att, attended], -1))) * attended
        return self.norm(self_att + mixed / len(levels))


class MeshedCaptioner(nn.Module):
    def __init__(self, d=32, heads=4, levels=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = ConvEncoder(d)
        self.levels = nn.ModuleList(nn.Linear(d, d) for _ in range(levels))
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(32, d) * 0.5)
        self.layers = nn.ModuleList(MeshedLayer(d, heads, levels) for _ in range(2))
        self.head = nn.Linear(d, VOCAB)
        self.eval()

    def encode(self, images):
        f = self.encoder(images)
        return [torch.tanh(level(f)) for level in self.levels]

    @torch.no_grad()
    def greedy(self, images, steps):
        levels = self.encode(images)
        token = torch.full((images.shape[0], 1), BOS)
        tokens, cache = [token], {}
        for t in range(steps):
            x = self.embed(token) + self.pos[t]
            for layer in self.layers:
                x = layer(x, levels, cache)
            token = self.head(x)[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        return torch.cat(tokens, 1)


def sat_beam_search(model: LSTMCaptioner, image, k=3, max_steps=8):
    """The Show-Attend-Tell tutorial's beam search, for one image: k hypotheses from the start, finished
    ones leave the batch, the state is reordered with `prev_word_inds[incomplete_inds]` every step.

    Returns the completed sequences (tokens after BOS), their `ends` as (step, row) and the back-pointers."""
    feats, _ = model.start(image)
    feats = feats.expand(k, *feats.shape[1:])
    h = torch.zeros(k, model.hidden)
    c = torch.zeros(k, model.hidden)
    prev = torch.full((k,), BOS)
    seqs = torch.full((k, 1), BOS)
    scores = torch.zeros(k, 1)
    complete, ends, parents = [], [], []
    for step in range(max_steps):
        logits, (h, c) = model.step(feats, prev, (h, c))
        logp = scores + logits.log_softmax(-1)
        top, words = (logp[0] if step == 0 else logp.view(-1)).topk(k)
        prev_inds, next_words = words // VOCAB, words % VOCAB
        seqs = torch.cat([seqs[prev_inds], next_words[:, None]], 1)
        incomplete = [i for i, w in enumerate(next_words.tolist()) if w != END]
        for i in set(range(len(next_words))) - set(incomplete):
            complete.append(seqs[i, 1:].tolist())
            ends.append((step, int(prev_inds[i])))
        k -= len(next_words) - len(incomplete)
        if k == 0 or step == max_steps - 1:
            for i in incomplete:
                complete.append(seqs[i, 1:].tolist())
                ends.append((step, int(prev_inds[i])))
            break
        keep = prev_inds[incomplete]
        parents.append(keep)
        seqs, h, c, feats = seqs[incomplete], h[keep], c[keep], feats[keep]
        scores = top[incomplete][:, None]
        prev = next_words[incomplete]
    return complete, ends, parents


class PrefixCaptioner(nn.Module):
    """GPT-2 prefix captioner pattern: the image becomes `prefix` embeddings in front of the words; no cache,
    the whole sequence is recomputed every step; beam search expands one row to k after the first step and
    reorders `generated = generated[next_tokens_source]`."""

    def __init__(self, d=32, heads=4, prefix=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.prefix = prefix
        self.encoder = ConvEncoder(d)
        self.project = nn.Linear(d, prefix * d)
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(32, d) * 0.5)
        self.gpt = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, 64, dropout=0.0, batch_first=True), 2)
        self.head = nn.Linear(d, VOCAB)
        self.eval()

    def logits(self, embeds):
        n = embeds.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(n)
        return self.head(self.gpt(embeds + self.pos[:n], mask=causal, is_causal=True))[:, -1]

    def prefix_embeds(self, image):
        return self.project(self.encoder(image).mean(1)).unflatten(-1, (self.prefix, -1))

    @torch.no_grad()
    def generate_beam(self, image, k=3, steps=5):
        generated = self.prefix_embeds(image)  # (1, prefix, d)
        scores, tokens, parents = None, None, []
        for t in range(steps):
            logp = self.logits(generated).log_softmax(-1)
            if scores is None:
                scores, next_tokens = logp[0].topk(k)
                generated = generated.expand(k, *generated.shape[1:])
                tokens = next_tokens[:, None]
                parents.append(torch.zeros(k, dtype=torch.long))
            else:
                top, flat = (scores[:, None] + logp).view(-1).topk(k)
                source, next_tokens = flat // VOCAB, flat % VOCAB
                generated, tokens = generated[source], torch.cat([tokens[source], next_tokens[:, None]], 1)
                scores = top
                parents.append(source)
            generated = torch.cat([generated, self.embed(next_tokens)[:, None]], 1)
        # parents[t] reorders the rows of step t into step t + 1; the last one says which row of the last
        # step wrote each returned hypothesis's last token
        return tokens, parents[:-1], [(steps - 1, int(r)) for r in parents[-1]]


class SlotEncoderLayer(nn.Module):
    """Memory-augmented encoder self-attention: the keys are the grid features plus learned memory slots."""

    def __init__(self, d, heads, slots=4):
        super().__init__()
        self.slots = nn.Parameter(torch.randn(1, slots, d))
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        keys = torch.cat([x, self.slots.expand(x.shape[0], -1, -1)], 1)
        return x + self.self_attn(x, keys, keys)[0]


class SlotCaptioner(nn.Module):
    def __init__(self, d=32, heads=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = ConvEncoder(d)
        self.encoder = SlotEncoderLayer(d, heads)
        self.embed = nn.Embedding(VOCAB, d)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, heads, 64, 0.0, batch_first=True), 1)
        self.head = nn.Linear(d, VOCAB)
        self.eval()

    @torch.no_grad()
    def greedy(self, images, steps):
        memory = self.encoder(self.backbone(images))
        tokens = torch.full((images.shape[0], 1), BOS)
        for _ in range(steps):
            causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
            y = self.decoder(self.embed(tokens), memory, tgt_mask=causal, tgt_is_causal=True)
            tokens = torch.cat([tokens, self.head(y[:, -1]).argmax(-1, keepdim=True)], 1)
        return tokens


class CrossFirstLayer(nn.Module):
    """Gated cross-attention before the layer's self-attention (Idefics v1 order), with a KV cache."""

    def __init__(self, d, heads):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.gate = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, memory, cache):
        x = x + torch.tanh(self.gate) * self.cross_attn(x, memory, memory)[0]
        past = cache.get(id(self))
        keys = x if past is None else torch.cat([past, x], 1)
        cache[id(self)] = keys
        return x + self.self_attn(x, keys, keys)[0]


class CrossFirstCaptioner(nn.Module):
    def __init__(self, d=32, heads=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = ConvEncoder(d)
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(32, d) * 0.5)
        self.layers = nn.ModuleList(CrossFirstLayer(d, heads) for _ in range(2))
        self.head = nn.Linear(d, VOCAB)
        self.eval()

    @torch.no_grad()
    def greedy(self, images, steps, prompt=3):
        memory = self.encoder(images)
        tokens = torch.full((images.shape[0], prompt), BOS)
        x, cache = self.embed(tokens) + self.pos[:prompt], {}
        for t in range(steps):
            for layer in self.layers:
                x = layer(x, memory, cache)
            token = self.head(x[:, -1]).argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, token], 1)
            x = self.embed(token) + self.pos[tokens.shape[1] - 1]
        return tokens
