"""GPT-2 inference in NumPy, written to be read top to bottom.

Every function takes its own weights by the names the checkpoint uses, so `**block` unpacking wires the whole
model and the params dict is the call tree. Shapes are commented where they change; n_seq is the number of
positions, and any leading batch axes ride along untouched.
"""
import math
import sys

import fire
import numpy as np


def gelu(x):
    # GPT-2 was trained with the tanh approximation of GELU. The constants are Python floats: a NumPy float64
    # scalar here would silently promote every activation to float64. x * x * x rather than x**3: NumPy
    # computes the power with a general pow() per element, 100x slower.
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)  # shifting by the max keeps exp from overflowing
    # The rest works in place: for a long prompt, x is the attention scores, the largest array in the model,
    # and a fresh array of that size costs more in page faults than the arithmetic itself.
    np.exp(x, out=x)
    x /= np.sum(x, axis=-1, keepdims=True)
    return x


def layer_norm(x, g, b, eps=1e-5):
    mean = np.mean(x, axis=-1, keepdims=True)
    variance = np.var(x, axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(variance + eps) + b  # normalize each position, then scale and shift


def linear(x, w, b):  # [n_seq, n_in] -> [n_seq, n_out]
    return x @ w + b


def ffn(x, c_fc, c_proj):  # [n_seq, n_embd] -> [n_seq, n_embd]
    h = gelu(linear(x, **c_fc))  # [n_seq, n_embd] -> [n_seq, 4*n_embd]
    return linear(h, **c_proj)  # [n_seq, 4*n_embd] -> [n_seq, n_embd]


def causal_mask(n_q, n_k):  # -> [n_q, n_k]
    # The n_q queries are the last n_q of the n_k positions; each may look at itself and everything before it.
    # -1e10 rather than -inf: exp() turns it into an exact 0 without ever producing inf - inf = nan.
    return np.triu(np.full((n_q, n_k), -1e10, dtype=np.float32), k=n_k - n_q + 1)


def attention(q, k, v):  # [n_head, n_q, d_head], [n_head, n_k, d_head] x2 -> [n_head, n_q, d_head]
    scores = q @ k.swapaxes(-1, -2)  # -> [n_head, n_q, n_k]
    scores /= math.sqrt(q.shape[-1])  # in place, like softmax
    scores += causal_mask(q.shape[-2], k.shape[-2])
    return softmax(scores) @ v


def split_heads(x, n_head):  # [n_seq, n_embd] -> [n_head, n_seq, n_embd/n_head]
    return x.reshape(*x.shape[:-1], n_head, -1).swapaxes(-3, -2)


def merge_heads(x):  # [n_head, n_seq, d_head] -> [n_seq, n_head*d_head]
    x = x.swapaxes(-3, -2)
    return x.reshape(*x.shape[:-2], -1)


class KVCache:
    """One block's keys and values for every position seen so far, in buffers allocated once.

    This is openai/gpt-2's `past`/`present` without the concatenation: each step writes its new positions in
    place, so a step costs only its own positions and the history is never copied.
    """

    def __init__(self, shape):  # [..., n_head, capacity, d_head]
        self.keys = np.empty(shape, dtype=np.float32)
        self.values = np.empty(shape, dtype=np.float32)
        self.length = 0  # how many positions are filled

    def append(self, k, v):  # 2 x [n_head, n_new, d_head] -> 2 x [n_head, length, d_head]
        start, self.length = self.length, self.length + k.shape[-2]
        if self.length > self.keys.shape[-2]:
            raise ValueError(f"KV cache holds {self.keys.shape[-2]} positions, {self.length} were asked for")
        self.keys[..., start:self.length, :] = k
        self.values[..., start:self.length, :] = v
        return self.keys[..., :self.length, :], self.values[..., :self.length, :]


def mha(x, c_attn, c_proj, n_head, cache=None):  # [n_seq, n_embd] -> [n_seq, n_embd]
    qkv = linear(x, **c_attn)  # [n_seq, n_embd] -> [n_seq, 3*n_embd]
    q, k, v = (split_heads(t, n_head) for t in np.split(qkv, 3, axis=-1))  # -> 3 x [n_head, n_seq, d_head]
    if cache is not None:
        k, v = cache.append(k, v)  # the new positions attend to every earlier one too: -> [n_head, length, d_head]
    heads = attention(q, k, v)  # all heads in one batched matmul
    return linear(merge_heads(heads), **c_proj)  # [n_head, n_seq, d_head] -> [n_seq, n_embd]


def transformer_block(x, mlp, attn, ln_1, ln_2, n_head, cache=None):  # [n_seq, n_embd] -> [n_seq, n_embd]
    # Pre-norm residual blocks: each sublayer reads a normalized copy and adds its result back.
    x = x + mha(layer_norm(x, **ln_1), **attn, n_head=n_head, cache=cache)
    x = x + ffn(layer_norm(x, **ln_2), **mlp)
    return x


def gpt2(inputs, wte, wpe, blocks, ln_f, n_head, kv_cache=None, last_only=False):  # [n_seq] -> [n_seq, n_vocab]
    """Logits for every position of inputs.

    kv_cache: optional list of one KVCache per block. With it, inputs are only the positions the caches have
    not seen yet; each call appends their keys and values, so generating a token costs one position's work.
    last_only: return only the last position's logits ([1, n_vocab]), all that generation needs.
    """
    inputs = np.asarray(inputs)
    start = kv_cache[0].length if kv_cache else 0
    positions = np.arange(start, start + inputs.shape[-1])
    x = wte[inputs] + wpe[positions]  # token + position embeddings: -> [n_seq, n_embd]
    for block, cache in zip(blocks, kv_cache or [None] * len(blocks)):
        x = transformer_block(x, **block, n_head=n_head, cache=cache)
    if last_only:
        x = x[..., -1:, :]  # [n_seq, n_embd] -> [1, n_embd]
    x = layer_norm(x, **ln_f)
    # The output projection is the token embedding itself (weight tying): a logit is the similarity between
    # the final hidden state and a token's input vector.
    return x @ wte.T  # [n_seq, n_embd] -> [n_seq, n_vocab]


def new_kv_cache(params, n_head, capacity, batch=()):
    d_head = params["wte"].shape[1] // n_head
    return [KVCache((*batch, n_head, capacity, d_head)) for _ in params["blocks"]]


# A long prompt is read into the cache this many positions at a time: each chunk attends only to the chunks
# before it, so the masked-out half of the score matrix is never computed, and a chunk's arrays stay in cache.
PREFILL_CHUNK = 256


def generate(inputs, params, n_head, n_tokens_to_generate):
    """Greedy decoding: append the most likely next token, n_tokens_to_generate times; returns the new ids."""
    kv_cache = new_kv_cache(params, n_head, capacity=len(inputs) + n_tokens_to_generate)
    for start in range(0, len(inputs), PREFILL_CHUNK):
        logits = gpt2(inputs[start:start + PREFILL_CHUNK], **params, n_head=n_head, kv_cache=kv_cache, last_only=True)
    new_ids = []
    for _ in range(n_tokens_to_generate):
        if new_ids:  # every earlier position is in the cache: only the newest token goes through the model
            logits = gpt2(new_ids[-1:], **params, n_head=n_head, kv_cache=kv_cache, last_only=True)
        new_ids.append(int(np.argmax(logits[-1])))
    return new_ids


def main(prompt, n_tokens_to_generate=40, model_size="124M", models_dir="models"):
    from utils import load_encoder_hparams_and_params

    encoder, hparams, params = load_encoder_hparams_and_params(model_size, models_dir)
    input_ids = encoder.encode(prompt)
    output_ids = generate(input_ids, params, hparams["n_head"], n_tokens_to_generate)
    return encoder.decode(output_ids)


def cli():
    from utils import ModelError

    try:
        fire.Fire(main)
    except ModelError as e:
        sys.exit(f"error: {e}")  # one line on stderr and exit code 1, no traceback


if __name__ == "__main__":
    cli()
