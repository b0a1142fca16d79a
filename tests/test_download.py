"""Downloads against a real HTTP server on 127.0.0.1 that can fail the ways real ones do."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import utils
from tests.conftest import ROOT
from tests.loopback import serve_release
from tests.mounts import small_disk


@pytest.fixture
def server(tiny_model, monkeypatch):
    srv = serve_release(tiny_model.path)
    monkeypatch.setenv("GPT2_MODELS_URL", srv.url)
    monkeypatch.setattr(utils, "RETRY_DELAY", 0.01)
    yield srv
    srv.shutdown()


def assert_release_files_complete(model_dir, server):
    names = sorted(os.listdir(model_dir))
    assert not [n for n in names if n.endswith(".part")]
    for name in utils.RELEASE_FILES:
        with open(os.path.join(model_dir, name), "rb") as f:
            assert f.read() == server.files[name], name


DATA = utils.DATA


def test_missing_release_model_is_downloaded_from_GPT2_MODELS_URL(tmp_path, tiny_model, server):
    _, hparams, params = utils.load_encoder_hparams_and_params("124M", str(tmp_path))
    assert_release_files_complete(tmp_path / "124M", server)
    assert sorted(name for name, _ in server.requests) == sorted(utils.RELEASE_FILES)
    np.testing.assert_array_equal(params["wte"], tiny_model.tensors["model/wte"])


def test_prepare_tokenizer_fetches_only_the_small_files(tmp_path, server):
    """So that the CLI can check the prompt against the context before the big download starts."""
    model_dir = utils.prepare_tokenizer("124M", str(tmp_path))
    assert sorted(os.listdir(model_dir)) == sorted(utils.TOKENIZER_FILES)
    assert sorted(server.names_requested()) == sorted(utils.TOKENIZER_FILES)
    utils.prepare_model("124M", str(tmp_path))
    assert sorted(server.names_requested()) == sorted(utils.RELEASE_FILES)  # the rest, and only the rest


def test_503_is_retried(tmp_path, server):
    server.faults = {"hparams.json": ["503", "503"], DATA: ["503"]}
    utils.prepare_model("124M", str(tmp_path))
    assert_release_files_complete(tmp_path / "124M", server)
    assert [name for name, _ in server.requests].count("hparams.json") == 3


def test_cut_connection_resumes_with_a_range_request(tmp_path, server):
    server.faults = {DATA: ["cut"]}
    utils.prepare_model("124M", str(tmp_path))
    assert_release_files_complete(tmp_path / "124M", server)
    data_requests = [rng for name, rng in server.requests if name == DATA]
    assert len(data_requests) == 2 and data_requests[0] is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", data_requests[1]).group(1))
    assert 0 < resumed_at <= len(server.files[DATA]) // 2  # what arrived before the cut is kept


def test_server_without_range_support_restarts_cleanly(tmp_path, server):
    server.faults = {DATA: ["cut", "cut"]}
    server.range_support = False
    utils.prepare_model("124M", str(tmp_path))
    assert_release_files_complete(tmp_path / "124M", server)
    assert [name for name, _ in server.requests].count(DATA) == 3


def test_404_names_the_file_and_url_and_leaves_nothing_under_a_final_name(tmp_path, server):
    del server.files["vocab.bpe"]
    with pytest.raises(utils.ModelError, match=re.escape(f"{server.url}/124M/vocab.bpe") + ".*404"):
        utils.prepare_model("124M", str(tmp_path))
    assert not os.path.exists(tmp_path / "124M" / "vocab.bpe")
    assert [name for name, _ in server.requests].count("vocab.bpe") == 1  # a 404 is not retried


def test_exhausted_retries_give_up_with_the_reason(tmp_path, server):
    server.faults = {"checkpoint": ["503"] * utils.DOWNLOAD_ATTEMPTS}
    with pytest.raises(utils.ModelError, match=f"checkpoint after {utils.DOWNLOAD_ATTEMPTS} attempts: HTTP 503"):
        utils.prepare_model("124M", str(tmp_path))
    assert not os.path.exists(tmp_path / "124M" / "checkpoint")


def test_interrupted_download_leaves_only_a_part_file(tmp_path, server, monkeypatch):
    server.faults = {DATA: ["cut"]}
    fetch = utils.fetch

    def fetch_then_interrupt(url, partial):
        if url.endswith(DATA) and os.path.exists(partial):  # Ctrl-C while the retry starts
            raise KeyboardInterrupt
        fetch(url, partial)

    monkeypatch.setattr(utils, "fetch", fetch_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        utils.prepare_model("124M", str(tmp_path))
    assert not os.path.exists(tmp_path / "124M" / DATA)
    assert 0 < os.path.getsize(tmp_path / "124M" / (DATA + ".part")) <= len(server.files[DATA]) // 2
    monkeypatch.setattr(utils, "fetch", fetch)
    utils.prepare_model("124M", str(tmp_path))  # the next run resumes
    assert_release_files_complete(tmp_path / "124M", server)


def test_empty_or_truncated_release_file_is_downloaded_again(tmp_path, server, tiny_model):
    utils.prepare_model("124M", str(tmp_path))
    open(tmp_path / "124M" / "encoder.json", "w").close()  # empty
    data = tmp_path / "124M" / DATA
    os.truncate(data, os.path.getsize(data) // 3)  # shorter than its index says
    _, _, params = utils.load_encoder_hparams_and_params("124M", str(tmp_path))
    assert_release_files_complete(tmp_path / "124M", server)
    np.testing.assert_array_equal(params["wte"], tiny_model.tensors["model/wte"])


def test_cli_offline_reports_one_line_and_exit_1(tmp_path):
    env = {**os.environ, "GPT2_MODELS_URL": "http://127.0.0.1:9"}  # nothing listens on the discard port
    code = "import utils; utils.RETRY_DELAY = 0; import gpt2; gpt2.cli()"
    result = subprocess.run([sys.executable, "-c", code, "Hello", "--models_dir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: could not download http://127.0.0.1:9/124M/hparams.json")  # fetched first
    assert "Traceback" not in result.stderr


def run_cli(models_dir, url, *args):
    """The real CLI against the mirror at url (RETRY_DELAY cut so that failures come quickly)."""
    code = "import utils; utils.RETRY_DELAY = 0; import gpt2; gpt2.cli()"
    return subprocess.run([sys.executable, "-c", code, "Hello", "--n_tokens_to_generate", "2", "--models_dir",
                           str(models_dir), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "GPT2_MODELS_URL": url}, timeout=300)


def assert_one_line_error(result, code, fragment):
    assert result.returncode == code, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]  # no progress bars
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_compressing_mirror_downloads_the_same_bytes(tmp_path, server):
    server.compress = True  # as nginx with `gzip on` does, even when asked not to
    utils.prepare_model("124M", str(tmp_path))
    assert_release_files_complete(tmp_path / "124M", server)
    assert sorted(server.names_requested()) == sorted(utils.RELEASE_FILES)  # none retried
    assert set(server.accept_encodings) == {"identity"}  # a mirror that listens does not compress at all


def test_html_answering_mirror_fails_in_one_line_then_a_good_mirror_recovers(tmp_path, server):
    release = server.files
    server.files = {name: b"<html><body>Please log in to the Wi-Fi</body></html>" for name in release}
    result = run_cli(tmp_path, server.url)
    assert_one_line_error(result, 1, f"{server.url}/124M/hparams.json did not send a usable hparams.json: "
                                     "not valid JSON")
    assert not os.path.exists(tmp_path / "124M")  # nothing kept under a release file's name
    # A folder an older version filled with such pages is repaired too: every file is validated before use.
    os.makedirs(tmp_path / "124M")
    for name in ("checkpoint", "hparams.json", "encoder.json", "vocab.bpe"):
        (tmp_path / "124M" / name).write_bytes(server.files[name])
    server.files = release
    _, hparams, _ = utils.load_encoder_hparams_and_params("124M", str(tmp_path))
    assert_release_files_complete(tmp_path / "124M", server)


@pytest.mark.parametrize("name, content, problem", [
    ("encoder.json", b'{"a": 0}', "encoder.json holds 1 entries, not 50257"),
    ("encoder.json", b"5", "encoder.json is not a JSON object"),
    ("vocab.bpe", b"#version: 0.2\na b\n", "vocab.bpe holds 1 lines, not 50000 merges"),
    ("vocab.bpe", b"a b\n", "vocab.bpe does not start with its #version line"),
    ("checkpoint", b"<html></html>", "checkpoint names no checkpoint"),
])
def test_invalid_release_file_is_downloaded_again(tmp_path, server, name, content, problem):
    utils.prepare_model("124M", str(tmp_path))
    (tmp_path / "124M" / name).write_bytes(content)
    assert utils.folder_problems(str(tmp_path / "124M"), [name]) == {name: problem.removeprefix(name + " ")}
    utils.prepare_model("124M", str(tmp_path))
    assert_release_files_complete(tmp_path / "124M", server)


def test_404_on_a_first_download_leaves_no_empty_model_folder(tmp_path, server):
    del server.files["hparams.json"]
    with pytest.raises(utils.ModelError, match="hparams.json: HTTP 404"):
        utils.prepare_model("124M", str(tmp_path))
    assert os.listdir(tmp_path) == [".124M.download.lock"]  # the lock file, hidden beside the folder; no folder


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://example.com/gpt-2", "http://"])
def test_GPT2_MODELS_URL_that_is_not_http_is_a_usage_error_before_any_work(tmp_path, url):
    assert_one_line_error(run_cli(tmp_path, url), 2, f"GPT2_MODELS_URL must be an http:// or https:// URL, got {url!r}")
    assert os.listdir(tmp_path) == []


def test_empty_GPT2_MODELS_URL_means_the_release_bucket(monkeypatch):
    monkeypatch.setenv("GPT2_MODELS_URL", "")
    assert utils.models_url() == utils.RELEASE_URL


def test_models_dir_that_is_a_file_is_one_line_exit_1(tmp_path, server):
    (tmp_path / "models").write_text("not a folder")
    assert_one_line_error(run_cli(tmp_path / "models", server.url), 1, "is a file, not a folder")
    assert server.requests == []


def test_full_disk_during_download_is_one_line_exit_1_and_nothing_partial(tmp_path, server):
    with small_disk(tmp_path / "disk", "4m") as disk:  # the vocabulary fits, the 13 MB data file does not
        result = run_cli(disk, server.url)
        assert_one_line_error(result, 1, f"could not write {disk / '124M' / DATA}: No space left on device")
        names = os.listdir(disk / "124M")
    assert DATA not in names and not [n for n in names if n.endswith(".part")]
