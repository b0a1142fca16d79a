"""A model named by its Hub repo id, fetched by huggingface_hub from a loopback Hub (tests/hf_layout.HubServer):
only the files the loader needs, then from the cache with the server gone and with HF_HUB_OFFLINE=1; a missing
repo, a repo that is not GPT-2, a missing revision and an endpoint that cannot be reached each give one line."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.hf_layout import repo_from_folder, serve_hub, write_hf_folder
from tests.test_hf import one_line_error

SHA = "0123456789abcdef0123456789abcdef01234567"
NEEDED = ["config.json", "merges.txt", "model.safetensors", "vocab.json"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "tiny"
    write_hf_folder(str(folder), seed=3)
    return folder


@pytest.fixture
def hub(hf_folder, tmp_path):
    """A loopback Hub with test/tiny (plus files the loader must not fetch), a private repo, a BERT, and a repo
    whose weights are only in pytorch_model.bin; and the environment that points huggingface_hub at it."""
    tiny = repo_from_folder(hf_folder, sha=SHA)
    tiny["files"].update({"pytorch_model.bin": b"not fetched", "tf_model.h5": b"not fetched", "README.md": b"# tiny"})
    bert = repo_from_folder(hf_folder)
    bert["files"]["config.json"] = json.dumps({"model_type": "bert", "hidden_size": 64}).encode()
    bin_only = repo_from_folder(hf_folder)
    del bin_only["files"]["model.safetensors"]
    bin_only["files"]["pytorch_model.bin"] = torch_state_bytes(hf_folder)
    server = serve_hub({"test/tiny": tiny, "test/private": {**repo_from_folder(hf_folder), "token": "hf_secret"},
                        "google/bert": bert, "test/bin": bin_only})
    env = {"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_CACHE": str(tmp_path / "hf_home" / "hub"), "HF_HUB_OFFLINE": "0", "HF_TOKEN": ""}
    yield server, env
    server.shutdown()
    server.server_close()


def torch_state_bytes(folder):
    import io

    from transformers import GPT2LMHeadModel

    buffer = io.BytesIO()
    torch.save(GPT2LMHeadModel.from_pretrained(str(folder)).state_dict(), buffer)
    return buffer.getvalue()


def run(script, *args, env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**base, "GPT2_MODELS_URL": "http://127.0.0.1:9", **env}, timeout=300)


def generate(name, env):
    return run("gpt2.py", "Alan Turing theorized that", "--n_tokens_to_generate", "5", "--model_size", name, env=env)


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_repo_id_loads_then_comes_from_the_cache_and_offline(hub, hf_folder):
    server, env = hub
    expected = generate(str(hf_folder), env)
    assert expected.returncode == 0 and len(expected.stdout) > 5, expected.stderr
    first = generate("test/tiny", env)
    assert (first.returncode, first.stdout) == (0, expected.stdout), first.stderr
    assert server.files_fetched("test/tiny") == NEEDED  # not pytorch_model.bin, tf_model.h5 or README.md
    # the same commit by its hash and by its branch, from the cache
    assert generate(f"test/tiny@{SHA}", env).stdout == expected.stdout
    server.shutdown()
    server.server_close()
    again = generate("test/tiny", env)
    assert (again.returncode, again.stdout) == (0, expected.stdout), again.stderr
    offline = generate("test/tiny", {**env, "HF_HUB_OFFLINE": "1"})
    assert (offline.returncode, offline.stdout) == (0, expected.stdout), offline.stderr
    line = one_line_error(generate("test/elsewhere", {**env, "HF_HUB_OFFLINE": "1"}), 1)
    assert line.startswith("error: test/elsewhere is not in the Hugging Face cache (") and \
        line.endswith(") and HF_HUB_OFFLINE is set")


def test_missing_repo_is_one_line(hub):
    server, env = hub
    line = one_line_error(generate("nobody/nothing", env), 1)
    assert line == f"error: no model nobody/nothing on {server.url} (if it is private or gated, set HF_TOKEN)"


def test_missing_revision_is_one_line(hub):
    server, env = hub
    line = one_line_error(generate("test/tiny@v9", env), 1)
    assert line == f"error: test/tiny on {server.url} has no revision 'v9'"


def test_a_repo_that_is_not_gpt2_is_refused_before_its_weights_are_fetched(hub):
    server, env = hub
    line = one_line_error(generate("google/bert", env), 1)
    assert "google/bert is not a GPT-2 model: its config.json has model_type 'bert'" in line
    assert "model.safetensors" not in server.files_fetched("google/bert")


def test_unreachable_endpoint_is_one_line(hub):
    _, env = hub
    endpoint = f"http://127.0.0.1:{closed_port()}"
    line = one_line_error(generate("test/tiny", {**env, "HF_ENDPOINT": endpoint}), 1)
    assert line.startswith("error: test/tiny is not in the Hugging Face cache (")
    assert line.endswith(f") and {endpoint} cannot be reached")


def test_private_repo_needs_hf_token(hub, hf_folder):
    _, env = hub
    line = one_line_error(generate("test/private", env), 1)
    assert "no model test/private" in line and "set HF_TOKEN" in line
    result = generate("test/private", {**env, "HF_TOKEN": "hf_secret"})
    assert (result.returncode, result.stdout) == (0, generate(str(hf_folder), env).stdout), result.stderr


def test_repo_with_only_pytorch_model_bin(hub, hf_folder):
    server, env = hub
    result = generate("test/bin", env)
    assert (result.returncode, result.stdout) == (0, generate(str(hf_folder), env).stdout), result.stderr
    assert server.files_fetched("test/bin") == ["config.json", "merges.txt", "pytorch_model.bin", "vocab.json"]


def test_score_and_export_take_a_repo_id(hub, hf_folder, tmp_path):
    _, env = hub
    text = tmp_path / "text.txt"
    text.write_text("The lighthouse keeper climbed the spiral stairs every evening at dusk.", encoding="utf-8")
    scores = [run("score.py", str(text), "--model_size", name, "--json", env=env) for name in ("test/tiny",
                                                                                                str(hf_folder))]
    assert scores[0].returncode == 0, scores[0].stderr
    assert json.loads(scores[0].stdout) == json.loads(scores[1].stdout)
    result = run("export.py", "--model_size", "test/tiny", "--out", str(tmp_path / "copy"), env=env)
    assert result.returncode == 0, result.stderr
    assert generate(str(tmp_path / "copy"), env).stdout == generate(str(hf_folder), env).stdout
    shutil.rmtree(tmp_path / "copy")


def test_a_dropped_download_resumes_where_it_stopped(hub, hf_folder):
    server, env = hub
    server.cuts["model.safetensors"] = 1
    result = generate("test/tiny", env)
    assert (result.returncode, result.stdout) == (0, generate(str(hf_folder), env).stdout), result.stderr
    size = (hf_folder / "model.safetensors").stat().st_size
    fetches = [header for name, header in server.ranges if name == "model.safetensors"]
    assert fetches[0] is None and len(fetches) == 2, fetches  # the whole file, then the rest of it
    # huggingface_hub writes 10 MiB at a time: what it had written is not asked for again
    assert 0 < int(fetches[1].removeprefix("bytes=").split("-")[0]) < size
