"""train.py's fine-tuning workflow: previews while it trains, the best model kept as models/<out_name>-best,
--patience, and the summary it ends with. None of them may change the weights a run trains."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gpt2
import runs
import train
import utils
from encoder import load_encoder
from tests.conftest import ROOT
from tests.release_layout import vocabulary_only
from tests.test_train import PARAGRAPH, finish, read_log, run_train, wait_for

# The paragraph is trained on; this other text is the validation split, so the validation loss falls while the
# model learns words and then rises as it memorizes the paragraph: the best step comes before the last.
OTHER = ("A quiet harbor town woke to the sound of gulls, and the baker opened his shutters before the sun rose over "
         "the hills.")
OPTIONS = dict(init_from="scratch", n_layer=1, n_head=2, n_embd=16, n_ctx=32, block_size=16, batch_size=2,
               learning_rate=5e-2, warmup_steps=0, lr_decay_steps=12, eval_every=1, save_every=0, sample_every=0,
               seed=0)


@pytest.fixture
def texts(tmp_path):
    (tmp_path / "train.txt").write_text(PARAGRAPH, encoding="utf-8")
    (tmp_path / "val.txt").write_text(OTHER, encoding="utf-8")
    return str(tmp_path / "train.txt"), str(tmp_path / "val.txt")


@pytest.fixture
def models_dir(tmp_path):
    return vocabulary_only(tmp_path / "models")


def run(texts, models_dir, name="run", **options):
    train.main(texts[0], name, models_dir=models_dir, **{**OPTIONS, "val_dataset": texts[1], **options})


def weights(model_dir, n_layer=1):
    return utils.read_tf_checkpoint(utils.checkpoint_prefix(model_dir), n_layer)


def weights_and_state(run_dir):
    flat = weights(run_dir)
    with np.load(os.path.join(run_dir, runs.STATE_FILE)) as state:
        flat.update({key: state[key] for key in state.files})
    return flat


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def logged_best(run_dir):
    """(step, loss) of the lowest logged validation loss, the first of equals."""
    losses = [(float(r["val_loss"]), int(r["step"])) for r in read_log(run_dir) if r["val_loss"]]
    loss, step = min(losses, key=lambda pair: pair[0])
    return step, loss


# ---------------------------------------------------------------------------------------------- previews

def test_previews_come_every_n_steps_the_same_for_the_same_seed_and_leave_the_weights_alone(texts, models_dir,
                                                                                            capsys):
    run(texts, models_dir, "a", max_steps=7, sample_every=3)
    a = capsys.readouterr()
    run(texts, models_dir, "b", max_steps=7, sample_every=3)
    b = capsys.readouterr()
    run(texts, models_dir, "quiet", max_steps=7, sample_every=0)
    quiet = capsys.readouterr()

    previews = [line for line in a.err.splitlines() if line.endswith(" sample:")]
    assert [line.rsplit("step ", 1)[1] for line in previews] == ["3 sample:", "6 sample:"]  # not at 7: the end's
    assert "sample:" not in quiet.err
    prompt = load_encoder(os.path.join(models_dir, "a")).decode(load_encoder(os.path.join(models_dir, "a"))
                                                                .encode(OTHER)[:16])

    def texts_of(err):  # each preview: the lines after its header, up to the next progress line or message
        return [err.split(f"step {s} sample:\n", 1)[1].split("\n")[0] for s in (3, 6)]

    assert texts_of(a.err) == texts_of(b.err)  # the same seed: the same previews
    assert all(t.startswith(prompt) and len(t) > len(prompt) for t in texts_of(a.err))  # the validation text's start
    assert texts_of(a.err)[0] != texts_of(a.err)[1]  # what changed between them is the model
    assert a.out == b.out == quiet.out  # the closing sample, with or without previews
    assert_same(weights_and_state(os.path.join(models_dir, "a")), weights_and_state(os.path.join(models_dir, "quiet")))


def test_the_closing_sample_is_what_gpt2_py_writes_with_the_same_settings(texts, models_dir, capfd):
    """Sampled, not greedy: the prompt, then gpt2.py's continuation at --temperature 0.8 --top_k 40 --seed 0."""
    run(texts, models_dir, max_steps=3, sample_prompt="The lighthouse", sample_length=12)
    out = capfd.readouterr().out
    continuation = gpt2.main("The lighthouse", n_tokens_to_generate=12, model_size="run", models_dir=models_dir,
                             temperature=0.8, top_k=40, seed=0)
    assert out == "The lighthouse" + continuation + "\n"
    assert gpt2.main("The lighthouse", n_tokens_to_generate=12, model_size="run", models_dir=models_dir) \
        != continuation  # greedy: another text


def test_a_sample_that_cannot_fit_the_context_is_refused_before_training(texts, models_dir):
    with pytest.raises(utils.UsageError, match="^--sample_prompt is 3 tokens: with --sample_length 40 a sample "
                                               "needs 42 positions, more than the model's context of 32$"):
        run(texts, models_dir, max_steps=1, sample_prompt="The lighthouse keeper", sample_length=40)
    assert not os.path.lexists(os.path.join(models_dir, "run"))


# ---------------------------------------------------------------------------------------------- the best model

def test_the_best_model_is_the_weights_of_the_step_with_the_lowest_logged_validation_loss(texts, models_dir, capsys):
    run(texts, models_dir, max_steps=12)
    err = capsys.readouterr().err
    run_dir, best_dir = os.path.join(models_dir, "run"), os.path.join(models_dir, "run-best")
    step, loss = logged_best(run_dir)
    assert 1 < step < 12  # the validation loss fell, then rose: the best is neither the first step nor the last
    run(texts, models_dir, "again", max_steps=step)  # the same run, stopped at the best step
    capsys.readouterr()
    assert_same(weights(best_dir), weights(os.path.join(models_dir, "again")))
    assert os.readlink(best_dir).startswith(".run.saves/best-")  # beside the run's saves, removed with them
    assert sorted(os.listdir(os.path.join(models_dir, ".run.saves"))) == sorted(
        os.path.basename(os.readlink(os.path.join(models_dir, n))) for n in ("run", "run-best"))

    final = float(read_log(run_dir)[-1]["val_loss"])
    assert err.endswith(
        f"saved step 12 in {run_dir}: validation loss {final:.4f}, perplexity {np.exp(final):.2f}\n"
        f"the best, step {step} (validation loss {loss:.4f}, perplexity {np.exp(loss):.2f}), is kept as {best_dir}\n"
        f'run it: python gpt2.py --model_size run --models_dir {models_dir} "your prompt" (the best: --model_size '
        f"run-best)\n")


def test_gpt2_py_and_score_py_load_the_best_model_by_its_name(texts, models_dir, tmp_path):
    run(texts, models_dir, max_steps=4)
    generated = subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), "The lighthouse", "--model_size",
                                "run-best", "--models_dir", models_dir, "--n_tokens_to_generate", "5"],
                               capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr
    scored = subprocess.run([sys.executable, os.path.join(ROOT, "score.py"), texts[1], "--model_size", "run-best",
                             "--models_dir", models_dir, "--json"], capture_output=True, text=True, cwd=ROOT,
                            timeout=600)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["n_tokens"] > 10


def test_resume_keeps_the_best_and_ends_with_the_best_of_an_uninterrupted_run(texts, models_dir, capsys):
    run(texts, models_dir, "straight", max_steps=12)
    run(texts, models_dir, "halves", max_steps=8)
    capsys.readouterr()
    first_best = weights(os.path.join(models_dir, "halves-best"))
    run(texts, models_dir, "halves", max_steps=12, resume=True)
    err = capsys.readouterr().err
    step, loss = logged_best(os.path.join(models_dir, "halves"))
    assert step <= 8  # the best came in the first session: the second one's worse losses must not replace it
    assert (f"resuming {os.path.join(models_dir, 'halves')} at step 8 (session 2), to step 12; its best, step {step} "
            f"(validation loss {loss:.4f}), is {os.path.join(models_dir, 'halves-best')}") in err
    assert_same(weights(os.path.join(models_dir, "halves-best")), first_best)
    assert_same(weights(os.path.join(models_dir, "halves-best")), weights(os.path.join(models_dir, "straight-best")))


def test_a_best_name_taken_by_another_model_is_refused_in_one_line_before_any_work(texts, models_dir, tmp_path):
    os.makedirs(os.path.join(models_dir, "run-best"))  # a user's own folder
    process = run_train("--dataset", texts[0], "--out_name", "run", "--init_from", "scratch", "--n_layer", "1",
                        "--n_head", "2", "--n_embd", "16", "--n_ctx", "32", "--block_size", "8", "--eval_every", "5",
                        "--models_dir", models_dir)
    out, err = finish(process)
    best = os.path.join(models_dir, "run-best")
    assert (process.returncode, out, err) == (2, "", f"error: {best} is another model: this run keeps its best "
                                                      f"model under that name (move it away, or choose another "
                                                      f"--out_name)\n")
    assert not os.path.lexists(os.path.join(models_dir, "run"))
    # Another run's best model is no more this run's: neither as its best nor as its name
    os.rmdir(best)
    run(texts, models_dir, "run-best-of", max_steps=2)
    os.symlink(os.readlink(os.path.join(models_dir, "run-best-of-best")), best)
    with pytest.raises(utils.UsageError, match="is the best model of the run run-best-of: this run keeps"):
        run(texts, models_dir, max_steps=2)
    with pytest.raises(utils.UsageError, match="is the best model of the run run-best-of: choose another"):
        run(texts, models_dir, "run-best-of-best", max_steps=2, overwrite=True)
    with pytest.raises(utils.UsageError, match="is the best model of the run run-best-of: choose another"):
        run(texts, models_dir, "run-best-of-best", max_steps=2)  # not "--overwrite replaces it": it would not
    # Without a validation loss a run keeps no best: the name is not in its way
    run(texts, models_dir, max_steps=1, eval_every=0)
    assert os.readlink(best) == os.readlink(os.path.join(models_dir, "run-best-of-best"))


def test_overwrite_replaces_the_old_best_only_with_a_best_of_its_own(texts, models_dir, capsys):
    run(texts, models_dir, max_steps=3)
    old = weights(os.path.join(models_dir, "run-best"))
    run(texts, models_dir, max_steps=1, eval_every=0, overwrite=True)
    assert (f"warning: {os.path.join(models_dir, 'run-best')} is the best model of the run that --overwrite "
            f"replaces; without a validation loss (--eval_every 0) this run keeps no best, so it stays as it is"
            ) in capsys.readouterr().err
    assert_same(weights(os.path.join(models_dir, "run-best")), old)
    run(texts, models_dir, max_steps=1, overwrite=True, seed=1)
    assert_same(weights(os.path.join(models_dir, "run-best")), weights(os.path.join(models_dir, "run")))
    assert len(os.listdir(os.path.join(models_dir, ".run.saves"))) == 2  # the old best is gone with its run


def test_overwrite_interrupted_before_its_first_save_keeps_the_old_best(texts, models_dir):
    run(texts, models_dir, max_steps=3)
    before = os.readlink(os.path.join(models_dir, "run-best"))

    def die_before_saving(*a, **k):
        raise KeyboardInterrupt  # a kill before the first save of the new run, after its first best

    original = runs.Run.save
    runs.Run.save = die_before_saving
    try:
        with pytest.raises(KeyboardInterrupt):
            run(texts, models_dir, max_steps=3, overwrite=True, seed=1)
    finally:
        runs.Run.save = original
    assert os.readlink(os.path.join(models_dir, "run-best")) == before
    assert sorted(os.listdir(os.path.join(models_dir, ".run.saves"))) == sorted(
        [before.split("/")[1], os.readlink(os.path.join(models_dir, "run")).split("/")[1]])


@pytest.mark.parametrize("scenario", ["resume", "fresh"])
def test_a_kill_at_any_call_of_a_best_model_update_leaves_a_loadable_best(tmp_path, scenario):
    """tests/best_sweep.py: SIGKILL at each call, in turn, of the functions that replace models/run-best."""
    sweep = subprocess.Popen([sys.executable, "-m", "tests.best_sweep", str(tmp_path), scenario], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = finish(sweep, timeout=1200)
    assert sweep.returncode == 0, err[-3000:]
    result = json.loads(out.splitlines()[-1])
    print(f"best sweep ({scenario}): {result['kill_points']} kill points")
    assert result["kill_points"] >= (10 if scenario == "resume" else 7)  # every rename, fsync and removal
    assert result["not_killed"] == []
    assert [result[k] for k in ("unloadable", "wrong_weights", "listed_leftovers", "differ")] == [[], [], [], []]


# ---------------------------------------------------------------------------------------------- patience

def test_patience_stops_where_the_log_says_and_saves(texts, models_dir, capsys):
    run(texts, models_dir, max_steps=50, patience=2)
    err = capsys.readouterr().err
    run_dir = os.path.join(models_dir, "run")
    rows = read_log(run_dir)
    step, loss = logged_best(run_dir)
    assert len(rows) == step + 2 < 50  # two evaluations (one per step) without improvement, then the stop
    assert (f"stopping at step {step + 2}: the validation loss has not improved for 2 evaluations (best {loss:.4f} "
            f"at step {step})\n") in err
    with np.load(os.path.join(run_dir, runs.STATE_FILE)) as state:
        assert int(state["step"]) == step + 2  # saved where it stopped
    assert f"saved step {step + 2} in {run_dir}" in err
    with pytest.raises(utils.UsageError, match=f"stopped at step {step + 2}: the validation loss has not improved "
                                               f"for 2 evaluations .*; give a larger --patience, or --patience 0"):
        train.main(resume=True, out_name="run", models_dir=models_dir)
    train.main(resume=True, out_name="run", models_dir=models_dir, patience=3)  # one more evaluation, then stops
    assert len(read_log(run_dir)) == step + 3


def test_patience_needs_a_validation_loss(texts, models_dir):
    with pytest.raises(utils.UsageError, match="^--patience counts evaluations of the validation loss: give "
                                               "--eval_every N"):
        run(texts, models_dir, max_steps=5, patience=2, eval_every=0)


def test_loading_the_best_model_while_the_run_replaces_it_never_fails_nor_warns(texts, models_dir, capfd):
    """gpt2.py's loader on run-best while a resumed run finds a new best at every step (its validation text is its
    training text, at a small learning rate): each load is one whole best model, never a mixture or a gap."""
    run(texts, models_dir, max_steps=2, save_every=1, learning_rate=1e-3, lr_decay_steps=100000,
        val_dataset=texts[0])
    trainer = run_train("--out_name", "run", "--resume", "--max_steps", "100000", "--models_dir", models_dir)
    best = os.path.join(models_dir, "run-best")
    seen = set()
    try:
        first = os.readlink(best)
        wait_for(lambda: os.readlink(best) != first, trainer, "a new best")
        for _ in range(300):  # until the loads have overlapped a few switches, however slow the machine
            _, hparams, params = utils.load_encoder_hparams_and_params("run-best", models_dir)
            assert params["wte"].shape == (50257, 16)
            seen.add(os.readlink(best))
            if len(seen) >= 3 or trainer.poll() is not None:
                break
    finally:
        trainer.kill()
        finish(trainer)
    assert len(seen) >= 3  # the loads did overlap switches of the name
    assert "warning" not in capfd.readouterr().err


def test_a_best_left_unlinked_by_a_death_after_the_first_save_takes_its_name_on_resume(texts, models_dir, capsys):
    """A new run's best takes the name at the run's first save, just after it: a death in between leaves the best
    save complete but unnamed. The next --resume names it before it trains."""
    run(texts, models_dir, max_steps=2, save_every=1)
    best = os.path.join(models_dir, "run-best")
    target, kept = os.readlink(best), weights(best)
    os.remove(best)  # what the death left: the run saved, its best written but not linked
    capsys.readouterr()
    run(texts, models_dir, max_steps=3, resume=True)
    step, loss = logged_best(os.path.join(models_dir, "run"))
    assert f"its best, step {int(target.split('-')[1].split('.')[0])} " in capsys.readouterr().err  # named at open
    assert os.path.lexists(best)
    if step <= 2:
        assert_same(weights(best), kept)


KILL_AT_SAVE = """
import os, signal, sys
import runs, train
die_at = int(sys.argv.pop(1))
real = runs.Run.save
def save(self, step, *args):
    if step == die_at:  # kill -9 as the run's save of this step begins: after the best saved just before it
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, step, *args)
runs.Run.save = save
train.cli()
"""


def test_a_best_saved_just_before_a_kill_is_kept_and_evaluated_again_on_resume(texts, models_dir, capsys):
    """Saves at 3 and 6, an evaluation at 5: a kill -9 at the save of step 6 leaves the run at step 3 and
    <name>-best at step 5, which the resumed log does not know. A --resume with another --eval_every (2: never 5)
    kept its log's best (step 4) as the name, removing step 5's weights, and said step 4 was the best: the name and
    the log disagreed. Now the name keeps step 5 until the run evaluates step 5 again, which it does whatever
    --eval_every, and says so; from there on the name follows the log."""
    options = {**OPTIONS, "eval_every": 5, "save_every": 3, "max_steps": 8, "val_dataset": texts[1]}
    args = [arg for name, value in options.items() for arg in (f"--{name}", str(value))]
    killed = subprocess.Popen([sys.executable, "-c", KILL_AT_SAVE, "6", "--dataset", texts[0], "--out_name", "run",
                               *args, "--models_dir", models_dir], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    out, err = finish(killed, timeout=300)
    assert killed.returncode == -9, err
    run_dir, best = os.path.join(models_dir, "run"), os.path.join(models_dir, "run-best")
    assert runs.read_saved_run(run_dir).step == 3 and runs.best_step(os.path.basename(os.readlink(best))) == 5
    orphan = weights(best)
    with open(os.path.join(models_dir, ".run.saves", runs.LIVE_LOG), newline="", encoding="utf-8") as f:
        lost_loss = [row for row in csv.DictReader(f) if row["step"] == "5"][0]["val_loss"]

    capsys.readouterr()
    run(texts, models_dir, resume=True, max_steps=4, eval_every=2)  # ends before step 5
    err = capsys.readouterr().err
    ahead = (f"{best} holds the best of step 5, from past the save this run resumed from (it stopped before saving "
             f"again), whose validation loss the log lost: a run that evaluates (--eval_every N) evaluates step 5 "
             f"again")
    assert f"warning: {ahead}\n" in err and err.rstrip().splitlines()[-2] == ahead
    assert [r["val_loss"] != "" for r in read_log(run_dir)] == [False, False, False, True]
    assert runs.best_step(os.path.basename(os.readlink(best))) == 5
    assert_same(weights(best), orphan)  # kept: the only copy of that best
    pending = [e for e in os.listdir(os.path.join(models_dir, ".run.saves")) if e.startswith("best-000004.")]
    assert len(pending) == 1  # step 4's best waits for step 5's loss
    step_4 = weights(os.path.join(models_dir, ".run.saves", pending[0]))

    run(texts, models_dir, resume=True, max_steps=8, eval_every=2)
    rows = read_log(run_dir)
    assert rows[4]["val_loss"] == lost_loss  # step 5 evaluated again: the same weights as the ones kept
    step, _ = logged_best(run_dir)
    assert runs.best_step(os.path.basename(os.readlink(best))) == step  # the name and the log agree again
    if step == 5:
        assert_same(weights(best), orphan)
    elif step == 4:
        assert_same(weights(best), step_4)
    elif step == 8:
        assert_same(weights(best), weights(run_dir))
    assert sorted(e for e in os.listdir(os.path.join(models_dir, ".run.saves")) if e.startswith("best-")) == \
        [os.path.basename(os.readlink(best))]  # no other best left behind


def test_a_full_disk_at_a_new_best_is_one_line_and_keeps_the_old_best_and_the_run(tmp_path, texts):
    """20 MB: the vocabulary (1.5 MB), a save of step 1 (11 MB) and its best (4.7 MB) fit; step 2's best does not.
    The run stops with one line saying what is kept, and the name keeps step 1's best, whole."""
    from tests.mounts import small_disk

    with small_disk(tmp_path / "disk", "20m") as disk:
        models_dir = vocabulary_only(os.path.join(disk, "models"))
        run(texts, models_dir, max_steps=1, save_every=1)
        run_dir, best = os.path.join(models_dir, "run"), os.path.join(models_dir, "run-best")
        kept, kept_best = os.readlink(run_dir), os.readlink(best)
        full = run_train("--out_name", "run", "--resume", "--max_steps", "3", "--models_dir", models_dir)
        out, err = finish(full, timeout=300)
        assert full.returncode == 1 and not out and "Traceback" not in err, err
        assert err.splitlines()[-1] == (f"error: could not save the best model of step 2 as {best}: No space left "
                                        f"on device; {run_dir} keeps its last save"), err
        assert (os.readlink(run_dir), os.readlink(best)) == (kept, kept_best)
        assert sorted(os.listdir(os.path.join(models_dir, ".run.saves"))) == sorted(
            os.path.basename(link) for link in (kept, kept_best))  # no partial save, no live log
        _, _, params = utils.load_encoder_hparams_and_params("run-best", models_dir)
        assert runs.read_saved_run(run_dir).step == 1
