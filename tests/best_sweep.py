"""The kill sweep of the best model: a training process killed by SIGKILL at each call, in turn, of the functions
that keeping models/run-best uses (Run.save_best and Run.link_best, nothing else counted; writing the model's files
counts as one call, since tests/kill_sweep.py kills every save at each of its calls, and so does removing a folder).

    python -m tests.best_sweep WORK_DIR SCENARIO    (tests/test_best.py runs it, with a deadline)

As tests/kill_sweep.py: this process imports TensorFlow once and forks one child per kill point. After each death,
run-best must be absent or load as gpt2.py loads it, holding the weights of a step that was the best (the previous
best or the new one, never a mixture), no leftover may be listed as a model, and going on to the end must give the
best model of an uninterrupted run, bit for bit. Prints one JSON line with the figures.

Scenarios:
- resume: a run at step 2 (best at step 2) resumed to step 3, whose validation loss is lower: -best is replaced;
- fresh: a new run's first best, at step 1, which takes the name -best at the run's first save.
"""
import json
import os
import shutil
import signal
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.kill_sweep import counted_functions, in_child, kill_at_each_call, prepare  # noqa: E402

OPTIONS = dict(init_from="scratch", n_layer=1, n_head=2, n_embd=8, n_ctx=16, block_size=8, batch_size=2,
               grad_accum=1, learning_rate=1e-2, warmup_steps=1, lr_decay_steps=3, eval_every=1, save_every=1,
               seed=0, sample_every=0)
MAX_STEPS = 3


def count_calls_in_best(kill_at, count_file):
    """Count the calls of kill_sweep's functions made while the run keeps its best model; die at call kill_at.
    Writing the model (utils.save_release_model, the code of every save) counts as one call."""
    import runs
    import utils

    calls, inside, suspended = [0], [0], [0]

    def wrap(original):
        def counted(*args, **kwargs):
            if inside[0] and not suspended[0]:
                calls[0] += 1
                if calls[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return counted

    def counting_depth(depth, original):  # original, with depth[0] one higher while it runs
        def call(*args, **kwargs):
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1
        return call

    def region(original):
        return counting_depth(inside, original)

    def one_call(original):  # a kill point of its own, whose insides tests/kill_sweep.py already sweeps
        return wrap(counting_depth(suspended, original))

    for module, name in counted_functions():
        if (module, name) != (shutil, "rmtree"):
            setattr(module, name, wrap(getattr(module, name)))
    utils.save_release_model = one_call(utils.save_release_model)
    shutil.rmtree = one_call(shutil.rmtree)  # the removal of the previous best: its unlinks are one more kill point
    runs.Run.save_best = region(runs.Run.save_best)
    runs.Run.link_best = region(runs.Run.link_best)
    return lambda: open(count_file, "w").write(str(calls[0]))


def weights(model_dir):
    import utils

    return utils.read_tf_checkpoint(utils.checkpoint_prefix(model_dir), OPTIONS["n_layer"])


def same(a, b):
    return sorted(a) == sorted(b) and all(np.array_equal(a[n], b[n]) for n in a)


def main(work_dir, scenario):
    import train
    import utils

    dataset, base = prepare(work_dir)
    if scenario == "resume":
        assert in_child(lambda: train.main(dataset, "run", val_dataset=dataset, max_steps=2, models_dir=base,
                                           **OPTIONS)) == 0

    def go_on(models_dir):
        if scenario == "fresh":
            train.main(dataset, "run", val_dataset=dataset, max_steps=1, models_dir=models_dir, **OPTIONS)
        else:
            train.main(dataset, "run", val_dataset=dataset, resume=True, max_steps=MAX_STEPS, models_dir=models_dir,
                       **OPTIONS)

    def attempt(models_dir, kill_at, count_file):
        def run():
            shutil.copytree(base, models_dir, symlinks=True)
            report = count_calls_in_best(kill_at, count_file)
            go_on(models_dir)
            report()
        return in_child(run)

    n_calls, deaths = kill_at_each_call(attempt, work_dir)

    import gpt2

    reference = os.path.join(work_dir, "uninterrupted")
    new_best = weights(os.path.join(reference, "run-best"))
    old_best = weights(os.path.join(base, "run-best")) if scenario == "resume" else None
    assert old_best is None or not same(old_best, new_best)  # the sweep replaces one best with another
    result = {"scenario": scenario, "kill_points": n_calls, "not_killed": [], "unloadable": [], "wrong_weights": [],
              "listed_leftovers": [], "differ": []}
    for k, (models_dir, status) in deaths.items():
        if status != -signal.SIGKILL:
            result["not_killed"].append([k, status])
        best = os.path.join(models_dir, "run-best")
        if utils.local_models(models_dir) not in ([], ["run"], ["run", "run-best"]):
            result["listed_leftovers"].append([k, utils.local_models(models_dir)])
        if os.path.lexists(best):
            try:
                with open(os.devnull, "w") as devnull:
                    sys.stdout, stdout = devnull, sys.stdout
                    try:
                        gpt2.main("", n_tokens_to_generate=1, model_size="run-best", models_dir=models_dir)
                    finally:
                        sys.stdout = stdout
                found = weights(best)
            except Exception as e:  # what gpt2.py would report
                result["unloadable"].append([k, f"{type(e).__name__}: {e}"])
                continue
            if not (same(found, new_best) or (old_best is not None and same(found, old_best))):
                result["wrong_weights"].append(k)
        # Going on: a run that reached its last step is done; one that did not is resumed (or started again).
        with open(os.devnull, "w") as devnull:
            sys.stdout, stdout = devnull, sys.stdout
            try:
                run_dir = os.path.join(models_dir, "run")
                step = 0
                if os.path.lexists(run_dir):
                    with np.load(os.path.join(run_dir, "train_state.npz")) as state:
                        step = int(state["step"])
                last = 1 if scenario == "fresh" else MAX_STEPS
                if step < last:
                    go_on(models_dir)
            finally:
                sys.stdout = stdout
        if scenario == "resume" or os.path.lexists(best):
            if not (os.path.lexists(best) and same(weights(best), new_best)):
                result["differ"].append(k)
        saves = sorted(os.listdir(os.path.join(models_dir, ".run.saves")))
        kept = sorted(os.path.basename(os.readlink(os.path.join(models_dir, name))) for name in ("run", "run-best")
                      if os.path.lexists(os.path.join(models_dir, name)))
        if step < last and saves != kept:  # the next holder removed the leftovers
            result["listed_leftovers"].append([k, saves])
        shutil.rmtree(models_dir)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
