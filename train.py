"""Training GPT-2 in NumPy: the backward pass, then AdamW and the training loop.

The first half mirrors gpt2.py's forward pass one piece at a time. Each `*_forward` computes what gpt2.py computes
and also returns a cache: the inputs and intermediate values its gradient needs. The `*_backward(dout, cache)`
beside it receives dout, the gradient of the loss with respect to that piece's output, and returns the gradient
with respect to its input and, for a piece with weights, a dict of weight gradients under the weights' own names.
Put together, the gradients form a tree with exactly the keys and shapes of the params tree. Shapes are for a
batch of token ids [batch, seq]; n_embd is written C where it keeps lines short.
"""
import math

import numpy as np

import gpt2
from gpt2 import causal_mask, gelu, linear, merge_heads, softmax, split_heads

# ============================================================================================ the backward pass


def embedding_forward(inputs, wte, wpe):  # [batch, seq] -> [batch, seq, n_embd]
    return wte[inputs] + wpe[np.arange(inputs.shape[-1])], (inputs, wpe.shape)


def embedding_backward(dx, cache, dwte):  # [batch, seq, n_embd] -> dwpe [n_ctx, n_embd], and adds into dwte
    """wte is used twice, as the lookup table here and as the LM head; dwte comes in holding the head's share and
    this adds the lookup's share to it."""
    inputs, wpe_shape = cache
    # A lookup copies row inputs[b, t] of the table to position (b, t), so a row's gradient is the sum of dx over
    # the positions that looked it up: a scatter-add. np.add.at adds every repeated index; dwte[inputs] += dx
    # would keep only one of them.
    np.add.at(dwte, inputs.reshape(-1), dx.reshape(-1, dx.shape[-1]))
    dwpe = np.zeros(wpe_shape, dtype=dx.dtype)
    dwpe[:inputs.shape[-1]] = dx.reshape(-1, *dx.shape[-2:]).sum(axis=0)  # every sample uses positions 0..seq-1
    return dwpe


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


def gelu_backward(dout, x):
    # gelu(x) = 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), so
    #   gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    x2 = x * x
    t = np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x2 * x))
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * x2))


def matmul(a, b):  # [..., n, k] @ [..., k, m] -> [..., n, m]
    """a @ b for stacks of matrices, at BLAS speed. NumPy hands a stack to BLAS only when the stack has a single
    leading axis and both operands are contiguous; [batch, n_head, ...] stacks and transposed views fall back to
    a loop about 10x slower. So both are copied contiguous and flattened to one leading axis first."""
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a, b = (np.ascontiguousarray(np.broadcast_to(t, (*lead, *t.shape[-2:]))).reshape(-1, *t.shape[-2:]) for t in (a, b))
    return (a @ b).reshape(*lead, a.shape[-2], b.shape[-1])


def attention_forward(q, k, v):  # 3 x [batch, n_head, seq, d_head] -> [batch, n_head, seq, d_head]
    scores = matmul(q, k.swapaxes(-1, -2))  # -> [batch, n_head, seq, seq]
    scores /= math.sqrt(q.shape[-1])
    scores += causal_mask(q.shape[-2], k.shape[-2])
    weights = softmax(scores)
    return matmul(weights, v), (q, k, v, weights)


def attention_backward(dout, cache):  # [batch, n_head, seq, d_head] -> 3 x [batch, n_head, seq, d_head]
    # out = weights @ v:          dweights = dout @ v.T,   dv = weights.T @ dout
    # weights = softmax(scores), row by row (w_i = e^s_i / sum_j e^s_j, so dw_i/ds_j = w_i (1[i=j] - w_j)):
    #                             dscores = weights * (dweights - sum over the row of dweights * weights)
    # scores = q @ k.T / sqrt(d): dq = dscores @ k / sqrt(d),   dk = dscores.T @ q / sqrt(d)
    # The causal mask is a constant: a masked weight is 0, so its dscores is 0 and no gradient leaks to the future.
    q, k, v, weights = cache
    dv = matmul(weights.swapaxes(-1, -2), dout)
    dscores = matmul(dout, v.swapaxes(-1, -2))  # dweights, turned into dscores in place:
    dscores -= np.sum(dscores * weights, axis=-1, keepdims=True)
    dscores *= weights
    dscores /= math.sqrt(q.shape[-1])
    return matmul(dscores, k), matmul(dscores.swapaxes(-1, -2), q), dv


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
    out, c_proj_cache = linear_forward(gelu(h), **c_proj)  # -> [batch, seq, C]
    return out, (c_fc_cache, h, c_proj_cache)


def ffn_backward(dout, cache):  # [batch, seq, C] -> [batch, seq, C]
    c_fc_cache, h, c_proj_cache = cache
    dgelu, dc_proj = linear_backward(dout, c_proj_cache)
    dx, dc_fc = linear_backward(gelu_backward(dgelu, h), c_fc_cache)
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


def lm_head_backward(dlogits, cache):  # [batch, seq, n_vocab] -> [batch, seq, C], dwte [n_vocab, C]
    # logits = x @ wte.T:   dx = dlogits @ wte,   dwte = dlogits.T @ x   (summed over every position)
    x, wte = cache
    dlogits_rows = dlogits.reshape(-1, dlogits.shape[-1])
    return (dlogits_rows @ wte).reshape(x.shape), dlogits_rows.T @ x.reshape(-1, x.shape[-1])


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


def cross_entropy_backward(cache):  # -> dlogits [batch, seq, n_vocab]
    # loss = mean over the N positions of log(sum_j e^z_j) - z_target, so dloss/dz = (softmax(z) - onehot) / N.
    probs, targets = cache
    dlogits = probs  # in place again: the probabilities are not needed after this
    np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(dlogits, targets[..., None], axis=-1) - 1.0,
                      axis=-1)
    dlogits /= targets.size
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
    dx, dwte = lm_head_backward(dlogits, lm_head_cache)
    dx, dln_f = layer_norm_backward(dx, ln_f_cache)
    dblocks = []
    for block_cache in reversed(block_caches):  # the last block's gradient is known first
        dx, dblock = transformer_block_backward(dx, block_cache)
        dblocks.insert(0, dblock)
    dwpe = embedding_backward(dx, embedding_cache, dwte)
    return {"wte": dwte, "wpe": dwpe, "blocks": dblocks, "ln_f": dln_f}


def loss_and_grads(params, inputs, targets, n_head):
    """The mean next-token cross-entropy of a batch and its gradient with respect to every parameter.

    inputs, targets: int arrays [batch, seq], targets being inputs shifted by one. The gradients form a tree with
    the keys, shapes and dtype of params; wte's includes both of its uses, the embedding and the LM head."""
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    logits, cache = gpt2_forward(inputs, **params, n_head=n_head)
    loss, cross_entropy_cache = cross_entropy_forward(logits, targets)
    return loss, gpt2_backward(cross_entropy_backward(cross_entropy_cache), cache)


def lm_loss(params, inputs, targets, n_head):
    """The same loss, forward only: nothing is kept for a backward pass."""
    logits = gpt2.gpt2(np.asarray(inputs), **params, n_head=n_head)
    return cross_entropy_forward(logits, np.asarray(targets))[0]

# ============================================================================================ training
