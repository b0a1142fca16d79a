"""A model folder is checked against what it claims before any weight is read: hparams.json against the
checkpoint's index, the vocabulary files for content, a release size's hparams against the release's. Each broken
folder is one `error:` line with exit 1, never other text with exit 0, never a traceback."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import cli
import gpt2
import utils
from tests.conftest import ROOT


def edit_json(name, change):
    def damage(model_dir):
        path = os.path.join(model_dir, name)
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
        change(value)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(value, f)
    return damage


def hparam(**values):
    return edit_json("hparams.json", lambda h: h.update(values))


def edit_text(name, change):
    def damage(model_dir):
        path = os.path.join(model_dir, name)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(change(text))
    return damage


def merge_line(number, line, name="vocab.bpe"):  # line `number` (1 is the #version header) replaced
    def change(text):
        lines = text.split("\n")
        lines[number - 1] = line
        return "\n".join(lines)
    return edit_text(name, change)


def swap_ids(model_dir):  # "!" takes '"'s id: two symbols with id 1, none with id 0
    edit_json("encoder.json", lambda e: e.update({"!": e['"']}))(model_dir)


def write(name, content):
    def damage(model_dir):
        with open(os.path.join(model_dir, name), "wb") as f:
            f.write(content)
    return damage


# tiny_model: n_layer 2, n_embd 64, n_head 4, n_ctx 1024, n_vocab 50257
BROKEN_FOLDERS = [
    ("n_layer 1", hparam(n_layer=1), "the checkpoint holds blocks h0..h1, but hparams.json says n_layer 1"),
    ("n_layer 3", hparam(n_layer=3), "the checkpoint holds blocks h0..h1, but hparams.json says n_layer 3"),
    ("n_layer 0", hparam(n_layer=0), "hparams.json has n_layer 0, not a whole number from 1 to 1024"),
    ("n_layer -3", hparam(n_layer=-3), "hparams.json has n_layer -3, not a whole number from 1 to 1024"),
    ("n_layer true", hparam(n_layer=True), "hparams.json has n_layer true, not a whole number from 1 to 1024"),
    ("n_layer 2.0", hparam(n_layer=2.0), "hparams.json has n_layer 2.0, not a whole number from 1 to 1024"),
    ("n_layer 1e9", hparam(n_layer=10**9), "hparams.json has n_layer 1000000000, not a whole number from 1 to 1024"),
    ("n_head 3", hparam(n_head=3), "hparams.json has n_embd 64, which n_head 3 does not divide into equal heads"),
    ("n_head 0", hparam(n_head=0), "hparams.json has n_head 0, not a whole number from 1 to 1024"),
    ("n_ctx 4096", hparam(n_ctx=4096), "the checkpoint's model/wpe is [1024, 64], but hparams.json (n_vocab 50257, "
                                       "n_ctx 4096, n_embd 64) makes it [4096, 64]"),
    ("n_embd 32", hparam(n_embd=32), "the checkpoint's model/wte is [50257, 64], but hparams.json (n_vocab 50257, "
                                     "n_ctx 1024, n_embd 32) makes it [50257, 32]"),
    ("n_vocab 50000", hparam(n_vocab=50000), "hparams.json says n_vocab 50000, but encoder.json holds 50257 tokens"),
    ("no n_ctx", edit_json("hparams.json", lambda h: h.pop("n_ctx")), "hparams.json has no n_ctx"),
    ("id a string", edit_json("encoder.json", lambda e: e.update({"!": "0"})),
     "encoder.json maps '!' to \"0\", not an id from 0 to 50256"),
    ("id 99999", edit_json("encoder.json", lambda e: e.update({"!": 99999})),
     "encoder.json maps '!' to 99999, not an id from 0 to 50256"),
    ("id twice", swap_ids, "encoder.json gives the id 1 to two symbols"),
    ("key twice", edit_text("encoder.json", lambda t: t.replace('"\\"": 1,', '"!": 1,', 1)),
     "encoder.json not valid JSON (the key '!' appears twice)"),
    ("symbol outside the byte alphabet", edit_json("encoder.json", lambda e: e.update({" x": e.pop("!")})),
     "encoder.json holds the symbol ' x', not spelled in GPT-2's byte alphabet"),
    ("merge result not a token", merge_line(2, "q z"),
     "vocab.bpe line 2 ('q z') needs the symbol 'qz', which encoder.json lacks"),
    ("merge of three", merge_line(2, "a b c"), "vocab.bpe line 2 is 'a b c', not two symbols separated by one space"),
    ("garbage index", write("model.ckpt.index", b"\0" * 100), "cannot read the checkpoint index"),
    ("data cut short", lambda d: os.truncate(os.path.join(d, utils.DATA), 1000),
     "its data files hold 1000 bytes, too few for the "),
    ("checkpoint names ..", write("checkpoint", b'model_checkpoint_path: ".."\n'),
     "checkpoint names '..', which is no checkpoint file"),
]
IDS = [case[0] for case in BROKEN_FOLDERS]


@pytest.fixture
def models_dir(tmp_path, tiny_model):
    shutil.copytree(tiny_model.path, tmp_path / "run1", ignore=shutil.ignore_patterns(utils.CONVERTED))
    return tmp_path


@pytest.fixture
def no_weights_read(monkeypatch):
    """Any read of the weights fails the test: the checks must all come first."""
    def read(*args, **kwargs):
        pytest.fail("weights were read before the folder was checked")

    monkeypatch.setattr(utils, "read_tf_checkpoint", read)
    monkeypatch.setattr(utils, "load_converted", read)


def run_cli(capsys, *argv):
    """gpt2.py's whole command line, in this process: exit code, stdout, stderr. An exception that escaped
    (a traceback) fails the test here."""
    with pytest.raises(SystemExit) as exit:
        cli.run(gpt2.main, list(argv))
    out, err = capsys.readouterr()
    return exit.value.code, out, err


@pytest.mark.parametrize("name, damage, message", BROKEN_FOLDERS, ids=IDS)
def test_broken_folder_is_one_line_exit_1_before_any_weight_is_read(models_dir, no_weights_read, capsys, name,
                                                                     damage, message):
    damage(str(models_dir / "run1"))
    code, out, err = run_cli(capsys, "Hello", "--n_tokens_to_generate", "3", "--model_size", "run1",
                             "--models_dir", str(models_dir))
    assert (code, out) == (1, "")
    assert err.startswith("error: ") and str(models_dir / "run1") in err, err  # the folder, named
    assert err.count("\n") == 1 and message in err, err
    with pytest.raises(utils.ModelError) as error:  # the library says the same
        utils.load_encoder_hparams_and_params("run1", str(models_dir))
    assert message in str(error.value)


@pytest.mark.parametrize("script", ["score.py", "train.py"])
def test_score_and_train_refuse_a_folder_whose_hparams_drop_a_layer(models_dir, no_weights_read, script):
    """score.py would report another perplexity and train.py --init_from would save a model with a layer dropped."""
    hparam(n_layer=1)(str(models_dir / "run1"))
    (models_dir / "text.txt").write_text("Hello there, general Kenobi. " * 20, encoding="utf-8")  # a validation split too
    args = ["text.txt", "--model_size", "run1"] if script == "score.py" else \
        ["--dataset", "text.txt", "--out_name", "new", "--init_from", "run1", "--max_steps", "1", "--warmup_steps", "1",
         "--block_size", "4"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *args, "--models_dir", str(models_dir)],
                            cwd=models_dir, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "GPT2_MODELS_URL": "http://127.0.0.1:9"})
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert result.stderr == (f"error: model folder {models_dir / 'run1'} cannot be loaded: the checkpoint holds "
                             f"blocks h0..h1, but hparams.json says n_layer 1\n")
    assert not os.path.exists(models_dir / "new") and not os.path.exists(models_dir / "run1" / utils.CONVERTED)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, tiny_model):
    """tiny_model in HF's layout (as export.py writes it): its vocab.json and merges.txt are encoder.json and
    vocab.bpe under HF's names."""
    import hf

    _, hparams, params = utils.load_encoder_hparams_and_params(tiny_model.name, tiny_model.models_dir)
    folder = str(tmp_path_factory.mktemp("hf") / "hf1")
    hf.save_hf_model(folder, params, hparams, tiny_model.path)
    return folder


def truncate(name, n_lines):  # `head -n n_lines name > name`
    return edit_text(name, lambda text: "\n".join(text.split("\n")[:n_lines]) + "\n")


# The release's checks of encoder.json and vocab.bpe, on the same files under HF's names
BROKEN_HF_FOLDERS = [
    ("merges cut to 1000 lines", truncate("merges.txt", 1000), "merges.txt holds 999 lines, not 50000 merges"),
    ("merges without #version", edit_text("merges.txt", lambda t: t.split("\n", 1)[1]),
     "merges.txt does not start with its #version line"),
    ("merge result not a token", merge_line(2, "q z", "merges.txt"),
     "merges.txt line 2 ('q z') needs the symbol 'qz', which vocab.json lacks"),
    ("vocab {}", write("vocab.json", b"{}"), "vocab.json holds 0 entries, not 50257"),
    ("vocab without 'x'", edit_json("vocab.json", lambda v: v.pop("x")), "vocab.json holds 50256 entries, not 50257"),
    ("vocab id twice", edit_json("vocab.json", lambda v: v.update({"!": v['"']})), "vocab.json gives the id 1 to two"),
    ("vocab empty", write("vocab.json", b""), "vocab.json empty"),
    ("a stray encoder.json, which is what is read", write("encoder.json", b"{}"),
     "encoder.json holds 0 entries, not 50257; vocab.bpe missing"),
]


@pytest.mark.parametrize("name, damage, message", BROKEN_HF_FOLDERS, ids=[case[0] for case in BROKEN_HF_FOLDERS])
def test_broken_hf_tokenizer_is_one_line_exit_1_naming_the_hf_file(tmp_path, hf_model, capsys, monkeypatch, name,
                                                                   damage, message):
    import hf

    monkeypatch.setattr(hf, "load_params", lambda *args: pytest.fail("weights were read before the check"))
    folder = shutil.copytree(hf_model, tmp_path / "hf1")
    damage(str(folder))
    code, out, err = run_cli(capsys, "xylophone", "--n_tokens_to_generate", "3", "--model_size", str(folder))
    assert (code, out) == (1, "")
    assert err.startswith(f"error: model folder {folder} cannot be loaded: {message}"), err
    assert err.count("\n") == 1, err
    with pytest.raises(utils.ModelError, match=re.escape(message)):  # the library says the same
        utils.load_encoder_hparams_and_params(str(folder), str(tmp_path))


@pytest.mark.parametrize("script", ["score.py", "train.py"])
@pytest.mark.parametrize("damage, message", [(truncate("merges.txt", 1000), "merges.txt holds 999 lines"),
                                             (write("vocab.json", b"{}"), "vocab.json holds 0 entries")],
                         ids=["merges cut", "vocab {}"])
def test_score_and_train_refuse_a_broken_hf_tokenizer(tmp_path, hf_model, script, damage, message):
    """score.py printed figures for 6302 tokens where the text has 3502 (merges cut); train.py raised KeyError."""
    folder = shutil.copytree(hf_model, tmp_path / "hf1")
    damage(str(folder))
    (tmp_path / "text.txt").write_text("Hello there, general Kenobi. " * 20, encoding="utf-8")
    args = ["text.txt", "--model_size", "./hf1"] if script == "score.py" else \
        ["--dataset", "text.txt", "--out_name", "new", "--init_from", "./hf1", "--max_steps", "1", "--warmup_steps",
         "1", "--block_size", "4"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *args, "--models_dir", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "GPT2_MODELS_URL": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert result.stderr.startswith("error: model folder ./hf1 cannot be loaded: " + message), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert not os.path.exists(tmp_path / "new")


def test_score_names_vocab_json_when_an_hf_config_pads_the_vocabulary(tmp_path, tiny_model):
    """vocab_size 50304 (padded, as nanoGPT trains) loads, but score.py needs one logit per token: refused, exit 1,
    naming the file the tokenizer came from (it said encoder.json, which an HF folder has not, with exit 2)."""
    import hf

    _, hparams, params = utils.load_encoder_hparams_and_params(tiny_model.name, tiny_model.models_dir)
    params["wte"] = np.concatenate([params["wte"], np.zeros((50304 - 50257, 64), np.float32)])
    hf.save_hf_model(str(tmp_path / "padded"), params, {**hparams, "n_vocab": 50304}, tiny_model.path)
    (tmp_path / "text.txt").write_text("Hello there", encoding="utf-8")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "score.py"), "text.txt", "--model_size", "./padded"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "GPT2_MODELS_URL": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"})
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    assert result.stderr == ("error: the tokenizer in ./padded has 50257 tokens but the model has 50304: vocab.json "
                             "does not belong to this model\n")


def test_index_shapes_are_tensorflows(tiny_model, trained_model):
    """The index is parsed without TensorFlow; what it gives is what TensorFlow's own reader lists."""
    import tensorflow as tf

    for model in (tiny_model, trained_model):
        prefix = utils.checkpoint_prefix(model.path)
        assert utils.index_shapes(prefix) == {name: tuple(shape) for name, shape in tf.train.list_variables(prefix)}
        assert utils.index_shapes(prefix) == utils.expected_shapes(model.hparams)


def test_a_release_size_holds_the_releases_hparams(tmp_path, tiny_model, monkeypatch, capsys):
    """A 124M folder with another model's hparams (and a checkpoint that matches them) is another model."""
    shutil.copytree(tiny_model.path, tmp_path / "124M", ignore=shutil.ignore_patterns(utils.CONVERTED))
    monkeypatch.delenv("GPT2_MODELS_URL", raising=False)  # OpenAI's: nothing is downloaded, every file is there
    code, out, err = run_cli(capsys, "Hello", "--models_dir", str(tmp_path))
    assert (code, out) == (1, "")
    assert err == (f"error: {tmp_path / '124M'}/hparams.json says n_embd 64, but OpenAI's 124M has n_embd 768: the "
                   f"folder holds another model (give it a name of its own, or remove it to download 124M)\n")


@pytest.mark.parametrize("named", ["/elsewhere/run1/model.ckpt", "../other/model.ckpt", "sub/../../other/model.ckpt"])
def test_a_checkpoint_named_outside_the_folder_is_read_by_its_name_inside(tmp_path, tiny_model, named, monkeypatch):
    """gpt-2-simple writes absolute paths; a hostile folder could name another model's files. Only the file name
    counts, inside the folder: the other model (n_embd 32) is never read."""
    models_dir = tmp_path / "models"
    shutil.copytree(tiny_model.path, models_dir / "run1", ignore=shutil.ignore_patterns(utils.CONVERTED))
    from tests.release_layout import write_model_dir
    write_model_dir(str(tmp_path / "other"), n_layer=1, n_embd=32, n_head=2, n_ctx=64)
    shutil.copytree(tmp_path / "other", models_dir / "other")
    (models_dir / "run1" / "checkpoint").write_text(f'model_checkpoint_path: "{named}"\n')
    assert utils.checkpoint_prefix(str(models_dir / "run1")) == str(models_dir / "run1" / "model.ckpt")
    expected = gpt2.main("Hello", n_tokens_to_generate=3, model_size="tiny", models_dir=tiny_model.models_dir)
    assert gpt2.main("Hello", n_tokens_to_generate=3, model_size="run1", models_dir=str(models_dir)) == expected


def test_a_checkpoint_named_inside_a_subfolder_is_still_read(tmp_path, tiny_model):
    os.makedirs(tmp_path / "run1" / "sub")
    for name in os.listdir(tiny_model.path):
        if name.startswith("model.ckpt"):
            shutil.copyfile(os.path.join(tiny_model.path, name), tmp_path / "run1" / "sub" / name)
        elif name != utils.CONVERTED:
            shutil.copyfile(os.path.join(tiny_model.path, name), tmp_path / "run1" / name)
    (tmp_path / "run1" / "checkpoint").write_text('model_checkpoint_path: "sub/model.ckpt"\n')
    _, _, params = utils.load_encoder_hparams_and_params("run1", str(tmp_path))
    np.testing.assert_array_equal(params["wpe"], tiny_model.tensors["model/wpe"])


def test_the_numpy_params_cache_must_have_the_checkpoints_shapes(models_dir, tiny_model):
    """A converted copy whose manifest and .npy agree with each other but not with the checkpoint is rebuilt."""
    model_dir = str(models_dir / "run1")
    utils.load_params(model_dir, 2)  # converts
    converted = os.path.join(model_dir, utils.CONVERTED)
    wpe = np.zeros((4096, 64), dtype=np.float32)
    np.save(os.path.join(converted, "wpe.npy"), wpe)
    manifest = utils.read_json(os.path.join(converted, "manifest.json"))
    manifest["tensors"]["wpe"] = {"shape": [4096, 64], "checksum": utils.checksum(wpe)}
    with open(os.path.join(converted, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    fingerprint = utils.checkpoint_fingerprint(utils.checkpoint_prefix(model_dir))
    shapes = utils.loaded_shapes(utils.checkpoint_prefix(model_dir), 2)
    assert utils.load_converted(converted, fingerprint, shapes) is None
    np.testing.assert_array_equal(utils.load_params(model_dir, 2)["wpe"], tiny_model.tensors["model/wpe"])


def test_hparams_in_the_billions_are_refused_in_bounded_memory(models_dir, tmp_path):
    """n_layer 1000000000 once built 12e9 tensor names (3.8 GB in 33 s under a 4 GB limit, then a MemoryError with
    no message). Now its value is refused before anything is counted from it: run under a 1 GiB limit."""
    hparam(n_layer=10**9, n_embd=2**40)(str(models_dir / "run1"))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
            "sys.argv[0] = 'gpt2.py'; import gpt2; gpt2.cli()")
    result = subprocess.run([sys.executable, "-c", code, "Hello", "--model_size", "run1", "--models_dir",
                             str(models_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "GPT2_MODELS_URL": "http://127.0.0.1:9"})
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert result.stderr == (f"error: model folder {models_dir / 'run1'} cannot be loaded: hparams.json has n_embd "
                             f"1099511627776, not a whole number from 1 to 65536\n")


def test_hidden_folders_are_never_listed_as_models(tmp_path, tiny_model, capsys):
    for name in ("run1", ".run1.tmp123", ".run1.old456"):  # a run's save in progress leaves the hidden two
        shutil.copytree(tiny_model.path, tmp_path / name, ignore=shutil.ignore_patterns(utils.CONVERTED))
    code, out, err = run_cli(capsys, "Hello", "--model_size", "run2", "--models_dir", str(tmp_path))
    assert code == 2 and f"a model folder in {tmp_path} (found: run1)," in err, err
