"""The kill sweep: a training process killed by SIGKILL at each call, in turn, of the functions a save uses.

    python -m tests.kill_sweep WORK_DIR SCENARIO    (tests/test_runs.py runs it, with a deadline)

A child first counts the calls an uninterrupted process makes (rename, replace, unlink, remove, rmdir, mkdir,
symlink, the renameat2 exchange, rmtree, copyfile, fsync, and the writes of the checkpoint and of the state),
N of them. Then, for k = 1..N, a child kills itself at its k-th call. After each death the run must load as
gpt2.py loads it, list no leftover as a model, and --resume to the end must give the weights, the optimizer's
state and the log of an uninterrupted run, bit for bit. Prints one JSON line with the figures.

TensorFlow takes seconds to import: this process imports it once and forks a child per kill point (TensorFlow is
fork-safe until it is first used, which here happens only in the children). Once every child is done, this process
checks each death's folder itself.

Scenarios:
- resume: a run saved at step 1, resumed to step 3 with a save every step (two saves that each replace one);
- fresh: a new run to step 2 (its first save, then one that replaces it);
- legacy: a run at step 1 saved by the previous train.py as a real folder, resumed to step 3 (the first save
  swaps the folder for a link).
"""
import json
import os
import shutil
import signal
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a tin of oil and a cloth "
        "for the glass. He counted the steps aloud, one hundred and twelve of them.")
OPTIONS = dict(init_from="scratch", n_layer=1, n_head=2, n_embd=8, n_ctx=16, block_size=8, batch_size=2,
               grad_accum=1, learning_rate=1e-2, warmup_steps=1, lr_decay_steps=3, eval_every=0, save_every=1, seed=0)
MAX_STEPS = 3
CHILD_DEADLINE = 120  # seconds for one child, on a loaded machine


def counted_functions():
    import tensorflow as tf

    import runs

    return [(os, "rename"), (os, "replace"), (os, "unlink"), (os, "remove"), (os, "rmdir"), (os, "mkdir"),
            (os, "symlink"), (os, "fsync"), (shutil, "rmtree"), (shutil, "copyfile"), (np, "savez"),
            (tf.raw_ops, "SaveV2"), (runs, "exchange")]


def count_calls(kill_at, count_file):
    """Wrap each counted function: call number kill_at is never made, the process dies by SIGKILL instead. The
    running count is written to count_file at exit (only an uninterrupted child gets there)."""
    calls = [0]

    def wrap(original):
        def counted(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return counted

    for module, name in counted_functions():
        setattr(module, name, wrap(getattr(module, name)))
    return lambda: open(count_file, "w").write(str(calls[0]))


def in_child(fn):
    """Run fn in a forked child with a deadline; the child's exit status (negative: killed by that signal)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with open(os.devnull, "w") as devnull:  # progress bars and samples of hundreds of children
                os.dup2(devnull.fileno(), 1)
                fn()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        os._exit(code)
    deadline = time.monotonic() + CHILD_DEADLINE
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise RuntimeError(f"a child ran past its {CHILD_DEADLINE} s deadline")
        time.sleep(0.005)


def kill_at_each_call(attempt, work_dir):
    """attempt(models_dir, kill_at, count_file) -> the child's exit status, once uninterrupted (kill_at 0: it counts
    the calls) and once killed at each call k in its own folder work_dir/k<k>: (the number of calls, {k: (that
    folder, its status)})."""
    count_file = os.path.join(work_dir, "count")
    assert attempt(os.path.join(work_dir, "uninterrupted"), 0, count_file) == 0
    with open(count_file) as f:
        n_calls = int(f.read())
    started = time.monotonic()
    deaths = {}
    for k in range(1, n_calls + 1):
        models_dir = os.path.join(work_dir, f"k{k}")
        deaths[k] = (models_dir, attempt(models_dir, k, count_file))
    print(f"{n_calls} deaths in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return n_calls, deaths


def as_legacy(models_dir):
    """The run as the previous train.py left it: a real folder, no train_config.json, no session column."""
    run_dir = os.path.join(models_dir, "run")
    save_dir = os.path.realpath(run_dir)
    os.remove(run_dir)
    shutil.move(save_dir, run_dir)
    shutil.rmtree(os.path.join(models_dir, ".run.saves"))
    os.remove(os.path.join(run_dir, "train_config.json"))
    with open(os.path.join(run_dir, "log.csv")) as f:
        rows = [line.rsplit(",", 1)[0] for line in f.read().splitlines()]
    with open(os.path.join(run_dir, "log.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


def snapshot(models_dir):
    """Weights, optimizer state and log of the run: what must come out the same, bit for bit."""
    import utils

    run_dir = os.path.join(models_dir, "run")
    flat = utils.read_tf_checkpoint(utils.checkpoint_prefix(run_dir), OPTIONS["n_layer"])
    with np.load(os.path.join(run_dir, "train_state.npz")) as state:
        flat.update({key: state[key] for key in state.files if key != "rng"})
        flat["rng"] = np.array(str(state["rng"]))
    with open(os.path.join(run_dir, "log.csv")) as f:
        flat["log"] = np.array([",".join(line.split(",")[:4]) for line in f.read().splitlines()[1:]])
    return flat


def prepare(work_dir):
    """What every sweep starts from: TensorFlow imported once (used only in the children: seconds saved per
    child), TEXT as a dataset and a vocabulary-only models folder. Returns (dataset, models folder)."""
    import utils
    from tests.release_layout import vocabulary_only

    with utils.silenced_stderr():
        import tensorflow  # noqa: F401
    dataset = os.path.join(work_dir, "text.txt")
    with open(dataset, "w", encoding="utf-8") as f:
        f.write(TEXT)
    base = os.path.join(work_dir, "base")
    vocabulary_only(base)
    return dataset, base


def main(work_dir, scenario):
    import train
    import utils
    from tests.release_layout import vocabulary_only

    dataset, base = prepare(work_dir)
    if scenario in ("resume", "legacy"):
        assert in_child(lambda: train.main(dataset, "run", max_steps=1, models_dir=base, **OPTIONS)) == 0
        if scenario == "legacy":
            as_legacy(base)

    def attempt(models_dir, kill_at, count_file):
        def run():
            shutil.copytree(base, models_dir, symlinks=True)
            report = count_calls(kill_at, count_file)
            if scenario == "fresh":
                train.main(dataset, "run", max_steps=2, models_dir=models_dir, **OPTIONS)
            else:
                train.main(dataset, "run", resume=True, max_steps=MAX_STEPS, models_dir=models_dir, **OPTIONS)
            report()
        return in_child(run)

    n_calls, deaths = kill_at_each_call(attempt, work_dir)
    started = time.monotonic()
    # Every child has ended: TensorFlow may now run here.
    import gpt2

    reference_dir = os.path.join(work_dir, "reference")
    vocabulary_only(reference_dir)
    train.main(dataset, "run", max_steps=MAX_STEPS, models_dir=reference_dir, **OPTIONS)
    reference = snapshot(reference_dir)
    result = {"scenario": scenario, "kill_points": n_calls, "not_killed": [], "listed_leftovers": [],
              "unloadable": [], "lost": [], "differ": []}
    for k, (models_dir, status) in deaths.items():
        if status != -signal.SIGKILL:
            result["not_killed"].append([k, status])
        run_dir = os.path.join(models_dir, "run")
        if utils.local_models(models_dir) not in ([], ["run"]):
            result["listed_leftovers"].append([k, utils.local_models(models_dir)])
        if os.path.lexists(run_dir):
            try:
                gpt2.main("", n_tokens_to_generate=1, model_size="run", models_dir=models_dir)
            except Exception as e:  # what gpt2.py would report
                result["unloadable"].append([k, f"{type(e).__name__}: {e}"])
                continue
        elif scenario != "fresh":
            result["lost"].append(k)  # a run that had been saved has no name any more
            continue
        try:
            with open(os.devnull, "w") as devnull:
                sys.stdout, stdout = devnull, sys.stdout
                try:
                    step = 0
                    if os.path.lexists(run_dir):
                        with np.load(os.path.join(run_dir, "train_state.npz")) as state:
                            step = int(state["step"])
                    if step == 0:
                        train.main(dataset, "run", max_steps=MAX_STEPS, models_dir=models_dir, **OPTIONS)
                    elif step < MAX_STEPS:
                        train.main(dataset, "run", resume=True, max_steps=MAX_STEPS, models_dir=models_dir,
                                   **OPTIONS)
                    opened = step < MAX_STEPS
                finally:
                    sys.stdout = stdout
            after = snapshot(models_dir)
        except Exception as e:
            result["lost"].append([k, f"{type(e).__name__}: {e}"])
            continue
        if sorted(after) != sorted(reference) or any(not np.array_equal(after[n], reference[n]) for n in after):
            result["differ"].append(k)
        saves = os.listdir(os.path.join(models_dir, ".run.saves"))
        if opened and saves != [os.path.basename(os.readlink(run_dir))]:  # the next holder removed the leftovers
            result["listed_leftovers"].append([k, saves])
        shutil.rmtree(models_dir)
    print(f"checked in {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
