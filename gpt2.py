"""GPT-2 inference in NumPy, written to be read top to bottom.

Every function takes its own weights by the names the checkpoint uses, so `**block` unpacking wires the whole
model and the params dict is the call tree. Shapes are commented where they change; n_seq is the number of
positions, and any leading batch axes ride along untouched.
"""
import math

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
    x = x - np.mean(x, axis=-1, keepdims=True)  # center each position
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return g * x / np.sqrt(variance + eps) + b  # scale to unit variance, then by the learned gain and shift


def linear(x, w, b):  # [n_seq, n_in] -> [n_seq, n_out]
    # One matrix product over every position of every sample: given a batch axis, NumPy would multiply
    # sample by sample and read w from memory once per sample.
    return (x.reshape(-1, x.shape[-1]) @ w + b).reshape(*x.shape[:-1], w.shape[-1])


def ffn(x, c_fc, c_proj):  # [n_seq, n_embd] -> [n_seq, n_embd]
    h = gelu(linear(x, **c_fc))  # [n_seq, n_embd] -> [n_seq, 4*n_embd]
    return linear(h, **c_proj)  # [n_seq, 4*n_embd] -> [n_seq, n_embd]


def causal_mask(n_q, n_k):  # -> [n_q, n_k]
    # The n_q queries are the last n_q of the n_k positions; each may look at itself and everything before it.
    # (n_q < n_k once a KVCache, below, holds the earlier positions' keys.)
    # -1e10 rather than -inf: exp() turns it into an exact 0 without ever producing inf - inf = nan.
    return np.triu(np.full((n_q, n_k), -1e10, dtype=np.float32), k=n_k - n_q + 1)


def attention_weights(q, k):  # [n_head, n_q, d_head], [n_head, n_k, d_head] -> [n_head, n_q, n_k]
    """How much each query attends to each key: softmax(q @ k.T / sqrt(d_head)), the future masked out."""
    scores = q @ k.swapaxes(-1, -2)  # all heads in one stacked matmul
    scores /= math.sqrt(q.shape[-1])  # in place, like softmax
    scores += causal_mask(q.shape[-2], k.shape[-2])
    return softmax(scores)


def attention(q, k, v):  # [n_head, n_q, d_head], [n_head, n_k, d_head] x2 -> [n_head, n_q, d_head]
    return attention_weights(q, k) @ v  # each query's average of the values, weighted by its attention


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
        """Copies of this history for n_samples continuations that will go their own ways."""
        batched = KVCache((n_samples, *self.keys.shape))
        batched.keys[..., :self.length, :] = self.keys[..., :self.length, :]
        batched.values[..., :self.length, :] = self.values[..., :self.length, :]
        batched.length = self.length
        return batched


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
    last_only: return only the last position's logits ([n_vocab]), all that generation needs.
    """
    inputs = np.asarray(inputs)
    start = kv_cache[0].length if kv_cache else 0
    positions = np.arange(start, start + inputs.shape[-1])
    x = wte[inputs] + wpe[positions]  # token + position embeddings: -> [n_seq, n_embd]
    for block, cache in zip(blocks, kv_cache or [None] * len(blocks)):
        x = transformer_block(x, **block, n_head=n_head, cache=cache)
    if last_only:
        x = x[..., -1, :]  # [n_seq, n_embd] -> [n_embd]
    x = layer_norm(x, **ln_f)
    # The output projection is the token embedding itself (weight tying): a logit is the similarity between
    # the final hidden state and a token's input vector.
    return x @ wte.T  # [n_seq, n_embd] -> [n_seq, n_vocab]


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


def draw(probs, uniforms):  # [n_samples, n_vocab], [n_samples] -> [n_samples]
    """Inverse-CDF sampling: for u in [0, 1), the first token whose cumulative probability passes u * total.
    The probabilities need not add up to 1, and a token of probability 0 is never drawn."""
    tokens = []
    for cdf, u in zip(np.cumsum(probs, axis=-1), uniforms):
        last = np.searchsorted(cdf, cdf[-1])  # the last token of nonzero probability, in case u * total rounds up
        tokens.append(min(np.searchsorted(cdf, u * cdf[-1], side="right"), last))
    return np.array(tokens)


def sample(logits, rngs, temperature=0.0, top_k=0, top_p=1.0):  # [n_samples, n_vocab] -> [n_samples]
    """Each sample's next token: the most likely one when temperature is 0, otherwise a draw from
    softmax(logits / temperature) restricted to the top_k most likely tokens and then to the nucleus of
    top_p (HF transformers' order). Sample i draws one number from rngs[i], so it gets the same token
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
    return draw(probs, [rng.random() for rng in rngs])


def sampling_rngs(seed, n_samples):
    """One independent random stream per sample; the same seed gives the same streams."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n_samples)]


ENDOFTEXT = 50256  # GPT-2's document separator; the official code also starts unconditional samples from it

# A long prompt is read into the cache this many positions at a time: each chunk attends only to the chunks
# before it, so the masked-out half of the score matrix is never computed, and a chunk's arrays stay in cache.
PREFILL_CHUNK = 256


def generate_steps(inputs, params, n_head, n_tokens_to_generate, rngs, temperature=0.0, top_k=0, top_p=1.0):
    """Yields the next token of each of len(rngs) samples of one prompt, step by step: [n_samples] ids.

    The samples run as one batch: the prompt is read once, then every step is a single forward pass for all
    of them, which reads the weights from memory once instead of once per sample.
    """
    n_ctx = params["wpe"].shape[0]
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one token; unconditional generation starts from [ENDOFTEXT]")
    if len(rngs) < 1:
        raise ValueError(f"num_samples must be at least 1, got {len(rngs)}")
    if n_tokens_to_generate < 0:
        raise ValueError(f"n_tokens_to_generate must be at least 0, got {n_tokens_to_generate}")
    # The last new token is returned, never fed back: a run needs len(inputs) + n_tokens_to_generate - 1 positions.
    capacity = len(inputs) + n_tokens_to_generate - 1
    if capacity > n_ctx:
        raise ValueError(f"{len(inputs)} input tokens and {n_tokens_to_generate} new ones need {capacity} positions, "
                         f"more than the model's context of {n_ctx}")
    if n_tokens_to_generate == 0:
        return
    kv_cache = new_kv_cache(params, n_head, capacity)
    for start in range(0, len(inputs), PREFILL_CHUNK):
        logits = gpt2(inputs[start:start + PREFILL_CHUNK], **params, n_head=n_head, kv_cache=kv_cache, last_only=True)
    kv_cache = [cache.repeat(len(rngs)) for cache in kv_cache]  # from here on, each sample has its own history
    logits = np.broadcast_to(logits, (len(rngs), logits.shape[-1]))  # [n_vocab] -> [n_samples, n_vocab]
    for step in range(n_tokens_to_generate):
        next_ids = sample(logits, rngs, temperature, top_k, top_p)
        yield next_ids
        if step + 1 < n_tokens_to_generate:  # every earlier position is cached: only the new tokens go through
            logits = gpt2(next_ids[:, None], **params, n_head=n_head, kv_cache=kv_cache, last_only=True)


def generate(inputs, params, n_head, n_tokens_to_generate, temperature=0.0, top_k=0, top_p=1.0, seed=None,
             num_samples=None):
    """The new ids: greedy by default (temperature 0), sampled otherwise (see `sample`). With num_samples=N,
    a list of N such lists, computed as one batch."""
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be at least 1 (or None), got {num_samples}")
    rngs = sampling_rngs(seed, num_samples or 1)
    steps = list(generate_steps(inputs, params, n_head, n_tokens_to_generate, rngs, temperature, top_k, top_p))
    samples = np.array(steps, dtype=np.int64).reshape(-1, len(rngs)).T.tolist()  # [n_steps, N] -> N lists
    return samples if num_samples else samples[0]


# The command line: the model above needs none of this, so `import gpt2` for the model alone stays light.
import utils
from cli import check, check_arguments, check_fits, check_memory, check_text, prompt_loop, read_prompt, run
from encoder import get_encoder


def main(prompt="", n_tokens_to_generate=40, model_size="124M", models_dir="models", temperature=0.0, top_k=0,
         top_p=1.0, seed=None, num_samples=1, stop_at_endoftext=False, prompt_file=None, interactive=False, *,
         stream=False):
    """Continue a prompt with GPT-2.

    Args:
        prompt: the text to continue; "" generates unconditionally (from <|endoftext|>); "-" reads standard input
        n_tokens_to_generate: how many tokens to add (prompt + n_tokens_to_generate - 1 <= the context, 1024)
        model_size: 124M, 355M, 774M or 1558M (downloaded if missing), or a model folder under models_dir
        models_dir: where model folders live
        temperature: 0 picks the most likely token every time; above 0, samples from softmax(logits / temperature)
        top_k: sample only from the top_k most likely tokens (0: no limit)
        top_p: sample only from the fewest most likely tokens whose probabilities add up to top_p (1.0: no limit)
        seed: makes sampling repeatable: the same seed gives the same text
        num_samples: how many continuations of the prompt to generate, as one batch
        stop_at_endoftext: end a sample when it generates <|endoftext|>
        prompt_file: read the prompt from this UTF-8 file instead
        interactive: load the model once, then continue each line typed (or piped) on standard input
        stream: print the text to stdout as it is generated (the command line always does)
    Returns:
        The continuation, or a list of num_samples continuations if num_samples > 1.
    """
    # Everything that needs no weights is checked first, so a mistake never waits for a download.
    check_arguments(n_tokens_to_generate, temperature, top_k, top_p, seed, num_samples, stop_at_endoftext, interactive)
    check(not interactive or (prompt == "" and prompt_file is None),
          "--interactive reads its prompts from standard input: give no prompt or --prompt_file")
    prompt = "" if interactive else read_prompt(prompt, prompt_file)
    model_dir = utils.prepare_tokenizer(model_size, models_dir)  # a few MB: enough to measure the prompt
    encoder, hparams = get_encoder(model_size, models_dir), utils.load_hparams(model_dir)

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
        samples = [[] for _ in range(num_samples)]
        finished = [False] * num_samples
        text_so_far = encoder.stream_decoder()  # holds back a character until all of its bytes have arrived
        steps = generate_steps(ids, params, hparams["n_head"], n_tokens_to_generate,
                               sampling_rngs(seed, num_samples), temperature, top_k, top_p)
        for next_ids in steps:
            for i, token in enumerate(next_ids.tolist()):
                if finished[i]:
                    continue
                if stop_at_endoftext and token == ENDOFTEXT:
                    finished[i] = True  # the separator ends the sample; it is not part of its text
                    continue
                samples[i].append(token)
                if stream and num_samples == 1:
                    print(text_so_far.decode(encoder.decode_bytes([token])), end="", flush=True)
            if all(finished):
                break
        texts = [encoder.decode(ids) for ids in samples]
        if stream:
            if num_samples == 1:
                print(text_so_far.decode(b"", final=True), flush=True)
            else:  # the samples advance together, so each is printed whole, under its own heading
                for i, text in enumerate(texts, 1):
                    print(f"{'=' * 30} sample {i} of {num_samples} {'=' * 30}\n{text}", flush=True)
        return texts[0] if num_samples == 1 else texts

    if interactive:  # the same seed gives the same text for the same prompt: every prompt starts afresh
        return prompt_loop(lambda text: continuation(prompt_ids(text), stream=True))
    return continuation(input_ids, stream)


SHORT_FLAGS = {"i": "interactive", "p": "prompt_file"}  # the one-letter flags, each chosen (cli.parse_argv)


def cli():
    run(main, short_flags=SHORT_FLAGS)


if __name__ == "__main__":
    cli()
