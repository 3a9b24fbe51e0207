"""Two captioners as their authors wrote them, in Keras 3 (any backend), small and with random weights.

`Tutorial`: the image-captioning tutorial's transformer decoder. `CrossAttention` wraps
`keras.layers.MultiHeadAttention(..., return_attention_scores=True)` and keeps `last_attention_scores`; the image
is a 7 x 7 feature grid; `simple_gen` reruns the whole prefix each step.

`VitCaptioner`: a ViT-B/32-style patch encoder (32 x 32 patches and a CLS token) and a transformer decoder, written as
Layer subclasses whose own `MultiHeadAttention.call(v, k, q, mask)` returns `(output, attention_weights)` and whose
decoder layer returns both blocks' weights.
"""

import keras
import numpy as np
from keras import layers, ops

VOCAB, START, END = 12, 1, 2


# --- the tutorial --------------------------------------------------------------------------------------------
class SeqEmbedding(layers.Layer):
    def __init__(self, vocab_size, max_length, depth):
        super().__init__()
        self.pos_embedding = layers.Embedding(input_dim=max_length, output_dim=depth)
        self.token_embedding = layers.Embedding(input_dim=vocab_size, output_dim=depth, mask_zero=True)
        self.add = layers.Add()

    def call(self, seq):
        seq = self.token_embedding(seq)  # (batch, seq, depth)
        x = ops.arange(ops.shape(seq)[1])[None, :]
        x = ops.repeat(self.pos_embedding(x), ops.shape(seq)[0], axis=0)  # (batch, seq, depth)
        return self.add([seq, x])  # Add keeps the tokens' padding mask


class BaseAttention(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__()
        self.mha = layers.MultiHeadAttention(**kwargs)
        self.layernorm = layers.LayerNormalization()
        self.add = layers.Add()


class CausalSelfAttention(BaseAttention):
    def call(self, x):
        attn = self.mha(query=x, value=x, use_causal_mask=True)
        x = self.add([x, attn])
        return self.layernorm(x)


class CrossAttention(BaseAttention):
    def call(self, x, y, **kwargs):
        attn, attention_scores = self.mha(query=x, value=y, return_attention_scores=True)
        self.last_attention_scores = attention_scores
        x = self.add([x, attn])
        return self.layernorm(x)


class FeedForward(layers.Layer):
    def __init__(self, units, dropout_rate=0.1):
        super().__init__()
        self.seq = keras.Sequential([layers.Dense(units=2 * units, activation="relu"), layers.Dense(units=units),
                                     layers.Dropout(rate=dropout_rate)])
        self.layernorm = layers.LayerNormalization()

    def call(self, x):
        x = x + self.seq(x)
        return self.layernorm(x)


class DecoderLayer(layers.Layer):
    def __init__(self, units, num_heads=1, dropout_rate=0.1):
        super().__init__()
        self.self_attention = CausalSelfAttention(num_heads=num_heads, key_dim=units, dropout=dropout_rate)
        self.cross_attention = CrossAttention(num_heads=num_heads, key_dim=units, dropout=dropout_rate)
        self.ff = FeedForward(units=units, dropout_rate=dropout_rate)

    def call(self, inputs, training=False):
        in_seq, out_seq = inputs
        out_seq = self.self_attention(out_seq)
        out_seq = self.cross_attention(out_seq, in_seq)
        self.last_attention_scores = self.cross_attention.last_attention_scores
        return self.ff(out_seq)


class Tutorial(keras.Model):
    """images (batch, 28, 28, 3) -> a 7 x 7 feature grid -> 2 decoder layers of 16 units, 2 heads."""

    def __init__(self, units=16, num_layers=2, num_heads=2, max_length=12, seed=0):
        super().__init__()
        keras.utils.set_random_seed(seed)
        self.feature_extractor = keras.Sequential([layers.Conv2D(units, 4, strides=4), layers.Reshape((49, units))])
        self.seq_embedding = SeqEmbedding(vocab_size=VOCAB, depth=units, max_length=max_length)
        self.decoder_layers = [DecoderLayer(units, num_heads=num_heads, dropout_rate=0.1) for _ in range(num_layers)]
        self.output_layer = layers.Dense(units=VOCAB)

    def call(self, inputs):
        image, txt = inputs
        image = self.feature_extractor(image)  # (batch, 49, units): the tutorial's 'b h w c -> b (h w) c'
        txt = self.seq_embedding(txt)
        for dec_layer in self.decoder_layers:
            txt = dec_layer(inputs=(image, txt))
        return self.output_layer(txt)

    def simple_gen(self, image, max_len=6):
        """Greedy, rerunning the whole prefix each step, as the tutorial does; token 0 (padding) is banned."""
        tokens = np.full((image.shape[0], 1), START, dtype="int32")
        for _ in range(max_len):
            logits = ops.convert_to_numpy(self((image, tokens)))[:, -1]
            logits[:, 0] = -np.inf
            tokens = np.concatenate([tokens, logits.argmax(-1)[:, None].astype("int32")], axis=1)
        return tokens[:, 1:]

    def incremental_gen(self, image, max_len=6):
        """Greedy, one new query per step: each self-attention attends over the cached inputs of its layer."""
        feats = self.feature_extractor(image)
        tokens = np.full((image.shape[0], 1), START, dtype="int32")
        caches = [None] * len(self.decoder_layers)
        for t in range(max_len):
            x = self.seq_embedding.token_embedding(tokens[:, -1:])
            x = x + self.seq_embedding.pos_embedding(np.array([[t]], dtype="int32"))
            for i, dec in enumerate(self.decoder_layers):
                caches[i] = x if caches[i] is None else ops.concatenate([caches[i], x], axis=1)
                sa = dec.self_attention
                x = sa.layernorm(sa.add([x, sa.mha(query=x, value=caches[i])]))
                x = dec.ff(dec.cross_attention(x, feats))
            logits = ops.convert_to_numpy(self.output_layer(x))[:, -1]
            logits[:, 0] = -np.inf
            tokens = np.concatenate([tokens, logits.argmax(-1)[:, None].astype("int32")], axis=1)
        return tokens[:, 1:]


# --- a ViT-B/32-style captioner ------------------------------------------------------------------------------
class MultiHeadAttention(layers.Layer):
    """The authors' own attention: call(v, k, q, mask) -> (output, attention_weights (batch, heads, q, k))."""

    def __init__(self, d_model, num_heads):
        super().__init__()
        self.num_heads, self.d_model, self.depth = num_heads, d_model, d_model // num_heads
        self.wq, self.wk, self.wv = layers.Dense(d_model), layers.Dense(d_model), layers.Dense(d_model)
        self.dense = layers.Dense(d_model)

    def split_heads(self, x):
        b = ops.shape(x)[0]
        return ops.transpose(ops.reshape(x, (b, -1, self.num_heads, self.depth)), (0, 2, 1, 3))

    def call(self, v, k, q, mask=None):
        q, k, v = self.split_heads(self.wq(q)), self.split_heads(self.wk(k)), self.split_heads(self.wv(v))
        logits = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / np.sqrt(self.depth).astype("float32")
        if mask is not None:
            logits = logits + mask * -1e9
        attention_weights = ops.softmax(logits, axis=-1)
        out = ops.transpose(ops.matmul(attention_weights, v), (0, 2, 1, 3))
        out = ops.reshape(out, (ops.shape(out)[0], -1, self.d_model))
        return self.dense(out), attention_weights


class EncoderLayer(layers.Layer):
    def __init__(self, d_model, num_heads):
        super().__init__()
        self.mha = MultiHeadAttention(d_model, num_heads)
        self.ffn = layers.Dense(d_model, activation="relu")
        self.norm1, self.norm2 = layers.LayerNormalization(), layers.LayerNormalization()

    def call(self, x):
        attn, _ = self.mha(x, x, x)
        x = self.norm1(x + attn)
        return self.norm2(x + self.ffn(x))


class PatchEncoder(layers.Layer):
    """32 x 32 patches of a 128 x 128 image (a 4 x 4 grid), a CLS token in front: 17 keys."""

    def __init__(self, d_model, num_heads, num_layers=1, patch=32, image=128):
        super().__init__()
        self.projection = layers.Conv2D(d_model, patch, strides=patch)
        self.grid = image // patch
        self.cls = self.add_weight(shape=(1, 1, d_model), initializer="random_normal", name="cls")
        self.position = self.add_weight(shape=(1, self.grid ** 2 + 1, d_model), initializer="random_normal",
                                        name="position")
        self.enc_layers = [EncoderLayer(d_model, num_heads) for _ in range(num_layers)]

    def call(self, images):
        x = self.projection(images)
        x = ops.reshape(x, (ops.shape(x)[0], self.grid * self.grid, -1))
        cls = ops.broadcast_to(self.cls, (ops.shape(x)[0], 1, ops.shape(x)[-1]))
        x = ops.concatenate([cls, x], axis=1) + self.position
        for layer in self.enc_layers:
            x = layer(x)
        return x


class VitDecoderLayer(layers.Layer):
    def __init__(self, d_model, num_heads):
        super().__init__()
        self.mha1, self.mha2 = MultiHeadAttention(d_model, num_heads), MultiHeadAttention(d_model, num_heads)
        self.ffn = layers.Dense(d_model, activation="relu")
        self.norm1, self.norm2, self.norm3 = (layers.LayerNormalization() for _ in range(3))

    def call(self, x, enc_output, look_ahead_mask):
        attn1, attn_weights_block1 = self.mha1(x, x, x, look_ahead_mask)
        out1 = self.norm1(attn1 + x)
        attn2, attn_weights_block2 = self.mha2(enc_output, enc_output, out1)
        out2 = self.norm2(attn2 + out1)
        return self.norm3(out2 + self.ffn(out2)), attn_weights_block1, attn_weights_block2


class VitDecoder(layers.Layer):
    def __init__(self, d_model, num_heads, num_layers, max_length=16):
        super().__init__()
        self.embedding = layers.Embedding(VOCAB, d_model)
        self.pos = layers.Embedding(max_length, d_model)
        self.dec_layers = [VitDecoderLayer(d_model, num_heads) for _ in range(num_layers)]

    def call(self, tokens, enc_output):
        n = ops.shape(tokens)[1]
        x = self.embedding(tokens) + self.pos(ops.arange(n)[None])
        look_ahead = 1.0 - ops.tril(ops.ones((n, n)))
        weights = {}
        for i, layer in enumerate(self.dec_layers):
            x, block1, block2 = layer(x, enc_output, look_ahead)
            weights[f"decoder_layer{i + 1}_block1"] = block1
            weights[f"decoder_layer{i + 1}_block2"] = block2
        return x, weights


class VitCaptioner(keras.Model):
    def __init__(self, d_model=16, num_heads=4, num_layers=2, seed=1):
        super().__init__()
        keras.utils.set_random_seed(seed)
        self.encoder = PatchEncoder(d_model, num_heads)
        self.decoder = VitDecoder(d_model, num_heads, num_layers)
        self.final_layer = layers.Dense(VOCAB)

    def call(self, inputs):
        images, tokens = inputs
        x, weights = self.decoder(tokens, self.encoder(images))
        return self.final_layer(x), weights

    def evaluate_caption(self, images, max_len=5):
        """Greedy, rerunning the prefix; returns the tokens and the weights of the last call."""
        tokens = np.full((images.shape[0], 1), START, dtype="int32")
        for _ in range(max_len):
            logits, weights = self((images, tokens))
            nxt = ops.convert_to_numpy(logits)[:, -1].argmax(-1)
            tokens = np.concatenate([tokens, nxt[:, None].astype("int32")], axis=1)
        return tokens[:, 1:], weights
