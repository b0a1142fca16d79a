"""Speed and memory of gpt2.py, measured side by side in one run against its peers and the hardware ceiling.

    python bench.py [--models_dir DIR] [--new_tokens 100] [--skip_hf] [--skip_pico] [--skip_score]

It writes a checkpoint with GPT-2 124M's shapes and random weights, in OpenAI's release layout, under
--models_dir (default: a folder in the system temp dir; OpenAI's weights are not needed), then prints:
- decode tok/s (greedy, 10-token prompt, --new_tokens new tokens, prefill excluded) for gpt2.py with its KV
  cache, for gpt2_pico.py (no cache, recomputes the sequence every token) and for HF transformers on PyTorch
  with its KV cache;
- the hardware ceiling: the best tok/s that streaming all the weights through a float32 GEMV allows;
- time to read a 1000-token prompt (prefill), gpt2.py vs HF;
- the time of 8 sampled continuations computed as one batch, against one;
- wall time and peak RSS of a whole `python gpt2.py ... --n_tokens_to_generate 1` process, cold (first run:
  TensorFlow reads the checkpoint) and warm (converted params mapped from disk);
- tokens/s of score.py scoring a 5000-token text at stride 512, against HF on the same windows and batches.
Each comparison runs its sides in alternating rounds and keeps each side's best: the machine is shared, so only
ratios taken in one run mean much.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import gpt2
import gpt2_pico
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
    """Float32 matrix-vector products over a weight-sized matrix, in both orientations: the fastest one is
    the least time that streaming every weight once can take."""
    w = np.full((weight_bytes // 4 // n_embd, n_embd), 0.5, dtype=np.float32)
    w_t = np.ascontiguousarray(w.T)
    x = np.ones(n_embd, dtype=np.float32)
    return lambda: w @ x, lambda: x @ w_t


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models_dir", default=os.path.join(tempfile.gettempdir(), "gpt2-bench"))
    parser.add_argument("--new_tokens", type=int, default=100)
    parser.add_argument("--skip_hf", action="store_true", help="do not compare with HF transformers")
    parser.add_argument("--skip_pico", action="store_true", help="do not time the slow no-cache path")
    parser.add_argument("--skip_score", action="store_true", help="do not time score.py")
    args = parser.parse_args()

    from tests.release_layout import write_model_dir

    model_dir = os.path.join(args.models_dir, MODEL)
    shape = dict(n_layer=12, n_embd=768, n_head=12)
    if not os.path.exists(os.path.join(model_dir, "checkpoint")):
        print(f"writing a random-weight checkpoint with 124M's shapes to {model_dir}", file=sys.stderr)
        write_model_dir(model_dir, **shape)

    def report(name, value, note=""):
        print(f"{name:44s} {value:>12s}  {note}", flush=True)

    forced = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    print(f"numpy {np.__version__}, {os.cpu_count()} cores" + (f"; BLAS kernels forced by {forced}" if forced else ""))

    # Whole-process start-up first, while nothing else holds memory.
    shutil.rmtree(os.path.join(model_dir, "numpy-params"), ignore_errors=True)
    cold_wall, cold_rss = run_cli(args.models_dir)
    warm_wall, warm_rss = run_cli(args.models_dir)

    with open(os.path.join(model_dir, "hparams.json"), encoding="utf-8") as f:
        hparams = json.load(f)
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
    sides = [*weight_sized_gemvs(weight_bytes, n_embd), ours(ids, 1), ours(ids, 1 + n)]
    if hf:
        hf(ids, 2)
        sides += [lambda: hf(ids, 1), lambda: hf(ids, 1 + n)]
    times = alternating_best(*sides, rounds=5)
    ceiling = 1 / min(times[:2])
    decode = n / (times[3] - times[2])
    report("hardware ceiling (float32 GEMV)", f"{ceiling:.1f} tok/s",
           f"{weight_bytes / min(times[:2]) / 1e9:.1f} GB/s over {weight_bytes / 1e6:.0f} MB of weights")
    report("gpt2.py decode (KV cache)", f"{decode:.1f} tok/s", f"{decode / ceiling:.0%} of ceiling (target >= 80%)")
    if hf:
        hf_decode = n / (times[5] - times[4])
        report("HF transformers decode (KV cache)", f"{hf_decode:.1f} tok/s",
               f"gpt2.py is {decode / hf_decode:.2f}x (target >= 1.5x)")

    if not args.skip_pico:
        pico_time, ours_time = alternating_best(lambda: gpt2_pico.generate(ids, params, n_head, n), ours(ids, n),
                                                rounds=1)
        report(f"gpt2_pico.py, no cache, {n} tokens", f"{n / pico_time:.1f} tok/s",
               f"gpt2.py is {pico_time / ours_time:.1f}x (target >= 20x)")

    def sampled(n_samples):
        return lambda: gpt2.generate(ids, params, n_head, n, temperature=1.0, seed=0, num_samples=n_samples)

    sampled(8)()  # warm-up
    one, eight = alternating_best(sampled(1), sampled(8))
    report(f"8 samples vs 1, {n} tokens, sampled", f"{eight / one:.2f}x",
           f"{one:.2f} s for 1, {eight:.2f} s for 8 in one batch (target <= 2x)")

    long_prompt = [int(i) for i in np.random.default_rng(0).integers(0, hparams["n_vocab"], 1000)]
    if hf:
        ours_prefill, hf_prefill = alternating_best(ours(long_prompt, 1), lambda: hf(long_prompt, 1))
        report("gpt2.py prefill, 1000 tokens", f"{ours_prefill:.2f} s",
               f"{ours_prefill / hf_prefill:.2f}x HF's {hf_prefill:.2f} s (target <= 1)")
    else:
        report("gpt2.py prefill, 1000 tokens", f"{alternating_best(ours(long_prompt, 1))[0]:.2f} s")

    report("CLI, 1 token, cold (TensorFlow)", f"{cold_wall:.2f} s", f"peak RSS {cold_rss / 1e6:.0f} MB")
    report("CLI, 1 token, warm (mapped .npy)", f"{warm_wall:.2f} s",
           f"{warm_wall / cold_wall:.2f}x cold (target <= 0.35x); peak RSS {warm_rss / 1e6:.0f} MB = "
           f"{warm_rss / weight_bytes:.2f}x weights (target <= 1.3x)")

    if not args.skip_score:
        bench_scoring(params, flat, hparams, hf is not None, report)


def hf_scorer(flat, hparams, spans, params):
    """score(sequence): HF transformers' log-probabilities of the same windows, in the same batches as score.py
    (windows of one shape together, as many as score.LOGITS_BUDGET allows), no_grad, all cores; only the new
    positions' logits are computed (logits_to_keep) and go through torch.log_softmax."""
    import torch

    import score
    from tests.release_layout import hf_model

    torch.set_num_threads(os.cpu_count())
    model = hf_model(flat, hparams)
    batches = list(score.window_batches(spans, params))

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

    sides = [ours]
    if with_hf:
        hf = hf_scorer(flat, hparams, spans, params)
        diff = np.abs(ours() - hf(sequence).numpy()).max()  # the same numbers, or the timing means nothing
        if diff > 1e-3:
            sys.exit(f"bench: score.py and HF disagree by {diff:.3g} in a log-probability")
        sides.append(lambda: hf(sequence))
    times = alternating_best(*sides, rounds=3)
    note = f"{len(spans)} windows of <= {n_ctx}"
    if with_hf:
        note += f"; {times[1] / times[0]:.2f}x HF's {n_tokens / times[1]:.0f} tok/s (target >= 1x)"
    report(f"score.py, {n_tokens} tokens, stride {stride}", f"{n_tokens / times[0]:.0f} tok/s", note)

if __name__ == "__main__":
    main()
