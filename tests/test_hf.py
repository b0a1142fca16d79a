"""Hugging Face's layout against transformers itself: folders written by save_pretrained load here with HF's logits,
export.py's folders load in transformers with ours, the tokenizer agrees with tiktoken, and release -> HF ->
release gives back the same bits. Also the names a model goes by, the configs refused, and fine-tuning and
scoring from an HF folder."""
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import gpt2
import hf
import utils
from tests.conftest import ROOT, scratch_models_dir
from tests.hf_layout import copy_vocab, hf_logits, write_hf_folder
from tests.release_layout import real_vocab_file

PROMPT = "Alan Turing theorized that computers would one day become the most powerful machines on the planet."
NO_NETWORK = {"GPT2_MODELS_URL": "http://127.0.0.1:9", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}


def run(script, *args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **NO_NETWORK, **(env or {})}, timeout=300)


def one_line_error(result, code):
    """The error line of a run that must have failed with exactly one line on stderr (besides progress bars)."""
    assert result.returncode == code, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def ours(model_dir, models_dir="unused-models-dir"):
    encoder, hparams, params = utils.load_encoder_hparams_and_params(str(model_dir), models_dir)
    ids = encoder.encode(PROMPT)
    return ids, gpt2.gpt2(ids, **params, n_head=hparams["n_head"]), hparams, params


def assert_close(logits, expected):
    diff = np.abs(logits - expected).max()
    print(f"max |logits - HF| = {diff:.3g} (logits up to {np.abs(expected).max():.3g})")
    assert logits.dtype == np.float32 and logits.shape == expected.shape
    assert diff <= 1e-4


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """{kind: (folder, the float32 GPT2LMHeadModel of its weights)}: save_pretrained in three dtypes, and a
    GPT2Model save (no `transformer.` prefix)."""
    root = tmp_path_factory.mktemp("hf")
    kinds = {"float32": dict(), "float16": dict(dtype="float16"), "bfloat16": dict(dtype="bfloat16"),
             "GPT2Model": dict(base=True)}
    return {kind: (str(root / kind), write_hf_folder(str(root / kind), seed=i, **kw))
            for i, (kind, kw) in enumerate(kinds.items())}


@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16", "GPT2Model"])
def test_save_pretrained_loads_with_hf_logits(hf_folders, kind):
    folder, model = hf_folders[kind]
    ids, logits, hparams, params = ours(folder)
    assert hparams == {"n_vocab": 50257, "n_ctx": 128, "n_embd": 64, "n_head": 4, "n_layer": 2}
    assert all(a.dtype == np.float32 for a in utils.flatten(params).values())
    assert_close(logits, hf_logits(model, ids))
    # widened exactly: the same float32 values transformers itself makes of the file
    expected = model.transformer.h[1].mlp.c_fc.weight.detach().numpy()
    assert np.array_equal(params["blocks"][1]["mlp"]["c_fc"]["w"], expected)


def test_bfloat16_widening_and_rounding_match_torch():
    values = torch.randn(10_000) * 10
    bits = hf.to_bfloat16_bits(values.numpy())
    assert np.array_equal(bits, values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    widened = (bits.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(widened, values.to(torch.bfloat16).float().numpy())


def test_pytorch_model_bin_loads_with_torch(tmp_path, hf_folders):
    folder, model = hf_folders["float32"]
    shutil.copytree(folder, tmp_path / "bin", ignore=shutil.ignore_patterns("model.safetensors"))
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ids, logits, *_ = ours(tmp_path / "bin")
    assert_close(logits, hf_logits(model, ids))


def test_an_hf_folder_keeps_its_files_order_of_wte_untimed(hf_folders, monkeypatch):
    """An HF folder is read on every run: timing the LM head's two orders (utils.lm_head_order) each time would
    cost more than decode gains, so wte stays row-major as in the file; the linear weights are laid out as ever."""
    def timed(n_vocab, n_embd):
        raise AssertionError("the head was timed")
    monkeypatch.setattr(utils, "lm_head_order", timed)
    params = utils.load_encoder_hparams_and_params(hf_folders["float32"][0], "unused-models-dir")[2]
    assert params["wte"].flags.c_contiguous
    assert params["blocks"][0]["mlp"]["c_proj"]["w"].flags.f_contiguous


@pytest.mark.parametrize("keep", [lambda size: 40_000, lambda size: size // 2, lambda size: size - 100,
                                  lambda size: 0], ids=["40 KB", "half", "all but its end", "empty"])
def test_a_truncated_pytorch_model_bin_is_one_line_naming_it(tmp_path, hf_folders, keep):
    """Cut short, the file was reported as torch's reader saw it: "[Errno 22] Invalid argument" (its first 40 KB),
    a miniz error, or "EOFError"."""
    folder, model = hf_folders["float32"]
    shutil.copytree(folder, tmp_path / "bin", ignore=shutil.ignore_patterns("model.safetensors"))
    path = tmp_path / "bin" / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    os.truncate(path, keep(os.path.getsize(path)))
    line = one_line_error(run("gpt2.py", "Hello", "--model_size", str(tmp_path / "bin")), 1)
    assert line == (f"error: {path} is truncated or damaged: it stops before the end of its zip archive (a download "
                    f"or a copy cut short?); fetch or copy it again")


def test_pytorch_model_bin_without_torch_says_how_to_convert(tmp_path, hf_folders):
    folder, model = hf_folders["float32"]
    shutil.copytree(folder, tmp_path / "bin", ignore=shutil.ignore_patterns("model.safetensors"))
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    code = "import sys; sys.modules['torch'] = None; sys.path.insert(0, '.'); import gpt2; gpt2.cli()"
    result = subprocess.run([sys.executable, "-c", code, "Hello", "--model_size", str(tmp_path / "bin")],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, **NO_NETWORK}, timeout=300)
    line = one_line_error(result, 1)
    assert "pytorch_model.bin is in PyTorch's format, which needs torch" in line
    assert "save_pretrained" in line


def edited_config(tmp_path, source, **changes):
    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


REFUSED = [  # (config changes, what the one line names)
    (dict(model_type="llama"), "is not a GPT-2 model: its config.json has model_type 'llama'"),
    (dict(activation_function="relu"), "sets activation_function to 'relu'; the forward pass here implements only "
                                       "'gelu_new'"),
    (dict(scale_attn_by_inverse_layer_idx=True), "sets scale_attn_by_inverse_layer_idx to True"),
    (dict(reorder_and_upcast_attn=True), "sets reorder_and_upcast_attn to True"),
    (dict(layer_norm_epsilon=1e-6), "sets layer_norm_epsilon to 1e-06"),
    (dict(n_inner=100), "sets n_inner to 100"),
    (dict(n_positions=256), "tensor transformer.wpe.weight has shape [128, 64], but config.json makes it [256, 64]"),
    (dict(n_layer=3), "has no tensor transformer.h.2.ln_1.weight"),
    (dict(n_embd="64"), "config.json needs n_embd as whole numbers >= 1"),
]


@pytest.mark.parametrize("changes, message", REFUSED, ids=[next(iter(c)) for c, _ in REFUSED])
def test_config_the_forward_pass_does_not_implement_is_one_line(tmp_path, hf_folders, changes, message):
    folder = edited_config(tmp_path, hf_folders["float32"][0], **changes)
    line = one_line_error(run("gpt2.py", "Hello", "--model_size", str(folder)), 1)
    assert message in line and str(folder) in line


@pytest.mark.parametrize("script, args", [("gpt2.py", ["Hello"]), ("score.py", ["-"]),
                                          ("export.py", ["--out", "unwritten"])])
def test_a_config_past_any_gpt2_is_refused_as_hparams_json_is(tmp_path, hf_folders, script, args):
    """config.json gets hparams.json's bounds, exit 1 like the release layout's: n_layer 10**30 exited 2 in gpt2.py
    (a memory check, on a model that was never checked) and hung score.py and export.py."""
    folder = edited_config(tmp_path, hf_folders["float32"][0], n_layer=10**30)
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *args, "--model_size", str(folder)],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **NO_NETWORK},
                            input="Hello", timeout=300)
    line = one_line_error(result, 1)
    assert line == f"error: {folder}: config.json has n_layer {10**30}, not a whole number from 1 to 1024"
    assert sorted(os.listdir(tmp_path)) == ["edited"]


def test_untied_head_is_refused_and_tied_copy_loads(tmp_path):
    untied = write_hf_folder(str(tmp_path / "untied"), tie_word_embeddings=False)
    assert not torch.equal(untied.lm_head.weight, untied.transformer.wte.weight)
    line = one_line_error(run("gpt2.py", "Hello", "--model_size", str(tmp_path / "untied")), 1)
    assert "lm_head.weight differs from wte.weight (untied embeddings)" in line
    # the same file with the head equal to wte (what a tied model saved with its head looks like) loads
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tmp_path / "untied" / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    save_file(tensors, str(tmp_path / "untied" / "model.safetensors"), metadata={"format": "pt"})
    assert run("gpt2.py", "Hello", "--n_tokens_to_generate", "2", "--model_size", str(tmp_path / "untied")) \
        .returncode == 0


def test_unexpected_tensor_is_refused(tmp_path, hf_folders):
    from transformers import GPT2ForSequenceClassification

    classifier = GPT2ForSequenceClassification.from_pretrained(hf_folders["float32"][0], num_labels=2)
    classifier.save_pretrained(tmp_path / "classifier")
    copy_vocab(tmp_path / "classifier")
    line = one_line_error(run("gpt2.py", "Hello", "--model_size", str(tmp_path / "classifier")), 1)
    assert "unexpected tensor score.weight: not GPT-2's language model" in line


def test_the_causal_mask_buffers_of_old_files_are_ignored(tmp_path, hf_folders):
    from safetensors.numpy import load_file, save_file

    folder, model = hf_folders["float32"]
    shutil.copytree(folder, tmp_path / "old")
    tensors = load_file(str(tmp_path / "old" / "model.safetensors"))
    for i in range(2):
        tensors[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), dtype=np.float32))
        tensors[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    save_file(tensors, str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})
    ids, logits, *_ = ours(tmp_path / "old")
    assert_close(logits, hf_logits(model, ids))


# --- Names ------------------------------------------------------------------------------------------------------

def test_every_way_to_name_a_folder_loads_it(tmp_path, hf_folders):
    folder = hf_folders["float32"][0]
    (tmp_path / "cwd" / "runs").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    shutil.copytree(folder, tmp_path / "cwd" / "runs" / "x")
    shutil.copytree(folder, tmp_path / "models" / "mine")
    shutil.copytree(folder, tmp_path / "cwd" / "owner" / "name")  # an existing path wins over the repo id
    cwd = tmp_path / "cwd" / "runs"
    expected = run("gpt2.py", "Hello", "--n_tokens_to_generate", "3", "--model_size", folder)
    assert expected.returncode == 0, expected.stderr
    for name, where in [("./x", cwd), ("../runs/x", cwd), (str(tmp_path / "cwd" / "runs" / "x"), cwd),
                        ("mine", cwd), ("owner/name", tmp_path / "cwd")]:
        result = run("gpt2.py", "Hello", "--n_tokens_to_generate", "3", "--model_size", name, "--models_dir",
                     str(tmp_path / "models"), cwd=where)
        assert (result.returncode, result.stdout) == (0, expected.stdout), (name, result.stderr)


def test_a_missing_path_is_one_line_exit_2(tmp_path):
    line = one_line_error(run("gpt2.py", "Hello", "--model_size", "./nowhere", cwd=tmp_path), 2)
    assert "no such model folder './nowhere'" in line
    (tmp_path / "x.txt").write_text("some text")
    line = one_line_error(run("score.py", "x.txt", "--model_size", "x/y/z", cwd=tmp_path), 2)
    assert "no such model folder 'x/y/z'" in line


@pytest.mark.parametrize("script, args", [
    ("gpt2.py", ["Hello", "--model_size"]), ("score.py", ["x.txt", "--model_size"]),
    ("export.py", ["--out", "unwritten", "--model_size"]),
    ("train.py", ["--dataset", "x.txt", "--out_name", "t", "--init_from"])])
def test_a_path_to_a_file_is_one_line_saying_it_is_no_folder(tmp_path, script, args):
    """It said "no such model folder" of a file that is there, or took owner/name for a Hub repo id."""
    (tmp_path / "x.txt").write_text("some text")
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").write_text("some text")
    for name in ("./x.txt", str(tmp_path / "x.txt"), "owner/name"):
        line = one_line_error(run(script, *args, name, "--models_dir", str(tmp_path / "models"), cwd=tmp_path), 2)
        assert line == f"error: {args[-1]} {name!r} is a file, not a model folder"
    assert sorted(os.listdir(tmp_path)) == ["owner", "x.txt"]


def test_a_bare_name_of_a_folder_here_says_to_write_dot_slash(tmp_path, hf_folders):
    shutil.copytree(hf_folders["float32"][0], tmp_path / "here")
    line = one_line_error(run("gpt2.py", "Hello", "--model_size", "here", "--models_dir", str(tmp_path / "m"),
                              cwd=tmp_path), 2)
    assert "unknown model 'here'" in line and "write ./here" in line and "openai-community/gpt2" in line


# --- Export ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    """tiny_model (release layout) exported by export.py in each dtype: {dtype: folder}."""
    root = tmp_path_factory.mktemp("exported")
    folders = {}
    for dtype in ("float32", "float16", "bfloat16"):
        folders[dtype] = str(root / dtype)
        result = run("export.py", "--model_size", tiny_model.name, "--models_dir", tiny_model.models_dir,
                     "--out", folders[dtype], "--dtype", dtype)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"wrote tiny to {folders[dtype]} in Hugging Face's layout ({dtype})\n"
    return folders


def load_in_transformers(folder):
    """GPT2LMHeadModel.from_pretrained(folder) computing in float32, its loading report, and everything that
    transformers logged or warned while loading."""
    import transformers
    from transformers import GPT2LMHeadModel

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    transformers.logging.set_verbosity_warning()
    transformers.logging.add_handler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    finally:
        transformers.logging.remove_handler(handler)
    return model.eval(), info, stream.getvalue() + "".join(str(w.message) for w in caught)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_export_loads_in_transformers_with_our_logits_and_no_warning(exported, tiny_model, dtype):
    folder = exported[dtype]
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "merges.txt",
                                          "model.safetensors", "tokenizer_config.json", "vocab.json"]
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["n_ctx"] == config["n_positions"] == 1024  # llama.cpp's converter reads n_ctx
    model, info, logged = load_in_transformers(folder)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert logged == "", logged
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice("transformer.wte.weight").get_dtype() == {"float32": "F32", "float16": "F16",
                                                                     "bfloat16": "BF16"}[dtype]
    ids, logits, *_ = ours(folder)
    assert_close(logits, hf_logits(model, ids))
    if dtype == "float32":  # the very model we exported
        assert_close(ours(tiny_model.path)[1], hf_logits(model, ids))


def test_export_tokenizer_in_transformers_gives_tiktokens_ids(exported, tiktoken_gpt2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["float32"])
    texts = [PROMPT, "Hello world", " leading space\n\nnew lines\ttabs", "naïve café 日本語 🤖", "it's 2024!!"]
    for text in texts:
        assert tokenizer(text)["input_ids"] == tiktoken_gpt2.encode(text, disallowed_special=()), text
    assert tokenizer.eos_token_id == 50256


def test_release_to_hf_to_release_is_bit_identical(tmp_path, exported, tiny_model):
    result = run("export.py", "--model_size", exported["float32"], "--out", str(tmp_path / "back"),
                 "--format", "release")
    assert result.returncode == 0, result.stderr
    n_layer = tiny_model.hparams["n_layer"]
    before = utils.read_tf_checkpoint(utils.checkpoint_prefix(tiny_model.path), n_layer)
    after = utils.read_tf_checkpoint(utils.checkpoint_prefix(str(tmp_path / "back")), n_layer)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype == np.float32
        assert np.array_equal(before[name].view(np.uint32), after[name].view(np.uint32)), name
    assert utils.load_hparams(str(tmp_path / "back")) == tiny_model.hparams
    for name in ("encoder.json", "vocab.bpe"):
        with open(tmp_path / "back" / name, "rb") as a, open(real_vocab_file(name), "rb") as b:
            assert a.read() == b.read()
    assert "train_state.npz" not in os.listdir(tmp_path / "back")


def test_export_refuses_an_existing_folder_unless_overwrite(tmp_path, tiny_model):
    out = tmp_path / "out"
    out.mkdir()
    args = ["export.py", "--model_size", tiny_model.name, "--models_dir", tiny_model.models_dir, "--out", str(out)]
    assert "already exists: --overwrite replaces it" in one_line_error(run(*args), 2)
    assert run(*args, "--overwrite").returncode == 0  # an empty folder
    assert run(*args, "--overwrite", "--format", "release").returncode == 0  # a model in HF's layout
    assert "checkpoint" in os.listdir(out) and "model.safetensors" not in os.listdir(out)
    assert run(*args, "--overwrite").returncode == 0  # a model in the release layout
    assert "model.safetensors" in os.listdir(out) and "checkpoint" not in os.listdir(out)
    assert [name for name in os.listdir(tmp_path) if name.startswith(".out.")] == [".out.writer.lock"]


def test_export_overwrite_replaces_only_a_model(tmp_path, tiny_model):
    """--overwrite of a folder that is no model (notes, a folder of folders, a half-made model) would delete the
    user's files: refused, naming what the folder holds."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")  # a config.json without weights is no model
    line = one_line_error(run("export.py", "--model_size", tiny_model.name, "--models_dir", tiny_model.models_dir,
                              "--out", str(out), "--overwrite"), 2)
    assert line == f"error: --out {out} is not a model folder (it holds config.json, notes.txt, sub): --overwrite " \
                   f"replaces only a model"
    assert sorted(os.listdir(out)) == ["config.json", "notes.txt", "sub"] and (out / "notes.txt").read_text() == "mine"


def test_export_overwrite_refuses_a_model_folder_holding_more_than_the_model(tmp_path, tiny_model):
    """A transformers Trainer's output folder: the model, and checkpoints and notes beside it, which replacing the
    folder would delete."""
    out = tmp_path / "trained"
    args = ("export.py", "--model_size", tiny_model.name, "--models_dir", tiny_model.models_dir, "--out", str(out))
    assert run(*args).returncode == 0
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-500").mkdir()
    line = one_line_error(run(*args, "--overwrite"), 2)
    assert line == f"error: --out {out} holds more than a model (checkpoint-500, notes.txt): --overwrite would " \
                   f"delete it with the model; move it out first"
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint-500").is_dir()
    os.remove(out / "notes.txt")
    os.rmdir(out / "checkpoint-500")
    assert run(*args, "--overwrite").returncode == 0  # the model alone is replaced


@pytest.mark.parametrize("format", ["hf", "release"])
def test_export_to_a_full_disk_is_one_line_and_leaves_no_folder(tmp_path, tiny_model, format):
    """safetensors' and TensorFlow's writers report a full disk as errors of their own (a traceback before)."""
    from tests.mounts import small_disk
    with small_disk(tmp_path / "disk", "512k") as disk:
        out = os.path.join(disk, "x")
        result = run("export.py", "--model_size", tiny_model.name, "--models_dir", tiny_model.models_dir, "--out",
                     out, "--format", format)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.splitlines()[0] == f"error: could not write {out}: No space left on device"
        assert [name for name in os.listdir(disk) if not name.endswith(".lock")] == []


@pytest.mark.parametrize("out, overwrite, code, message", [
    ("/proc/x", True, 1, "could not write /proc/x: cannot create files in /proc (No such file or directory)"),
    ("/dev/full/x", True, 2, "--out /dev/full/x cannot be made: /dev/full is not a folder"),
    ("FILE/x", True, 2, "--out FILE/x cannot be made: FILE is not a folder"),
    ("/dev/full", False, 2, "--out /dev/full is not a folder; give a folder to write"),
])
def test_export_where_no_folder_can_be_made_names_the_cause(tmp_path, tiny_model, out, overwrite, code, message):
    """/proc/x said "another process is writing" (filelock takes a lock file it cannot create for a lock held),
    /dev/full/x and FILE/x "File exists"."""
    (tmp_path / "file").write_text("mine")
    out, message = (text.replace("FILE", str(tmp_path / "file")) for text in (out, message))
    line = one_line_error(run("export.py", "--model_size", tiny_model.name, "--models_dir", tiny_model.models_dir,
                              "--out", out, *["--overwrite"] * overwrite), code)
    assert line == f"error: {message}"
    assert os.listdir(tmp_path) == ["file"]


def test_export_overwrite_of_a_folder_it_cannot_read_is_one_line(tmp_path, monkeypatch):
    """chmod 000: os.listdir's PermissionError went up from main as it was (a traceback from Python, a line without
    the cause from the command line). Monkeypatched, since root reads any folder."""
    import export

    def unreadable(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "listdir", unreadable)
    with pytest.raises(utils.ModelError) as refused:
        export.check_out(str(tmp_path), overwrite=True)
    assert str(refused.value) == f"cannot read --out {tmp_path} (Permission denied), so --overwrite cannot tell " \
                                 f"what it would delete"


def test_export_overwrite_through_a_link_replaces_the_model_it_points_at(tmp_path, tiny_model):
    """--out LINK --overwrite renamed the link aside and left it behind as .LINK.old<pid>; now the folder the link
    points at is replaced and the link stays, as any write through a link does."""
    args = ["export.py", "--model_size", tiny_model.name, "--models_dir", tiny_model.models_dir]
    assert run(*args, "--out", str(tmp_path / "real")).returncode == 0
    os.symlink("real", tmp_path / "link")
    result = run(*args, "--out", str(tmp_path / "link"), "--overwrite", "--format", "release")
    assert result.returncode == 0, result.stderr
    assert os.readlink(tmp_path / "link") == "real" and "checkpoint" in os.listdir(tmp_path / "real")
    assert sorted(name for name in os.listdir(tmp_path) if not name.endswith(".lock")) == ["link", "real"]


def test_export_never_replaces_the_model_it_reads(tmp_path, tiny_model):
    shutil.copytree(tiny_model.path, tmp_path / "run")
    line = one_line_error(run("export.py", "--model_size", str(tmp_path / "run"), "--out", str(tmp_path / "run"),
                              "--overwrite"), 2)
    assert "holds the model being exported" in line
    shutil.copytree(tiny_model.path, tmp_path / "run" / "inner")
    line = one_line_error(run("export.py", "--model_size", str(tmp_path / "run" / "inner"),
                              "--out", str(tmp_path / "run"), "--overwrite"), 2)
    assert "holds more than a model (inner)" in line
    assert sorted(os.listdir(tmp_path / "run")) == sorted(os.listdir(tiny_model.path) + ["inner"])


@pytest.fixture(scope="module")
def training_run(tmp_path_factory, tiny_model):
    """A finished training run, `run`, under its own models folder: the links `run` and `run-best` into
    .run.saves/, which holds its save and its best; beside it `linked`, a link to .run.saves, and a model."""
    import train

    models_dir = scratch_models_dir(tmp_path_factory)
    dataset = models_dir / "text.txt"
    dataset.write_text(" ".join([PROMPT] * 40), encoding="utf-8")
    train.main(str(dataset), "run", init_from="scratch", n_layer=2, n_head=2, n_embd=32, n_ctx=64, block_size=32,
               batch_size=2, warmup_steps=5, sample_every=0, eval_every=10, save_every=10, max_steps=20,
               models_dir=str(models_dir))
    assert os.path.islink(models_dir / "run") and os.path.islink(models_dir / "run-best")
    os.symlink(".run.saves", models_dir / "linked")
    shutil.copytree(tiny_model.path, models_dir / "124M-copy")
    return models_dir


def run_state(models_dir):
    """What a run is made of: its names' links and its saves folder's entries."""
    return ({name: os.readlink(models_dir / name) for name in ("run", "run-best")},
            sorted(os.listdir(models_dir / ".run.saves")), sorted(os.listdir(models_dir)))


def export_to(out, models_dir, *args):
    return run("export.py", "--model_size", "run", "--models_dir", str(models_dir), "--out", str(out), *args)


@pytest.mark.parametrize("inside", ["run/sub", "run-best/sub", ".run.saves/sub", "run/numpy-params/sub",
                                    "linked/sub", "124M-copy/sub"])
def test_export_refuses_an_out_inside_a_model_or_a_run(training_run, inside):
    """A run's next save deletes the folder its name pointed at, and a model folder is replaced whole: an export
    inside either would be lost. Refused, the path followed through symbolic links, whether it exists or not."""
    before = run_state(training_run)
    line = one_line_error(export_to(training_run / inside, training_run, "--overwrite"), 2)
    assert line.startswith(f"error: --out {training_run / inside} lies inside ")
    if inside.startswith("124M-copy"):
        assert f"the model folder {training_run / '124M-copy'}, which is replaced whole" in line
    else:
        assert f"the training run run's folder {training_run / '.run.saves'}: its next save would delete it" in line
    assert run_state(training_run) == before


@pytest.mark.parametrize("name", ["run", "run-best", "other", "other-best"])
def test_export_refuses_a_training_runs_names(training_run, name):
    """`run` and `run-best` are the run's links into its saves folder: a folder put there would orphan the saves
    and make the run's next best fail; a name with a .<name>.saves beside it is a run's too (its link missing)."""
    (training_run / ".other.saves").mkdir(exist_ok=True)
    before = run_state(training_run)
    line = one_line_error(export_to(training_run / name, training_run, "--overwrite"), 2)
    run_name = name.removesuffix("-best")
    assert line == f"error: --out {training_run / name} belongs to the training run {run_name}: train.py " \
                   f"--out_name {run_name} --overwrite starts the run again, or delete the run to free the name"
    assert run_state(training_run) == before


EXPORT_ERRORS = [
    (["--format", "gguf"], "--format must be one of hf, release, got 'gguf'"),
    (["--dtype", "int8"], "--dtype must be one of float32, float16, bfloat16, got 'int8'"),
    (["--format", "release", "--dtype", "float16"], "--format release holds float32 weights only"),
    (["--outt", "x"], "unknown flag --outt; did you mean --out?"),
]


@pytest.mark.parametrize("args, message", EXPORT_ERRORS, ids=[" ".join(a) for a, _ in EXPORT_ERRORS])
def test_export_argument_errors_are_one_line_before_any_work(tmp_path, args, message):
    out = [] if "--outt" in args else ["--out", str(tmp_path / "out")]
    line = one_line_error(run("export.py", "--model_size", "124M", "--models_dir", str(tmp_path), *out, *args), 2)
    assert message in line
    assert os.listdir(tmp_path) == []  # nothing downloaded, nothing written


def test_export_without_out_is_one_line():
    assert "--out is required" in one_line_error(run("export.py", "--model_size", "124M"), 2)


# --- Training and scoring from an HF folder ----------------------------------------------------------------------

def test_fine_tune_from_an_hf_folder_and_load_the_run(tmp_path, hf_folders):
    folder, model = hf_folders["float16"]
    dataset = tmp_path / "text.txt"
    dataset.write_text(PROMPT * 20, encoding="utf-8")
    result = run("train.py", "--dataset", str(dataset), "--out_name", "tuned", "--init_from", folder,
                 "--models_dir", str(tmp_path), "--block_size", "32", "--batch_size", "2", "--max_steps", "2",
                 "--learning_rate", "1e-3", "--eval_every", "0")
    assert result.returncode == 0, result.stderr
    encoder, hparams, params = utils.load_encoder_hparams_and_params("tuned", str(tmp_path))
    assert hparams == {"n_vocab": 50257, "n_ctx": 128, "n_embd": 64, "n_head": 4, "n_layer": 2}
    _, _, start = ours(folder)[1:]
    moved = np.abs(params["blocks"][0]["attn"]["c_attn"]["w"] - start["blocks"][0]["attn"]["c_attn"]["w"]).max()
    assert 0 < moved < 0.1  # trained from the HF weights, two small steps
    with open(tmp_path / "tuned" / "encoder.json", "rb") as a, open(os.path.join(folder, "vocab.json"), "rb") as b:
        assert a.read() == b.read()


def test_init_from_a_missing_folder_is_one_line(tmp_path):
    dataset = tmp_path / "text.txt"
    dataset.write_text(PROMPT, encoding="utf-8")
    line = one_line_error(run("train.py", "--dataset", str(dataset), "--out_name", "t", "--init_from", "./gone",
                              "--models_dir", str(tmp_path)), 2)
    assert "no such model folder './gone'" in line


def test_score_on_an_hf_folder_equals_score_on_its_release_copy(tmp_path, hf_folders):
    folder = hf_folders["bfloat16"][0]
    assert run("export.py", "--model_size", folder, "--out", str(tmp_path / "release"), "--format", "release") \
        .returncode == 0
    text = tmp_path / "text.txt"
    text.write_text(PROMPT * 10, encoding="utf-8")
    results = [run("score.py", str(text), "--model_size", name, "--stride", "64", "--json")
               for name in (folder, str(tmp_path / "release"))]
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    hf_scores, release_scores = (json.loads(r.stdout) for r in results)
    assert hf_scores["n_tokens"] == release_scores["n_tokens"] > 128  # several windows of n_ctx
    assert hf_scores["logprobs"] == release_scores["logprobs"]
    assert hf_scores["mean_nll"] == release_scores["mean_nll"]


def test_sharded_safetensors_load(tmp_path, hf_folders):
    folder, model = hf_folders["float32"]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="4MB")
    copy_vocab(tmp_path / "sharded")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(name.endswith(".safetensors") for name in files) > 1
    ids, logits, *_ = ours(tmp_path / "sharded")
    assert_close(logits, hf_logits(model, ids))


def test_export_at_real_gpt2_logit_magnitudes(tmp_path, realistic_model):
    """Real GPT-2's logits are about a hundred; float32 rounding grows with them (as in test_model.py)."""
    out = str(tmp_path / "realistic")
    result = run("export.py", "--model_size", realistic_model.name, "--models_dir", realistic_model.models_dir,
                 "--out", out)
    assert result.returncode == 0, result.stderr
    model, *_ = load_in_transformers(out)
    ids, logits, *_ = ours(out)
    expected = hf_logits(model, ids)
    diff, magnitude = np.abs(logits - expected).max(), np.abs(expected).max()
    print(f"max |logits - HF| = {diff:.3g} of logits up to {magnitude:.3g}")
    assert magnitude > 50 and diff <= 1e-4 * max(1.0, magnitude / 30)
