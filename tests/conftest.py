import hashlib
import os
import shutil
import sys
from dataclasses import dataclass

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter out of test logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project is a folder of modules, not an installed package

from tests.release_layout import real_vocab_file, write_model_dir  # noqa: E402


@dataclass
class Model:
    models_dir: str
    name: str
    hparams: dict
    tensors: dict  # checkpoint variable name -> array, as written

    @property
    def path(self):
        return os.path.join(self.models_dir, self.name)


def make_model(tmp_path_factory, name, **shape):
    models_dir = str(tmp_path_factory.mktemp("models"))
    hparams, tensors = write_model_dir(os.path.join(models_dir, name), **shape)
    return Model(models_dir, name, hparams, tensors)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """2 layers, n_embd 64, 4 heads, real vocabulary."""
    return make_model(tmp_path_factory, "tiny", n_layer=2, n_embd=64, n_head=4)


@pytest.fixture(scope="session")
def unloadable_model(tmp_path_factory, tiny_model):
    """tiny_model without its weights (no checkpoint data file): a check that fails on it ran before loading,
    which would fail with exit 1 and another message."""
    models_dir = str(tmp_path_factory.mktemp("unloadable"))
    shutil.copytree(tiny_model.path, os.path.join(models_dir, "run1"), ignore=shutil.ignore_patterns("numpy-params"))
    os.remove(os.path.join(models_dir, "run1", "model.ckpt.data-00000-of-00001"))
    return Model(models_dir, "run1", tiny_model.hparams, {})


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory):
    """GPT-2's real width and head size (n_embd 768, 12 heads of 64), 2 layers."""
    return make_model(tmp_path_factory, "wide", n_layer=2, n_embd=768, n_head=12, seed=1)


@pytest.fixture(scope="session")
def tiktoken_gpt2(tmp_path_factory):
    """tiktoken's "gpt2" encoding, offline: its cache is filled with the real files under the names it looks for."""
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copyfile(real_vocab_file(name), cache / hashlib.sha1((base + name).encode()).hexdigest())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    import tiktoken

    return tiktoken.get_encoding("gpt2")
