"""Record where a plain-PyTorch captioner looks, word by word.

The captioner below is written the way many captioning repositories write one: a convolutional encoder
turns the image into a grid of keys, a stock `nn.TransformerDecoder` writes tokens, and greedy decoding
reruns the whole prefix at every step. attnhook knows nothing about it; `record()` finds the decoder's
cross-attention, forces per-head weights out of it (the decoder layers ask for `need_weights=False`),
and keeps one row per generated token.

Run: python examples/record_decoder.py
"""

import torch
from torch import nn

import attnhook as ah

torch.manual_seed(0)
D, VOCAB, BOS = 64, 10, 1


class Captioner(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, D, 8, stride=8), nn.Flatten(2))  # (B, D, rows*cols)
        self.embed = nn.Embedding(VOCAB, D)
        layer = nn.TransformerDecoderLayer(D, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers=2)
        self.head = nn.Linear(D, VOCAB)

    @torch.no_grad()
    def generate(self, image, steps=8):
        memory = self.encoder(image).transpose(1, 2)  # (B, keys, D)
        tokens = torch.full((image.shape[0], 1), BOS)
        for _ in range(steps):
            causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
            hidden = self.decoder(self.embed(tokens), memory, tgt_mask=causal, tgt_is_causal=True)
            tokens = torch.cat([tokens, self.head(hidden[:, -1]).argmax(-1, keepdim=True)], dim=1)
        return tokens


model = Captioner().eval()
image = torch.rand(1, 3, 48, 64)  # 6 x 8 grid of 8-pixel patches

for site in ah.find_attention(model):
    print("found", site)

with ah.record(model, sites="cross", layers=-1) as trace:
    tokens = model.generate(image)

site = trace.sites[0]
weights = trace.weights(site)  # (batch, steps, heads, keys)
print(f"\nrecorded {site.name}: weights {tuple(weights.shape)} = (batch, steps, heads, keys), {trace.nbytes} bytes")
mean = weights[0].mean(1)  # (steps, keys), heads averaged
for step, token in enumerate(tokens[0, 1:].tolist()):
    row, col = divmod(int(mean[step].argmax()), 8)
    print(f"token {step + 1} (id {token}): produced by row {step}, looked most at patch row {row}, col {col}"
          f" (weight {mean[step].max():.3f})")
assert weights.shape == (1, 8, 4, 48)
