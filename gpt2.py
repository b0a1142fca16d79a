"""GPT-2 inference in NumPy, written to be read top to bottom.

Every function takes its own weights by the names the checkpoint uses, so `**block` unpacking wires the whole
model and the params dict is the call tree. Shapes are commented where they change; n_seq is the number of
positions, and any leading batch axes ride along untouched.
"""
import startup  # noqa: F401 -- first of all: a Ctrl-C during the slow imports below is one line, not a traceback
import copy
import functools
import math

import numpy as np

import threads
from cli import check_logits, check_sampling, is_int  # the rules for every sampling value, the command line's too


def gelu(x):  # x: a float array, left as it is
    # GPT-2 was trained with the tanh approximation of GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    # Written as that expression, NumPy makes a new array for each of its nine operations; in the MLP these
    # are the largest activations, so the steps go one at a time through one array, y, instead (1.7x faster
    # on [1024, 3072]). x * x rather than x**3, which NumPy computes with a general pow().
    c = math.sqrt(2.0 / math.pi)
    y = x * x
    y *= 0.044715 * c
    y += c
    y *= x  # sqrt(2/pi) (x + 0.044715 x^3)
    np.tanh(y, out=y)
    y += 1.0
    y *= x
    y *= 0.5
    return y


def softmax(x):  # in place: x is overwritten with its softmax and returned
    # For a long prompt, x is the attention scores, the largest array in the model: a fresh array of that size
    # costs more in page faults than the arithmetic itself, so the caller hands over an array it no longer needs.
    x -= np.max(x, axis=-1, keepdims=True)  # shifting by the max keeps exp from overflowing
    np.exp(x, out=x)
    x /= np.sum(x, axis=-1, keepdims=True)
    return x


def layer_norm(x, g, b, eps=1e-5):
    x = x - np.mean(x, axis=-1, keepdims=True)  # center each position (a new array: the caller's x stays as it was)
    variance = np.mean(x * x, axis=-1, keepdims=True)
    x /= np.sqrt(variance + eps)  # scale to unit variance, then by the learned gain and shift, in place
    x *= g
    x += b
    return x


def linear(x, w, b):  # [n_seq, n_in] -> [n_seq, n_out]
    # One matrix product over every position of every sample: given a batch axis, NumPy would multiply
    # sample by sample and read w from memory once per sample.
    y = x.reshape(-1, x.shape[-1]) @ w
    y += b  # in place: `+ b` would make a second array the size of the output, one more pass over memory
    return y.reshape(*x.shape[:-1], w.shape[-1])


def ffn(x, c_fc, c_proj):  # [n_seq, n_embd] -> [n_seq, n_embd]
    h = gelu(linear(x, **c_fc))  # [n_seq, n_embd] -> [n_seq, 4*n_embd]
    return linear(h, **c_proj)  # [n_seq, 4*n_embd] -> [n_seq, n_embd]


@functools.lru_cache(maxsize=8)  # built once per shape, not once per layer: every block asks for the same one
def causal_mask(n_q):  # -> [n_q, n_q]
    # The n_q queries are the last n_q positions; each may look at itself and everything before it. Only the
    # last n_q keys can lie in a query's future, so the mask covers those columns alone (n_q < n_k once a
    # KVCache, below, holds the earlier positions' keys).
    # -1e10 rather than -inf: exp() turns it into an exact 0 without ever producing inf - inf = nan.
    mask = np.triu(np.full((n_q, n_q), -1e10, dtype=np.float32), k=1)
    mask.flags.writeable = False  # shared by every caller
    return mask


def attention_weights(q, k):  # [n_head, n_q, d_head], [n_head, n_k, d_head] -> [n_head, n_q, n_k]
    """How much each query attends to each key: softmax(q @ k.T / sqrt(d_head)), the future masked out."""
    q = q * (1.0 / math.sqrt(q.shape[-1]))  # scaling q, n_k times smaller than the scores, gives the same scores
    scores = q @ k.swapaxes(-1, -2)  # all heads in one stacked matmul
    n_q = q.shape[-2]
    if n_q > 1:  # a single query is the newest position: nothing lies in its future
        scores[..., -n_q:] += causal_mask(n_q)
    return softmax(scores)


ATTENTION_BLOCK = 256  # queries at a time, as PREFILL_CHUNK below (whole, scoring was 5-15% slower)


def attention(q, k, v):  # [n_head, n_q, d_head], [n_head, n_k, d_head] x2 -> [n_head, n_q, d_head]
    # Each query's average of the values, weighted by its attention. Many queries at once (scoring, or a prompt
    # without a KV cache) go ATTENTION_BLOCK at a time, each block with the keys up to its last query only: the
    # masked-out part is never computed, and a block's scores stay small enough for the CPU's cache.
    n_q, n_k = q.shape[-2], k.shape[-2]
    if n_q <= ATTENTION_BLOCK:  # one block (every decode step, every prefill chunk): nothing to split or copy
        return attention_weights(q, k) @ v
    out = np.empty(q.shape, dtype=q.dtype)
    for start in range(0, n_q, ATTENTION_BLOCK):
        end = min(start + ATTENTION_BLOCK, n_q)
        seen = n_k - n_q + end  # the block's queries are the last of these keys
        out[..., start:end, :] = attention_weights(q[..., start:end, :], k[..., :seen, :]) @ v[..., :seen, :]
    return out


def split_heads(x, n_head):  # [n_seq, n_embd] -> [n_head, n_seq, n_embd/n_head]
    return x.reshape(*x.shape[:-1], n_head, -1).swapaxes(-3, -2)


def merge_heads(x):  # [n_head, n_seq, d_head] -> [n_seq, n_head*d_head]
    x = x.swapaxes(-3, -2)
    return x.reshape(*x.shape[:-2], -1)


# Before mha, which appends to it: as in openai/gpt-2, the cache is part of attention's design, not an add-on.
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
        start, end = self.length, self.length + k.shape[-2]
        if end > self.keys.shape[-2]:  # checked before anything changes: a refused append leaves the cache as it was
            raise ValueError(f"KV cache holds {self.keys.shape[-2]} positions, {end} were asked for")
        self.keys[..., start:end, :] = k
        self.values[..., start:end, :] = v
        self.length = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def repeat(self, n_samples):  # [n_head, capacity, d_head] -> [n_samples, n_head, capacity, d_head]
        """Copies of this history for n_samples continuations that will go their own ways. A single one goes on
        in this cache's own buffers, seen with a sample axis (a copy would cost 629 MB for 1558M's full context):
        from then on, append to it, not to this cache."""
        if n_samples == 1:
            single = copy.copy(self)
            single.keys, single.values = self.keys[None], self.values[None]
            return single
        batched = KVCache((n_samples, *self.keys.shape))
        batched.keys[..., :self.length, :] = self.keys[..., :self.length, :]
        batched.values[..., :self.length, :] = self.values[..., :self.length, :]
        batched.length = self.length
        return batched


def mha(x, c_attn, c_proj, n_head, cache=None, last_only=False):  # [n_seq, n_embd] -> [n_seq or 1, n_embd]
    qkv = linear(x, **c_attn)  # [n_seq, n_embd] -> [n_seq, 3*n_embd]
    q, k, v = (split_heads(t, n_head) for t in np.split(qkv, 3, axis=-1))  # -> 3 x [n_head, n_seq, d_head]
    if cache is not None:
        k, v = cache.append(k, v)  # the new positions attend to every earlier one too: -> [n_head, length, d_head]
    if last_only:  # -> [n_head, 1, d_head]: the last position's query alone, which sees every key (n_seq -> 1 below)
        q = q[..., -1:, :]
    heads = attention(q, k, v)  # all heads in one batched matmul
    return linear(merge_heads(heads), **c_proj)  # [n_head, n_seq, d_head] -> [n_seq, n_embd]


def transformer_block(x, mlp, attn, ln_1, ln_2, n_head, cache=None, last_only=False):  # [n_seq, n_embd] -> same
    """Pre-norm residual block: each sublayer reads a normalized copy and adds its result back.

    last_only: only the last position's output is wanted (-> [1, n_embd]), as from the last block when only the last
    logits are. Every position still gives attention its key and value, but the other queries, and everything
    after attention for the other positions, would only be thrown away."""
    attended = mha(layer_norm(x, **ln_1), **attn, n_head=n_head, cache=cache, last_only=last_only)
    x = (x[..., -1:, :] if last_only else x) + attended
    x = x + ffn(layer_norm(x, **ln_2), **mlp)
    return x


def embed(inputs, wte, wpe, start=0):  # [n_seq] -> [n_seq, n_embd]
    """Token + position embeddings of inputs at positions start, start + 1, ..."""
    inputs = np.asarray(inputs)
    return wte[inputs] + wpe[np.arange(start, start + inputs.shape[-1])]


def lm_head(x, wte, ln_f):  # [n_seq, n_embd] -> [n_seq, n_vocab]
    # The output projection is the token embedding itself (weight tying): a logit is the similarity between
    # the final hidden state and a token's input vector.
    return layer_norm(x, **ln_f) @ wte.T


def gpt2(inputs, wte, wpe, blocks, ln_f, n_head, kv_cache=None, last_only=False):  # [n_seq] -> [n_seq, n_vocab]
    """Logits for every position of inputs.

    kv_cache: optional list of one KVCache per block. With it, inputs are only the positions the caches have
    not seen yet; each call appends their keys and values, so generating a token costs one position's work.
    last_only: return only the last position's logits ([n_vocab]), all that generation needs.
    """
    x = embed(inputs, wte, wpe, start=kv_cache[0].length if kv_cache else 0)
    for i, (block, cache) in enumerate(zip(blocks, kv_cache or [None] * len(blocks))):
        x = transformer_block(x, **block, n_head=n_head, cache=cache, last_only=last_only and i == len(blocks) - 1)
    if last_only:
        x = x[..., -1, :]  # [1, n_embd] -> [n_embd]
    return lm_head(x, wte, ln_f)


def new_kv_cache(params, n_head, capacity):
    d_head = params["wte"].shape[1] // n_head
    return [KVCache((n_head, capacity, d_head)) for _ in params["blocks"]]


def top_k_mask(logits, top_k):  # [n_samples, n_vocab] -> [n_samples, n_vocab] of bool
    """The tokens top_k keeps: each row's top_k largest logits, and any tied with the k-th (top_k 0: all)."""
    if not 0 < top_k < logits.shape[-1]:  # a top_k as large as the vocabulary keeps every token
        return np.ones(logits.shape, dtype=bool)
    kth_largest = np.partition(logits, -top_k, axis=-1)[:, -top_k, None]
    return logits >= kth_largest


def top_p_mask(probs, top_p):  # [n_samples, n_vocab] -> [n_samples, n_vocab] of bool
    """The tokens the nucleus keeps: each row's fewest most likely tokens whose probabilities add up to top_p
    (so the token that crosses top_p is kept), and any tied with the last of them (top_p 1.0: all)."""
    if top_p >= 1.0:
        return np.ones(probs.shape, dtype=bool)
    descending = -np.sort(-probs, axis=-1)
    n_before = np.sum(np.cumsum(descending, axis=-1) < top_p, axis=-1)  # tokens before the one reaching top_p
    smallest_kept = np.take_along_axis(descending, np.minimum(n_before, probs.shape[-1] - 1)[:, None], axis=-1)
    return probs >= smallest_kept


def min_p_mask(probs, min_p):  # [n_samples, n_vocab] -> [n_samples, n_vocab] of bool
    """The tokens min-p keeps: those at least min_p times as likely as the most likely one (min_p 0: all)."""
    return probs >= min_p * np.max(probs, axis=-1, keepdims=True)  # p >= min_p * max(p)


def draw(probs, uniforms):  # [n_samples, n_vocab], [n_samples] -> [n_samples]
    """Inverse-CDF sampling: for u in [0, 1), the first token whose cumulative probability passes u * total.
    The probabilities need not add up to 1, and a token of probability 0 is never drawn."""
    tokens = []
    for cdf, u in zip(np.cumsum(probs, axis=-1), uniforms):
        last = np.searchsorted(cdf, cdf[-1])  # the last token of nonzero probability, in case u * total rounds up
        tokens.append(min(np.searchsorted(cdf, u * cdf[-1], side="right"), last))
    return np.array(tokens)


def sample(logits, rngs, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0):  # [n_samples, n_vocab] -> [n_samples]
    """Each sample's next token: the most likely one when temperature is 0, otherwise a draw from
    softmax(logits / temperature) restricted to the top_k most likely tokens, then to the nucleus of top_p,
    then to min_p (HF transformers' order). Sample i draws one number from rngs[i], so it gets the same token
    whether it is sampled alone or in a batch."""
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    # float64, and the largest logit subtracted before dividing: a tiny temperature then sends every other
    # logit to -inf (probability 0: greedy) rather than all of them to +-inf (inf - inf = nan), and the running
    # sums over 50257 probabilities do not drift.
    probs = logits.astype(np.float64)  # the steps below work in place: each fresh array costs page faults
    probs -= np.max(probs, axis=-1, keepdims=True)
    with np.errstate(over="ignore"):  # that overflow to -inf is the intended result
        probs /= temperature
    np.exp(probs, out=probs)
    probs[~top_k_mask(logits, top_k)] = 0.0
    probs /= np.sum(probs, axis=-1, keepdims=True)  # the largest logit's weight is 1: never 0 / 0
    probs[~top_p_mask(probs, top_p)] = 0.0
    if min_p > 0:
        probs[~min_p_mask(probs, min_p)] = 0.0
    return draw(probs, [rng.random() for rng in rngs])


# Controls on the logits before sampling (HF's logits processors). Each takes the batch's logits, [n_samples, n_vocab],
# and changes them in place.

def penalize_repetition(logits, ids, penalty):  # ids: [n_samples, n_seen], the prompt and the new tokens so far
    """HF's repetition_penalty (from the CTRL paper) on every token already in the text: a positive logit is divided
    by penalty, a negative one multiplied, so either way a penalty above 1 makes the token less likely."""
    rows = np.arange(len(logits))[:, None]
    seen = logits[rows, ids]  # -> [n_samples, n_seen]; a token seen twice is penalized once, written twice
    logits[rows, ids] = np.where(seen < 0, seen * penalty, seen / penalty)


def penalize_presence_and_frequency(logits, counts, presence, frequency):  # counts: [n_samples, n_vocab]
    """OpenAI's penalties on what each sample has generated: logit - frequency * count - presence * (count > 0)."""
    logits -= frequency * counts + presence * np.sign(counts)  # counts are float32 and >= 0: sign is 0 or 1


def repeated_ngram_ends(ids, n):  # [n_seen] -> [n_found]
    """The tokens that would repeat an n-gram of ids: those that followed an earlier occurrence of its last n-1."""
    n_ngrams = len(ids) - n + 1  # the n-grams the text holds start at 0 .. n_ngrams - 1
    if n_ngrams < 1:
        return ids[:0]
    same_start = np.ones(n_ngrams, dtype=bool)
    for j, token in enumerate(ids[n_ngrams:]):  # the last n-1 tokens: does each n-gram begin with them?
        same_start &= ids[j:j + n_ngrams] == token
    return ids[n - 1:][same_start]  # the last token of each n-gram that does


def ban_repeated_ngrams(logits, ids, n):
    """HF's no_repeat_ngram_size: no n-gram may occur twice in the text (prompt included)."""
    for row, text in zip(logits, ids):
        row[repeated_ngram_ends(text, n)] = -np.inf


def process_logits(logits, ids, counts, n_new, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                   no_repeat_ngram_size=0, min_new_tokens=0):  # -> [n_samples, n_vocab]
    """The logits with every control that is on applied, in HF's order (presence and frequency, which HF does not
    have, right after the repetition penalty, as llama.cpp does). ids: [n_samples, n_seen], the text so far;
    counts: [n_samples, n_vocab], how often each sample generated each token; n_new: how many it has generated."""
    if (repetition_penalty, presence_penalty, frequency_penalty, no_repeat_ngram_size) == (1, 0, 0, 0) \
            and n_new >= min_new_tokens:
        return logits  # every control off: the model's logits as they are
    logits = np.array(logits)  # a copy: the first step's logits are one row broadcast to the batch, read-only
    with np.errstate(over="ignore"):  # a huge penalty overflows to -inf: the token is out, as intended
        if repetition_penalty != 1:
            penalize_repetition(logits, ids, repetition_penalty)
        if presence_penalty or frequency_penalty:
            penalize_presence_and_frequency(logits, counts, presence_penalty, frequency_penalty)
    if no_repeat_ngram_size:
        ban_repeated_ngrams(logits, ids, no_repeat_ngram_size)
    if n_new < min_new_tokens:  # HF's min_new_tokens: <|endoftext|> cannot end a sample this early
        logits[:, ENDOFTEXT] = -np.inf
    return logits


def sampling_rngs(seed, n_samples):
    """One independent random stream per sample; the same seed gives the same streams."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n_samples)]


ENDOFTEXT = 50256  # GPT-2's document separator; the official code also starts unconditional samples from it

# A long prompt is read into the cache this many positions at a time: each chunk attends only to the chunks
# before it, so the masked-out half of the score matrix is never computed, and a chunk's arrays stay in cache.
PREFILL_CHUNK = 256


def prompt_parts(n_positions, n_cores, n_embd):  # -> [0, ..., n_positions]: where each part begins, and the end
    """How prefill cuts a prompt to read it side by side: one part per core, none shorter than PREFILL_CHUNK / 2 on
    average, and of equal work. In each block a position p costs 12 n_embd^2 multiply-adds for its products with
    the weights and 2 n_embd (p + 1) for its attention to the positions up to it, so later positions cost more;
    the first n positions cost n_embd (n^2 + (12 n_embd + 1) n), and part k ends where that reaches k / n_parts
    of the whole: at the positive root of the quadratic, to the nearest position."""
    n_parts = min(n_cores, n_positions // (PREFILL_CHUNK // 2))
    b = 12 * n_embd + 1
    total = n_positions ** 2 + b * n_positions
    ends = [(math.sqrt(b * b + 4 * total * k / n_parts) - b) / 2 for k in range(1, n_parts)]
    return [0, *(round(end) for end in ends), n_positions]


def prefill(inputs, params, n_head, kv_cache):  # [n_prompt] -> [n_vocab]
    """The prompt's last logits, its keys and values read into kv_cache."""
    if len(inputs) > PREFILL_CHUNK and threads.CORES > 1:
        # One part of the prompt per core, each through every block on its core, side by side; block j's cache
        # takes the parts' keys and values in prompt order, as part i's attention reads those of the parts before
        # it (threads.in_turns). Parts of equal work end together.
        bounds, seen = prompt_parts(len(inputs), threads.CORES, params["wte"].shape[1]), kv_cache[0].length

        def read(i, caches):  # part i through every block -> [1, n_embd]: its last position, all the last computes
            x = embed(inputs[bounds[i]:bounds[i + 1]], params["wte"], params["wpe"], start=seen + bounds[i])
            for j, (block, cache) in enumerate(zip(params["blocks"], caches)):
                x = transformer_block(x, **block, n_head=n_head, cache=cache, last_only=j == len(caches) - 1)
            return x
        *_, x = threads.in_turns(read, len(bounds) - 1, kv_cache)
        return lm_head(x[-1], params["wte"], params["ln_f"])
    for start in range(0, len(inputs), PREFILL_CHUNK):
        chunk = inputs[start:start + PREFILL_CHUNK]
        with threads.choice("prefill").step(work=len(chunk)):  # as many BLAS threads as measured fastest
            logits = gpt2(chunk, **params, n_head=n_head, kv_cache=kv_cache, last_only=True)
    return logits


def check_token_ids(ids, n_vocab):  # -> ids as an int64 array, once they are known to be token ids
    if not isinstance(ids, np.ndarray):  # element by element: NumPy makes floats of np.uint64s beside Python ints
        ids = np.array(ids, dtype=object)
    if ids.ndim != 1:
        raise ValueError(f"token ids are a list of ids; inputs have shape {ids.shape}")
    if ids.dtype.kind == "O":  # a bool or a float would index wte, or be cut to an int below
        types = set(map(type, ids.flat))  # each type checked once: a list of 200k ids takes a few ms
        bad = {t for t in types if issubclass(t, (bool, np.bool_)) or not issubclass(t, (int, np.integer))}
        if bad:
            raise ValueError(f"token ids are integers; inputs hold {next(i for i in ids.flat if type(i) in bad)!r}")
    elif ids.size and ids.dtype.kind not in "iu":
        raise ValueError(f"token ids are integers; inputs are {ids.dtype}")
    outside = ids[(ids < 0) | (ids >= n_vocab)]
    if outside.size:  # a negative id would silently pick a row from the end of wte
        raise ValueError(f"token ids lie in 0..{n_vocab - 1}; inputs hold {outside[:3].tolist()}")
    return ids.astype(np.int64)


def generate_steps(inputs, params, n_head, n_tokens_to_generate, rngs, temperature=0.0, top_k=0, top_p=1.0,
                   min_p=0.0, **controls):
    """Yields the next token of each of len(rngs) samples of one prompt, step by step: [n_samples] ids.
    controls: the keyword arguments of process_logits (repetition_penalty, presence_penalty, ...), all off by default.

    The samples run as one batch: the prompt is read once, then every step is a single forward pass for all
    of them, which reads the weights from memory once instead of once per sample.
    """
    check_sampling(temperature, top_k, top_p, min_p=min_p, **controls, dashes="")  # a nan would sample wrong tokens
    n_ctx = params["wpe"].shape[0]
    inputs = check_token_ids(inputs, params["wte"].shape[0])
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one token; unconditional generation starts from [ENDOFTEXT]")
    if len(rngs) < 1:
        raise ValueError(f"num_samples must be at least 1, got {len(rngs)}")
    if not (is_int(n_tokens_to_generate) and n_tokens_to_generate >= 0):  # 2.5 or "3" failed deep in NumPy
        raise ValueError(f"n_tokens_to_generate must be a whole number >= 0, got {n_tokens_to_generate!r}")
    # The last new token is returned, never fed back: a run needs len(inputs) + n_tokens_to_generate - 1 positions.
    capacity = len(inputs) + n_tokens_to_generate - 1
    if capacity > n_ctx:
        raise ValueError(f"{len(inputs)} input tokens and {n_tokens_to_generate} new ones need {capacity} positions, "
                         f"more than the model's context of {n_ctx}")
    if n_tokens_to_generate == 0:
        return
    kv_cache = new_kv_cache(params, n_head, capacity)
    logits = prefill(inputs, params, n_head, kv_cache)
    kv_cache = [cache.repeat(len(rngs)) for cache in kv_cache]  # from here on, each sample has its own history
    logits = np.broadcast_to(logits, (len(rngs), logits.shape[-1]))  # [n_vocab] -> [n_samples, n_vocab]
    # What the controls look at: each sample's text so far and, for presence and frequency, how often it generated
    # each token
    ids = np.empty((len(rngs), len(inputs) + n_tokens_to_generate), dtype=np.int64)  # [n_samples, n_prompt + n_new]
    ids[:, :len(inputs)] = inputs
    counting = controls.get("presence_penalty") or controls.get("frequency_penalty")
    counts = np.zeros(logits.shape, dtype=np.float32) if counting else None  # [n_samples, n_vocab]
    for step in range(n_tokens_to_generate):
        n_seen = len(inputs) + step
        check_logits(logits)  # a model whose forward pass overflowed would sample token 0 for ever
        logits = process_logits(logits, ids[:, :n_seen], counts, step, **controls)
        next_ids = sample(logits, rngs, temperature, top_k, top_p, min_p)
        ids[:, n_seen] = next_ids
        if counting:
            counts[np.arange(len(rngs)), next_ids] += 1
        yield next_ids
        if step + 1 < n_tokens_to_generate:  # every earlier position is cached: only the new tokens go through
            with threads.choice("decode").step():  # as many BLAS threads as the last steps found fastest
                logits = gpt2(next_ids[:, None], **params, n_head=n_head, kv_cache=kv_cache, last_only=True)


def generate(inputs, params, n_head, n_tokens_to_generate, temperature=0.0, top_k=0, top_p=1.0, seed=None,
             num_samples=None, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
             no_repeat_ngram_size=0, min_new_tokens=0):
    """The new ids: greedy by default (temperature 0, where top_k, top_p, min_p and seed change nothing), sampled
    otherwise (see `sample`). With num_samples=N, a list of N such lists, computed as one batch.
    The controls on the logits are all off by default (see `process_logits`): repetition_penalty (HF's, over the
    prompt and the new tokens), presence_penalty and frequency_penalty (OpenAI's, over the new tokens),
    no_repeat_ngram_size (HF's, prompt included), min_new_tokens (no <|endoftext|> among the first N new tokens).
    Stop strings are text, not ids: `main(stop=...)` has them."""
    if num_samples is not None and not (is_int(num_samples) and num_samples >= 1):  # True is no count of samples
        raise ValueError(f"num_samples must be a whole number >= 1 (or None), got {num_samples!r}")
    check_sampling(seed=seed, dashes="")
    rngs = sampling_rngs(seed, num_samples or 1)
    controls = dict(repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                    min_new_tokens=min_new_tokens)
    steps = list(generate_steps(inputs, params, n_head, n_tokens_to_generate, rngs, temperature, top_k, top_p, min_p,
                                **controls))
    samples = np.array(steps, dtype=np.int64).reshape(-1, len(rngs)).T.tolist()  # [n_steps, N] -> N lists
    return samples if num_samples else samples[0]


# The command line: the model above needs none of this but cli's checks of its arguments and logits.
import utils
from cli import (check, check_arguments, check_fits, check_memory, check_text, open_prompt, prompt_bytes_limit,
                 prompt_loop, run, warn_literal_escapes, warn_unreachable_min_new_tokens, warn_unused_flags)
from encoder import load_encoder
from stopping import SampleText


def main(prompt="", n_tokens_to_generate=40, model_size="124M", models_dir="models", temperature=0.0, top_k=0,
         top_p=1.0, seed=None, num_samples=1, stop_at_endoftext=False, prompt_file=None, interactive=False, stop=None,
         min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, no_repeat_ngram_size=0,
         min_new_tokens=0, *, stream=False):
    """Continue a prompt with GPT-2.

    Args:
        prompt: the text to continue; "" generates unconditionally (from <|endoftext|>); "-" reads standard input
        n_tokens_to_generate: how many tokens to add (prompt + n_tokens_to_generate - 1 <= the context, 1024)
        model_size: 124M, 355M, 774M or 1558M (downloaded if missing), a model folder under models_dir, a path
            to a model folder (./x), or a Hugging Face Hub repo id (owner/name[@revision])
        models_dir: where model folders live
        temperature: 0 picks the most likely token every time; above 0, samples from softmax(logits / temperature)
        top_k: sample only from the top_k most likely tokens (0: no limit)
        top_p: sample only from the fewest most likely tokens whose probabilities add up to top_p (1.0: no limit)
        seed: makes sampling repeatable: the same seed gives the same text
        num_samples: how many continuations of the prompt to generate, as one batch
        stop_at_endoftext: end a sample when it generates <|endoftext|>
        prompt_file: read the prompt from this UTF-8 file instead
        interactive: load the model once, then continue each line typed (or piped) on standard input
        stop: end a sample as soon as its text contains this text, which is left out; a list: any of them (the flag
            may be repeated)
        min_p: sample only from tokens at least min_p times as likely as the most likely one (0: off)
        repetition_penalty: divide a positive logit, multiply a negative one, of every token already in the text
            (prompt included) by this (1.0: off; HF's repetition_penalty)
        presence_penalty: subtract this from the logit of every token generated so far (0: off; OpenAI's)
        frequency_penalty: subtract this times the number of times a token was generated so far (0: off; OpenAI's)
        no_repeat_ngram_size: no sequence of this many tokens occurs twice in the text, prompt included (0: off)
        min_new_tokens: <|endoftext|> cannot be chosen before this many new tokens (0: off)
        stream: print the text to stdout as it is generated (the command line always does)
    Returns:
        The continuation, or a list of num_samples continuations if num_samples > 1.
    """
    # Everything that needs no weights is checked first, so a mistake never waits for a download.
    check_arguments(n_tokens_to_generate, temperature, top_k, top_p, seed, num_samples, stop_at_endoftext, interactive,
                    stop=stop, min_p=min_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                    min_new_tokens=min_new_tokens)
    warn_literal_escapes(stop)
    warn_unreachable_min_new_tokens(n_tokens_to_generate, min_new_tokens)  # once, in -i too: no prompt changes it
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    controls = dict(repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                    min_new_tokens=min_new_tokens)
    check(not interactive or (prompt == "" and prompt_file is None),
          "--interactive reads its prompts from standard input: give no prompt or --prompt_file")
    read_prompt = (lambda max_bytes: "") if interactive else open_prompt(prompt, prompt_file)
    if not interactive:
        warn_unused_flags(temperature, top_k, top_p, seed, num_samples, min_p=min_p)
    model_dir = utils.prepare_tokenizer(model_size, models_dir)  # a few MB: enough to measure the prompt
    encoder, hparams = load_encoder(model_dir), utils.load_hparams(model_dir)
    max_bytes = prompt_bytes_limit(hparams["n_ctx"], encoder)  # more could not fit the context: never read
    prompt = read_prompt(max_bytes)

    def prompt_ids(text):
        # Encoding stops past the context, so a prompt file of any size is refused at once.
        ids = encoder.encode(check_text(text, "the prompt"), max_tokens=hparams["n_ctx"]) or [ENDOFTEXT]
        check_fits(len(ids), n_tokens_to_generate, hparams["n_ctx"])
        check_memory(hparams, num_samples, len(ids) + n_tokens_to_generate - 1)
        return ids

    input_ids = prompt_ids(prompt)
    utils.prepare_model(model_size, models_dir)
    params = utils.load_model_params(model_size, models_dir, hparams["n_layer"])

    def continuation(ids, stream):
        texts = [SampleText(encoder.stream_decoder(), stops) for _ in range(num_samples)]
        steps = generate_steps(ids, params, hparams["n_head"], n_tokens_to_generate, sampling_rngs(seed, num_samples),
                               temperature, top_k, top_p, min_p, **controls)
        for next_ids in steps:
            for text, token in zip(texts, next_ids.tolist()):
                if text.done:
                    continue  # a sample that has stopped takes nothing more
                if stop_at_endoftext and token == ENDOFTEXT:
                    new_text = text.finish()  # the separator ends the sample; it is not part of its text
                else:
                    new_text = text.add(encoder.decode_bytes([token]))  # cut before a stop string, if one appears
                if stream and num_samples == 1 and new_text:
                    print(new_text, end="", flush=True)
            if all(text.done for text in texts):
                break
        rest = [text.finish() for text in texts]  # what each held back, in case it began a stop string
        if stream:
            if num_samples == 1:
                print(rest[0], flush=True)
            else:  # the samples advance together, so each is printed whole, under its own heading
                for i, text in enumerate(texts, 1):
                    print(f"{'=' * 30} sample {i} of {num_samples} {'=' * 30}\n{text.text}", flush=True)
        return texts[0].text if num_samples == 1 else [text.text for text in texts]

    if interactive:  # the same seed gives the same text for the same prompt: every prompt starts afresh
        def continue_prompt(text):
            ids = prompt_ids(text)
            warn_unused_flags(temperature, top_k, top_p, seed, num_samples, min_p=min_p)  # with each continuation
            continuation(ids, stream=True)

        return prompt_loop(continue_prompt, max_bytes)
    return continuation(input_ids, stream)


SHORT_FLAGS = {"i": "interactive", "p": "prompt_file"}  # the one-letter flags, each chosen (cli.parse_argv)


def cli():
    run(main, short_flags=SHORT_FLAGS)


if __name__ == "__main__":
    cli()
