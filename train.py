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
import startup  # noqa: F401 -- first of all: a Ctrl-C during the slow imports below is one line, not a traceback
import math
import signal
import sys
import time
import warnings

import numpy as np
from tqdm import tqdm

import gpt2
import runs
import utils
from cli import run_script
from gpt2 import attention_weights, gelu, linear, merge_heads, split_heads
from threads import POOL, on_every_core
from utils import flatten

LOGITS_CHUNK = 512  # positions whose logits exist at once in training: [512, 50257] float32 is 103 MB

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
    return on_every_core(gelu, x.reshape(-1, x.shape[-1])).reshape(x.shape), x


def gelu_backward(dout, cache):
    rows = (a.reshape(-1, a.shape[-1]) for a in (dout, cache))  # -> [batch * seq, 4C]
    return on_every_core(gelu_grad, *rows).reshape(dout.shape)


def gelu_grad(dout, x):
    # gelu(x) = 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), so
    #   gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    x2 = x * x
    t = np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x2 * x))
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * x2))


def attention_forward(q, k, v):  # 3 x [batch, n_head, seq, d_head] -> [batch, n_head, seq, d_head]
    shape = q.shape
    # All heads of all samples as one stack [batch * n_head, seq, d_head], shared out over the cores head by head.
    q, k, v = (heads_stack(t) for t in (q, k, v))
    out, weights = on_every_core(attention_with_weights, q, k, v)  # weights: [batch * n_head, seq, seq]
    return out.reshape(shape), (q, k, v, weights)


def attention_with_weights(q, k, v):  # gpt2.attention, keeping the weights [n, seq, seq] for the backward
    weights = attention_weights(q, k)
    return weights @ v, weights


def heads_stack(t):  # [batch, n_head, seq, d_head] -> [batch * n_head, seq, d_head]
    return t.reshape(-1, *t.shape[-2:])


def attention_backward(dout, cache):  # [batch, n_head, seq, d_head] -> 3 x [batch, n_head, seq, d_head]
    q, k, v, weights = cache
    dq, dk, dv = on_every_core(attention_grads, heads_stack(dout), q, k, v, weights)
    return tuple(d.reshape(dout.shape) for d in (dq, dk, dv))


def attention_grads(dout, q, k, v, weights):  # 4 x [n, seq, d_head], [n, seq, seq] -> 3 x [n, seq, d_head]
    # out = weights @ v:          dweights = dout @ v.T,   dv = weights.T @ dout
    # weights = softmax(scores), row by row (w_i = e^s_i / sum_j e^s_j, so dw_i/ds_j = w_i (1[i=j] - w_j)):
    #                             dscores = weights * (dweights - sum over the row of dweights * weights)
    # scores = q @ k.T / sqrt(d): dq = dscores @ k / sqrt(d),   dk = dscores.T @ q / sqrt(d)
    # The causal mask is a constant: a masked weight is 0, so its dscores is 0 and no gradient leaks to the future.
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


def lm_head_loss_forward(x, wte, targets):  # [batch, seq, C], [batch, seq] -> the mean loss
    """The LM head and the cross-entropy together, LOGITS_CHUNK positions at a time. The logits are the largest
    arrays of training (a row of 1024 positions is 206 MB, as large again for their gradient), and each chunk's
    are done with once its gradient is known: so the forward computes the gradient through the head too, chunk by
    chunk, and keeps only that; the backward scales it by dloss."""
    x_rows, target_rows = x.reshape(-1, x.shape[-1]), targets.reshape(-1)  # every position as one row
    n = len(x_rows)
    total, dx, dwte = 0.0, np.empty_like(x_rows), None
    for start in range(0, n, LOGITS_CHUNK):
        rows = slice(start, start + LOGITS_CHUNK)
        logits, lm_head_cache = lm_head_forward(x_rows[rows], wte)  # -> [chunk, n_vocab]
        loss, cross_entropy_cache = cross_entropy_forward(logits, target_rows[rows])
        total += loss * len(logits)
        dlogits = cross_entropy_backward(len(logits) / n, cross_entropy_cache)  # the chunk's share of the mean
        dx[rows], dlm_head = lm_head_backward(dlogits, lm_head_cache)
        if dwte is None:
            dwte = dlm_head["wte"]
        else:
            dwte += dlm_head["wte"]
    return total / n, (dx.reshape(x.shape), dwte)


def lm_head_loss_backward(dloss, cache):  # dloss (1 for the loss itself) -> [batch, seq, C], dwte [n_vocab, C]
    dx, dwte = cache
    if dloss != 1.0:  # the chain rule from whatever comes after the loss; for the loss itself, nothing to do
        dx, dwte = dx * dloss, dwte * dloss
    return dx, {"wte": dwte}


def recomputed_block_forward(x, n_head, **block):  # [batch, seq, C] -> [batch, seq, C]
    """transformer_block_forward keeping only its input: the backward computes the block's activations again,
    one block at a time. Every block's activations at once are the largest memory of training after the weights
    and AdamW's moments (774M at 1 x 1024: about 140 MB a block, 5 GB in all), for a third more arithmetic."""
    out, _ = transformer_block_forward(x, **block, n_head=n_head)
    return out, (x, block, n_head)


def recomputed_block_backward(dout, cache):  # [batch, seq, C] -> [batch, seq, C]
    x, block, n_head = cache
    _, block_cache = transformer_block_forward(x, **block, n_head=n_head)  # the same numbers as the first time
    return transformer_block_backward(dout, block_cache)


def gpt2_forward(inputs, targets, wte, wpe, blocks, ln_f, n_head, recompute=False):  # [batch, seq] x2 -> loss
    x, embedding_cache = embedding_forward(inputs, wte, wpe)  # -> [batch, seq, C]
    block_forward, block_backward = ((recomputed_block_forward, recomputed_block_backward) if recompute else
                                     (transformer_block_forward, transformer_block_backward))
    block_caches = []
    for block in blocks:
        x, block_cache = block_forward(x, **block, n_head=n_head)
        block_caches.append(block_cache)
    x, ln_f_cache = layer_norm_forward(x, **ln_f)
    loss, lm_head_loss_cache = lm_head_loss_forward(x, wte, targets)
    return loss, (embedding_cache, block_backward, block_caches, ln_f_cache, lm_head_loss_cache)


def gpt2_backward(dloss, cache):  # the loss's gradient -> a gradient tree shaped like params
    embedding_cache, block_backward, block_caches, ln_f_cache, lm_head_loss_cache = cache
    dx, dlm_head = lm_head_loss_backward(dloss, lm_head_loss_cache)
    dx, dln_f = layer_norm_backward(dx, ln_f_cache)
    dblocks = []
    while block_caches:  # the last block's gradient is known first; each cache is let go once used
        dx, dblock = block_backward(dx, block_caches.pop())
        dblocks.insert(0, dblock)
    dembedding = embedding_backward(dx, embedding_cache)
    # wte has two uses, the lookup table and the LM head, so its gradient is the sum of theirs. Added in place
    # into the head's share: a fresh array of wte's size (154 MB for GPT-2) would cost page faults.
    dwte = dlm_head["wte"]
    dwte += dembedding["wte"]
    return {"wte": dwte, "wpe": dembedding["wpe"], "blocks": dblocks, "ln_f": dln_f}


def loss_and_grads(params, inputs, targets, n_head, recompute=False):
    """The mean next-token cross-entropy of a batch and its gradient with respect to every parameter.

    inputs, targets: int arrays [batch, seq], targets being inputs shifted by one. The gradients form a tree with
    the keys, shapes and dtype of params; wte's includes both of its uses, the embedding and the LM head.
    recompute: keep only each block's input in the forward and compute its activations again in the backward
    (the same gradients, in less memory, for more time)."""
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    loss, cache = gpt2_forward(inputs, targets, **params, n_head=n_head, recompute=recompute)
    return loss, gpt2_backward(1.0, cache)  # the chain starts at dloss/dloss = 1


def lm_loss(params, inputs, targets, n_head):
    """The same loss, forward only, for evaluation: through gpt2.py's forward pass, which keeps nothing for a
    backward pass."""
    logits = gpt2.gpt2(np.asarray(inputs), **params, n_head=n_head)  # -> [batch, seq, n_vocab]
    loss, _ = cross_entropy_forward(logits, np.asarray(targets))
    return loss


# ============================================================================================ training

EVAL_WINDOWS = 32  # how many block-sized windows of the validation tokens an evaluation reads, at most
BETAS = (0.9, 0.95)
EPS = 1e-8
MIN_LR_FRACTION = 0.1  # the cosine ends at 10% of --learning_rate


# ---------------------------------------------------------------------------------------------- the data

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
    torch.nn.utils.clip_grad_norm_ does. Returns the norm before clipping."""
    norm = math.sqrt(sum(float(np.vdot(g, g)) for g in flatten(grads).values()))
    if max_norm > 0:
        scale = min(1.0, max_norm / (norm + 1e-6))
        for g in flatten(grads).values():
            g *= scale
    return norm


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
            # The blocks are independent: one thread per core takes them in turn (NumPy releases the GIL).
            list(POOL.map(lambda rows: self.update(p[rows], g[rows], m[rows], v[rows], lr, weight_decay),
                          row_blocks(p)))

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
        loss, grads = loss_and_grads(params, inputs, targets, config["n_head"], config.get("recompute", False))
        total_loss += loss
        if total_grads is None:
            total_grads = grads
        else:
            for total, g in zip(flatten(total_grads).values(), flatten(grads).values()):
                total += g
    if config["grad_accum"] > 1:
        for total in flatten(total_grads).values():
            total *= 1.0 / config["grad_accum"]
    loss, norm = total_loss / config["grad_accum"], clip_grads(total_grads, config["grad_clip"])
    if not (math.isfinite(loss) and math.isfinite(norm)):  # diverged: this update would make every weight nan
        raise Diverged(f"the loss is {loss:.4g} and the gradients' norm {norm:.4g}, so the step was not taken")
    optimizer.step(params, total_grads, lr)
    return loss


class Diverged(Exception):
    """A step whose loss or gradients are not finite numbers (inf or nan): a learning rate too high, say."""


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (kill, `docker stop`, a cluster taking its machine back) during training asks to
    stop after the current step: an update interrupted halfway would leave the weights matching no step at all, and
    that is what would be saved. signum: the first signal that asked, or None."""

    SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.previous = {signum: signal.signal(signum, self.request) for signum in self.SIGNALS}
        return self

    def request(self, signum, frame):
        if self.signum is None:
            tqdm.write(f"{self.SIGNALS[signum]}: stopping after this step", file=sys.stderr)
            self.signum = signum

    @property
    def requested(self):
        return self.signum is not None

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def train(params, optimizer, step, rng, tokens, val_tokens, config, run, sample):
    """Update params in place from `step` up to --max_steps, saving every --save_every steps and at the end, and
    keeping the weights of the lowest validation loss so far as models/<out_name>-best. Prints sample(params), a
    preview of what the model writes, every --sample_every steps. Returns the step it reached, before --max_steps
    only if --patience or a signal stopped it, and that signal (StopRequest's signum) or None."""
    max_steps, n_head = config["max_steps"], config["n_head"]
    tokens_per_step = config["batch_size"] * config["block_size"] * config["grad_accum"]
    windows = val_windows(val_tokens, config["block_size"])
    with StopRequest() as stop, tqdm(total=max_steps, initial=step, unit="step", file=sys.stderr,
                                     dynamic_ncols=True) as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow or nan, in any thread: Diverged stops the run
        while step < max_steps and not stop.requested:
            lr = learning_rate_at(step, config["learning_rate"], config["warmup_steps"], config["lr_decay_steps"])
            start = time.perf_counter()
            try:
                loss = train_step(params, optimizer, tokens, rng, config, lr)
            except Diverged as e:  # the weights are still those of the step before, but saving them would only
                raise runs.RunError(run.diverged(step + 1, e)) from None  # keep a run that is blowing up
            tokens_per_s = tokens_per_step / (time.perf_counter() - start)
            step += 1
            val_loss = ""
            # Also at the step of a best model saved just before a death, which a resumed run's log has lost
            if config["eval_every"] and (step % config["eval_every"] == 0 or step in (max_steps, run.best_ahead)):
                val_loss = evaluate(params, windows, n_head, config["batch_size"])
                if not math.isfinite(val_loss):  # weights that overflow the forward pass: never a best, never saved
                    raise runs.RunError(run.diverged(step, f"its validation loss is {val_loss:.4g}"))
                tqdm.write(f"step {step}: val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}",
                           file=sys.stderr)
            run.log_step(step=step, train_loss=f"{loss:.6f}", val_loss=val_loss and f"{val_loss:.6f}",
                         lr=f"{lr:.6g}", tokens_per_s=f"{tokens_per_s:.1f}")
            bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s")
            bar.update()
            if run.best.step == step:  # the lowest validation loss so far: keep these weights
                run.save_best(step, params)
            # Early stopping: --patience evaluations in a row without a new best mean the model has begun to fit
            # the training text better than text it has not seen.
            stalled = run.out_of_patience()
            if stalled:
                tqdm.write(f"stopping at step {step}: {run.best.stopped(config['patience'])}", file=sys.stderr)
            if stalled or run.save_due(step, stop.requested):
                run.save(step, params, optimizer, rng)
            if stalled:
                break
            preview_due = config["sample_every"] and step % config["sample_every"] == 0
            if preview_due and step < max_steps and not stop.requested:  # main prints the last one
                tqdm.write(f"step {step} sample:\n{sample(params)}", file=sys.stderr)
    return step, stop.signum


D = runs.Default  # a flag left out: a new run takes this value, --resume the run's recorded one


def main(dataset=D(None), out_name=None, val_dataset=D(None), text_column=D(None), init_from=D("124M"),
         n_layer=D(12), n_head=D(12), n_embd=D(768), n_ctx=D(1024), block_size=D(256), batch_size=D(4),
         grad_accum=D(1), max_steps=D(1000), learning_rate=D(3e-4), warmup_steps=D(100),
         lr_decay_steps=D(None, "max_steps"), weight_decay=D(0.1), grad_clip=D(1.0), eval_every=D(100),
         save_every=D(500), seed=D(0), patience=D(0), sample_every=D(100), sample_prompt=D(None), sample_length=D(40),
         sample_temperature=D(0.8), sample_top_k=D(40), models_dir="models", resume=False, overwrite=False,
         recompute=False):
    """Train GPT-2 on your text and save it as models/<out_name>, a model folder gpt2.py and score.py load.

    python train.py --dataset TEXT --out_name NAME [flags]. Before the first step, a few lines on stderr say what
    was read (files, documents, what was skipped and why), the tokens of the training and validation splits, the
    model's parameters, the tokens per step and the passes over the training tokens --max_steps makes, and where
    the run is. --resume continues a saved run with the options it was started with (the flags that would change
    its training are refused).

    Args:
        dataset: the text to train on (required, except with --resume). A text file is one document; a .jsonl
            file has one per line, in its "text" field; a .csv file one per row, in its only column, the column
            --text_column names, or the one named text. A folder is read with its subfolders, in the order of the
            files' paths, taking .txt, .md, .rst, .jsonl and .csv files (any case) and UTF-8 files without an
            extension; other files and hidden ones are skipped and counted, FIFOs, devices and broken links are
            skipped and named. Every document is followed by <|endoftext|>
        out_name: the run's folder name under models_dir (required); an existing one is refused without
            --resume or --overwrite
        val_dataset: the text to validate on, in the same forms (default: the last 10% of the dataset's tokens)
        text_column: the column of .csv files, or the field of .jsonl lines, that holds the text (by default a
            CSV file's only column or its column named text, and the field text)
        init_from: the model to fine-tune: 124M, 355M, 774M or 1558M (downloaded if missing), a model folder
            under models_dir, a path to one (./x), a Hugging Face Hub repo id (owner/name[@revision]); or scratch,
            a new model of the shape below with GPT-2's initialization and vocabulary
        n_layer: transformer blocks of a model from scratch
        n_head: attention heads of a model from scratch (they divide n_embd)
        n_embd: the width of a model from scratch
        n_ctx: the context of a model from scratch, in positions (at least block_size)
        block_size: tokens per training sequence (at most the model's context)
        batch_size: sequences per micro-batch
        grad_accum: micro-batches whose mean gradient makes one optimizer step (tokens per step: batch_size x
            block_size x grad_accum)
        max_steps: optimizer steps in all; a resumed run stops there too, and may be given a higher one
        learning_rate: the peak learning rate, reached at the end of the warmup
        warmup_steps: steps of linear warmup from learning_rate / warmup_steps to learning_rate
        lr_decay_steps: the step where the cosine after the warmup reaches 10% of learning_rate, flat after
        weight_decay: AdamW's decoupled weight decay, on 2-D weights only (not biases or layer-norm gains)
        grad_clip: the largest global L2 norm of the gradients; larger ones are scaled down to it (0: no clipping)
        eval_every: the validation loss and perplexity every this many steps and at the end (0: never)
        save_every: save the run every this many steps (0: only at the end, or on Ctrl-C)
        seed: the initialization of a model from scratch and the random choice of training windows
        patience: stop after this many evaluations in a row without a lower validation loss, and save (0: never);
            the best weights are always kept as models/<out_name>-best while there is a validation loss
        sample_every: print a preview of what the model writes every N steps, on stderr (0: none); the last
            one is printed on stdout when the run ends
        sample_prompt: the text that previews continue (default: the first 16 tokens of the validation text,
            which the model never trains on; "" starts from <|endoftext|>)
        sample_length: how many tokens a preview adds (left at its default, fewer if the model's context is shorter)
        sample_temperature: the previews' temperature (0: greedy); every preview uses --seed, so previews at
            different steps differ only by what the model learned
        sample_top_k: the previews' top-k (0: off)
        models_dir: where runs and models live; tokenized datasets are kept in models_dir/token-cache
        resume: continue the saved run out_name from its last save, with its recorded options
        overwrite: start the run out_name again; the old one is kept until the new run's first save
        recompute: compute each block's activations again in the backward pass: the same gradients in far less
            memory, for about a third more time (what lets 774M fine-tune in 24 GB)
    """
    setup = runs.setup(locals())  # every check, the data tokenized, a resumed run read back; nothing written yet
    config, hparams = setup.config, setup.hparams
    with runs.open_run(setup) as run:  # the run's lock: a second run on this name is refused
        if setup.saved:
            params, step, rng = setup.saved.params, setup.saved.step, setup.saved.rng
            optimizer = AdamW(params, config["weight_decay"])
            optimizer.m, optimizer.v = (utils.nest(moments, hparams["n_layer"]) for moments in (setup.saved.m,
                                                                                               setup.saved.v))
            optimizer.t = setup.saved.adam_t
        else:
            init_rng, data_seed = np.random.SeedSequence(config["seed"]).spawn(2)
            if config["init_from"] == "scratch":
                params = init_params(hparams["n_layer"], hparams["n_embd"], hparams["n_ctx"],
                                     np.random.default_rng(init_rng))
            else:  # the loaded weights are read-only memory maps: training needs its own copy
                params = utils.load_model_params(config["init_from"], setup.models_dir, hparams["n_layer"])
                params = tree_map(lambda a: np.array(a, dtype=np.float32, order="C"), params)
            # An existing run (--overwrite) stays as it is until the first save replaces it whole.
            optimizer, step, rng = AdamW(params, config["weight_decay"]), 0, np.random.default_rng(data_seed)

        def sample(params):  # the same prompt, seed and settings every time: `gpt2.py --seed` gives the same text
            ids = gpt2.generate(setup.sample_prompt, params, hparams["n_head"], config["sample_length"],
                                temperature=config["sample_temperature"], top_k=config["sample_top_k"],
                                seed=config["seed"])
            return setup.encoder.decode(setup.sample_prompt + ids)

        step, signum = train(params, optimizer, step, rng, setup.train_tokens, setup.val_tokens, config, run, sample)
    if signum is not None and step < config["max_steps"] and not run.out_of_patience():  # say what was kept, and
        sys.stderr.write(run.interrupted(step, StopRequest.SIGNALS[signum]) + "\n")        # end as the signal does
        raise SystemExit(128 + signum)
    print(sample(params))
    sys.stderr.write(run.summary(step) + "\n")


SHORT_FLAGS = {"d": "dataset", "v": "val_dataset", "i": "init_from", "e": "eval_every", "r": "resume"}  # chosen


def cli():
    run_script(main, text_flags={"dataset", "val_dataset", "text_column", "out_name", "init_from", "models_dir",
                                 "sample_prompt"},
               short_flags=SHORT_FLAGS)


if __name__ == "__main__":
    cli()
