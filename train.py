"""Training GPT-2 in NumPy: the backward pass, then AdamW and the training loop.

The first half mirrors gpt2.py's forward pass one piece at a time. Each `*_forward` computes what gpt2.py computes
and also returns a cache: the inputs and intermediate values its gradient needs. Every backward beside it is

    *_backward(dout, cache) -> (dx, grads)

dout is the gradient of the loss with respect to the piece's output, dx the gradient with respect to its input, and
grads a dict of the piece's weight gradients under the weights' own names. Two kinds of piece return one of the two:
those without weights (gelu, attention, the cross-entropy) return dx alone, and those whose input is token ids (the
embedding, the whole model) return grads alone, since ids have no gradient. Put together, the gradients form a
tree with exactly the keys and shapes of the params tree. Shapes are for a batch of token ids [batch, seq]; n_embd
is written C where it keeps lines short.
"""
import csv
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

import gpt2
import utils
from encoder import get_encoder
from cli import check, is_int, is_number, run_script
from gpt2 import ENDOFTEXT, attention_weights, gelu, linear, merge_heads, split_heads
from utils import flatten

# ============================================================================================ the backward pass


def embedding_forward(inputs, wte, wpe):  # [batch, seq] -> [batch, seq, n_embd]
    return wte[inputs] + wpe[np.arange(inputs.shape[-1])], (inputs, wte.shape, wpe.shape)


def embedding_backward(dout, cache):  # [batch, seq, n_embd] -> dwte [n_vocab, n_embd], dwpe [n_ctx, n_embd]
    inputs, wte_shape, wpe_shape = cache
    # A lookup copies row inputs[b, t] of the table to position (b, t), so a row's gradient is the sum of dout over
    # the positions that looked it up: a scatter-add. np.add.at adds every repeated index; dwte[inputs] += dout
    # would keep only one of them.
    dwte = np.zeros(wte_shape, dtype=dout.dtype)
    np.add.at(dwte, inputs.reshape(-1), dout.reshape(-1, dout.shape[-1]))
    dwpe = np.zeros(wpe_shape, dtype=dout.dtype)
    dwpe[:inputs.shape[-1]] = dout.reshape(-1, *dout.shape[-2:]).sum(axis=0)  # every sample uses positions 0..seq-1
    return {"wte": dwte, "wpe": dwpe}


def layer_norm_forward(x, g, b, eps=1e-5):  # [..., C] -> [..., C]
    x_centered = x - np.mean(x, axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(np.mean(x_centered * x_centered, axis=-1, keepdims=True) + eps)  # 1 / standard deviation
    x_hat = x_centered * rstd
    return g * x_hat + b, (x_hat, rstd, g)


def layer_norm_backward(dout, cache):  # [..., C] -> [..., C]
    # y = g * x_hat + b, x_hat = (x - mean(x)) * rstd. Gain and bias are shared by every position:
    #   dg = sum over positions of dout * x_hat,   db = sum over positions of dout.
    # The mean and rstd depend on every feature of a position, which gives, with dx_hat = dout * g,
    #   dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))   (means over the C features).
    x_hat, rstd, g = cache
    dx_hat = dout * g
    dx = rstd * (dx_hat - np.mean(dx_hat, axis=-1, keepdims=True)
                 - x_hat * np.mean(dx_hat * x_hat, axis=-1, keepdims=True))
    return dx, {"g": sum_over_positions(dout * x_hat), "b": sum_over_positions(dout)}


def sum_over_positions(x):  # [..., C] -> [C]
    return x.reshape(-1, x.shape[-1]).sum(axis=0)


def linear_forward(x, w, b):  # [..., n_in] -> [..., n_out]
    return linear(x, w, b), (x, w)


def linear_backward(dout, cache):  # [..., n_out] -> [..., n_in]
    # y = x @ w + b:   dx = dout @ w.T,   dw = x.T @ dout,   db = sum of dout,
    # with every position of every sample as one row, so dw and db sum over all of them in one matrix product.
    x, w = cache
    x_rows, dout_rows = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])
    dx = (dout_rows @ w.T).reshape(x.shape)
    return dx, {"w": x_rows.T @ dout_rows, "b": dout_rows.sum(axis=0)}


def gelu_forward(x):
    return gelu(x), x


def gelu_backward(dout, cache):
    # gelu(x) = 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), so
    #   gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    x = cache
    x2 = x * x
    t = np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x2 * x))
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * x2))


def attention_forward(q, k, v):  # 3 x [batch, n_head, seq, d_head] -> [batch, n_head, seq, d_head]
    weights = attention_weights(q, k)  # -> [batch, n_head, seq, seq]
    return weights @ v, (q, k, v, weights)  # gpt2.attention, keeping the weights for the backward


def attention_backward(dout, cache):  # [batch, n_head, seq, d_head] -> 3 x [batch, n_head, seq, d_head]
    # out = weights @ v:          dweights = dout @ v.T,   dv = weights.T @ dout
    # weights = softmax(scores), row by row (w_i = e^s_i / sum_j e^s_j, so dw_i/ds_j = w_i (1[i=j] - w_j)):
    #                             dscores = weights * (dweights - sum over the row of dweights * weights)
    # scores = q @ k.T / sqrt(d): dq = dscores @ k / sqrt(d),   dk = dscores.T @ q / sqrt(d)
    # The causal mask is a constant: a masked weight is 0, so its dscores is 0 and no gradient leaks to the future.
    q, k, v, weights = cache
    dv = weights.swapaxes(-1, -2) @ dout
    dscores = dout @ v.swapaxes(-1, -2)  # dweights, turned into dscores in place:
    dscores -= np.sum(dscores * weights, axis=-1, keepdims=True)
    dscores *= weights
    dscores /= math.sqrt(q.shape[-1])
    return dscores @ k, dscores.swapaxes(-1, -2) @ q, dv


def mha_forward(x, c_attn, c_proj, n_head):  # [batch, seq, C] -> [batch, seq, C]
    qkv, c_attn_cache = linear_forward(x, **c_attn)  # -> [batch, seq, 3C]
    q, k, v = (split_heads(t, n_head) for t in np.split(qkv, 3, axis=-1))  # -> 3 x [batch, n_head, seq, C/n_head]
    heads, attention_cache = attention_forward(q, k, v)
    out, c_proj_cache = linear_forward(merge_heads(heads), **c_proj)  # -> [batch, seq, C]
    return out, (c_attn_cache, attention_cache, c_proj_cache, n_head)


def mha_backward(dout, cache):  # [batch, seq, C] -> [batch, seq, C]
    c_attn_cache, attention_cache, c_proj_cache, n_head = cache
    dheads, dc_proj = linear_backward(dout, c_proj_cache)
    # Splitting and merging heads only move numbers around, so each one's gradient is the other:
    # merge_heads undoes split_heads.
    dq, dk, dv = attention_backward(split_heads(dheads, n_head), attention_cache)
    dqkv = np.concatenate([merge_heads(d) for d in (dq, dk, dv)], axis=-1)  # -> [batch, seq, 3C]
    dx, dc_attn = linear_backward(dqkv, c_attn_cache)
    return dx, {"c_attn": dc_attn, "c_proj": dc_proj}


def ffn_forward(x, c_fc, c_proj):  # [batch, seq, C] -> [batch, seq, C]
    h, c_fc_cache = linear_forward(x, **c_fc)  # -> [batch, seq, 4C]
    h, gelu_cache = gelu_forward(h)
    out, c_proj_cache = linear_forward(h, **c_proj)  # -> [batch, seq, C]
    return out, (c_fc_cache, gelu_cache, c_proj_cache)


def ffn_backward(dout, cache):  # [batch, seq, C] -> [batch, seq, C]
    c_fc_cache, gelu_cache, c_proj_cache = cache
    dh, dc_proj = linear_backward(dout, c_proj_cache)
    dh = gelu_backward(dh, gelu_cache)
    dx, dc_fc = linear_backward(dh, c_fc_cache)
    return dx, {"c_fc": dc_fc, "c_proj": dc_proj}


def transformer_block_forward(x, mlp, attn, ln_1, ln_2, n_head):  # [batch, seq, C] -> [batch, seq, C]
    a, ln_1_cache = layer_norm_forward(x, **ln_1)
    a, attn_cache = mha_forward(a, **attn, n_head=n_head)
    x = x + a
    m, ln_2_cache = layer_norm_forward(x, **ln_2)
    m, mlp_cache = ffn_forward(m, **mlp)
    return x + m, (ln_1_cache, attn_cache, ln_2_cache, mlp_cache)


def transformer_block_backward(dout, cache):  # [batch, seq, C] -> [batch, seq, C]
    # A residual add y = x + f(x) hands dout to both paths: dx = dout + (the gradient through f).
    ln_1_cache, attn_cache, ln_2_cache, mlp_cache = cache
    dm, dmlp = ffn_backward(dout, mlp_cache)
    dm, dln_2 = layer_norm_backward(dm, ln_2_cache)
    dx = dout + dm
    da, dattn = mha_backward(dx, attn_cache)
    da, dln_1 = layer_norm_backward(da, ln_1_cache)
    return dx + da, {"mlp": dmlp, "attn": dattn, "ln_1": dln_1, "ln_2": dln_2}


def lm_head_forward(x, wte):  # [batch, seq, C] -> [batch, seq, n_vocab]
    # The head is the token embedding itself (weight tying), as in gpt2.gpt2.
    return x @ wte.T, (x, wte)


def lm_head_backward(dout, cache):  # [batch, seq, n_vocab] -> [batch, seq, C], dwte [n_vocab, C]
    # logits = x @ wte.T:   dx = dlogits @ wte,   dwte = dlogits.T @ x   (summed over every position)
    x, wte = cache
    dlogits = dout.reshape(-1, dout.shape[-1])  # every position of every sample as one row
    return (dlogits @ wte).reshape(x.shape), {"wte": dlogits.T @ x.reshape(-1, x.shape[-1])}


def cross_entropy_forward(logits, targets):  # [batch, seq, n_vocab], [batch, seq] -> the mean loss
    """The mean over positions of -log softmax(logits)[target]. Works in place: logits, the largest array in
    training (4 x 256 x 50257 floats is 206 MB), becomes the probabilities that the backward needs."""
    logits -= np.max(logits, axis=-1, keepdims=True)  # a shift that keeps exp from overflowing
    target_logits = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    probs = np.exp(logits, out=logits)
    totals = np.sum(probs, axis=-1, keepdims=True)
    probs /= totals
    loss = np.mean(np.log(totals[..., 0]) - target_logits)  # -log(e^z_t / sum e^z) = log(sum e^z) - z_t
    return float(loss), (probs, targets)


def cross_entropy_backward(dloss, cache):  # the loss's gradient (1 for the loss itself) -> [batch, seq, n_vocab]
    # loss = mean over the N positions of log(sum_j e^z_j) - z_target, so dloss/dz = (softmax(z) - onehot) / N.
    probs, targets = cache
    dlogits = probs  # in place again: the probabilities are not needed after this
    np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(dlogits, targets[..., None], axis=-1) - 1.0,
                      axis=-1)
    dlogits *= dloss / targets.size
    return dlogits


def gpt2_forward(inputs, wte, wpe, blocks, ln_f, n_head):  # [batch, seq] -> [batch, seq, n_vocab]
    x, embedding_cache = embedding_forward(inputs, wte, wpe)  # -> [batch, seq, C]
    block_caches = []
    for block in blocks:
        x, block_cache = transformer_block_forward(x, **block, n_head=n_head)
        block_caches.append(block_cache)
    x, ln_f_cache = layer_norm_forward(x, **ln_f)
    logits, lm_head_cache = lm_head_forward(x, wte)  # -> [batch, seq, n_vocab]
    return logits, (embedding_cache, block_caches, ln_f_cache, lm_head_cache)


def gpt2_backward(dlogits, cache):  # [batch, seq, n_vocab] -> a gradient tree shaped like params
    embedding_cache, block_caches, ln_f_cache, lm_head_cache = cache
    dx, dlm_head = lm_head_backward(dlogits, lm_head_cache)
    dx, dln_f = layer_norm_backward(dx, ln_f_cache)
    dblocks = []
    for block_cache in reversed(block_caches):  # the last block's gradient is known first
        dx, dblock = transformer_block_backward(dx, block_cache)
        dblocks.insert(0, dblock)
    dembedding = embedding_backward(dx, embedding_cache)
    # wte has two uses, the lookup table and the LM head, so its gradient is the sum of theirs. Added in place
    # into the head's share: a fresh array of wte's size (154 MB for GPT-2) would cost page faults.
    dwte = dlm_head["wte"]
    dwte += dembedding["wte"]
    return {"wte": dwte, "wpe": dembedding["wpe"], "blocks": dblocks, "ln_f": dln_f}


def loss_and_grads(params, inputs, targets, n_head):
    """The mean next-token cross-entropy of a batch and its gradient with respect to every parameter.

    inputs, targets: int arrays [batch, seq], targets being inputs shifted by one. The gradients form a tree with
    the keys, shapes and dtype of params; wte's includes both of its uses, the embedding and the LM head."""
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    logits, cache = gpt2_forward(inputs, **params, n_head=n_head)
    loss, cross_entropy_cache = cross_entropy_forward(logits, targets)
    dlogits = cross_entropy_backward(1.0, cross_entropy_cache)  # the chain starts at dloss/dloss = 1
    return loss, gpt2_backward(dlogits, cache)


def lm_loss(params, inputs, targets, n_head):
    """The same loss, forward only, for evaluation: through gpt2.py's forward pass, which keeps nothing for a
    backward pass."""
    logits = gpt2.gpt2(np.asarray(inputs), **params, n_head=n_head)  # -> [batch, seq, n_vocab]
    loss, _ = cross_entropy_forward(logits, np.asarray(targets))
    return loss


# ============================================================================================ training

VAL_FRACTION = 0.1  # without --val_dataset, the last 10% of the tokens are held out for validation
EVAL_WINDOWS = 32  # how many block-sized windows of the validation tokens an evaluation reads, at most
BETAS = (0.9, 0.95)
EPS = 1e-8
MIN_LR_FRACTION = 0.1  # the cosine ends at 10% of --learning_rate
SAMPLE_TOKENS = 40  # the greedy sample printed at the end
STATE_FILE = "train_state.npz"  # beside the model: AdamW's moments, the step, the batch generator's state
LOG_FILE = "log.csv"
TOKEN_CACHE = "token-cache"  # the folder in --models_dir that keeps tokenized datasets
LOG_COLUMNS = ("step", "train_loss", "val_loss", "lr", "tokens_per_s")


# ---------------------------------------------------------------------------------------------- the data

def dataset_texts(path, flag):
    """The documents of a .txt file or of a folder's .txt files (sorted by name), as strings."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".txt"))
        if not files:
            raise utils.UsageError(f"{flag} {path}: the folder holds no .txt files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise utils.UsageError(f"{flag} {path}: no such file or folder")
    texts = []
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError as e:
            raise utils.UsageError(f"{flag} {file} is not UTF-8 text (byte {e.start} cannot be decoded)") from None
        except OSError as e:
            raise utils.UsageError(f"{flag} {file}: {e.strerror}") from None
    if not any(text.strip() for text in texts):
        raise utils.UsageError(f"{flag} {path} is empty")
    return texts


def token_cache_path(texts, cache_dir):
    """Where the tokens of these texts are kept: named by a hash of their content, so an edited text gets
    tokenized afresh and an unchanged one never again."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")  # the separator keeps "ab" + "c" apart from "a" + "bc"
    return os.path.join(cache_dir, digest.hexdigest() + ".npy")


def tokenize(texts, encoder, cache_dir):  # -> [n_tokens] uint16
    """Every document's tokens followed by <|endoftext|>, one stream. uint16 holds GPT-2's 50257 ids in
    half the memory of int32; the stream is read a window at a time."""
    path = token_cache_path(texts, cache_dir)
    try:
        return np.load(path)
    except (OSError, ValueError):  # not cached yet, or a damaged file: tokenize again (save_tokens replaces it)
        pass
    ids = []
    for text in texts:
        ids += encoder.encode(text) + [ENDOFTEXT]
    return np.array(ids, dtype=np.uint16)


def save_tokens(tokens, texts, cache_dir):
    path = token_cache_path(texts, cache_dir)
    try:
        if np.array_equal(np.load(path), tokens):
            return
    except (OSError, ValueError):  # missing or damaged: (re)write it
        pass
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, tokens)
    os.replace(tmp, path)  # another run reading the cache never sees half a file


def get_batch(tokens, rng, batch_size, block_size):  # -> inputs, targets: [batch_size, block_size] each
    """Random windows of block_size + 1 tokens: each position's target is the token after it."""
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    windows = tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)  # [batch, block_size + 1]
    return windows[:, :-1], windows[:, 1:]


def val_windows(tokens, block_size):  # -> [n_windows, <= block_size + 1]
    """Validation reads the same consecutive windows every time, so its losses compare across steps."""
    size = min(block_size + 1, len(tokens))
    n = min(len(tokens) // size, EVAL_WINDOWS)
    return tokens[:n * size].reshape(n, size).astype(np.int64)


def evaluate(params, windows, n_head, batch_size):
    """Mean validation loss over the windows, batch_size windows at a time."""
    losses = [lm_loss(params, w[:, :-1], w[:, 1:], n_head) * len(w)
              for w in (windows[i:i + batch_size] for i in range(0, len(windows), batch_size))]
    return sum(losses) / len(windows)


# ---------------------------------------------------------------------------------------------- the model

def tree_map(fn, *trees):
    """fn applied leaf by leaf to trees of the same shape (dicts and lists of arrays), as a new tree."""
    if isinstance(trees[0], dict):
        return {key: tree_map(fn, *(t[key] for t in trees)) for key in trees[0]}
    if isinstance(trees[0], list):
        return [tree_map(fn, *branches) for branches in zip(*trees)]
    return fn(*trees)


def init_params(n_layer, n_embd, n_ctx, rng, n_vocab=50257):
    """GPT-2's initialization: weights normal with std 0.02, layer-norm gains 1, biases 0. The two projections
    that add into the residual stream (c_proj) start 1/sqrt(2 n_layer) smaller, so the stream's variance does not
    grow with depth: each of the 2 n_layer residual adds contributes a little."""
    def normal(*shape, std=0.02):
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    def dense(n_in, n_out, std=0.02):  # [n_in, n_out], as the checkpoint stores conv weights
        return {"w": normal(n_in, n_out, std=std), "b": np.zeros(n_out, dtype=np.float32)}

    def layer_norm():
        return {"g": np.ones(n_embd, dtype=np.float32), "b": np.zeros(n_embd, dtype=np.float32)}

    residual_std = 0.02 / math.sqrt(2 * n_layer)
    blocks = [{"ln_1": layer_norm(),
               "attn": {"c_attn": dense(n_embd, 3 * n_embd), "c_proj": dense(n_embd, n_embd, residual_std)},
               "ln_2": layer_norm(),
               "mlp": {"c_fc": dense(n_embd, 4 * n_embd), "c_proj": dense(4 * n_embd, n_embd, residual_std)}}
              for _ in range(n_layer)]
    return {"wte": normal(n_vocab, n_embd), "wpe": normal(n_ctx, n_embd), "blocks": blocks, "ln_f": layer_norm()}


# ---------------------------------------------------------------------------------------------- the optimizer

def learning_rate_at(step, learning_rate, warmup_steps, lr_decay_steps):
    """The learning rate of update number `step` (0-based): a linear warmup, so that Adam's first, noisy moment
    estimates take small steps, then a cosine down to 10% of the peak at lr_decay_steps, then flat."""
    min_lr = MIN_LR_FRACTION * learning_rate
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if step >= lr_decay_steps:
        return min_lr
    progress = (step - warmup_steps) / (lr_decay_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def clip_grads(grads, max_norm):
    """Scale all gradients together so that their global L2 norm is at most max_norm (0: no clipping), as
    torch.nn.utils.clip_grad_norm_ does."""
    if max_norm > 0:
        norm = math.sqrt(sum(float(np.vdot(g, g)) for g in flatten(grads).values()))
        scale = min(1.0, max_norm / (norm + 1e-6))
        for g in flatten(grads).values():
            g *= scale


class AdamW:
    """torch.optim.AdamW, in place on a params tree. For each weight p with gradient g, at update t = 1, 2, ...:

        p <- p - lr * weight_decay * p                   (decoupled weight decay: 2-D weights only)
        m <- beta1 * m + (1 - beta1) * g                 (running mean of gradients)
        v <- beta2 * v + (1 - beta2) * g^2               (running mean of their squares)
        p <- p - lr * m_hat / (sqrt(v_hat) + eps)        m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)

    Dividing by sqrt(v) gives every weight a step of about lr whatever its gradient's scale; the bias corrections
    undo m's and v's start at zero. The decay pulls weights, not gains or biases, towards zero.
    """

    def __init__(self, params, weight_decay):
        self.weight_decay = weight_decay
        self.m = tree_map(np.zeros_like, params)
        self.v = tree_map(np.zeros_like, params)
        self.t = 0

    def step(self, params, grads, lr):
        self.t += 1
        for p, g, m, v in zip(*(flatten(tree).values() for tree in (params, grads, self.m, self.v))):
            weight_decay = self.weight_decay if p.ndim == 2 else 0.0  # wte, wpe and every w
            for rows in row_blocks(p):
                self.update(p[rows], g[rows], m[rows], v[rows], lr, weight_decay)

    def update(self, p, g, m, v, lr, weight_decay):  # the formula above, on views: p, m and v change in place
        beta1, beta2 = BETAS  # Python floats throughout: a NumPy float64 scalar would make float32 arrays float64
        p -= lr * weight_decay * p                   # decoupled weight decay
        m[...] = beta1 * m + (1.0 - beta1) * g       # running mean of gradients
        v[...] = beta2 * v + (1.0 - beta2) * g * g   # running mean of their squares
        m_hat = m / (1.0 - beta1 ** self.t)          # bias corrections
        v_hat = v / (1.0 - beta2 ** self.t)
        p -= lr * m_hat / (np.sqrt(v_hat) + EPS)


def row_blocks(a, size=1 << 16):  # slices of a's first axis, of about `size` numbers each
    """AdamW's formula makes a fresh array per operation. Of a 154 MB weight (wte), each would cost more in page
    faults than the arithmetic: the whole-array formula takes 2x the in-place step's time. Of a block of 256 KB,
    they reuse freed memory and stay in the CPU's cache, and the formula is as fast as in-place operations."""
    rows = max(1, size * len(a) // a.size)
    return [slice(start, start + rows) for start in range(0, len(a), rows)]


def train_step(params, optimizer, tokens, rng, config, lr):
    """One optimizer update from grad_accum micro-batches: their mean gradient, clipped. Returns the mean loss."""
    total_loss, total_grads = 0.0, None
    for _ in range(config["grad_accum"]):
        inputs, targets = get_batch(tokens, rng, config["batch_size"], config["block_size"])
        loss, grads = loss_and_grads(params, inputs, targets, config["n_head"])
        total_loss += loss
        if total_grads is None:
            total_grads = grads
        else:
            for total, g in zip(flatten(total_grads).values(), flatten(grads).values()):
                total += g
    if config["grad_accum"] > 1:
        for total in flatten(total_grads).values():
            total *= 1.0 / config["grad_accum"]
    clip_grads(total_grads, config["grad_clip"])
    optimizer.step(params, total_grads, lr)
    return total_loss / config["grad_accum"]


# ---------------------------------------------------------------------------------------------- the run folder

def save_run(run_dir, params, hparams, vocab_dir, optimizer, step, rng):
    """The model in the release layout, plus what --resume needs, written into a temporary folder beside the
    run and swapped into place: a folder under the run's name is always a whole model."""
    parent, name = os.path.split(run_dir)
    tmp_dir = os.path.join(parent, f".{name}.tmp{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    utils.save_release_model(tmp_dir, params, hparams, vocab_dir)
    moments = {f"{kind}/{n}": a for kind, tree in (("m", optimizer.m), ("v", optimizer.v)) for n, a in flatten(tree).items()}
    np.savez(os.path.join(tmp_dir, STATE_FILE), step=step, adam_t=optimizer.t,
             rng=json.dumps(rng.bit_generator.state), **moments)
    shutil.copyfile(live_log_path(run_dir), os.path.join(tmp_dir, LOG_FILE))
    old_dir = os.path.join(parent, f".{name}.old{os.getpid()}")
    if os.path.exists(run_dir):
        os.rename(run_dir, old_dir)  # a folder cannot replace a non-empty one in one rename: two, then delete
    os.rename(tmp_dir, run_dir)
    shutil.rmtree(old_dir, ignore_errors=True)


def load_run(run_dir, weight_decay):
    """params, optimizer, step and the batch generator of a saved run, as save_run left them."""
    hparams = utils.load_hparams(run_dir)
    flat = utils.read_tf_checkpoint(utils.checkpoint_prefix(run_dir), hparams["n_layer"])
    params = tree_map(np.ascontiguousarray, utils.nest(flat, hparams["n_layer"]))
    optimizer = AdamW(params, weight_decay)
    with np.load(os.path.join(run_dir, STATE_FILE)) as state:
        for kind, tree in (("m", optimizer.m), ("v", optimizer.v)):
            for name, array in flatten(tree).items():
                array[...] = state[f"{kind}/{name}"]
        optimizer.t = int(state["adam_t"])
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(str(state["rng"]))
        return params, optimizer, int(state["step"]), rng


def remove_leftovers(run_dir):
    """Temporary folders and the live log of a run that was killed midway; only a process holding the run's lock
    (utils.exclusive) may call this."""
    parent, name = os.path.split(run_dir)
    for entry in os.listdir(parent):
        if entry.startswith((f".{name}.tmp", f".{name}.old")):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    if os.path.exists(live_log_path(run_dir)):
        os.remove(live_log_path(run_dir))


def live_log_path(run_dir):
    """Where the log grows while the run trains: beside the run folder, which holds only whole saves. A save
    copies it into the new folder as log.csv."""
    parent, name = os.path.split(run_dir)
    return os.path.join(parent, f".{name}.{LOG_FILE}")


class Log:
    """The run's log, one row per step, written as the run goes (see live_log_path). On --resume it starts from
    the saved log.csv's rows up to the saved step: rows of a run that went on past its last save and then died
    are dropped, since those steps run again."""

    def __init__(self, run_dir, step):
        rows = []
        if step:
            with open(os.path.join(run_dir, LOG_FILE), newline="", encoding="utf-8") as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= step]
        self.file = open(live_log_path(run_dir), "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, LOG_COLUMNS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, **row):
        self.writer.writerow(row)
        self.file.flush()


# ---------------------------------------------------------------------------------------------- the command line

def check_flags(flags):
    """The flags that must be whole numbers or positive, with one message each."""
    for name in ("block_size", "batch_size", "grad_accum", "max_steps", "lr_decay_steps", "n_layer", "n_head",
                 "n_embd", "n_ctx"):
        value = flags[name]
        check(is_int(value) and value > 0,
              f"--{name} must be a positive whole number, got {value!r}")
    for name in ("warmup_steps", "eval_every", "save_every", "seed"):
        value = flags[name]
        check(is_int(value) and value >= 0,
              f"--{name} must be a whole number >= 0, got {value!r}")
    check(is_number(flags["learning_rate"]) and flags["learning_rate"] > 0, f"--learning_rate must be a positive number, got {flags['learning_rate']!r}")
    for name in ("weight_decay", "grad_clip"):
        value = flags[name]
        check(is_number(value) and value >= 0,
              f"--{name} must be a number >= 0, got {value!r}")


def already_exists(run_dir):
    if os.path.exists(os.path.join(run_dir, STATE_FILE)):
        return f"{run_dir} already exists: --resume continues it, --overwrite starts it again"
    return f"{run_dir} already exists and is no saved training run: --overwrite replaces it"


def check_out_name(out_name, models_dir, resume, overwrite):
    check(isinstance(out_name, str) and out_name and "/" not in out_name and os.sep not in out_name
          and out_name not in (".", "..") and not out_name.startswith("."),
          f"--out_name must be a folder name in {models_dir}, not a path: got {out_name!r}")
    check(out_name not in utils.RELEASE_SIZES, f"--out_name {out_name} is a release model's name: choose another")
    check(out_name != TOKEN_CACHE, f"--out_name {TOKEN_CACHE} is where tokenized datasets are kept: choose another")
    check(not (resume and overwrite), "give --resume or --overwrite, not both")
    run_dir = os.path.join(models_dir, out_name)
    if resume:
        check(os.path.exists(os.path.join(run_dir, STATE_FILE)),
              f"--resume: {run_dir} holds no saved training run ({STATE_FILE}); start one without --resume")
    else:
        check(overwrite or not os.path.exists(run_dir),
              already_exists(run_dir))
    return run_dir


def check_init_from(init_from, models_dir, flags):
    """What can be known about --init_from and the model's shape before anything is downloaded."""
    if init_from == "scratch":
        check(flags["n_embd"] % flags["n_head"] == 0,
              f"--n_embd {flags['n_embd']} must be divisible by --n_head {flags['n_head']}")
        check(flags["block_size"] <= flags["n_ctx"], f"--block_size {flags['block_size']} is longer than --n_ctx "
                                                     f"{flags['n_ctx']}, the model's context")
        return
    check(isinstance(init_from, str) and init_from and init_from == os.path.basename(init_from)
          and init_from not in (".", ".."),
          f"--init_from must be scratch, a release size or a model folder in {models_dir}, got {init_from!r}")
    check(init_from in utils.RELEASE_SIZES or os.path.isdir(os.path.join(models_dir, init_from)),
          f"unknown --init_from {init_from!r}: use scratch, one of {', '.join(utils.RELEASE_SIZES)} (downloaded "
          f"if missing) or a model folder in {models_dir}")
    if init_from in utils.RELEASE_SIZES:  # every release model reads 1024 positions
        check(flags["block_size"] <= 1024, f"--block_size {flags['block_size']} is longer than {init_from}'s "
                                           f"context of 1024")


def vocabulary_dir(init_from, models_dir):
    """The folder whose encoder.json and vocab.bpe tokenize the dataset: the model's (124M's for a model from
    scratch). Of a release, only those small files are downloaded now: the dataset is checked before the weights
    are fetched."""
    return utils.prepare_tokenizer("124M" if init_from == "scratch" else init_from, models_dir)


def model_hparams(init_from, models_dir, flags):
    """The hparams of the model to train: the flags' shape from scratch, else the (downloaded) model's."""
    if init_from == "scratch":
        return {"n_vocab": 50257, **{k: flags[k] for k in ("n_ctx", "n_embd", "n_head", "n_layer")}}
    hparams = utils.load_hparams(utils.prepare_model(init_from, models_dir))
    check(flags["block_size"] <= hparams["n_ctx"], f"--block_size {flags['block_size']} is longer than "
                                                   f"{init_from}'s context of {hparams['n_ctx']}")
    return hparams


def split_tokens(tokens, val_tokens, block_size):
    """(training tokens, validation tokens): --val_dataset's, or the last 10% of the dataset's."""
    check(len(tokens) >= block_size + 1, f"--dataset has {len(tokens)} tokens, fewer than --block_size + 1 = "
                                         f"{block_size + 1}")
    if val_tokens is not None:
        return tokens, val_tokens
    split = int(len(tokens) * (1.0 - VAL_FRACTION))
    check(split >= block_size + 1, f"--dataset has {len(tokens)} tokens: its first 90%, for training, are fewer "
                                   f"than --block_size + 1 = {block_size + 1} (give --val_dataset or a smaller "
                                   f"--block_size)")
    return tokens[:split], tokens[split:]


def main(dataset, out_name, val_dataset=None, init_from="124M", n_layer=12, n_head=12, n_embd=768, n_ctx=1024,
         block_size=256, batch_size=4, grad_accum=1, max_steps=1000, learning_rate=3e-4, warmup_steps=100,
         lr_decay_steps=None, weight_decay=0.1, grad_clip=1.0, eval_every=100, save_every=500, seed=0,
         models_dir="models", resume=False, overwrite=False):
    """Train GPT-2 on the text in --dataset and save it as models/<out_name>, in OpenAI's release layout."""
    if lr_decay_steps is None:
        lr_decay_steps = max_steps
    flags = dict(locals())
    check_flags(flags)
    run_dir = check_out_name(out_name, models_dir, resume, overwrite)
    check(init_from != out_name or resume, "--init_from and --out_name name the same folder: training writes a "
                                           "new one")
    texts = dataset_texts(dataset, "--dataset")
    val_texts = dataset_texts(val_dataset, "--val_dataset") if val_dataset is not None else None
    if resume:
        hparams, vocab_dir = utils.load_hparams(run_dir), run_dir
        check(block_size <= hparams["n_ctx"], f"--block_size {block_size} is longer than the run's context of "
                                              f"{hparams['n_ctx']}")
    else:
        check_init_from(init_from, models_dir, flags)
        vocab_dir = vocabulary_dir(init_from, models_dir)

    encoder = get_encoder(os.path.basename(vocab_dir), os.path.dirname(vocab_dir))
    cache_dir = os.path.join(models_dir, TOKEN_CACHE)
    tokens = tokenize(texts, encoder, cache_dir)
    val_tokens = tokenize(val_texts, encoder, cache_dir) if val_texts is not None else None
    train_tokens, val_tokens = split_tokens(tokens, val_tokens, block_size)
    if not resume:
        hparams = model_hparams(init_from, models_dir, flags)

    with utils.exclusive(run_dir):  # a second run on this folder is refused, not let in to share it
        if not resume:  # checked again now that no other run can create the folder
            check(overwrite or not os.path.exists(run_dir),
                  already_exists(run_dir))
        remove_leftovers(run_dir)
        save_tokens(tokens, texts, cache_dir)
        if val_texts is not None:
            save_tokens(val_tokens, val_texts, cache_dir)

        if resume:
            params, optimizer, step, rng = load_run(run_dir, weight_decay)
        else:
            init_rng, data_seed = np.random.SeedSequence(seed).spawn(2)
            if init_from == "scratch":
                params = init_params(hparams["n_layer"], hparams["n_embd"], hparams["n_ctx"],
                                     np.random.default_rng(init_rng))
            else:  # the loaded weights are read-only memory maps: training needs its own copy
                params = utils.load_model_params(init_from, models_dir, hparams["n_layer"])
                params = tree_map(lambda a: np.array(a, dtype=np.float32, order="C"), params)
            # An existing run (--overwrite) stays as it is until the first save replaces it whole.
            optimizer, step, rng = AdamW(params, weight_decay), 0, np.random.default_rng(data_seed)
        check(step < max_steps, f"{run_dir} is already at step {step}: give a --max_steps above it to go on")

        config = {**flags, "n_head": hparams["n_head"], "lr_decay_steps": lr_decay_steps}
        train(params, optimizer, step, rng, train_tokens, val_tokens, config, hparams, run_dir, vocab_dir)
    sample = gpt2.generate([ENDOFTEXT], params, hparams["n_head"], min(SAMPLE_TOKENS, hparams["n_ctx"] - 1))
    print(encoder.decode(sample))


class StopRequest:
    """Ctrl-C during training asks to stop after the current step: an update interrupted halfway would leave
    the weights matching no step at all, and that is what would be saved."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.request)
        return self

    def request(self, signum, frame):
        if not self.requested:
            tqdm.write("interrupted: stopping after this step to save it", file=sys.stderr)
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def train(params, optimizer, step, rng, tokens, val_tokens, config, hparams, run_dir, vocab_dir):
    """Update params in place from `step` up to --max_steps, saving every --save_every steps and at the end."""
    max_steps, n_head = config["max_steps"], config["n_head"]
    tokens_per_step = config["batch_size"] * config["block_size"] * config["grad_accum"]
    windows = val_windows(val_tokens, config["block_size"])
    log = Log(run_dir, step)
    bar = tqdm(total=max_steps, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True)
    with StopRequest() as stop:
        while step < max_steps and not stop.requested:
            lr = learning_rate_at(step, config["learning_rate"], config["warmup_steps"], config["lr_decay_steps"])
            start = time.perf_counter()
            loss = train_step(params, optimizer, tokens, rng, config, lr)
            tokens_per_s = tokens_per_step / (time.perf_counter() - start)
            step += 1
            val_loss = ""
            if config["eval_every"] and (step % config["eval_every"] == 0 or step == max_steps) and len(windows):
                val_loss = evaluate(params, windows, n_head, config["batch_size"])
                tqdm.write(f"step {step}: val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}",
                           file=sys.stderr)
            log.write(step=step, train_loss=f"{loss:.6f}", val_loss=val_loss and f"{val_loss:.6f}", lr=f"{lr:.6g}",
                      tokens_per_s=f"{tokens_per_s:.1f}")
            bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s")
            bar.update()
            if step == max_steps or stop.requested or (config["save_every"] and step % config["save_every"] == 0):
                save_run(run_dir, params, hparams, vocab_dir, optimizer, step, rng)
                vocab_dir = run_dir
        bar.close()
        log.file.close()
        os.remove(live_log_path(run_dir))  # the last save holds all of it
        if stop.requested:
            sys.stderr.write(f"interrupted: saved step {step} in {run_dir}; --resume continues it\n")
            sys.exit(130)


SHORT_FLAGS = {"d": "dataset", "v": "val_dataset", "i": "init_from", "e": "eval_every", "r": "resume"}  # chosen


def cli():
    run_script(main, text_flags={"dataset", "val_dataset", "out_name", "init_from", "models_dir"},
               short_flags=SHORT_FLAGS)


if __name__ == "__main__":
    cli()
