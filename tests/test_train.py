"""train.py: AdamW against torch.optim.AdamW, and whole runs: memorization, saving, resuming, Ctrl-C, locking,
and the bad-input table."""
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import runs
import train
import utils
from utils import flatten
from tests.conftest import ROOT
from tests.release_layout import hf_model, vocabulary_only

PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a tin of oil and a "
             "cloth for the glass. He counted the steps aloud, one hundred and twelve of them, and at the top he lit "
             "the lamp that warned the fishing boats away from the rocks.")
TINY = ["--init_from", "scratch", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--n_ctx", "64"]
SCRATCH = {flag[2:]: value if flag == "--init_from" else int(value) for flag, value in zip(TINY[::2], TINY[1::2])}


@pytest.fixture
def models_dir(tmp_path):
    """A models folder holding only 124M's tokenizer files (no weights): a model from scratch uses its vocabulary."""
    return vocabulary_only(tmp_path / "models")


@pytest.fixture
def paragraph(tmp_path):
    path = tmp_path / "paragraph.txt"
    path.write_text(PARAGRAPH, encoding="utf-8")
    return str(path)


DEADLINE = 600  # seconds for any child: generous for a loaded 2-core machine; nothing here is timed


def run_train(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], text=True, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process, timeout=DEADLINE):
    """(stdout, stderr) of a child, which is killed if it runs past its deadline: the test then fails with what it
    printed, instead of waiting for ever."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{process.args} ran past its {timeout} s deadline; stdout: {out[-2000:]!r}; "
                    f"stderr: {err[-2000:]!r}")


def wait_for(condition, process, what, timeout=DEADLINE):
    """Poll until condition() holds; the test fails (the child killed, its output shown) if the child ends or the
    deadline passes first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"no {what} (exit {process.returncode}); stdout: {out[-2000:]!r}; stderr: {err[-2000:]!r}")
        time.sleep(0.1)


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- data and model

def test_initialization_is_gpt2s():
    params = train.init_params(n_layer=8, n_embd=256, n_ctx=128, rng=np.random.default_rng(0))
    assert all(a.dtype == np.float32 for _, a in flatten(params).items())
    assert params["wte"].shape == (50257, 256) and params["wpe"].shape == (128, 256)
    for name, array in flatten(params).items():
        if name.endswith("/g"):
            assert np.all(array == 1.0), name
        elif name.endswith("/b"):
            assert np.all(array == 0.0), name
        else:  # the residual projections start 1/sqrt(2 n_layer) = 1/4 as large
            std = 0.02 / 4 if name.endswith("c_proj/w") else 0.02
            assert abs(array.mean()) < 1e-3 and array.std() == pytest.approx(std, rel=0.03), name


# ---------------------------------------------------------------------------------------------- the optimizer

def test_learning_rate_schedule_warms_up_then_follows_a_cosine_to_a_tenth():
    lr = lambda step: train.learning_rate_at(step, 1e-3, warmup_steps=10, lr_decay_steps=110)  # noqa: E731
    assert lr(0) == pytest.approx(1e-4) and lr(4) == pytest.approx(5e-4) and lr(9) == pytest.approx(1e-3)
    assert lr(10) == pytest.approx(1e-3)  # the cosine starts at the peak
    assert lr(60) == pytest.approx(0.55e-3)  # halfway down the cosine: halfway between peak and floor
    assert lr(110) == pytest.approx(1e-4) and lr(500) == pytest.approx(1e-4)  # the floor, then flat
    assert all(lr(s) >= lr(s + 1) for s in range(10, 200))


def test_twenty_steps_match_torch_adamw_with_the_same_schedule_and_clipping():
    """Same initial weights, same batches, two micro-batches per step: loss and weights as HF's GPT2LMHeadModel
    trained by torch.optim.AdamW, torch's gradient clipping, and the same learning rate per step."""
    import torch

    torch.manual_seed(0)
    n_layer, n_head, n_embd, n_ctx = 2, 2, 32, 32
    params = train.init_params(n_layer, n_embd, n_ctx, np.random.default_rng(0))
    # Layer-norm gains and biases away from 1 and 0, so that treating them as weights (decay) would show.
    for name, array in flatten(params).items():
        if array.ndim == 1:
            array += np.random.default_rng(len(name)).normal(0, 0.1, array.shape).astype(np.float32)
    hparams = {"n_vocab": 50257, "n_ctx": n_ctx, "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer}
    model = hf_model(flatten(params), hparams).train()  # no dropout: the config sets it to 0
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    torch_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1.0, betas=(0.9, 0.95), eps=1e-8)
    config = {"batch_size": 3, "block_size": 16, "grad_accum": 2, "n_head": n_head, "grad_clip": 0.5}
    tokens = np.random.default_rng(1).integers(0, 50257, 500).astype(np.uint16)
    ours_rng, torch_rng = np.random.default_rng(2), np.random.default_rng(2)
    optimizer = train.AdamW(params, weight_decay=0.1)
    for step in range(20):
        lr = train.learning_rate_at(step, 3e-3, warmup_steps=5, lr_decay_steps=15)
        loss = train.train_step(params, optimizer, tokens, ours_rng, config, lr)

        torch_loss = 0.0
        for _ in range(config["grad_accum"]):
            inputs, targets = train.get_batch(tokens, torch_rng, config["batch_size"], config["block_size"])
            logits = model(torch.from_numpy(inputs)).logits
            micro = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets).flatten())
            (micro / config["grad_accum"]).backward()
            torch_loss += micro.item() / config["grad_accum"]
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        for group in torch_opt.param_groups:
            group["lr"] = lr
        torch_opt.step()
        torch_opt.zero_grad()
        assert loss == pytest.approx(torch_loss, rel=1e-4), step

    state = model.state_dict()
    for name, ours in flatten(params).items():
        *path, leaf = name.split("/")
        path = [f"h.{p[1:]}" if p.startswith("h") else p for p in path]
        leaf = {"g": "weight", "w": "weight", "b": "bias"}.get(leaf, f"{leaf}.weight")
        theirs = state[".".join(["transformer", *path, leaf])].numpy()
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0, err_msg=name)


# ---------------------------------------------------------------------------------------------- whole runs

def test_a_tiny_model_memorizes_a_paragraph_and_gpt2_py_continues_it(models_dir, paragraph):
    """From scratch, end to end: train.py, then gpt2.py on the saved folder, as a user would run them. The
    paragraph (55 tokens) is its own validation text, so every token of it is trained on, and the windows cover
    every position that generating 40 tokens after a 3-token prompt uses."""
    run = run_train("--dataset", paragraph, "--val_dataset", paragraph, "--out_name", "lighthouse",
                    "--init_from", "scratch", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--n_ctx", "48",
                    "--block_size", "47", "--batch_size", "4", "--max_steps", "120", "--learning_rate", "1e-2",
                    "--warmup_steps", "10", "--weight_decay", "0", "--eval_every", "60", "--save_every", "0",
                    "--models_dir", models_dir)
    out, err = finish(run)
    assert run.returncode == 0, err
    assert "val loss" in err and "perplexity" in err
    assert out.strip()  # the greedy sample
    rows = read_log(os.path.join(models_dir, "lighthouse"))
    assert [int(r["step"]) for r in rows] == list(range(1, 121))
    assert float(rows[-1]["train_loss"]) < 0.2 < float(rows[0]["train_loss"])
    assert rows[59]["val_loss"] and not rows[58]["val_loss"]

    prompt, rest = " ".join(PARAGRAPH.split()[:3]), " " + " ".join(PARAGRAPH.split()[3:])
    generated = subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), prompt, "--model_size", "lighthouse",
                                "--models_dir", models_dir, "--n_tokens_to_generate", "40"],
                               capture_output=True, text=True, cwd=ROOT)
    assert generated.returncode == 0, generated.stderr
    assert len(generated.stdout) > 150 and rest.startswith(generated.stdout.rstrip("\n")), generated.stdout


def test_the_saved_run_reads_back_under_the_official_names_and_shapes(models_dir, paragraph):
    import tensorflow as tf

    train.main(paragraph, "run", init_from="scratch", n_layer=2, n_head=2, n_embd=32, n_ctx=64, block_size=16,
               batch_size=2, max_steps=2, learning_rate=1e-2, warmup_steps=0, eval_every=0, models_dir=models_dir)
    run_dir = os.path.join(models_dir, "run")
    with open(os.path.join(run_dir, "checkpoint"), encoding="utf-8") as f:
        assert f.readline() == 'model_checkpoint_path: "model.ckpt"\n'
    assert sorted(os.listdir(run_dir)) == ["checkpoint", "encoder.json", "hparams.json", "log.csv",
                                           "model.ckpt.data-00000-of-00001", "model.ckpt.index", "model.ckpt.meta",
                                           "train_config.json", "train_state.npz", "vocab.bpe"]
    # no temporary folder: the run's name, its own hidden folder holding the one save, and the locks
    assert [n for n in sorted(os.listdir(models_dir)) if not n.endswith(".lock")] == [".run.saves", "124M", "run",
                                                                                     "token-cache"]
    assert os.listdir(os.path.join(models_dir, ".run.saves")) == [os.path.basename(os.readlink(run_dir))]
    expected = {"model/wte": [50257, 32], "model/wpe": [64, 32], "model/ln_f/g": [32], "model/ln_f/b": [32]}
    for i in range(2):
        for ln in ("ln_1", "ln_2"):
            expected.update({f"model/h{i}/{ln}/g": [32], f"model/h{i}/{ln}/b": [32]})
        for name, n_in, n_out in (("attn/c_attn", 32, 96), ("attn/c_proj", 32, 32), ("mlp/c_fc", 32, 128),
                                  ("mlp/c_proj", 128, 32)):
            expected.update({f"model/h{i}/{name}/w": [1, n_in, n_out], f"model/h{i}/{name}/b": [n_out]})
    prefix = os.path.join(run_dir, "model.ckpt")
    assert dict(tf.train.list_variables(prefix)) == expected

    encoder, hparams, params = utils.load_encoder_hparams_and_params("run", models_dir)
    assert hparams == {"n_vocab": 50257, "n_ctx": 64, "n_embd": 32, "n_head": 2, "n_layer": 2}
    for name, array in flatten(params).items():
        np.testing.assert_array_equal(array, np.squeeze(tf.train.load_variable(prefix, f"model/{name}"), 0)
                                      if name.endswith("/w") else tf.train.load_variable(prefix, f"model/{name}"))
    assert np.all(params["blocks"][0]["ln_1"]["g"] != 1.0)  # trained, not the initialization


def test_fine_tuning_starts_from_a_model_folder_and_keeps_its_shape(models_dir, paragraph, capsys):
    from tests.release_layout import write_model_dir

    hparams, tensors = write_model_dir(os.path.join(models_dir, "base"), n_layer=1, n_embd=32, n_head=2, n_ctx=48)
    train.main(paragraph, "tuned", init_from="base", n_layer=3, n_embd=64, block_size=16, batch_size=2, max_steps=1,
               learning_rate=1e-3, warmup_steps=0, eval_every=0, models_dir=models_dir)
    # a shape flag cannot reshape a loaded model: said in one line, not ignored silently
    assert "warning: --n_layer, --n_embd only shape a model trained from scratch: --init_from base keeps its own " \
           "shape\n" in capsys.readouterr().err
    _, tuned_hparams, params = utils.load_encoder_hparams_and_params("tuned", models_dir)
    assert tuned_hparams == hparams
    for name, array in flatten(params).items():
        before = tensors[f"model/{name}"]
        before = before[0] if before.ndim == 3 else before
        # One AdamW step moves each weight by about the learning rate, no more: it started from the folder's.
        assert 0 < np.abs(array - before).max() < 2e-3, name


def test_resuming_gives_the_same_weights_as_one_uninterrupted_run(models_dir, paragraph):
    common = dict(init_from="scratch", n_layer=1, n_head=2, n_embd=32, n_ctx=64, block_size=16, batch_size=2,
                  grad_accum=2, learning_rate=1e-2, warmup_steps=2, lr_decay_steps=6, eval_every=0,
                  models_dir=models_dir)
    train.main(paragraph, "straight", max_steps=6, save_every=4, **common)
    train.main(paragraph, "halves", max_steps=3, **common)
    train.main(paragraph, "halves", max_steps=6, resume=True, **common)

    def saved(name):
        run_dir = os.path.join(models_dir, name)
        flat = utils.read_tf_checkpoint(utils.checkpoint_prefix(run_dir), 1)
        with np.load(os.path.join(run_dir, "train_state.npz")) as state:
            flat.update({key: state[key] for key in state.files})  # moments, step, the batch generator
        return flat, [(r["step"], r["train_loss"]) for r in read_log(run_dir)]

    (straight, straight_log), (halves, halves_log) = saved("straight"), saved("halves")
    assert straight_log == halves_log and len(straight_log) == 6
    assert sorted(straight) == sorted(halves) and int(halves["step"]) == 6
    for name in straight:
        np.testing.assert_array_equal(straight[name], halves[name], err_msg=name)


def test_a_run_in_the_models_folder_itself_saves_and_resumes(models_dir, paragraph, monkeypatch):
    """--models_dir . (the run's name alone has no folder part: its saves went to a folder named '')."""
    monkeypatch.chdir(models_dir)
    common = dict(**SCRATCH, block_size=16, batch_size=2, warmup_steps=1, eval_every=0, models_dir=".")
    train.main(paragraph, "here", max_steps=2, **common)
    train.main(paragraph, "here", max_steps=3, resume=True, **common)
    assert os.readlink("here").startswith(".here.saves" + os.sep) and runs.read_saved_run("here").step == 3


def test_recompute_trains_the_same_weights(models_dir, paragraph):
    """--recompute only trades memory for time: the same losses and, bit for bit, the same saved weights."""
    common = dict(init_from="scratch", n_layer=2, n_head=2, n_embd=32, n_ctx=64, block_size=16, batch_size=2,
                  learning_rate=1e-2, warmup_steps=1, max_steps=3, eval_every=0, models_dir=models_dir)
    train.main(paragraph, "kept", **common)
    train.main(paragraph, "recomputed", recompute=True, **common)
    saved = {name: utils.read_tf_checkpoint(utils.checkpoint_prefix(os.path.join(models_dir, name)), 2)
             for name in ("kept", "recomputed")}
    assert [r["train_loss"] for r in read_log(os.path.join(models_dir, "kept"))] == \
        [r["train_loss"] for r in read_log(os.path.join(models_dir, "recomputed"))]
    for name, weight in saved["kept"].items():
        np.testing.assert_array_equal(saved["recomputed"][name], weight, err_msg=name)


def test_ctrl_c_saves_a_loadable_run_and_a_second_run_on_it_is_refused(models_dir, paragraph):
    run_dir = os.path.join(models_dir, "long")
    # --save_every 2: a save soon after the start, whatever the machine's load; every wait below has a deadline
    first = run_train("--dataset", paragraph, "--out_name", "long", *TINY, "--block_size", "16", "--batch_size",
                      "2", "--max_steps", "100000", "--eval_every", "0", "--save_every", "2", "--models_dir",
                      models_dir)
    wait_for(lambda: os.path.exists(os.path.join(run_dir, "log.csv")), first, "first save")

    second = run_train("--dataset", paragraph, "--out_name", "long", *TINY, "--block_size", "16", "--max_steps",
                       "1", "--warmup_steps", "1", "--overwrite", "--models_dir", models_dir)
    out, err = finish(second)
    assert second.returncode == 2 and not out
    assert err == f"error: another process is writing {run_dir}\n", err
    assert len(read_log(run_dir)) >= 2  # the first run's save is untouched

    first.send_signal(signal.SIGINT)
    out, err = finish(first)
    assert first.returncode == 130, err
    assert "interrupted: saved step" in err and "Traceback" not in err
    steps = len(read_log(run_dir))
    with np.load(os.path.join(run_dir, "train_state.npz")) as state:
        assert int(state["step"]) == steps >= 2
    _, hparams, params = utils.load_encoder_hparams_and_params("long", models_dir)
    assert hparams["n_embd"] == 32 and params["wte"].shape == (50257, 32)


def test_a_step_whose_loss_is_nan_is_not_taken_and_the_run_keeps_its_last_save(models_dir, paragraph, monkeypatch):
    """Step 5's loss is nan (a run blowing up): the run stops with one line, and its save of step 4 stays, finite."""
    losses, real = iter([None] * 4 + [float("nan")]), train.loss_and_grads

    def nan_at_step_5(*args):
        loss, grads = real(*args)
        return next(losses, None) or loss, grads
    monkeypatch.setattr(train, "loss_and_grads", nan_at_step_5)
    run_dir = os.path.join(models_dir, "run")
    with pytest.raises(utils.ModelError, match=r"^training diverged at step 5: the loss is nan .* so the step was not "
                                               rf"taken; {re.escape(run_dir)} keeps its last save"):
        train.main(paragraph, "run", **SCRATCH, block_size=16, batch_size=2, max_steps=10,
                   save_every=2, eval_every=0, models_dir=models_dir)
    saved = runs.read_saved_run(run_dir)
    assert saved.step == 4 and all(np.isfinite(a).all() for a in flatten(saved.params).values())


def test_an_overwrite_that_diverges_before_its_first_save_says_the_old_run_is_as_it_was(models_dir, paragraph,
                                                                                         monkeypatch):
    common = dict(**SCRATCH, block_size=16, batch_size=2, max_steps=4, save_every=2, eval_every=0,
                  models_dir=models_dir)
    train.main(paragraph, "run", **common)
    real = train.loss_and_grads
    monkeypatch.setattr(train, "loss_and_grads", lambda *args: (float("nan"), real(*args)[1]))
    run_dir = os.path.join(models_dir, "run")
    with pytest.raises(utils.ModelError, match=rf"{re.escape(run_dir)} is as it was, and the new run is discarded"):
        train.main(paragraph, "run", overwrite=True, **common)
    assert runs.read_saved_run(run_dir).step == 4


def test_weights_that_overflow_are_never_saved_over_the_last_save(models_dir, paragraph, monkeypatch):
    """An update that leaves a weight at inf with a finite loss (the embedding of a position past the blocks of 16):
    the save due at step 4 is refused and the save of step 2 stays; the best model is not replaced either."""
    real = train.AdamW.step

    def overflowing_at_update_3(self, params, grads, lr):
        real(self, params, grads, lr)
        if self.t == 3:
            params["wpe"][-1, 0] = np.inf
    monkeypatch.setattr(train.AdamW, "step", overflowing_at_update_3)
    run_dir = os.path.join(models_dir, "run")
    with pytest.raises(utils.ModelError, match=r"^training diverged at step 4: its weights are not all finite"):
        train.main(paragraph, "run", **SCRATCH, block_size=16, batch_size=2, max_steps=10,
                   save_every=2, eval_every=2, models_dir=models_dir)
    assert runs.read_saved_run(run_dir).step == 2
    best = utils.read_tf_checkpoint(utils.checkpoint_prefix(run_dir + "-best"), 2)
    assert all(np.isfinite(a).all() for a in best.values())


def test_a_validation_loss_that_is_not_finite_stops_the_run_and_is_never_the_best(models_dir, paragraph,
                                                                                   monkeypatch):
    losses, real = iter([None, float("nan")]), train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *args: next(losses, None) or real(*args))
    run_dir = os.path.join(models_dir, "run")
    with pytest.raises(utils.ModelError, match=r"^training diverged at step 4: its validation loss is nan"):
        train.main(paragraph, "run", **SCRATCH, block_size=16, batch_size=2, max_steps=10, save_every=2,
                   eval_every=2, models_dir=models_dir)
    assert runs.read_saved_run(run_dir).step == 2 and runs.best_of(run_dir + "-best")[1].startswith("best-000002.")


def test_a_diverging_run_on_the_command_line_is_one_error_line_and_exit_1(models_dir, paragraph):
    process = run_train("--dataset", paragraph, "--out_name", "run", *TINY, "--block_size", "16", "--max_steps", "5",
                        "--learning_rate", "1e30", "--eval_every", "0", "--models_dir", models_dir)
    out, err = finish(process)
    assert process.returncode == 1 and not out
    assert err.splitlines()[-1].startswith("error: training diverged at step 2: the loss is nan") and \
        "Warning" not in err, err  # one line: NumPy's warnings of the overflow are not shown
    assert not os.path.lexists(os.path.join(models_dir, "run"))


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["new run", "--overwrite of no run"])
def test_sigterm_saves_the_step_it_was_on_as_ctrl_c_does(models_dir, paragraph, overwrite):
    """kill, `docker stop` and a cluster taking its machine back send SIGTERM: the steps since the last save are
    saved, not lost, and the exit code is the signal's (143). --overwrite with no old run to keep saves too (a job
    script that always passes it lost its run)."""
    run_dir = os.path.join(models_dir, "long")
    process = run_train("--dataset", paragraph, "--out_name", "long", *TINY, "--block_size", "16", "--batch_size",
                        "2", "--max_steps", "100000", "--eval_every", "0", "--save_every", "1000", "--models_dir",
                        models_dir, *overwrite)
    live_log = os.path.join(models_dir, ".long.saves", "live-log.csv")
    wait_for(lambda: os.path.exists(live_log) and len(open(live_log).readlines()) > 3, process, "three steps")
    process.send_signal(signal.SIGTERM)
    out, err = finish(process)
    assert process.returncode == 143 and "terminated: saved step" in err and "Traceback" not in err, err
    steps = len(read_log(run_dir))
    with np.load(os.path.join(run_dir, "train_state.npz")) as state:
        assert int(state["step"]) == steps >= 3  # no save was due: this one is SIGTERM's


# ---------------------------------------------------------------------------------------------- bad input

def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


BAD_INPUT = [  # (flags, what the one line says)
    (dict(dataset="{tmp}/missing.txt"), "no such file or folder"),
    (dict(dataset="{empty}"), "is empty"),
    (dict(dataset="{latin1}"), "is not UTF-8 text"),
    (dict(dataset="{no_text}"), "the folder holds no text files (.txt, .md, .rst, .jsonl, .csv, or UTF-8 text"),
    (dict(block_size=60), "fewer than --block_size + 1"),
    (dict(block_size=65), "longer than --n_ctx"),
    (dict(n_embd=30, n_head=4), "must be divisible by --n_head"),
    # 806 billion parameters: it filled the machine's memory for minutes before failing; 16 bytes each to train
    (dict(n_layer=1000, n_embd=8192, n_head=64),
     "a model of 805,825,110,016 parameters needs at least 12,007.7 GiB to train"),
    (dict(init_from="gpt5"), "unknown --init_from"),
    (dict(init_from="../models/124M"), "no such model folder '../models/124M'"),
    (dict(out_name="runs/mine"), "not a path"),
    (dict(out_name="355M"), "release model's name"),
    (dict(out_name="existing"), "already exists"),
    (dict(resume=True, out_name="new"), "holds no saved training run"),
    (dict(max_steps=0), "--max_steps must be a positive whole number"),
    (dict(max_steps=2.5), "--max_steps must be a positive whole number"),
    (dict(batch_size=-1), "--batch_size must be a positive whole number"),
    (dict(learning_rate=0), "--learning_rate must be a positive number"),
    (dict(learning_rate="fast"), "--learning_rate must be a positive number"),
    (dict(recompute="yes"), "--recompute takes no value"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUT, ids=[m for _, m in BAD_INPUT])
def test_bad_input_is_refused_before_anything_is_written(models_dir, paragraph, tmp_path, flags, message):
    os.makedirs(os.path.join(models_dir, "existing"))
    files = {"tmp": str(tmp_path), "empty": write(tmp_path / "empty.txt", b""),
             "latin1": write(tmp_path / "latin1.txt", "café".encode("latin-1")), "no_text": str(tmp_path / "notes")}
    os.makedirs(tmp_path / "notes")
    write(tmp_path / "notes" / "photo.png", b"\x89PNG\r\n\x1a\n")
    write(tmp_path / "notes" / "program", b"\x7fELF\x02\x01\x01\x00")  # no extension, not text
    args = dict(dataset=paragraph, out_name="run", init_from="scratch", n_layer=1, n_head=2, n_embd=32, n_ctx=64,
                block_size=16, models_dir=models_dir)
    args.update({k: v.format(**files) if isinstance(v, str) else v for k, v in flags.items()})
    before = sorted(os.walk(models_dir))
    with pytest.raises(utils.UsageError, match=re.escape(message)):
        train.main(**args)
    assert sorted(os.walk(models_dir)) == before


def test_the_command_line_reports_bad_input_in_one_line_with_exit_2(models_dir, tmp_path):
    run = run_train("--dataset", str(tmp_path / "missing.txt"), "--out_name", "run", "--models_dir", models_dir)
    out, err = finish(run)
    assert run.returncode == 2 and not out
    assert err == f"error: --dataset {tmp_path / 'missing.txt'}: no such file or folder\n"


@pytest.mark.parametrize("args, line", [
    (["--max_step", "2"], "error: unknown flag --max_step; did you mean --max_steps, --warmup_steps? "
                          "`python train.py --help` lists them all"),
    (["extra"], "error: unexpected argument 'extra': every value goes with its --flag; python train.py --help "
                "lists them"),
])
def test_a_flag_mistake_is_refused_before_any_training(models_dir, paragraph, args, line):
    # fire alone would train for all --max_steps first and only then complain about the flag it could not use
    run = run_train("--dataset", paragraph, "--out_name", "run", "--init_from", "scratch", "--n_layer", "1",
                    "--n_head", "2", "--n_embd", "32", "--n_ctx", "64", "--block_size", "16", "--models_dir",
                    models_dir, *args)
    out, err = finish(run)
    assert (run.returncode, out, err) == (2, "", line + "\n")
    assert not os.path.exists(os.path.join(models_dir, "run"))


def test_text_flags_stay_text(models_dir, paragraph, tmp_path):
    shutil.copyfile(paragraph, tmp_path / "2024")
    run = run_train("--dataset", str(tmp_path / "2024"), "--out_name", "2025", "--init_from", "scratch",
                    "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--n_ctx", "64", "--block_size", "16",
                    "--max_steps", "1", "--eval_every", "0", "--models_dir", models_dir)
    out, err = finish(run)
    assert run.returncode == 0, err
    assert os.path.exists(os.path.join(models_dir, "2025", "checkpoint"))


def test_overwrite_keeps_the_old_run_whole_until_the_first_save(models_dir, paragraph):
    args = dict(init_from="scratch", n_layer=1, n_head=2, n_embd=32, n_ctx=64, block_size=16, batch_size=2,
                learning_rate=1e-2, warmup_steps=0, eval_every=0, models_dir=models_dir)
    train.main(paragraph, "run", max_steps=2, **args)
    saved = {name: open(os.path.join(models_dir, "run", name), "rb").read()
             for name in os.listdir(os.path.join(models_dir, "run"))}

    def die_before_saving(*a, **k):
        raise KeyboardInterrupt  # a kill before the first save of the new run

    original = runs.Run.save
    runs.Run.save = die_before_saving
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(paragraph, "run", max_steps=3, overwrite=True, **args)
    finally:
        runs.Run.save = original
    assert {name: open(os.path.join(models_dir, "run", name), "rb").read()
            for name in os.listdir(os.path.join(models_dir, "run"))} == saved
    with pytest.raises(utils.UsageError, match="is already at step 2: give a --max_steps above it"):
        train.main(paragraph, "run", max_steps=2, resume=True, **args)
    with pytest.raises(utils.UsageError, match="is where tokenized datasets are kept"):
        train.main(paragraph, "token-cache", max_steps=2, overwrite=True, **args)
