import math

import numpy as np


def gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def layer_norm(x, g, b, eps=1e-5):
    return g * (x - x.mean(axis=-1, keepdims=True)) / np.sqrt(x.var(axis=-1, keepdims=True) + eps) + b


def linear(x, w, b):
    return x @ w + b


def ffn(x, c_fc, c_proj):
    return linear(gelu(linear(x, **c_fc)), **c_proj)


def mha(x, c_attn, c_proj, n_head):
    q, k, v = (t.reshape(len(x), n_head, -1).transpose(1, 0, 2) for t in np.split(linear(x, **c_attn), 3, axis=-1))
    mask = np.triu(np.full((len(x), len(x)), -1e10, np.float32), k=1)
    heads = softmax(q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1]) + mask) @ v
    return linear(heads.transpose(1, 0, 2).reshape(len(x), -1), **c_proj)


def transformer_block(x, mlp, attn, ln_1, ln_2, n_head):
    x = x + mha(layer_norm(x, **ln_1), **attn, n_head=n_head)
    return x + ffn(layer_norm(x, **ln_2), **mlp)


def gpt2(inputs, wte, wpe, blocks, ln_f, n_head):
    x = wte[inputs] + wpe[range(len(inputs))]
    for block in blocks:
        x = transformer_block(x, **block, n_head=n_head)
    return layer_norm(x, **ln_f) @ wte.T


def generate(inputs, params, n_head, n_tokens_to_generate):
    inputs = list(inputs)
    for _ in range(n_tokens_to_generate):
        inputs.append(int(np.argmax(gpt2(inputs, **params, n_head=n_head)[-1])))
    return inputs[len(inputs) - n_tokens_to_generate:]


def main(prompt, n_tokens_to_generate=40, model_size="124M", models_dir="models"):
    from cli import check_fits, read_prompt
    from utils import load_encoder_hparams_and_params

    prompt = read_prompt(prompt)  # "-": from standard input
    encoder, hparams, params = load_encoder_hparams_and_params(model_size, models_dir)
    ids = encoder.encode(prompt) or [encoder.encoder["<|endoftext|>"]]  # "" starts from <|endoftext|>
    check_fits(len(ids), n_tokens_to_generate, hparams["n_ctx"])
    return encoder.decode(generate(ids, params, hparams["n_head"], n_tokens_to_generate))


if __name__ == "__main__":
    import cli

    cli.run(main, short_flags={"n": "n_tokens_to_generate"})  # gpt2.py's flag checks and one-line errors
