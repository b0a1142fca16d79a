"""Every bad input and broken model folder: one clear line on stderr, the right exit code, nothing half-loaded."""
import functools
import json
import os
import shutil
import subprocess
import sys

import pytest

import gpt2
import utils
from tests.conftest import ROOT

OFFLINE = {"GPT2_MODELS_URL": "http://127.0.0.1:9"}  # a download attempt would fail with a different message


def run_cli(*args, stdin=None, models_dir=None):
    cmd = [sys.executable, os.path.join(ROOT, "gpt2.py"), *args]
    if models_dir:
        cmd += ["--models_dir", str(models_dir)]
    return subprocess.run(cmd, capture_output=True, input=stdin, env={**os.environ, **OFFLINE}, timeout=300)


def assert_one_line_error(result, code, *fragments):
    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert result.stdout == b""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0]


BAD_ARGUMENTS = [
    (["--n_tokens_to_generate", "0"], "--n_tokens_to_generate must be a whole number >= 1, got 0"),
    (["--n_tokens_to_generate", "2.5"], "--n_tokens_to_generate must be a whole number >= 1, got 2.5"),
    (["--temperature", "-1"], "--temperature must be a number >= 0, got -1"),
    (["--temperature", "hot"], "--temperature must be a number >= 0, got 'hot'"),
    (["--top_k", "-1"], "--top_k must be a whole number >= 0 (0: off), got -1"),
    (["--top_p", "0"], "--top_p must be a number in (0, 1] (1: off), got 0"),
    (["--top_p", "1.5"], "--top_p must be a number in (0, 1] (1: off), got 1.5"),
    (["--num_samples", "0"], "--num_samples must be a whole number >= 1, got 0"),
    (["--seed", "-3"], "--seed must be a whole number >= 0, got -3"),
    (["--stop_at_endoftext=maybe"], "--stop_at_endoftext must be True or False, got 'maybe'"),
    (["--temperature", "1e999"], "--temperature must be a number >= 0, got inf"),
    (["--prompt_file", "/nonexistent/prompt.txt"], "--prompt_file /nonexistent/prompt.txt: No such file"),
    (["--model_size", "../124M"], "no such model folder '../124M', and it is no Hub repo id (owner/name)"),
    (["--model_size", "a/b/c"], "no such model folder 'a/b/c'"),
]


@pytest.mark.parametrize("args, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_argument_is_one_line_exit_2_before_any_download(tmp_path, args, message):
    prompt = [] if "--prompt_file" in args else ["Hello"]
    assert_one_line_error(run_cli(*prompt, *args, models_dir=tmp_path), 2, message)
    assert not os.path.exists(tmp_path / "124M")  # nothing was downloaded or created


@pytest.mark.parametrize("args, message", BAD_ARGUMENTS[:11], ids=[" ".join(a) for a, _ in BAD_ARGUMENTS[:11]])
def test_library_callers_get_a_value_error_with_the_same_message(tmp_path, args, message):
    name, _, value = " ".join(args).removeprefix("--").replace("=", " ").partition(" ")
    try:
        value = json.loads(value)
    except ValueError:
        pass
    with pytest.raises(ValueError) as error:
        gpt2.main("Hello", models_dir=str(tmp_path), **{name: value})
    assert message in str(error.value)


def test_prompt_and_prompt_file_together(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hi")
    assert_one_line_error(run_cli("Hello", "--prompt_file", str(path), models_dir=tmp_path), 2,
                          "either a prompt or --prompt_file, not both")


def test_non_utf8_prompt_file_and_stdin(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    assert_one_line_error(run_cli("--prompt_file", str(path), models_dir=tmp_path), 2, "is not UTF-8 text")
    assert_one_line_error(run_cli("-", stdin="café".encode("latin-1"), models_dir=tmp_path), 2,
                          "the prompt on standard input is not UTF-8 text")


@pytest.mark.parametrize("args, message", [
    ([" ".join(["word"] * 1020), "--n_tokens_to_generate", "6"], "the prompt is 1020 tokens and "
     "--n_tokens_to_generate is 6: together they need 1025 positions, more than the model's context of 1024"),
    (["", "--n_tokens_to_generate", "1025"], "together they need 1025 positions"),
    (["", "--interactive", "--n_tokens_to_generate", "1025"], "together they need 1025 positions"),
    (["Hello", "--num_samples", "1000000000", "--temperature", "1"],
     "--num_samples 1000000000 needs about 1535922.3 GiB for its caches, more than this machine's"),
], ids=["prompt too long", "n too long", "interactive n too long", "num_samples too many"])
def test_checks_that_need_the_tokenizer_run_before_loading(unloadable_model, args, message):
    result = run_cli(*args, "--model_size", unloadable_model.name, models_dir=unloadable_model.models_dir)
    assert_one_line_error(result, 2, message)
    assert not os.path.exists(os.path.join(unloadable_model.path, "numpy-params"))


def test_release_model_fetches_only_the_tokenizer_before_refusing_a_long_run(tmp_path, tiny_model):
    import http.server
    import threading

    os.makedirs(tmp_path / "site" / "124M")
    for name in utils.RELEASE_FILES:
        shutil.copyfile(os.path.join(tiny_model.path, name), tmp_path / "site" / "124M" / name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        cmd = [sys.executable, os.path.join(ROOT, "gpt2.py"), "", "--n_tokens_to_generate", "1025",
               "--models_dir", str(tmp_path / "models")]
        result = subprocess.run(cmd, capture_output=True, timeout=300,
                                env={**os.environ, "GPT2_MODELS_URL": f"http://127.0.0.1:{server.server_port}"})
        server.shutdown()
    assert result.returncode == 2 and b"together they need 1025 positions" in result.stderr
    assert sorted(os.listdir(tmp_path / "models" / "124M")) == sorted(utils.TOKENIZER_FILES)


def test_prompt_that_is_not_unicode_text_is_a_usage_error_before_loading(monkeypatch):
    monkeypatch.setattr(utils, "prepare_tokenizer", lambda *a: pytest.fail("the model was prepared"))
    with pytest.raises(utils.UsageError, match=r"the prompt is not valid UTF-8 text \(character 3 cannot"):
        gpt2.main("caf\udce9")


def test_unknown_model_lists_release_sizes_and_local_folders(tmp_path, tiny_model):
    shutil.copytree(tiny_model.path, tmp_path / "run1")
    os.makedirs(tmp_path / "not-a-model")
    result = run_cli("Hello", "--model_size", "run2", models_dir=tmp_path)
    assert_one_line_error(result, 2, "unknown model 'run2'", "124M, 355M, 774M, 1558M", "(found: run1)")


@pytest.fixture
def local_model(tmp_path, tiny_model):
    shutil.copytree(tiny_model.path, tmp_path / "run1", ignore=shutil.ignore_patterns("numpy-params"))
    return tmp_path


@pytest.mark.parametrize("damage, message", [
    (lambda d: os.remove(d / "model.ckpt.index"), "model.ckpt.index missing"),
    (lambda d: open(d / "vocab.bpe", "w").close(), "vocab.bpe empty"),
    (lambda d: (d / "hparams.json").write_text("{"), "hparams.json not valid JSON"),
    (lambda d: (d / "hparams.json").write_text('{"n_layer": 2}'), "hparams.json has no n_ctx"),
    (lambda d: (d / "checkpoint").write_text("nothing here"), "checkpoint names no checkpoint"),
    (lambda d: os.truncate(d / "model.ckpt.data-00000-of-00001", 1000), "cannot read the checkpoint"),
], ids=["missing index", "empty vocab", "bad hparams", "hparams keys", "bad checkpoint file", "truncated data"])
def test_broken_local_model_is_reported_never_half_loaded(local_model, damage, message):
    damage(local_model / "run1")
    result = run_cli("Hello", "--model_size", "run1", models_dir=local_model)
    assert_one_line_error(result, 1, f"{local_model / 'run1'}", message)
    assert not os.path.exists(local_model / "run1" / "numpy-params")
    with pytest.raises(utils.ModelError, match=message):
        utils.load_encoder_hparams_and_params("run1", str(local_model))
