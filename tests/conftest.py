import os
import shutil
import sys
from dataclasses import dataclass

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter out of test logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project is a folder of modules, not an installed package

from tests.release_layout import offline_tiktoken_gpt2, write_model_dir  # noqa: E402


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
def realistic_model(tmp_path_factory):
    """The tiny shape with logits of real GPT-2's size (about -100 to 100, where the others' are 1 to 3)."""
    return make_model(tmp_path_factory, "realistic", n_layer=2, n_embd=64, n_head=4, seed=2, logit_scale=120.0)


def scratch_models_dir(tmp_path_factory):
    """A new models folder holding 124M's tokenizer files alone: where a model from scratch takes its vocabulary."""
    import json

    from tests.release_layout import real_vocab_file

    models_dir = tmp_path_factory.mktemp("models")
    vocab_dir = models_dir / "124M"
    vocab_dir.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(real_vocab_file(name), vocab_dir / name)
    (vocab_dir / "hparams.json").write_text(json.dumps(
        {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}))
    return models_dir


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    """A model trained during the test run (train.py, from scratch, 2 layers, on a few sentences), so its
    next-token distributions are peaked like a real model's, not the near-uniform ones of random weights."""
    import json

    import train
    from utils import load_params

    models_dir = scratch_models_dir(tmp_path_factory)
    dataset = models_dir / "text.txt"
    dataset.write_text("Alan Turing theorized that computers would one day become the most powerful machines on "
                       "the planet, and he was right about that, as it turned out. The lighthouse keeper climbed "
                       "the spiral stairs every evening at dusk, carrying a tin of oil and a cloth for the glass.",
                       encoding="utf-8")
    train.main(str(dataset), "trained", val_dataset=str(dataset), init_from="scratch", n_layer=2, n_head=2,
               n_embd=32, n_ctx=64, block_size=32, batch_size=4, max_steps=100, learning_rate=1e-2,
               warmup_steps=10, weight_decay=0.0, eval_every=0, save_every=0, models_dir=str(models_dir))
    model_dir = models_dir / "trained"
    hparams = json.loads((model_dir / "hparams.json").read_text())
    return Model(str(models_dir), "trained", hparams, load_params(str(model_dir), hparams["n_layer"]))


@pytest.fixture(scope="session")
def tiktoken_gpt2(tmp_path_factory):
    """tiktoken's "gpt2" encoding, offline (see release_layout.offline_tiktoken_gpt2)."""
    return offline_tiktoken_gpt2(tmp_path_factory.mktemp("tiktoken_cache"))


MODEL_FIXTURES = {"tiny_model", "wide_model", "realistic_model", "trained_model"}


def pytest_configure(config):
    config.addinivalue_line("markers", "checkpoint: the test writes a model checkpoint first (slow to set up)")


def pytest_collection_modifyitems(items):
    # Lets a run pick the fast tests alone (`-m "not checkpoint"`), as the mutation testing in setup.cfg does.
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params.values()
        if MODEL_FIXTURES & set(item.fixturenames) or MODEL_FIXTURES & set(map(str, params or ())):
            item.add_marker("checkpoint")
