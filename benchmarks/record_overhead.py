"""Overhead of recording on a stock nn.TransformerDecoder captioner (plain PyTorch).

Greedy decoding of 20 tokens that reruns the prefix at every step (the usual captioning loop), batch 4,
14 x 14 = 196 image keys, d=256, 8 heads, 4 layers. Timed in one run, interleaved, median of repeats:
  baseline      no recording (MHA fast paths as torch leaves them)
  cross, last   recording the last layer's cross-attention
  all sites     recording every self- and cross-attention site
Prints time ratios against the baseline and the bytes each trace keeps. Not a test: machines are noisy,
compare the ratios, not the absolute times.

Run: python benchmarks/record_overhead.py
"""

import statistics
import time

import torch
from torch import nn

import attnhook as ah

torch.manual_seed(0)
torch.set_num_threads(max(1, torch.get_num_threads()))
D, HEADS, LAYERS, STEPS, BATCH = 256, 8, 4, 20, 4


class Captioner(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, D, 16, stride=16), nn.Flatten(2))
        self.embed = nn.Embedding(1000, D)
        layer = nn.TransformerDecoderLayer(D, HEADS, dim_feedforward=4 * D, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, LAYERS)
        self.head = nn.Linear(D, 1000)

    @torch.no_grad()
    def generate(self, image):
        memory = self.encoder(image).transpose(1, 2)
        tokens = torch.zeros(image.shape[0], 1, dtype=torch.long, device=image.device)
        for _ in range(STEPS):
            causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=image.device,
                                                                    dtype=image.dtype)
            h = self.decoder(self.embed(tokens), memory, tgt_mask=causal, tgt_is_causal=True)
            tokens = torch.cat([tokens, self.head(h[:, -1]).argmax(-1, keepdim=True)], 1)
        return tokens


def main(repeats=7):
    model = Captioner().eval()
    image = torch.rand(BATCH, 3, 224, 224)
    variants = {
        "baseline": lambda: None,
        "cross, last layer": lambda: ah.record(model, sites="cross", layers=-1),
        "all sites": lambda: ah.record(model, sites="all"),
    }
    times = {k: [] for k in variants}
    kept = {}
    reference = model.generate(image)
    for _ in range(repeats):
        for name, make in variants.items():
            ctx = make()
            start = time.perf_counter()
            if ctx is None:
                tokens = model.generate(image)
            else:
                with ctx as trace:
                    tokens = model.generate(image)
                kept[name] = trace.nbytes
            times[name].append(time.perf_counter() - start)
            assert torch.equal(tokens, reference), "recording changed the tokens"
    base = statistics.median(times["baseline"])
    print(f"stock TransformerDecoder captioner, {STEPS} tokens, batch {BATCH}, {LAYERS} layers, 196 keys")
    print(f"{'variant':<20}{'median s':>10}{'ratio':>8}{'kept':>12}")
    for name in variants:
        t = statistics.median(times[name])
        print(f"{name:<20}{t:>10.4f}{t / base:>8.3f}{kept.get(name, 0) / 2**10:>10.1f} KiB")


if __name__ == "__main__":
    main()
