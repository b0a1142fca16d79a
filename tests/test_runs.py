"""runs.py: a training run is never lost, and --resume continues exactly what was started. Kills at every call of
a save, a power cut, full and read-only disks, damaged files, the record of options and data, the token cache,
and the dataset's odd files."""
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import runs
import train
import utils
from tests.conftest import ROOT
from tests.mounts import read_only, run_mount, small_disk
from tests.release_layout import real_vocab_file, vocabulary_only
from tests.test_train import PARAGRAPH, finish, models_dir, paragraph, run_train, wait_for  # noqa: F401

OPTIONS = dict(init_from="scratch", n_layer=1, n_head=2, n_embd=16, n_ctx=32, block_size=8, batch_size=2,
               learning_rate=1e-2, warmup_steps=1, eval_every=0, save_every=1, seed=0)
CLI_OPTIONS = [arg for name, value in OPTIONS.items() for arg in (f"--{name}", str(value))]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A models folder with the run `run` saved at step 2, and its dataset; copy it before changing it."""
    root = tmp_path_factory.mktemp("saved")
    dataset = root / "paragraph.txt"
    dataset.write_text(PARAGRAPH, encoding="utf-8")
    models_dir = vocabulary_only(root / "models")
    train.main(str(dataset), "run", max_steps=2, models_dir=models_dir, **OPTIONS)
    return models_dir, str(dataset)


@pytest.fixture
def run_copy(saved_run, tmp_path):
    models_dir, dataset = saved_run
    shutil.copytree(models_dir, tmp_path / "models", symlinks=True)
    return str(tmp_path / "models"), dataset


def tree_bytes(path):
    """{relative path: bytes} of every file under path (a run's name followed to its save)."""
    path = os.path.realpath(path)
    found = {}
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.relpath(os.path.join(folder, name), path)] = f.read()
    return found


def weights_and_state(run_dir):
    flat = utils.read_tf_checkpoint(utils.checkpoint_prefix(run_dir), OPTIONS["n_layer"])
    with np.load(os.path.join(run_dir, "train_state.npz")) as state:
        flat.update({key: state[key] for key in state.files})
    return flat


def assert_same_run(a, b):
    a, b = weights_and_state(a), weights_and_state(b)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- kills and power cuts

@pytest.fixture
def fast_disk(tmp_path):
    """A tmpfs where one can be mounted (fsync costs nothing there; the power cut test is about the disk), else
    tmp_path."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(path)], capture_output=True)
    yield path
    if mounted.returncode == 0:
        subprocess.run(["umount", "-l", str(path)], check=True, timeout=120)


# fresh: a new run's first save (nothing to replace), then one that replaces it. legacy: a real folder of the
# previous train.py swapped for a link, then a save that replaces a save, as every --resume's are.
@pytest.mark.parametrize("scenario", ["fresh", "legacy"])
def test_a_kill_at_any_call_of_two_saves_loses_nothing(fast_disk, scenario):
    """tests/kill_sweep.py: SIGKILL at each call, in turn, of the functions two consecutive saves use."""
    sweep = subprocess.Popen([sys.executable, "-m", "tests.kill_sweep", str(fast_disk), scenario], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = finish(sweep, timeout=1800)
    assert sweep.returncode == 0, err[-3000:]
    result = json.loads(out.splitlines()[-1])
    print(f"kill sweep ({scenario}): {result['kill_points']} kill points tried, {len(result['lost'])} runs lost")
    assert result["kill_points"] >= 30  # the count covers two saves: a dozen fsyncs and renames each at least
    assert result["not_killed"] == []  # every child died where it was told to
    assert (result["lost"], result["unloadable"], result["differ"], result["listed_leftovers"]) == ([], [], [], [])


def test_a_power_cut_after_a_save_leaves_a_loadable_run(tmp_path, paragraph):
    """The run on ext4 on a loop device; the disk image copied (what a power cut leaves: only what reached the
    device) right after a save and while the next ones are written; each copy, mounted, holds a loadable run."""
    if os.geteuid() != 0 or not shutil.which("losetup") or not shutil.which("mkfs.ext4"):
        pytest.skip("a power cut needs root, losetup and mkfs.ext4 (a loop device and an ext4 image)")
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    with open(image, "wb") as f:
        f.truncate(96 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    copies = []

    def copy_image():
        copy = tmp_path / f"copy{len(copies)}.img"
        shutil.copyfile(image, copy)
        copies.append(copy)

    with loop_mount(image, mnt):
        models_dir = vocabulary_only(mnt / "models")
        subprocess.run(["sync"], timeout=120)  # the vocabulary is not what this test is about
        # commit=600: the journal is not written for ten minutes, so only what was fsynced reaches the device
        run_mount("-o", "remount,commit=600", str(mnt))
        first = run_train("--dataset", paragraph, "--out_name", "run", *CLI_OPTIONS, "--max_steps", "1",
                          "--models_dir", models_dir)
        out, err = finish(first)
        assert first.returncode == 0, err
        copy_image()  # just after a completed save
        second = run_train("--out_name", "run", "--resume", "--max_steps", "100000", "--models_dir", models_dir)
        wait_for(lambda: len(read_log(os.path.join(models_dir, "run"))) >= 3, second, "third save")
        for _ in range(3):  # while the next saves are written
            # A power cut is an instant, a copy of the image takes a while: read while the writer goes on, it can
            # hold a block written after another it read before (a save's metadata without its data), which no
            # power cut leaves. So the writer is stopped, and its last writes reach the image, while it is copied.
            second.send_signal(signal.SIGSTOP)
            time.sleep(0.5)
            copy_image()
            second.send_signal(signal.SIGCONT)
            time.sleep(0.5)
        second.kill()
        finish(second)
    for i, copy in enumerate(copies):
        with loop_mount(copy, tmp_path / f"mnt{i}"):
            copied_models = str(tmp_path / f"mnt{i}" / "models")
            _, hparams, params = utils.load_encoder_hparams_and_params("run", copied_models)
            assert params["wte"].shape == (50257, 16)
            with np.load(os.path.join(copied_models, "run", "train_state.npz")) as state:
                step = int(state["step"])
            assert step >= 1 and len(read_log(os.path.join(copied_models, "run"))) == step


class loop_mount:
    def __init__(self, image, mnt):
        self.image, self.mnt = image, mnt

    def __enter__(self):
        os.makedirs(self.mnt, exist_ok=True)
        run_mount("-o", "loop", str(self.image), str(self.mnt))
        return self.mnt

    def __exit__(self, *exc):
        subprocess.run(["umount", str(self.mnt)], timeout=120, check=True)


# ---------------------------------------------------------------------------------------------- names and leftovers

def test_a_run_beside_one_whose_name_extends_it_leaves_it_alone(models_dir, paragraph):
    train.main(paragraph, "story.old", max_steps=1, models_dir=models_dir, **OPTIONS)
    before = tree_bytes(os.path.join(models_dir, "story.old"))
    saves = os.listdir(os.path.join(models_dir, ".story.old.saves"))
    train.main(paragraph, "story", max_steps=1, models_dir=models_dir, **OPTIONS)
    assert tree_bytes(os.path.join(models_dir, "story.old")) == before
    assert os.listdir(os.path.join(models_dir, ".story.old.saves")) == saves
    assert utils.local_models(models_dir) == ["story", "story.old"]


def test_leftovers_of_a_dead_run_are_removed_by_the_next_holder_and_no_one_else(run_copy):
    models_dir, dataset = run_copy
    saves = os.path.join(models_dir, ".run.saves")
    current = os.path.basename(os.readlink(os.path.join(models_dir, "run")))
    leftovers = ["000009.abcdef", "000010.abcdef.partial", "link.tmp", "live-log.csv"]
    for name in leftovers[:2]:
        shutil.copytree(os.path.join(saves, current), os.path.join(saves, name))
    os.symlink("nowhere", os.path.join(saves, "link.tmp"))
    open(os.path.join(saves, "live-log.csv"), "w").close()
    open(os.path.join(saves, "notes.txt"), "w").close()  # not a name runs.py makes: kept
    # a reader (gpt2.py) changes nothing of them
    utils.load_encoder_hparams_and_params("run", models_dir)
    assert set(leftovers) < set(os.listdir(saves))
    train.main(dataset, "run", resume=True, max_steps=3, models_dir=models_dir, **OPTIONS)
    assert sorted(os.listdir(saves)) == sorted([os.path.basename(os.readlink(os.path.join(models_dir, "run"))),
                                                "notes.txt"])


def as_the_previous_train_py_saved_it(models_dir):
    """models_dir/run turned into a real folder without train_config.json, as the previous train.py wrote it."""
    run_dir = os.path.join(models_dir, "run")
    save = os.path.realpath(run_dir)
    os.remove(run_dir)
    shutil.move(save, run_dir)
    shutil.rmtree(os.path.join(models_dir, ".run.saves"))
    os.remove(os.path.join(run_dir, "train_config.json"))
    return run_dir


def test_a_run_of_the_previous_train_py_is_resumed_and_becomes_a_link(run_copy, saved_run, tmp_path):
    models_dir, dataset = run_copy
    run_dir = as_the_previous_train_py_saved_it(models_dir)
    train.main(dataset, "run", resume=True, max_steps=3, models_dir=models_dir, **OPTIONS)
    assert os.path.islink(run_dir) and [r["step"] for r in read_log(run_dir)] == ["1", "2", "3"]
    assert os.listdir(os.path.join(models_dir, ".run.saves")) == [os.path.basename(os.readlink(run_dir))]
    straight = vocabulary_only(tmp_path / "straight")
    train.main(dataset, "run", max_steps=3, models_dir=straight, **OPTIONS)
    assert_same_run(run_dir, os.path.join(straight, "run"))


def test_without_an_exchange_a_folder_moved_aside_by_a_dead_process_is_put_back(run_copy, monkeypatch, tmp_path):
    models_dir, dataset = run_copy
    run_dir = as_the_previous_train_py_saved_it(models_dir)
    monkeypatch.setattr(runs, "exchange", lambda a, b: False)  # as on a system without renameat2
    replace = os.replace

    def die_at_the_link(src, dst):
        if dst == run_dir:
            raise KeyboardInterrupt  # the process ends between moving the folder aside and renaming the link
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", die_at_the_link)
    with pytest.raises(KeyboardInterrupt):
        train.main(dataset, "run", resume=True, max_steps=3, models_dir=models_dir, **OPTIONS)
    assert not os.path.lexists(run_dir)  # the one moment the name is missing, on such a system
    monkeypatch.setattr(os, "replace", replace)
    train.main(dataset, "run", resume=True, max_steps=3, models_dir=models_dir, **OPTIONS)  # put back, resumed
    assert os.path.islink(run_dir) and [r["step"] for r in read_log(run_dir)] == ["1", "2", "3"]
    straight = vocabulary_only(tmp_path / "straight")
    train.main(dataset, "run", max_steps=3, models_dir=straight, **OPTIONS)
    assert_same_run(run_dir, os.path.join(straight, "run"))


# ---------------------------------------------------------------------------------------------- --overwrite

def test_overwrite_then_ctrl_c_before_its_first_save_leaves_the_old_run_byte_for_byte(run_copy):
    models_dir, dataset = run_copy
    run_dir = os.path.join(models_dir, "run")
    before = tree_bytes(run_dir)
    target = os.readlink(run_dir)
    new = run_train("--dataset", dataset, "--out_name", "run", *CLI_OPTIONS, "--save_every", "100000",
                    "--max_steps", "100000", "--overwrite", "--models_dir", models_dir)
    wait_for(lambda: os.path.exists(os.path.join(models_dir, ".run.saves", "live-log.csv"))
             and len(open(os.path.join(models_dir, ".run.saves", "live-log.csv")).readlines()) >= 2, new,
             "first step")
    new.send_signal(signal.SIGINT)
    out, err = finish(new)
    assert new.returncode == 130 and not out
    assert err.splitlines()[-1] == (f"interrupted before the new run's first save: {run_dir} is as it was, and the "
                                    f"new run ({err.split('new run (')[1].split(')')[0]}) is discarded"), err
    assert os.readlink(run_dir) == target and tree_bytes(run_dir) == before
    assert os.listdir(os.path.join(models_dir, ".run.saves")) == [os.path.basename(target)]


def test_overwrite_replaces_a_real_folder_at_its_first_save(models_dir, paragraph):
    from tests.release_layout import write_model_dir

    write_model_dir(os.path.join(models_dir, "mine"), n_layer=1, n_embd=16, n_head=2, n_ctx=32)
    train.main(paragraph, "mine", max_steps=1, overwrite=True, models_dir=models_dir, **OPTIONS)
    assert os.path.islink(os.path.join(models_dir, "mine"))
    assert os.listdir(os.path.join(models_dir, ".mine.saves")) == [os.readlink(os.path.join(models_dir, "mine"))
                                                                   .split("/")[1]]


# ---------------------------------------------------------------------------------------------- --resume

def test_resume_with_only_max_steps_continues_with_the_recorded_options(run_copy, tmp_path):
    models_dir, dataset = run_copy
    resumed = run_train("--out_name", "run", "--resume", "--max_steps", "4", "--models_dir", models_dir)
    out, err = finish(resumed)
    assert resumed.returncode == 0, err
    assert f"resuming {os.path.join(models_dir, 'run')} at step 2 (session 2), to step 4" in err
    rows = read_log(os.path.join(models_dir, "run"))
    assert [(r["step"], r["session"]) for r in rows] == [("1", "1"), ("2", "1"), ("3", "2"), ("4", "2")]
    with open(os.path.join(models_dir, "run", "train_config.json")) as f:
        assert json.load(f)["options"]["max_steps"] == 4
    # the same as one run to step 4 with the schedule it was started with (its cosine ends at step 2)
    straight = vocabulary_only(tmp_path / "straight")
    train.main(dataset, "run", max_steps=4, models_dir=straight, **{**OPTIONS, "lr_decay_steps": 2})
    assert_same_run(os.path.join(models_dir, "run"), os.path.join(straight, "run"))
    assert [(r["step"], r["train_loss"], r["lr"]) for r in rows] == [
        (r["step"], r["train_loss"], r["lr"]) for r in read_log(os.path.join(straight, "run"))]


REFUSED = [("block_size", 16), ("batch_size", 3), ("grad_accum", 2), ("learning_rate", 3e-4), ("warmup_steps", 5),
           ("lr_decay_steps", 9), ("weight_decay", 0.0), ("grad_clip", 0.5), ("seed", 1), ("n_layer", 2),
           ("n_head", 4), ("n_embd", 32), ("n_ctx", 64), ("init_from", "124M"),
           ("text_column", "body")]


@pytest.mark.parametrize("name, value", REFUSED, ids=[name for name, _ in REFUSED])
def test_resume_refuses_an_option_that_would_change_the_run(saved_run, name, value):
    models_dir, dataset = saved_run
    recorded = {**OPTIONS, "lr_decay_steps": 2, "grad_accum": 1, "weight_decay": 0.1, "grad_clip": 1.0,
                "text_column": None}[name]
    before = tree_bytes(os.path.join(models_dir, "run"))
    with pytest.raises(utils.UsageError) as refused:
        train.main(out_name="run", resume=True, max_steps=5, models_dir=models_dir, **{name: value})
    assert str(refused.value).startswith(f"--{name} {value!r} would change the run: "
                                         f"{os.path.join(models_dir, 'run')} was started with --{name} {recorded!r}")
    assert tree_bytes(os.path.join(models_dir, "run")) == before


def test_resume_may_change_how_often_it_evaluates_and_saves(run_copy):
    models_dir, dataset = run_copy
    train.main(out_name="run", resume=True, max_steps=4, eval_every=1, save_every=3, models_dir=models_dir)
    rows = read_log(os.path.join(models_dir, "run"))
    assert [bool(r["val_loss"]) for r in rows] == [False, False, True, True]


def test_resume_refuses_another_dataset_and_accepts_the_same_text_elsewhere(run_copy, tmp_path):
    models_dir, dataset = run_copy
    other = tmp_path / "other.txt"
    other.write_text(PARAGRAPH + " And then he slept.", encoding="utf-8")
    with pytest.raises(utils.UsageError, match=f"--dataset {other} is not the text .* was trained on "
                                               f"\\(--dataset {dataset}, sha256 "):
        train.main(str(other), "run", resume=True, max_steps=3, models_dir=models_dir)
    with pytest.raises(utils.UsageError, match="was started without --val_dataset"):
        train.main(out_name="run", val_dataset=str(other), resume=True, max_steps=3, models_dir=models_dir)
    moved = tmp_path / "moved.txt"
    shutil.copyfile(dataset, moved)
    train.main(str(moved), "run", resume=True, max_steps=3, models_dir=models_dir)
    with open(moved, "a", encoding="utf-8") as f:
        f.write(" An edit.")  # the recorded file (now the moved one) itself changed
    with pytest.raises(utils.UsageError, match="is not the text"):
        train.main(out_name="run", resume=True, max_steps=4, models_dir=models_dir)


def test_the_token_cache_is_keyed_by_text_and_vocabulary(models_dir, paragraph, tiktoken_gpt2, tmp_path):
    from encoder import get_encoder

    # another vocabulary, as valid as GPT-2's: two tokens' ids swapped
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    encoder_json = json.loads(open(real_vocab_file("encoder.json"), encoding="utf-8").read())
    encoder_json["The"], encoder_json["Ġthe"] = encoder_json["Ġthe"], encoder_json["The"]
    (other_dir / "encoder.json").write_text(json.dumps(encoder_json), encoding="utf-8")
    shutil.copyfile(real_vocab_file("vocab.bpe"), other_dir / "vocab.bpe")
    texts = runs.dataset_texts(paragraph, "--dataset").texts
    cache_dir = os.path.join(models_dir, "token-cache")
    found = []
    for vocab_dir in (os.path.join(models_dir, "124M"), str(other_dir)):
        encoder = get_encoder(os.path.basename(vocab_dir), os.path.dirname(vocab_dir))
        path = runs.token_cache_path(cache_dir, runs.text_fingerprint(texts), runs.vocabulary_fingerprint(vocab_dir))
        assert runs.cached_tokens(path) is None
        runs.save_tokens(runs.tokenize(texts, encoder), path)
        found.append(runs.cached_tokens(path).tolist())
        assert found[-1] == encoder.encode(PARAGRAPH) + [50256]
    assert found[0] == tiktoken_gpt2.encode(PARAGRAPH) + [50256] and found[0] != found[1]
    assert len(os.listdir(cache_dir)) == 2  # nothing temporary left


def test_a_damaged_token_cache_is_tokenized_again(models_dir, paragraph):
    train.main(paragraph, "run", max_steps=1, models_dir=models_dir, **OPTIONS)
    [cached] = os.listdir(os.path.join(models_dir, "token-cache"))
    path = os.path.join(models_dir, "token-cache", cached)
    tokens = np.load(path)
    for damage in (b"", open(path, "rb").read()[:100]):
        with open(path, "wb") as f:
            f.write(damage)
        train.main(paragraph, "run", max_steps=1, overwrite=True, models_dir=models_dir, **OPTIONS)
        np.testing.assert_array_equal(np.load(path), tokens)


# ---------------------------------------------------------------------------------------------- damage

def damage_state(run_dir, change):
    path = os.path.join(run_dir, "train_state.npz")
    with np.load(path) as state:
        arrays = {key: state[key] for key in state.files}
    change(arrays)
    os.remove(path)
    np.savez(path, **arrays)


def nan_in_weights(run_dir):
    """The save's checkpoint written again with one weight nan (in place: the save's folder is the run's)."""
    hparams = utils.load_hparams(run_dir)
    flat = utils.read_tf_checkpoint(utils.checkpoint_prefix(run_dir), hparams["n_layer"])
    flat["ln_f/g"][3] = np.nan
    written = run_dir + ".nan"
    utils.save_release_model(written, utils.nest(flat, hparams["n_layer"]), hparams, run_dir)
    for name in os.listdir(written):
        if name.startswith(("model.ckpt", "checkpoint")):
            os.replace(os.path.join(written, name), os.path.join(run_dir, name))


def truncate(path, size):
    def damage(run_dir):
        data = open(os.path.join(run_dir, path), "rb").read()
        with open(os.path.join(run_dir, path), "wb") as f:
            f.write(data[:size] if size >= 0 else data[:len(data) // 2])
    return damage


def replace_with(path, content):
    def damage(run_dir):
        os.remove(os.path.join(run_dir, path))
        if content is not None:
            with open(os.path.join(run_dir, path), "wb") as f:
                f.write(content)
    return damage


DAMAGES = [  # (what, how, what the one line says)
    ("state truncated", truncate("train_state.npz", -1), "train_state.npz is damaged"),
    ("state empty", truncate("train_state.npz", 0), "train_state.npz is empty"),
    ("state garbage", replace_with("train_state.npz", b"not a zip file" * 100), "train_state.npz is damaged"),
    ("state missing a key", lambda d: damage_state(d, lambda a: a.pop("v/wte")), "train_state.npz has no v/wte"),
    ("state rng garbage", lambda d: damage_state(d, lambda a: a.update(rng=np.array("{garbage"))),
     "train_state.npz holds no valid state of the batch generator"),
    ("state rng wrong", lambda d: damage_state(d, lambda a: a.update(rng=np.array('{"bit_generator": "MT"}'))),
     "train_state.npz holds no valid state of the batch generator"),
    ("moment of the wrong shape", lambda d: damage_state(d, lambda a: a.update({"m/ln_f/g": np.zeros(1, np.float32)})),
     "train_state.npz holds m/ln_f/g as float32 [1], where the weight is float32 [16]"),
    ("moment not finite", lambda d: damage_state(d, lambda a: a["v/h0/mlp/c_fc/b"].__setitem__(0, np.inf)),
     "train_state.npz holds numbers that are not finite (inf or nan) in v/h0/mlp/c_fc/b"),
    ("weights not finite", nan_in_weights, "model.ckpt holds weights that are not finite (NaN) in ln_f/g"),
    ("step garbage", lambda d: damage_state(d, lambda a: a.update(step=np.array("two"))), "no valid step"),
    ("log missing", replace_with("log.csv", None), "log.csv is missing"),
    ("log empty", replace_with("log.csv", b""), "log.csv is empty"),
    ("log garbled", replace_with("log.csv", b"step,train_loss,val_loss,lr,tokens_per_s,session\n1,9.1,,0.01,5,1\n"
                                            b"x,y\n"), "log.csv is garbled at row 3"),
    ("log header", replace_with("log.csv", b"\x00\x01garbage\n1,2\n"), "log.csv is garbled: its header"),
    ("log short", lambda d: open(os.path.join(d, "log.csv"), "r+").truncate(
        len("".join(open(os.path.join(d, "log.csv")).readlines()[:2]))), "log.csv has rows for 1 steps, not the 2 saved"),
    ("checkpoint missing", replace_with("checkpoint", None), "checkpoint is missing"),
    ("checkpoint empty", replace_with("checkpoint", b""), "checkpoint is empty"),
    ("checkpoint garbage", replace_with("checkpoint", b"garbage"), "checkpoint names no checkpoint"),
    ("data truncated", truncate("model.ckpt.data-00000-of-00001", -1), "cannot read the checkpoint"),
    ("hparams missing", replace_with("hparams.json", None), "hparams.json is missing"),
    ("hparams empty", replace_with("hparams.json", b""), "hparams.json is empty"),
    ("hparams garbage", replace_with("hparams.json", b"{"), "hparams.json not valid JSON"),
    ("config garbage", replace_with("train_config.json", b"{"), "train_config.json cannot be read"),
    ("config wrong", replace_with("train_config.json", b"[]"), "train_config.json is not a record train.py wrote"),
]


@pytest.mark.parametrize("what, damage, message", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_a_damaged_run_is_one_line_naming_the_file(run_copy, what, damage, message):
    models_dir, dataset = run_copy
    run_dir = os.path.join(models_dir, "run")
    damage(os.path.realpath(run_dir))
    with pytest.raises(utils.ModelError) as refused:
        train.main(dataset, "run", resume=True, max_steps=3, models_dir=models_dir)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert str(refused.value).startswith(run_dir) or "cannot read the checkpoint" in message
    if "can still start a new run" in str(refused.value):  # the hint names the run, not a tensor of it
        assert "(--init_from run --out_name NEW)" in str(refused.value)
    assert "--overwrite" in str(refused.value)


def test_a_damaged_run_on_the_command_line_is_one_error_line_and_exit_1(run_copy):
    models_dir, dataset = run_copy
    truncate("train_state.npz", -1)(os.path.realpath(os.path.join(models_dir, "run")))
    resumed = run_train("--out_name", "run", "--resume", "--max_steps", "3", "--models_dir", models_dir)
    out, err = finish(resumed)
    assert resumed.returncode == 1 and not out
    assert err.startswith(f"error: {os.path.join(models_dir, 'run', 'train_state.npz')} is damaged") and \
        err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------- disks

def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_save(tmp_path, paragraph):
    with small_disk(tmp_path / "disk", "16m") as disk:
        models_dir = vocabulary_only(os.path.join(disk, "models"))  # 1.5 MB; one save is about 11 MB
        full = run_train("--dataset", paragraph, "--out_name", "run", *CLI_OPTIONS, "--max_steps", "3",
                         "--models_dir", models_dir)
        out, err = finish(full)
        assert full.returncode == 1 and not out
        last = err.splitlines()[-1]
        assert last == (f"error: could not save step 2 of {os.path.join(models_dir, 'run')}: No space left on "
                        f"device; {os.path.join(models_dir, 'run')} keeps its last save"), err
        assert "Traceback" not in err
        assert os.listdir(os.path.join(models_dir, ".run.saves")) == [  # the partial save is gone
            os.readlink(os.path.join(models_dir, "run")).split("/")[1]]
        _, _, params = utils.load_encoder_hparams_and_params("run", models_dir)
        with np.load(os.path.join(models_dir, "run", "train_state.npz")) as state:
            assert int(state["step"]) == 1


def test_a_full_disk_during_the_token_cache_is_one_line_and_leaves_nothing(tmp_path, paragraph):
    with small_disk(tmp_path / "disk", "2m") as disk:
        models_dir = vocabulary_only(os.path.join(disk, "models"))
        fd = os.open(os.path.join(disk, "filler"), os.O_WRONLY | os.O_CREAT)  # the rest of the disk
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        for _ in range(2):  # a retry leaves nothing either
            full = run_train("--dataset", paragraph, "--out_name", "run", *CLI_OPTIONS, "--max_steps", "1",
                             "--models_dir", models_dir)
            out, err = finish(full)
            assert full.returncode == 1 and not out
            assert err.startswith(f"error: cannot write the token cache {os.path.join(models_dir, 'token-cache')}")
            assert err.endswith(": No space left on device\n") and err.count("\n") == 1, err
            assert os.listdir(os.path.join(models_dir, "token-cache")) == []
            assert not os.path.lexists(os.path.join(models_dir, "run"))


def test_a_read_only_models_folder_is_one_line(tmp_path, paragraph):
    source = vocabulary_only(tmp_path / "models")
    with read_only(source, tmp_path / "ro") as models_dir:
        refused = run_train("--dataset", paragraph, "--out_name", "run", *CLI_OPTIONS, "--max_steps", "1",
                            "--models_dir", str(models_dir))
        out, err = finish(refused)
    assert (refused.returncode, out, err) == (2, "", f"error: cannot write in --models_dir {models_dir}: "
                                                     f"read-only file system\n")


def test_an_empty_models_dir_is_one_line(paragraph):
    refused = run_train("--dataset", paragraph, "--out_name", "run", "--models_dir", "")
    out, err = finish(refused)
    assert (refused.returncode, out, err) == (2, "", "error: --models_dir must name a folder, got ''\n")


# ---------------------------------------------------------------------------------------------- the dataset

def test_a_fifo_or_a_device_as_dataset_is_refused_by_name(models_dir, tmp_path):
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    for path, kind in ((str(fifo), "a FIFO"), ("/dev/zero", "a character device")):
        with pytest.raises(utils.UsageError, match=f"^--dataset {path} is {kind}, not a file or folder$"):
            train.main(path, "run", max_steps=1, models_dir=models_dir, **OPTIONS)


def test_odd_files_in_a_dataset_folder_are_skipped_and_named(models_dir, tmp_path, capfd):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(PARAGRAPH, encoding="utf-8")
    os.mkfifo(folder / "b.txt")  # opening it would wait for a writer for ever
    os.symlink("/dev/zero", folder / "c.txt")  # reading it would never end
    os.symlink(str(folder / "gone"), folder / "d.txt")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(folder / "e.txt"))
    try:
        texts = runs.dataset_texts(str(folder), "--dataset").texts
    finally:
        listening.close()
    assert texts == [PARAGRAPH]
    assert capfd.readouterr().err.splitlines() == [
        f"warning: --dataset {folder}: skipping b.txt, a FIFO", f"warning: --dataset {folder}: skipping c.txt, a "
        f"character device", f"warning: --dataset {folder}: skipping d.txt, a broken link",
        f"warning: --dataset {folder}: skipping e.txt, a socket"]


def test_a_link_that_loops_or_runs_through_a_file_is_skipped_as_a_broken_link(models_dir, tmp_path, capfd):
    """os.stat of such a link fails with ELOOP or ENOTDIR, not FileNotFoundError: it was one error ending the run,
    where a link to nothing is skipped."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(PARAGRAPH, encoding="utf-8")
    os.symlink("b.txt", folder / "b.txt")  # itself
    os.symlink("a.txt/x", folder / "c.txt")  # through a file
    assert runs.dataset_texts(str(folder), "--val_dataset").texts == [PARAGRAPH]
    assert capfd.readouterr().err.splitlines() == [
        f"warning: --val_dataset {folder}: skipping {name}, a broken link" for name in ("b.txt", "c.txt")]


def unreadable(path, monkeypatch):
    """chmod 000, and where that does not stop reads (root), os.open refusing path as chmod 000 would."""
    os.chmod(path, 0)
    if os.geteuid() == 0:
        real = os.open

        def refuse(file, *args, **kwargs):
            if os.path.abspath(file) == str(path):
                raise PermissionError(13, "Permission denied", file)
            return real(file, *args, **kwargs)
        monkeypatch.setattr(os, "open", refuse)


@pytest.mark.parametrize("flag", ["dataset", "val_dataset"])
def test_an_unreadable_text_file_in_a_dataset_folder_is_one_error_naming_it(models_dir, tmp_path, monkeypatch,
                                                                            flag):
    """Unlike a FIFO or a broken link, which can hold no text, an unreadable .txt is text the run was asked to
    learn from: skipping it would train on less than was given, without a word but a warning. Reported as an
    undecodable file is: one line naming it (UsageError: exit 2), before any work."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(PARAGRAPH, encoding="utf-8")
    (folder / "b.txt").write_text(PARAGRAPH, encoding="utf-8")
    unreadable(folder / "b.txt", monkeypatch)
    paths = {"dataset": str(folder), "val_dataset": str(folder)}
    if flag == "val_dataset":
        paths["dataset"] = str(tmp_path / "train.txt")
        (tmp_path / "train.txt").write_text(PARAGRAPH, encoding="utf-8")
    with pytest.raises(utils.UsageError, match=f"^--{flag} {folder / 'b.txt'}: Permission denied$"):
        train.main(paths["dataset"], "run", val_dataset=paths["val_dataset"], max_steps=1, models_dir=models_dir,
                   **OPTIONS)
    assert not os.path.lexists(os.path.join(models_dir, "run"))


def test_odd_files_in_a_validation_folder_never_hang_train_py(models_dir, paragraph, tmp_path):
    """The command line, end to end: a FIFO, a socket and broken links in --val_dataset are skipped with a line
    each and the run trains; a FIFO given as --val_dataset itself is one line, exit 2."""
    folder = tmp_path / "val"
    folder.mkdir()
    (folder / "a.txt").write_text(PARAGRAPH, encoding="utf-8")
    os.mkfifo(folder / "b.txt")
    os.symlink(str(folder / "gone"), folder / "c.txt")
    os.symlink("d.txt", folder / "d.txt")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(folder / "e.txt"))
    try:
        trained = run_train("--dataset", paragraph, "--val_dataset", str(folder), "--out_name", "run", *CLI_OPTIONS,
                            "--max_steps", "1", "--models_dir", models_dir)
        out, err = finish(trained, timeout=300)
    finally:
        listening.close()
    assert trained.returncode == 0 and "Traceback" not in err, err
    for name, why in (("b.txt", "a FIFO"), ("c.txt", "a broken link"), ("d.txt", "a broken link"),
                      ("e.txt", "a socket")):
        assert f"warning: --val_dataset {folder}: skipping {name}, {why}\n" in err
    refused = run_train("--dataset", paragraph, "--val_dataset", str(folder / "b.txt"), "--out_name", "other",
                        *CLI_OPTIONS, "--max_steps", "1", "--models_dir", models_dir)
    out, err = finish(refused, timeout=300)
    assert (refused.returncode, out, err) == (2, "", f"error: --val_dataset {folder / 'b.txt'} is a FIFO, not a file "
                                                     f"or folder\n")


def test_a_validation_split_too_short_to_score_is_one_line(models_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("one two three four five six seven eight nine", encoding="utf-8")  # 9 tokens + <|endoftext|>
    with pytest.raises(utils.UsageError, match="the validation text is 1 token: a validation loss needs at least 2"):
        train.main(str(short), "run", max_steps=1, models_dir=models_dir, **{**OPTIONS, "eval_every": 1})


AT_THE_LOCK = """
import os, sys, time
import runs, train
ready, go = sys.argv.pop(1), sys.argv.pop(1)
real = runs.Run.__enter__
def enter(self):  # setup done (the name was free), the run's lock not taken yet: wait there for the test
    open(ready, "w").close()
    deadline = time.monotonic() + 300
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return real(self)
runs.Run.__enter__ = enter
train.cli()
"""


@pytest.mark.parametrize("order", ["together", "one after the other"])
def test_two_new_runs_on_one_name_at_once_one_wins_and_the_other_is_one_line(models_dir, paragraph, tmp_path,
                                                                              order):
    """Both found the name free and are past every check; then both take the run's lock at once (together), or
    the second only once the first has finished (its check that the name is free is then stale). One trains; the
    other is one line, exit 2, and leaves the winner's run whole and resumable."""
    run_dir = os.path.join(models_dir, "run")
    flags = [f"{tmp_path}/{which}" for n in (0, 1) for which in (f"ready{n}", f"go{n}")]
    racers = [subprocess.Popen([sys.executable, "-c", AT_THE_LOCK, *flags[2 * n:2 * n + 2], "--dataset", paragraph,
                                "--out_name", "run", *CLI_OPTIONS, "--max_steps", "3", "--models_dir", models_dir],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    for n, racer in enumerate(racers):
        wait_for(lambda: os.path.exists(flags[2 * n]), racer, f"racer {n} at the lock", timeout=300)
    if order == "together":
        for n in (0, 1):
            open(flags[2 * n + 1], "w").close()
        results = [finish(racer, timeout=300) for racer in racers]
    else:
        open(flags[1], "w").close()
        results = [finish(racers[0], timeout=300)]
        open(flags[3], "w").close()
        results.append(finish(racers[1], timeout=300))
    codes = [racer.returncode for racer in racers]
    assert sorted(codes) == [0, 2], results
    out, err = results[codes.index(2)]
    refusals = (f"error: another process is writing {run_dir}\n",
                f"error: {run_dir} already exists: --resume continues it, --overwrite starts it again\n")
    assert out == "" and err in (refusals if order == "together" else refusals[1:]), err
    saved = runs.read_saved_run(run_dir)
    assert saved.step == 3 and [int(r["step"]) for r in saved.rows] == [1, 2, 3]
    assert os.listdir(os.path.join(models_dir, ".run.saves")) == [os.path.basename(os.readlink(run_dir))]
    train.main(paragraph, "run", resume=True, max_steps=4, models_dir=models_dir)
    assert runs.read_saved_run(run_dir).step == 4


# ---------------------------------------------------------------------------------------------- readers

def test_loading_a_run_while_it_saves_never_warns(run_copy, capfd):
    """gpt2.py loading a run (and writing its numpy-params/ into the current save) while the run saves every
    step: the run never switches its name, nor removes a save, while a reader converts it."""
    models_dir, dataset = run_copy
    trainer = run_train("--out_name", "run", "--resume", "--max_steps", "100000", "--models_dir", models_dir)
    try:
        wait_for(lambda: len(read_log(os.path.join(models_dir, "run"))) >= 4, trainer, "fourth save")
        steps = set()
        for _ in range(200):  # until the loads have overlapped a few saves, however slow the machine
            _, hparams, params = utils.load_encoder_hparams_and_params("run", models_dir)
            assert params["wte"].shape == (50257, 16)
            steps.add(len(read_log(os.path.join(models_dir, "run"))))
            if len(steps) >= 4 or trainer.poll() is not None:
                break
    finally:
        trainer.kill()
        finish(trainer)
    assert len(steps) > 1  # the loads did overlap saves
    assert "warning" not in capfd.readouterr().err



def test_resume_beside_a_run_training_now_is_refused_before_its_save_is_read(run_copy, tmp_path):
    """A run that trains saves again and removes the save a second --resume would be reading: the second one is
    refused by the writer lock, never told that a healthy run is damaged."""
    models_dir, dataset = run_copy
    run_dir = os.path.join(models_dir, "run")
    open(os.path.join(run_dir, runs.STATE_FILE), "wb").close()  # were it read, this would be "is empty"
    held = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, utils\nwith utils.exclusive(sys.argv[1]):\n"
                               "    open(sys.argv[2], 'w').close(); sys.stdin.read()", run_dir, str(held)],
                              cwd=ROOT, stdin=subprocess.PIPE, text=True)
    try:
        wait_for(held.exists, holder, "lock taken by the other process", timeout=60)
        with pytest.raises(utils.UsageError, match=f"^another process is writing {run_dir}$"):
            train.main(dataset, "run", resume=True, max_steps=3, models_dir=models_dir)
    finally:
        finish(holder, timeout=60)  # which closes the holder's stdin: it releases the lock and exits
