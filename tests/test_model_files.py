"""Model files are never lost and never silently wrong: failures that are not damage keep the files and say what
they are; interrupted conversions leave nothing behind; read-only and full disks still run the model."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import gpt2
import utils
from tests.conftest import ROOT
from tests.mounts import read_only, small_disk

CONVERTED = utils.CONVERTED
OFFLINE = "http://127.0.0.1:9"  # a download attempt fails with "could not download ...", which no test expects


def copy_model(tiny_model, models_dir, name="tiny"):
    shutil.copytree(tiny_model.path, os.path.join(models_dir, name), ignore=shutil.ignore_patterns(CONVERTED))
    return os.path.join(models_dir, name)


def contents(model_dir):
    files = {}
    for name in sorted(os.listdir(model_dir)):
        with open(os.path.join(model_dir, name), "rb") as f:
            files[name] = f.read()
    return files


def run_cli(models_dir, model_size="tiny", code="import gpt2; gpt2.cli()", env=None, **popen):
    cmd = [sys.executable, "-c", code, "Hello", "--n_tokens_to_generate", "3", "--model_size", model_size,
           "--models_dir", str(models_dir)]
    env = {**os.environ, "GPT2_MODELS_URL": OFFLINE, **(env or {})}
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, **popen)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def expected_stdout(tiny_model):
    return gpt2.main("Hello", n_tokens_to_generate=3, model_size="tiny", models_dir=tiny_model.models_dir) + "\n"


def stderr_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_release_checkpoint_is_kept_when_tensorflow_cannot_be_imported(tmp_path, tiny_model):
    model_dir = copy_model(tiny_model, tmp_path, "124M")  # a release size: damage would download it again
    before = contents(model_dir)
    blocker = tmp_path / "no_tf"
    os.makedirs(blocker)
    (blocker / "tensorflow.py").write_text("raise ImportError(\"No module named 'tensorflow'\")\n")
    result = run_cli(tmp_path, "124M", env={"PYTHONPATH": str(blocker)})
    assert result.returncode == 1 and result.stdout == ""
    assert stderr_lines(result) == [f"error: reading the checkpoint {model_dir}/model.ckpt needs TensorFlow "
                                    "(pip install tensorflow): No module named 'tensorflow'"]
    assert contents(model_dir) == before  # nothing deleted, nothing downloaded


def test_release_checkpoint_is_kept_when_memory_runs_out(tmp_path, tiny_model, monkeypatch):
    import tensorflow as tf

    model_dir = copy_model(tiny_model, tmp_path, "124M")
    before = contents(model_dir)

    def out_of_memory(prefix):
        raise MemoryError

    monkeypatch.setattr(tf.train, "load_checkpoint", out_of_memory)
    monkeypatch.setenv("GPT2_MODELS_URL", OFFLINE)
    with pytest.raises(utils.ModelError, match="not enough memory to read the checkpoint"):
        utils.load_encoder_hparams_and_params("124M", str(tmp_path))
    assert contents(model_dir) == before


# np.save made to stop after the first tensor, so that a signal surely arrives during the conversion.
STOP_IN_SAVE = """
import os, sys, time, numpy
save = numpy.save
def save_then_wait(*args, **kwargs):
    save(*args, **kwargs)
    open(os.environ["IN_SAVE"], "w").close()
    time.sleep(300)
numpy.save = save_then_wait
import gpt2; gpt2.cli()
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_signal_during_conversion_leaves_no_temporary_folder(tmp_path, tiny_model, signum, code):
    model_dir = copy_model(tiny_model, tmp_path)
    in_save = tmp_path / "in_save"
    process = run_cli(tmp_path, code=STOP_IN_SAVE, env={"IN_SAVE": str(in_save)},
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not in_save.exists() and process.poll() is None:  # a file marks the moment: no guessed delay
            time.sleep(0.1)
        assert process.poll() is None, process.communicate()
        assert [n for n in os.listdir(model_dir) if n.startswith(CONVERTED + ".tmp")]  # caught mid-conversion
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code and "Traceback" not in stderr, stderr
    assert not [n for n in os.listdir(model_dir) if n.startswith(CONVERTED)]
    _, _, params = utils.load_encoder_hparams_and_params("tiny", str(tmp_path))  # the next run is fine
    np.testing.assert_array_equal(params["wte"], tiny_model.tensors["model/wte"])


def test_temporary_folder_of_a_killed_conversion_is_removed_by_the_next(tmp_path, tiny_model):
    model_dir = copy_model(tiny_model, tmp_path)
    leftover = os.path.join(model_dir, CONVERTED + ".tmp4194304")  # no such process: SIGKILLed long ago
    os.makedirs(leftover)
    with open(os.path.join(leftover, "wte.npy"), "wb") as f:
        f.write(b"half a tensor")
    utils.load_encoder_hparams_and_params("tiny", str(tmp_path))
    assert sorted(n for n in os.listdir(model_dir) if n.startswith(CONVERTED)) == [CONVERTED]


# The warnings are the CLI's own lines: Python's warnings filters (what `-W` sets in a child) change nothing.
WARNING_FILTERS = {"default": {}, "ignore": {"PYTHONWARNINGS": "ignore"}, "error": {"PYTHONWARNINGS": "error"}}


@pytest.mark.parametrize("filters", list(WARNING_FILTERS), ids=lambda f: f"PYTHONWARNINGS={f}")
def test_read_only_models_folder_runs_with_one_warning(tmp_path, tiny_model, expected_stdout, filters):
    copy_model(tiny_model, tmp_path / "writable")
    with read_only(tmp_path / "writable", tmp_path / "ro") as models_dir:
        result = run_cli(models_dir, env=WARNING_FILTERS[filters])
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_stdout
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"warning: could not write {models_dir}/tiny/{CONVERTED} "
                                                   "(Read-only file system)") and "start-up stays slow" in lines[0]


@pytest.mark.parametrize("filters", list(WARNING_FILTERS), ids=lambda f: f"PYTHONWARNINGS={f}")
def test_full_disk_during_conversion_runs_with_one_warning_and_nothing_partial(tmp_path, tiny_model,
                                                                               expected_stdout, filters):
    with small_disk(tmp_path / "disk", "20m") as disk:  # the 15 MB model fits, a second copy of its weights not
        model_dir = copy_model(tiny_model, disk)
        result = run_cli(disk, env=WARNING_FILTERS[filters])
        left = os.listdir(model_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_stdout
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"warning: could not write {model_dir}/{CONVERTED} "
                                                   "(No space left on device: the copy needs 14 MB)")
    assert not [n for n in left if n.startswith(CONVERTED)]
