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
    # scalar here would silently promote every activation to float64.
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x):
    exp_x = np.exp(x - np.max(x, axis=-1, keepdims=True))  # shifting by the max keeps exp from overflowing
    return exp_x / np.sum(exp_x, axis=-1, keepdims=True)


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
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])  # -> [n_head, n_q, n_k]
    return softmax(scores + causal_mask(q.shape[-2], k.shape[-2])) @ v


def split_heads(x, n_head):  # [n_seq, n_embd] -> [n_head, n_seq, n_embd/n_head]
    return x.reshape(*x.shape[:-1], n_head, -1).swapaxes(-3, -2)


def merge_heads(x):  # [n_head, n_seq, d_head] -> [n_seq, n_head*d_head]
    x = x.swapaxes(-3, -2)
    return x.reshape(*x.shape[:-2], -1)


def mha(x, c_attn, c_proj, n_head):  # [n_seq, n_embd] -> [n_seq, n_embd]
    qkv = linear(x, **c_attn)  # [n_seq, n_embd] -> [n_seq, 3*n_embd]
    q, k, v = (split_heads(t, n_head) for t in np.split(qkv, 3, axis=-1))  # -> 3 x [n_head, n_seq, d_head]
    heads = attention(q, k, v)  # all heads in one batched matmul
    return linear(merge_heads(heads), **c_proj)  # [n_head, n_seq, d_head] -> [n_seq, n_embd]


def transformer_block(x, mlp, attn, ln_1, ln_2, n_head):  # [n_seq, n_embd] -> [n_seq, n_embd]
    # Pre-norm residual blocks: each sublayer reads a normalized copy and adds its result back.
    x = x + mha(layer_norm(x, **ln_1), **attn, n_head=n_head)
    x = x + ffn(layer_norm(x, **ln_2), **mlp)
    return x


def gpt2(inputs, wte, wpe, blocks, ln_f, n_head):  # [n_seq] -> [n_seq, n_vocab]
    inputs = np.asarray(inputs)
    x = wte[inputs] + wpe[np.arange(inputs.shape[-1])]  # token + position embeddings: -> [n_seq, n_embd]
    for block in blocks:
        x = transformer_block(x, **block, n_head=n_head)
    x = layer_norm(x, **ln_f)
    # The output projection is the token embedding itself (weight tying): a logit is the similarity between
    # the final hidden state and a token's input vector.
    return x @ wte.T  # [n_seq, n_embd] -> [n_seq, n_vocab]


def generate(inputs, params, n_head, n_tokens_to_generate):
    """Greedy decoding: append the most likely next token, n_tokens_to_generate times; returns the new ids."""
    ids = list(inputs)
    for _ in range(n_tokens_to_generate):
        logits = gpt2(ids, **params, n_head=n_head)
        ids.append(int(np.argmax(logits[-1])))
    return ids[len(inputs):]


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
