"""Beam search in your own loop, as the Show, Attend and Tell tutorial writes it, followed with attnhook.

The loop keeps k hypotheses, drops the finished ones from the batch and reorders its state every step with
`prev_word_inds[incomplete_inds]`. attnhook records every live hypothesis at every step; the back-pointers the
loop already computes are all `attnhook.beams.follow()` needs to give each returned caption its rows.
Run: python examples/beam_loop.py
"""

import torch
from torch import nn

import attnhook as ah
from attnhook.beams import follow

torch.manual_seed(2)
VOCAB, BOS, END, KEYS, D, H = 10, 1, 2, 12, 16, 24


class Attention(nn.Module):  # additive attention: alpha = softmax(w . tanh(W f + U h))
    def __init__(self):
        super().__init__()
        self.f, self.h, self.w = nn.Linear(D, D), nn.Linear(H, D), nn.Linear(D, 1)

    def forward(self, feats, hidden):  # feats (B, K, D), hidden (B, H)
        alpha = self.w(torch.tanh(self.f(feats) + self.h(hidden)[:, None])).squeeze(-1).softmax(-1)
        return (alpha[..., None] * feats).sum(1), alpha


attention, embed, cell, head = Attention(), nn.Embedding(VOCAB, D), nn.LSTMCell(2 * D, H), nn.Linear(H, VOCAB)
with torch.no_grad():
    head.bias[END] += 0.3  # random weights: let some hypotheses finish early
decoder = nn.ModuleDict(dict(attention=attention, embed=embed, cell=cell, head=head))
ah.register(ah.AttentionSpec("additive", Attention, read=lambda call: call.output[1], kind="cross"))


def beam_search(feats, k=3, max_steps=6):
    feats = feats.expand(k, -1, -1)
    h = c = torch.zeros(k, H)
    prev, seqs, scores = torch.full((k,), BOS), torch.full((k, 1), BOS), torch.zeros(k, 1)
    done, ends, parents = [], [], []
    for step in range(max_steps):
        context, _ = attention(feats, h)
        h, c = cell(torch.cat([embed(prev), context], -1), (h, c))
        logp = scores + head(h).log_softmax(-1)
        top, words = (logp[0] if step == 0 else logp.view(-1)).topk(k)
        prev_word_inds, next_words = words // VOCAB, words % VOCAB
        seqs = torch.cat([seqs[prev_word_inds], next_words[:, None]], 1)
        last = step == max_steps - 1
        incomplete = [i for i, w in enumerate(next_words.tolist()) if w != END and not last]
        for i in sorted(set(range(len(next_words))) - set(incomplete)):
            done.append(seqs[i, 1:].tolist())
            ends.append((step, int(prev_word_inds[i])))  # the step and row that wrote the last token
        k = len(incomplete)
        if k == 0:
            break
        keep = prev_word_inds[incomplete]
        parents.append(keep)  # the back-pointers: row r of the next step continues row keep[r] of this one
        seqs, h, c, feats = seqs[incomplete], h[keep], c[keep], feats[keep]
        scores, prev = top[incomplete][:, None], next_words[incomplete]
    return done, ends, parents


feats = torch.randn(1, KEYS, D)  # one image: 3 x 4 grid features
with torch.no_grad(), ah.record(decoder) as trace:
    captions, ends, parents = beam_search(feats)

print("hypotheses alive at each step:", trace.batch_sizes("attention"))
picked = follow(trace, parents, ends=ends)
weights = picked.weights("attention")  # (returned, steps, heads, keys), zero after a caption ended
print("per returned caption:", weights.shape, "lengths", picked.meta["lengths"])

# check the longest caption against its teacher-forced replay: the same rows, one pass, no back-pointers
i = max(range(len(captions)), key=lambda j: len(captions[j]))
best = captions[i]
with torch.no_grad(), ah.record(decoder) as replay:
    h = c = torch.zeros(1, H)
    for token in [BOS] + best[:-1]:
        context, _ = attention(feats, h)
        h, c = cell(torch.cat([embed(torch.tensor([token])), context], -1), (h, c))
n = len(best)
torch.testing.assert_close(weights[i, :n], replay.weights("attention")[0])
print(f"caption {i} matches its teacher-forced replay over", n, "steps")
