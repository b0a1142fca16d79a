"""Downloads against a real HTTP server on 127.0.0.1 that can fail the ways real ones do."""
import http.server
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

import utils
from tests.conftest import ROOT


class ReleaseServer(http.server.ThreadingHTTPServer):
    """Serves files[name] at /124M/<name>. Faults, consumed one per request:
    faults[name] = ["503", "cut", ...]; "cut" sends half of the body and drops the connection.
    range_support=False makes it ignore Range headers, as some servers do."""

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.faults, self.range_support, self.requests = files, {}, True, []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_port}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        name = self.path.rsplit("/", 1)[-1]
        server.requests.append((name, self.headers.get("Range")))
        fault = server.faults.get(name, []).pop(0) if server.faults.get(name) else None
        if name not in server.files or not self.path.startswith("/124M/"):
            self.send_error(404)
            return
        if fault == "503":
            self.send_error(503)
            return
        body, start = server.files[name], 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.range_support:
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if fault == "cut":
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server(tiny_model, monkeypatch):
    files = {}
    for name in utils.RELEASE_FILES:
        with open(os.path.join(tiny_model.path, name), "rb") as f:
            files[name] = f.read()
    srv = ReleaseServer(files)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
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


DATA = "model.ckpt.data-00000-of-00001"


def test_missing_release_model_is_downloaded_from_GPT2_MODELS_URL(tmp_path, tiny_model, server):
    _, hparams, params = utils.load_encoder_hparams_and_params("124M", str(tmp_path))
    assert_release_files_complete(tmp_path / "124M", server)
    assert sorted(name for name, _ in server.requests) == sorted(utils.RELEASE_FILES)
    np.testing.assert_array_equal(params["wte"], tiny_model.tensors["model/wte"])


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
    assert len(lines) == 1 and lines[0].startswith("error: could not download http://127.0.0.1:9/124M/")
    assert "Traceback" not in result.stderr
