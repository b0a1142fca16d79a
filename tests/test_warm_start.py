"""Converted params kept beside the checkpoint: later runs map them without TensorFlow, and rebuild them
whenever they no longer match the checkpoint or their own checksums."""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import gpt2
import utils
from tests.conftest import ROOT
from tests.release_layout import write_model_dir

CONVERTED = "numpy-params"


@pytest.fixture
def model_copy(tmp_path, tiny_model):
    shutil.copytree(tiny_model.path, tmp_path / "tiny", ignore=shutil.ignore_patterns(CONVERTED))
    return tmp_path


def run_cli_without_tensorflow(models_dir, blocker=None):
    """The real CLI, in a process where `import tensorflow` fails."""
    blocker = blocker or os.path.join(models_dir, "no_tf")
    os.makedirs(blocker, exist_ok=True)
    with open(os.path.join(blocker, "tensorflow.py"), "w") as f:
        f.write("raise ImportError('tensorflow was imported')\n")
    env = {**os.environ, "PYTHONPATH": blocker}
    return subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), "Hello", "--n_tokens_to_generate", "3",
                           "--model_size", "tiny", "--models_dir", str(models_dir)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_second_run_does_not_import_tensorflow(model_copy):
    first = run_cli_without_tensorflow(model_copy)
    assert first.returncode != 0 and "tensorflow was imported" in first.stderr  # the first run needs it
    utils.load_encoder_hparams_and_params("tiny", str(model_copy))  # converts, with TensorFlow
    second = run_cli_without_tensorflow(model_copy)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip()


def test_converted_params_are_memory_mapped_float32(model_copy, tiny_model):
    utils.load_encoder_hparams_and_params("tiny", str(model_copy))
    _, _, params = utils.load_encoder_hparams_and_params("tiny", str(model_copy))
    w = params["blocks"][0]["attn"]["c_attn"]["w"]
    assert isinstance(w.base, np.memmap) and w.dtype == np.float32
    np.testing.assert_array_equal(w, tiny_model.tensors["model/h0/attn/c_attn/w"][0])


def load_wte(models_dir):
    return utils.load_encoder_hparams_and_params("tiny", str(models_dir))[2]["wte"]


def test_changed_checkpoint_is_converted_again(model_copy):
    before = load_wte(model_copy).copy()
    # a fine-tuning run overwrites the checkpoint in place
    _, tensors = write_model_dir(str(model_copy / "tiny"), n_layer=2, n_embd=64, n_head=4, seed=7)
    after = load_wte(model_copy)
    np.testing.assert_array_equal(after, tensors["model/wte"])
    assert not np.array_equal(after, before)


def test_same_size_checkpoint_with_restored_times_is_converted_again(model_copy, tmp_path):
    """A fine-tune of the same shapes copied over the old checkpoint by a tool that restores modification times
    (tar, rsync -t, zip): sizes and times are the old ones, only the contents differ."""
    load_wte(model_copy)
    _, tensors = write_model_dir(str(tmp_path / "fine-tuned"), n_layer=2, n_embd=64, n_head=4, seed=7)
    for name in utils.RELEASE_FILES:
        old, new = model_copy / "tiny" / name, tmp_path / "fine-tuned" / name
        times, size = (os.stat(old).st_atime_ns, os.stat(old).st_mtime_ns), os.path.getsize(old)
        shutil.copyfile(new, old)
        os.utime(old, ns=times)
        assert os.path.getsize(old) == size
    np.testing.assert_array_equal(load_wte(model_copy), tensors["model/wte"])


@pytest.mark.parametrize("damage", ["truncate_npy", "delete_npy", "garbage_manifest", "delete_manifest",
                                    "zeroed_tail", "nan", "weight_of_another_shape"])
def test_damaged_conversion_is_rebuilt_not_used(model_copy, tiny_model, damage):
    load_wte(model_copy)
    converted = model_copy / "tiny" / CONVERTED
    npy = converted / "wte.npy"
    size = os.path.getsize(npy)
    if damage == "truncate_npy":
        os.truncate(npy, size // 2)
    elif damage == "zeroed_tail":  # a crash before the data reached the disk: right size, zeros at the end
        os.truncate(npy, size - 4096)
        os.truncate(npy, size)
    elif damage == "nan":
        with open(npy, "r+b") as f:
            f.seek(size - tiny_model.tensors["model/wte"].nbytes // 2)  # the middle weight: data ends the file
            f.write(np.float32("nan").tobytes())
    elif damage == "delete_npy":
        os.remove(npy)
    elif damage == "weight_of_another_shape":  # a 1-d array where a linear weight [in, out] belongs
        np.save(converted / "h0.attn.c_attn.w.npy", np.zeros(10, dtype=np.float32))
    elif damage == "garbage_manifest":
        (converted / "manifest.json").write_text("{not json")
    else:
        os.remove(converted / "manifest.json")
    np.testing.assert_array_equal(load_wte(model_copy), tiny_model.tensors["model/wte"])
    assert os.path.getsize(npy) > tiny_model.tensors["model/wte"].nbytes  # rebuilt whole


@pytest.mark.parametrize("shape, order", [((6, 4), "C"), ((6, 4), "F"), ((3, 5), "F"), ((7,), "C")],
                         ids=["even C", "even F", "odd F", "odd 1-d"])
def test_checksum_sees_every_word_of_either_layout(shape, order):
    array = np.asarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32), order=order)
    assert utils.checksum(array) == utils.checksum(array.copy(order=order))
    for index in [(0,) * len(shape), tuple(n - 1 for n in shape)]:  # the first and the last word in memory
        damaged = array.copy(order=order)
        damaged[index] = np.nan
        assert utils.checksum(damaged) != utils.checksum(array)
    zeroed = array.copy(order=order)
    zeroed.reshape(-1, order="A")[-2:] = 0  # the tail, in memory order
    assert utils.checksum(zeroed) != utils.checksum(array)


def test_weights_are_laid_out_as_decode_streams_them_fastest(model_copy):
    """c_attn and c_fc (they widen) row-major, the two c_proj column-major (utils.decode_order), whether read
    from the checkpoint or mapped from the converted copy; the values are the checkpoint's either way."""
    for _ in range(2):  # converting, then mapped
        block = utils.load_encoder_hparams_and_params("tiny", str(model_copy))[2]["blocks"][0]
        assert block["attn"]["c_attn"]["w"].flags.c_contiguous and block["mlp"]["c_fc"]["w"].flags.c_contiguous
        assert block["attn"]["c_proj"]["w"].flags.f_contiguous and block["mlp"]["c_proj"]["w"].flags.f_contiguous
        assert not block["attn"]["c_attn"]["w"].flags.f_contiguous
        assert not block["mlp"]["c_proj"]["w"].flags.c_contiguous


@pytest.mark.parametrize("order", ["F", "C"])
def test_wte_is_stored_in_the_order_lm_head_order_chose_and_kept_in_it(model_copy, tiny_model, monkeypatch, order):
    """The converted copy holds wte in the order the LM head was timed fastest in; a later process that would
    choose the other order still maps the copy as it is (not converted again), and the logits are the same."""
    def load():
        return utils.load_encoder_hparams_and_params("tiny", str(model_copy))[2]

    monkeypatch.setattr(utils, "lm_head_order", lambda n_vocab, n_embd: order)
    params = load()
    other_order = "CF".replace(order, "")
    assert params["wte"].flags[order + "_CONTIGUOUS"] and not params["wte"].flags[other_order + "_CONTIGUOUS"]
    np.testing.assert_array_equal(params["wte"], tiny_model.tensors["model/wte"])
    wte_file = model_copy / "tiny" / CONVERTED / "wte.npy"
    written = wte_file.stat().st_mtime_ns
    monkeypatch.setattr(utils, "lm_head_order", lambda n_vocab, n_embd: other_order)
    mapped = load()
    assert mapped["wte"].flags[order + "_CONTIGUOUS"] and wte_file.stat().st_mtime_ns == written
    ids = [464, 2068, 7586, 21831]
    other = {**mapped, "wte": np.asarray(mapped["wte"], order=other_order)}
    np.testing.assert_allclose(gpt2.gpt2(ids, **mapped, n_head=4), gpt2.gpt2(ids, **other, n_head=4),
                               rtol=1e-5, atol=1e-5)


class SlowProduct(np.ndarray):
    """A matrix whose products take 20 ms longer: the order lm_head_order must not choose."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        time.sleep(0.02)
        return getattr(ufunc, method)(*(np.asarray(a) for a in inputs), **kwargs)


@pytest.mark.parametrize("slow", ["C", "F"])
def test_lm_head_order_chooses_the_order_whose_product_is_faster(monkeypatch, slow):
    real_ones = np.ones

    def ones(shape, dtype=None, order="C"):
        array = real_ones(shape, dtype=dtype, order=order)
        return array.view(SlowProduct) if order == slow and shape[0] > 1 else array  # not x, the vector
    monkeypatch.setattr(utils, "HEAD_TIMED_BYTES", 1 << 16)
    monkeypatch.setattr(utils.np, "ones", ones)
    assert utils.lm_head_order.__wrapped__(1000, 64) == "CF".replace(slow, "")


def test_a_head_that_fits_the_caches_is_not_timed(monkeypatch):
    def ones(*args, **kwargs):
        raise AssertionError("timed")
    monkeypatch.setattr(utils.np, "ones", ones)
    assert utils.lm_head_order.__wrapped__(50257, 64) == "C"  # 12.9 MB, as the tests' models


def test_a_copy_converted_in_the_earlier_layout_is_converted_again(model_copy, tiny_model):
    """Before decode_order every weight was stored column-major: such a copy (whose own checksums match) is
    rebuilt in today's layout rather than used, and the weights are the same numbers."""
    flat = utils.read_tf_checkpoint(utils.checkpoint_prefix(str(model_copy / "tiny")), 2)
    earlier = {name: np.asfortranarray(a) if name.endswith("/w") else a for name, a in flat.items()}
    converted = str(model_copy / "tiny" / CONVERTED)
    utils.save_converted(converted, utils.checkpoint_fingerprint(utils.checkpoint_prefix(str(model_copy / "tiny"))),
                         earlier)
    c_attn = np.load(os.path.join(converted, "h0.attn.c_attn.w.npy"), mmap_mode="r")
    assert c_attn.flags.f_contiguous and not c_attn.flags.c_contiguous  # the earlier layout, as written
    block = utils.load_encoder_hparams_and_params("tiny", str(model_copy))[2]["blocks"][0]
    assert block["attn"]["c_attn"]["w"].flags.c_contiguous
    np.testing.assert_array_equal(block["attn"]["c_attn"]["w"], tiny_model.tensors["model/h0/attn/c_attn/w"][0])
    assert np.load(os.path.join(converted, "h0.attn.c_attn.w.npy"), mmap_mode="r").flags.c_contiguous  # rewritten


def write_earlier_layout_copy(model_dir):
    """numpy-params/ as the version before decode_order wrote it, every linear weight column-major: the flat params."""
    prefix = utils.checkpoint_prefix(str(model_dir))
    flat = utils.read_tf_checkpoint(prefix, 2)
    utils.save_converted(str(model_dir / CONVERTED), utils.checkpoint_fingerprint(prefix),
                         {name: np.asfortranarray(a) if name.endswith("/w") else a for name, a in flat.items()})
    return flat


def test_an_earlier_layout_copy_is_laid_out_anew_without_tensorflow(model_copy):
    flat = write_earlier_layout_copy(model_copy / "tiny")
    result = run_cli_without_tensorflow(model_copy)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and not result.stderr.strip()
    c_attn = np.load(str(model_copy / "tiny" / CONVERTED / "h0.attn.c_attn.w.npy"), mmap_mode="r")
    assert c_attn.flags.c_contiguous  # rewritten in today's layout, from the copy itself
    np.testing.assert_array_equal(c_attn, flat["h0/attn/c_attn/w"])
    assert not [name for name in os.listdir(model_copy / "tiny") if ".tmp" in name]


def test_an_earlier_layout_copy_on_a_full_disk_is_used_as_it_is(model_copy, tmp_path):
    """No room for a second copy beside it: the earlier one is mapped as it is (no TensorFlow, no warning), and
    it stays: it is the only copy there is."""
    from tests.mounts import small_disk

    flat = write_earlier_layout_copy(model_copy / "tiny")
    need = sum(a.nbytes for a in flat.values())
    used = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(model_copy / "tiny") for f in files)
    with small_disk(tmp_path / "full", f"{(used + need // 2) // 1024 + 64}k") as models_dir:
        shutil.copytree(model_copy / "tiny", models_dir / "tiny")
        assert shutil.disk_usage(models_dir).free < need
        result = run_cli_without_tensorflow(models_dir, blocker=str(tmp_path / "no_tf"))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() and not result.stderr.strip()
        c_attn = np.load(str(models_dir / "tiny" / CONVERTED / "h0.attn.c_attn.w.npy"), mmap_mode="r")
        assert c_attn.flags.f_contiguous and not c_attn.flags.c_contiguous  # the earlier copy, kept
        np.testing.assert_array_equal(c_attn, flat["h0/attn/c_attn/w"])
        assert not [name for name in os.listdir(models_dir / "tiny") if ".tmp" in name]


def test_an_earlier_layout_copy_in_a_read_only_folder_is_used_as_it_is(tmp_path, model_copy):
    """A copy in the earlier layout that cannot be rewritten (a read-only folder) is still the checkpoint's
    numbers: it is mapped as it is, without TensorFlow, rather than the checkpoint read on every run."""
    from tests.mounts import read_only

    flat = write_earlier_layout_copy(model_copy / "tiny")
    with read_only(model_copy, tmp_path / "ro") as models_dir:
        result = run_cli_without_tensorflow(models_dir, blocker=str(tmp_path / "no_tf"))
        block = utils.load_encoder_hparams_and_params("tiny", str(models_dir))[2]["blocks"][0]
        np.testing.assert_array_equal(block["attn"]["c_attn"]["w"], flat["h0/attn/c_attn/w"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
