"""How likely GPT-2 finds a text, token by token: log-probabilities, perplexity and bits per byte.

    python score.py PATH [--model_size 124M] [--models_dir models] [--stride N] [--per_token] [--top 5] [--json]

A model's log-probability of each token given the tokens before it is how language models are compared
(perplexity), and a direct view of what surprised the model and what it expected instead. `target_logprobs`
is the one implementation of it; train.py's loss is its negative mean.
"""
import startup  # noqa: F401 -- first of all: a Ctrl-C during the slow imports below is one line, not a traceback
import contextlib
import math
import os
import sys
from json import dumps

import numpy as np
from tqdm import tqdm

import gpt2
import threads
import utils
from cli import check, is_int, run_script, warn
from encoder import load_encoder
from gpt2 import ENDOFTEXT

# Logits are [rows, n_seq, n_vocab]: 206 MB for a single 1024-token window of GPT-2. Rows go through the model
# together until their logits would pass this size, so memory stays bounded however many rows there are.
LOGITS_BUDGET = 512 * 2**20
PROGRESS_MIN_WINDOWS = 4  # a bar for more windows than this; a few finish before a bar would tell anything
# The text, its tokens and their scores are all held in memory: 10 to 13 bytes per byte of text (prose to code). A
# GiB of text (enwik9 passes) is over 10 GiB and days of scoring on a CPU; an endless input (/dev/zero) stops here.
TEXT_BYTES_LIMIT = 1 << 30


def log_softmax_at(logits, ids):  # [..., n_vocab], [..., k] -> [..., k]
    """log softmax(logits) at the given ids of the last axis. Works in place: logits is overwritten, since a
    copy of GPT-2's logits costs as much as computing with them."""
    logits -= np.max(logits, axis=-1, keepdims=True)  # the largest logit becomes 0, so exp cannot overflow
    picked = np.take_along_axis(logits, ids, axis=-1)
    np.exp(logits, out=logits)
    return picked - np.log(np.sum(logits, axis=-1, keepdims=True))


def rows_within_budget(n_logits, n_positions, params, n_head):
    """How many windows of n_positions go through the model at once, within LOGITS_BUDGET (at least one). A
    window's largest arrays are the logits of its n_logits new positions, its attention scores (n_head x
    n_positions x n_positions) and its keys and values; the largest of them sets the size, so a small stride
    (few new positions, a long context) is limited by attention rather than logits."""
    n_vocab, n_embd = params["wte"].shape
    kv_cache = len(params["blocks"]) * 2 * n_positions * n_embd
    largest = max(n_logits * n_vocab, n_head * n_positions * n_positions, kv_cache)
    return max(1, LOGITS_BUDGET // (largest * params["wte"].itemsize))


def target_logprobs(params, inputs, targets, n_head):  # [batch, n_seq] x2 -> [batch, n_seq]
    """log p(targets[b, i] | inputs[b, :i+1]): how likely the model finds each target token after its prefix.
    Float32 for float32 params (float64 for float64 params)."""
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    logprobs = np.empty(inputs.shape, dtype=params["wte"].dtype)
    n_rows = rows_within_budget(inputs.shape[-1], inputs.shape[-1], params, n_head)
    for start in range(0, len(inputs), n_rows):
        rows = slice(start, start + n_rows)
        logits = gpt2.gpt2(inputs[rows], **params, n_head=n_head)  # -> [rows, n_seq, n_vocab]
        logprobs[rows] = log_softmax_at(logits, targets[rows, :, None])[..., 0]
    return logprobs


def new_position_logits(params, inputs, first, n_head):  # [rows, n_seq] -> [rows, n_seq - first, n_vocab]
    """Logits of positions first.. of each row; float32 params. The positions before them are context only:
    they go into a KV cache without reaching the LM head (last_only), and the new positions attend to the
    cache, so neither the context's logits nor the attention of context to new positions (masked out
    anyway) is computed: about 15% of a 1024-token window's work at a stride of 512."""
    if first == 0:
        return gpt2.gpt2(inputs, **params, n_head=n_head)
    d_head = params["wte"].shape[1] // n_head
    kv_cache = [gpt2.KVCache((len(inputs), n_head, inputs.shape[-1], d_head)) for _ in params["blocks"]]
    gpt2.gpt2(inputs[:, :first], **params, n_head=n_head, kv_cache=kv_cache, last_only=True)
    return gpt2.gpt2(inputs[:, first:], **params, n_head=n_head, kv_cache=kv_cache)


def windows(n_positions, n_ctx, stride):
    """(start, end, scored) for each window over a sequence of n_positions tokens: it feeds the model positions
    start..end-1, which predict positions start+1..end, and scores those after `scored`, the last position an
    earlier window predicted. Window k starts at k * stride, so each token after the first window is predicted
    with at least n_ctx - stride tokens of context."""
    start, scored = 0, 0
    while scored < n_positions - 1:
        end = min(start + n_ctx, n_positions - 1)
        yield start, end, scored
        start, scored = start + stride, end


def window_parts(n_positions, first, params, n_cores):  # -> [0, ..., n_positions]: where each part begins, and the end
    """How a window is cut to score it one part per core, side by side (as gpt2.prefill reads a prompt): parts of
    equal work, as many as gpt2.prompt_parts would make. In each block a position p costs 12 n_embd^2
    multiply-adds with the weights and 2 n_embd (p + 1) in attention, and a new position (p >= first) another
    n_embd n_vocab in the LM head; a part ends where the sum of its positions' costs reaches its share."""
    n_parts = max(1, min(n_cores, n_positions // (gpt2.PREFILL_CHUNK // 2)))
    n_vocab, n_embd = params["wte"].shape
    p = np.arange(n_positions)
    cost = len(params["blocks"]) * (12 * n_embd ** 2 + 2 * n_embd * (p + 1)) + (p >= first) * n_embd * n_vocab
    work = np.cumsum(cost)  # of the positions up to each
    ends = np.searchsorted(work, work[-1] * np.arange(1, n_parts) / n_parts)
    return [0, *ends.tolist(), n_positions]


def window_batches(spans, params, n_head):
    """The windows in batches, as many as LOGITS_BUDGET allows, each batch of one shape: windows are n_ctx long
    but perhaps the last, and all but the first begin with the same number of positions already scored."""
    for length, first in sorted({(end - start, scored - start) for start, end, scored in spans}):
        group = [span for span in spans if (span[1] - span[0], span[2] - span[0]) == (length, first)]
        n_rows = rows_within_budget(length - first, length, params, n_head)
        yield from (group[i:i + n_rows] for i in range(0, len(group), n_rows))


def window_scores(logits, targets, top):  # [n, n_vocab], [n] -> [n], and [n], [n, top], [n, top]
    """log p of each target; with top (a number of candidates) also the target's rank among all tokens (1: the
    most likely) and the top most likely tokens with their log-probabilities, most likely first."""
    targets = targets[:, None]
    if top is None:
        return log_softmax_at(logits, targets)[:, 0], None, None, None
    # Ranks and candidates come from the logits, before log_softmax_at overwrites them.
    ranks = 1 + np.sum(logits > np.take_along_axis(logits, targets, axis=-1), axis=-1)
    candidates = np.argpartition(logits, -top, axis=-1)[:, -top:] if top else targets[:, :0]  # in no order
    scores = log_softmax_at(logits, np.concatenate([targets, candidates], axis=-1))  # -> [n, 1 + top]
    order = np.argsort(-scores[:, 1:], axis=-1, kind="stable")
    return (scores[:, 0], ranks, np.take_along_axis(candidates, order, axis=-1),
            np.take_along_axis(scores[:, 1:], order, axis=-1))


def score_ids(ids, params, n_head, n_ctx, stride, top=None, progress=False):
    """Scores every token of ids as a new document (the first is predicted from <|endoftext|>).

    Returns {"logprobs": [n]}, and with top (a number of candidates, 0 for none) also "ranks" ([n]: 1 for
    the model's most likely token) and "top_ids", "top_logprobs" ([n, top], most likely first).
    """
    if not (is_int(stride) and 1 <= stride <= n_ctx):  # 0 would never end; more than n_ctx would skip tokens
        raise ValueError(f"stride must be a whole number in 1..{n_ctx}, got {stride!r}")
    n_vocab = params["wte"].shape[0]
    if not (top is None or is_int(top) and 0 <= top <= n_vocab):
        raise ValueError(f"top must be a whole number in 0..{n_vocab} (or None), got {top!r}")
    sequence = np.concatenate([[ENDOFTEXT], gpt2.check_token_ids(ids, n_vocab)])
    spans = list(windows(len(sequence), n_ctx, stride))
    n, d_head = len(sequence) - 1, params["wte"].shape[1] // n_head
    result = {"logprobs": np.empty(n, dtype=params["wte"].dtype)}
    if top is not None:
        result.update(ranks=np.empty(n, dtype=np.int64), top_ids=np.empty((n, top), dtype=np.int64),
                      top_logprobs=np.empty((n, top), dtype=params["wte"].dtype))
    if not spans:  # no ids: nothing to score
        return result

    def scores_of(batch):  # the windows' scores: [(logprobs, ranks, top_ids, top_logprobs) for each window]
        first = batch[0][2] - batch[0][0]  # the same in every window of the batch
        inputs = np.stack([sequence[start:end] for start, end, _ in batch])  # -> [n_windows, length]
        logits = new_position_logits(params, inputs, first, n_head)  # -> [n_windows, length - first, n_vocab]
        # Position p of the sequence is ids[p - 1]: the new positions' scores go to ids[scored:end].
        return [window_scores(row_logits, sequence[scored + 1:end + 1], top)
                for (_, end, scored), row_logits in zip(batch, logits)]

    def one_at_a_time(batches):
        for batch in batches:
            with threads.choice("score").step(work=sum(end - start for start, end, _ in batch)):
                scores = scores_of(batch)  # with as many BLAS threads as measured fastest
            yield scores

    def cuts(span):  # where its window is cut to read it a part per core
        return window_parts(span[1] - span[0], span[2] - span[0], params, threads.CORES)

    def in_parts(span):  # one window, a part per core side by side -> [(logprobs, ranks, top_ids, top_logprobs)]
        start, end, scored = span
        inputs, first, bounds, last = sequence[start:end], scored - start, cuts(span), len(params["blocks"]) - 1
        caches = [gpt2.KVCache((n_head, end - start, d_head)) for _ in params["blocks"]]

        def read(i, turns):  # part i through every block -> the scores of its new positions, or None: it has none
            a, b = bounds[i], bounds[i + 1]
            x = gpt2.embed(inputs[a:b], params["wte"], params["wpe"], start=a)
            for j, (block, turn) in enumerate(zip(params["blocks"], turns)):  # turn: block j's cache, parts in order
                x = gpt2.transformer_block(x, **block, n_head=n_head, cache=turn, last_only=b <= first and j == last)
            if b <= first:  # context only: its keys and values are all the parts after it need of it
                return None
            logits = gpt2.lm_head(x[max(first - a, 0):], params["wte"], params["ln_f"])  # -> [new ones, n_vocab]
            return window_scores(logits, sequence[start + max(a, first) + 1:start + b + 1], top)
        with contextlib.closing(threads.in_turns(read, len(bounds) - 1, caches)) as read_parts:  # closing: as below
            parts = [part for part in read_parts if part is not None]
        return [tuple(None if values[0] is None else np.concatenate(values) for values in zip(*parts))]

    # A window per core, side by side (threads.side_by_side says why), while as many are left and their arrays all
    # fit in LOGITS_BUDGET at once. The windows left (fewer than the cores: the last of a text, or a text's only one)
    # are read one at a time, a part per core (as gpt2.prefill reads a prompt), so no core waits idle for the last
    # window; windows too short to cut, and every window on one core, go in batches with every core in BLAS.
    most_new, longest = max(end - scored for _, end, scored in spans), max(end - start for start, end, _ in spans)
    wide = threads.CORES > 1 and rows_within_budget(most_new, longest, params, n_head) >= threads.CORES
    whole = len(spans) - len(spans) % threads.CORES if wide else 0
    cut = {span: len(cuts(span)) > 2 for span in spans[whole:]}  # (spans are distinct: each starts elsewhere)
    parted = [[span] for span in cut if cut[span]]
    rest = list(window_batches([span for span in cut if not cut[span]], params, n_head))
    batches = [[span] for span in spans[:whole]] + parted + rest

    def all_scores():  # each batch's windows' scores, in the order of batches
        if whole:
            yield from threads.side_by_side(scores_of, batches[:whole])
        for batch in parted:
            yield in_parts(batch[0])
        yield from one_at_a_time(rest)
    batch_scores = all_scores()
    with tqdm(total=len(spans), desc="scoring", unit="window", leave=False,
              disable=not progress or len(spans) <= PROGRESS_MIN_WINDOWS) as bar, contextlib.closing(batch_scores):
        # closing: an exception here, between two windows (Ctrl-C landing in this loop rather than in side_by_side's
        # wait), would leave the generator suspended with BLAS limited to one thread and its threads scoring every
        # window left, for as long as the traceback keeps it (sys.last_traceback, a notebook's history)
        for batch, scores in zip(batches, batch_scores):
            for (_, end, scored), window in zip(batch, scores):
                for key, value in zip(("logprobs", "ranks", "top_ids", "top_logprobs"), window):
                    if value is not None:
                        result[key][scored:end] = value
            bar.update(len(batch))
    return result


def summary(logprobs, n_bytes):
    """Mean negative log-likelihood per token (nats), perplexity, and bits per byte of UTF-8 text. The perplexity
    of a mean NLL past 709 nats (a model that all but rules the text out) is past float64's range: inf."""
    total = -float(np.sum(logprobs, dtype=np.float64))
    mean_nll = total / len(logprobs)
    perplexity = math.exp(mean_nll) if mean_nll < math.log(sys.float_info.max) else math.inf
    return {"mean_nll": mean_nll, "perplexity": perplexity, "bits_per_byte": total / math.log(2) / n_bytes}


def check_finite(logprobs):
    """A log-probability that is NaN or infinite comes from weights whose forward pass overflows, never from a
    text: scores made of it would be printed as if they meant something."""
    bad = np.flatnonzero(~np.isfinite(logprobs))
    if len(bad):
        raise utils.ModelError(f"the model's log-probability of token {bad[0] + 1} is {logprobs[bad[0]]}: its forward "
                               f"pass overflows float32 ({len(bad)} of {len(logprobs)} tokens), so nothing it "
                               f"scores would mean anything")


def escape(token_bytes):
    """A token's text, readable in one table cell: a token can end inside a multi-byte character, whose bytes
    show as \\xNN; newlines and other invisible characters, and the backslash itself, show as escapes."""
    cells = []
    for c in token_bytes.decode("utf-8", errors="surrogateescape"):
        if "\udc80" <= c <= "\udcff":  # a byte that is not a whole character
            cells.append(f"\\x{ord(c) - 0xdc00:02x}")
        elif c == "\\" or not c.isprintable():
            cells.append(c.encode("unicode_escape").decode("ascii"))
        else:
            cells.append(c)
    return "".join(cells)


def per_token_table(ids, scores, encoder):
    def token(i):
        return "'" + escape(encoder.decode_bytes([i])) + "'"

    rows = [f"{'position':>8}  {'token':20}  {'logprob':>9}  {'rank':>6}  candidates (probability)"]
    for position, (i, logprob, rank, top_ids, top_logprobs) in enumerate(
            zip(ids, scores["logprobs"], scores["ranks"], scores["top_ids"], scores["top_logprobs"]), 1):
        candidates = "  ".join(f"{token(c)} {math.exp(lp):.3g}" for c, lp in zip(top_ids, top_logprobs))
        rows.append(f"{position:8d}  {token(i):20}  {logprob:9.4f}  {rank:6d}  {candidates}")
    return "\n".join(rows)


def read_text(path):
    source = "standard input" if path == "-" else path
    try:
        if path == "-":
            check(sys.stdin is not None, "standard input is closed, so there is no text to read from it (`-`)")
            data = sys.stdin.buffer.read(TEXT_BYTES_LIMIT + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(TEXT_BYTES_LIMIT + 1)
        check(len(data) <= TEXT_BYTES_LIMIT, f"{source} is more than {TEXT_BYTES_LIMIT / 2**30:g} GiB "
                                             f"({TEXT_BYTES_LIMIT} bytes), the most score.py reads: it was not read "
                                             f"further; score it in parts")
        text = data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark (Notepad's) is no text
    except UnicodeDecodeError as e:
        raise utils.UsageError(f"{source} is not UTF-8 text (byte {e.start} cannot be decoded)") from None
    except OSError as e:
        raise utils.UsageError(f"{source}: {e.strerror}") from None
    check(text != "", f"{source} is empty: there is nothing to score")
    return text


def main(path=None, model_size="124M", models_dir="models", stride=None, per_token=False, top=5, json=False):
    """Score a text with GPT-2: how likely the model finds each of its tokens.

    Every token is scored once, given the tokens before it; the first is predicted from <|endoftext|>, as the
    start of a new document. A text longer than the model's context (1024 tokens) is read in windows of up to
    n_ctx tokens that start --stride tokens apart, and each token is scored by the first window that predicts it.

    Args:
        path: the UTF-8 text file to score, or - for standard input
        model_size: 124M, 355M, 774M or 1558M (downloaded if missing), a model folder under models_dir, a path
            to a model folder (./x), or a Hugging Face Hub repo id (owner/name[@revision])
        models_dir: where model folders live
        stride: how far apart windows start, 1..n_ctx (default n_ctx / 2). What it buys is context. Every
            token after the first window is predicted from at least n_ctx - stride tokens, so a smaller stride
            gives a lower, fairer perplexity (each token sees more of the text) and costs about n_ctx / stride
            forward passes of n_ctx tokens per n_ctx tokens of text. With --stride n_ctx the windows do not
            overlap, which is fastest, but the first tokens of each window are predicted from little context.
        per_token: print a table with one row per token, giving its position, text, log-probability, its rank
            among all tokens (1 is the model's most likely) and the model's --top most likely candidates
        top: how many candidates --per_token shows
        json: print one JSON object instead, with n_tokens, mean_nll, logprobs (natural log, one per token),
            perplexity (null past float64's range, a mean NLL over 709 nats), bits_per_byte, and with
            --per_token the tokens, ranks and candidates
    """
    check(path is not None, "give the file to score, or - to read standard input")
    check(stride is None or is_int(stride), f"--stride must be a whole number, got {stride!r}")
    check(is_int(top) and top >= 0, f"--top must be a whole number >= 0, got {top!r}")
    check(isinstance(per_token, bool), f"--per_token must be True or False, got {per_token!r}")
    check(isinstance(json, bool), f"--json must be True or False, got {json!r}")
    text = read_text(path)

    model_dir = utils.prepare_model(model_size, models_dir)
    hparams = utils.load_hparams(model_dir)
    n_ctx, n_vocab = hparams["n_ctx"], hparams["n_vocab"]
    stride = max(1, n_ctx // 2) if stride is None else stride
    check(1 <= stride <= n_ctx, f"--stride must be between 1 and the model's context of {n_ctx}, got {stride}")
    check(top <= n_vocab, f"--top must be at most the model's {n_vocab} tokens, got {top}")
    if top != 5 and not per_token:  # 5: the default, which says nothing of what the user asked for
        warn(f"--top {top} changes nothing without --per_token, whose table lists the candidates")
    encoder = load_encoder(model_dir)
    vocab = os.path.basename(utils.tokenizer_file(model_dir, "encoder.json"))  # or HF's name for it, vocab.json
    if len(encoder.encoder) != n_vocab:  # a fault of the model, not of the command line: exit 1
        raise utils.ModelError(f"the tokenizer in {model_dir} has {len(encoder.encoder)} tokens but the model has "
                               f"{n_vocab}: {vocab} does not belong to this model")
    ids = encoder.encode(text)
    if max(ids) >= n_vocab:
        raise utils.ModelError(f"the tokenizer gave token id {max(ids)}, but the model has only {n_vocab} tokens: "
                               f"{vocab} does not belong to this model")
    params = utils.load_model_params(model_size, models_dir, hparams["n_layer"])

    scores = score_ids(ids, params, hparams["n_head"], n_ctx, stride, top if per_token else None,
                       progress=True)
    check_finite(scores["logprobs"])  # (NumPy's warnings of the overflow are silenced: cli.one_line_errors)
    totals = summary(scores["logprobs"], len(text.encode("utf-8")))
    if json:
        # JSON has no infinity: a perplexity past float64's range is null there
        report = {"n_tokens": len(ids), **totals, "logprobs": scores["logprobs"].tolist()}
        report["perplexity"] = report["perplexity"] if math.isfinite(report["perplexity"]) else None
        if per_token:
            def token(i):
                return encoder.decode_bytes([i]).decode("utf-8", errors="backslashreplace")

            # ids too: a token ending inside a character reads "\xf0\x9f" in tokens, as that text itself would
            report.update(ids=ids, tokens=[token(i) for i in ids], ranks=scores["ranks"].tolist(), candidates=[
                [{"token": token(c), "id": int(c), "prob": math.exp(lp)} for c, lp in zip(top_ids, top_lps)]
                for top_ids, top_lps in zip(scores["top_ids"].tolist(), scores["top_logprobs"].tolist())])
        print(dumps(report, ensure_ascii=False))
        return
    if per_token:
        print(per_token_table(ids, scores, encoder))
    print(f"tokens          {len(ids)}\n"
          f"mean NLL        {totals['mean_nll']:.4f} nats per token\n"
          f"perplexity      {totals['perplexity']:.4f}\n"
          f"bits per byte   {totals['bits_per_byte']:.4f}")


SHORT_FLAGS = {"s": "stride", "t": "top", "j": "json"}  # the one-letter flags, each chosen (cli.parse_argv)


def cli():
    run_script(main, text_flags={"path", "model_size", "models_dir"}, positional="path", short_flags=SHORT_FLAGS)


if __name__ == "__main__":
    cli()
