"""Downloads, against a real HTTP server on 127.0.0.1 serving a release-layout folder."""
import functools
import http.server
import os
import threading

import numpy as np
import pytest

import utils


@pytest.fixture
def release_server(tiny_model):
    """Serves tiny_model's files as if they were the 124M release: <url>/124M/<file>."""
    root = os.path.dirname(tiny_model.path)
    os.makedirs(os.path.join(root, "124M"), exist_ok=True)
    for name in utils.RELEASE_FILES:
        link = os.path.join(root, "124M", name)
        if not os.path.exists(link):
            os.symlink(os.path.join(tiny_model.path, name), link)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_missing_release_model_is_downloaded(tmp_path, tiny_model, release_server, monkeypatch):
    monkeypatch.setattr(utils, "RELEASE_URL", release_server)
    _, hparams, params = utils.load_encoder_hparams_and_params("124M", str(tmp_path))
    assert sorted(os.listdir(tmp_path / "124M")) == sorted([*utils.RELEASE_FILES, "numpy-params"])
    for name in utils.RELEASE_FILES:
        with open(tmp_path / "124M" / name, "rb") as got, open(os.path.join(tiny_model.path, name), "rb") as want:
            assert got.read() == want.read()
    np.testing.assert_array_equal(params["wte"], tiny_model.tensors["model/wte"])
