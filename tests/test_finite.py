"""Weights holding NaN or inf are refused when a model loads, in every layout the loader reads (the release
checkpoint, its converted .npy copy, HF's model.safetensors and pytorch_model.bin): one line naming the tensor,
exit 1. Loaded, they would make every logit NaN and the scripts print garbage with exit 0."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import hf
import utils
from tests.conftest import ROOT

N_LAYER = 2
DAMAGES = {"nan": np.nan, "inf": np.inf}
# Where each damage goes (our flat name, an index), and the name each layout's message gives that tensor.
SPOT = {"nan": ("ln_f/g", (3,)), "inf": ("h1/attn/c_attn/w", (5, 7))}
NAMES = {"release": {"nan": "model/ln_f/g", "inf": "model/h1/attn/c_attn/w"},
         "safetensors": {"nan": "transformer.ln_f.weight", "inf": "transformer.h.1.attn.c_attn.weight"}}
NAMES["bin"] = NAMES["safetensors"]
NAMES["npy"] = NAMES["release"]  # an old copy is converted again from the checkpoint, which names the tensor
FOUND = {"nan": "holds NaN", "inf": "holds inf"}


def damaged_params(tiny_model, damage):
    flat = utils.read_tf_checkpoint(utils.checkpoint_prefix(tiny_model.path), N_LAYER)
    flat = {name: np.array(a) for name, a in flat.items()}
    name, index = SPOT[damage]
    flat[name][index] = DAMAGES[damage]
    return utils.nest(flat, N_LAYER)


def write_layout(folder, layout, params, tiny_model):
    """A model folder in `layout` holding params."""
    if layout in ("release", "npy"):
        utils.save_release_model(folder, params, tiny_model.hparams, tiny_model.path)
    if layout == "npy":  # a copy converted by a version that did not check: its manifest has no "finite"
        prefix = utils.checkpoint_prefix(folder)
        converted = os.path.join(folder, utils.CONVERTED)
        utils.save_converted(converted, utils.checkpoint_fingerprint(prefix), utils.flatten(params))
        manifest = utils.read_json(os.path.join(converted, "manifest.json"))
        del manifest["finite"]
        with open(os.path.join(converted, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f)
    if layout in ("safetensors", "bin"):
        hf.save_hf_model(folder, params, tiny_model.hparams, tiny_model.path)
    if layout == "bin":
        import torch
        from safetensors.numpy import load_file

        state = {name: torch.from_numpy(a) for name, a in load_file(os.path.join(folder, hf.WEIGHTS)).items()}
        torch.save(state, os.path.join(folder, hf.TORCH_WEIGHTS))
        os.remove(os.path.join(folder, hf.WEIGHTS))
    return folder


@pytest.fixture(scope="module")
def damaged_models(tmp_path_factory, tiny_model):
    """{(layout, damage): models_dir holding the model "bad"}."""
    models = {}
    for layout in NAMES:
        for damage in DAMAGES:
            models_dir = str(tmp_path_factory.mktemp(f"{layout}-{damage}"))
            write_layout(os.path.join(models_dir, "bad"), layout, damaged_params(tiny_model, damage), tiny_model)
            models[layout, damage] = models_dir
    return models


def run_script(script, *args):
    env = {**os.environ, "GPT2_MODELS_URL": "http://127.0.0.1:9"}
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_refused(result, layout, damage):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and not result.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert f"tensor {NAMES[layout][damage]} {FOUND[damage]}" in lines[0]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("layout", NAMES)
def test_nonfinite_weights_are_a_model_error(damaged_models, layout, damage):
    with pytest.raises(utils.ModelError) as refused:
        utils.load_encoder_hparams_and_params("bad", damaged_models[layout, damage])
    assert f"tensor {NAMES[layout][damage]} {FOUND[damage]}" in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("layout", NAMES)
def test_gpt2_refuses_nonfinite_weights_in_one_line(damaged_models, layout, damage):
    result = run_script("gpt2.py", "Hello", "--n_tokens_to_generate", "3", "--model_size", "bad",
                        "--models_dir", damaged_models[layout, damage])
    assert_refused(result, layout, damage)


def test_score_and_export_refuse_nonfinite_weights(damaged_models, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Hello there, how are you?")
    assert_refused(run_script("score.py", str(text), "--model_size", "bad", "--models_dir",
                              damaged_models["safetensors", "nan"]), "safetensors", "nan")
    out = tmp_path / "out"
    assert_refused(run_script("export.py", "--model_size", "bad", "--models_dir", damaged_models["release", "inf"],
                              "--out", str(out)), "release", "inf")
    assert not out.exists()


def test_nonfinite_tells_nan_from_inf_and_passes_finite_arrays():
    a = np.zeros((64, 48), dtype=np.float32, order="F")
    assert utils.nonfinite(a) is None
    a[1, 2] = np.inf
    assert utils.nonfinite(a) == "inf"
    a[3, 4] = np.nan
    assert utils.nonfinite(a, chunk=7) == "NaN and inf"
    big = np.full(8, 3e38, dtype=np.float32)  # its sum overflows to inf, yet every number is finite
    assert utils.nonfinite(big) is None


def test_a_converted_copy_is_marked_finite_and_a_clean_model_still_loads(tmp_path, tiny_model):
    shutil.copytree(tiny_model.path, tmp_path / "tiny", ignore=shutil.ignore_patterns(utils.CONVERTED))
    for _ in range(2):  # converting, then mapped
        params = utils.load_encoder_hparams_and_params("tiny", str(tmp_path))[2]
        np.testing.assert_array_equal(params["ln_f"]["g"], tiny_model.tensors["model/ln_f/g"])
    assert utils.read_json(str(tmp_path / "tiny" / utils.CONVERTED / "manifest.json"))["finite"] is True


def test_float16_export_refuses_a_weight_past_its_range(tmp_path, tiny_model):
    flat = utils.read_tf_checkpoint(utils.checkpoint_prefix(tiny_model.path), N_LAYER)
    flat = {name: np.array(a) for name, a in flat.items()}
    flat["wte"][5, 3] = 1e5  # float16's largest number is 65504: this would be written as inf
    models_dir = tmp_path / "models"
    write_layout(str(models_dir / "big"), "safetensors", utils.nest(flat, N_LAYER), tiny_model)
    out = tmp_path / "out"
    result = run_script("export.py", "--model_size", "big", "--models_dir", str(models_dir), "--out", str(out),
                        "--dtype", "float16")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "tensor transformer.wte.weight holds 100000" in lines[0] and "--dtype bfloat16" in lines[0]
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_logits_that_overflow_from_finite_weights_are_one_line_not_token_0_for_ever(tmp_path_factory):
    """Finite weights far past a trained GPT-2's (the final layer norm's gain at 1e38) load, but their forward pass
    overflows float32 at some positions: logits of NaN, from which greedy decoding took token 0 over and over."""
    import gpt2
    from tests.conftest import make_model

    model = make_model(tmp_path_factory, "overflowing", n_layer=N_LAYER, n_embd=64, n_head=4, seed=2,
                       logit_scale=1e38)
    encoder, hparams, params = utils.load_encoder_hparams_and_params(model.name, model.models_dir)
    ids = encoder.encode("Alan Turing theorized that computers would one day become")
    with np.errstate(all="ignore"):
        finite = np.isfinite(gpt2.gpt2(np.array(ids), **params, n_head=4)).all(axis=-1)
    assert finite.any() and not finite.all()  # the model itself is fine to load and run; some positions overflow
    prompt = encoder.decode(ids[:int(np.argmin(finite)) + 1])  # a prompt whose last logits are NaN
    with pytest.raises(utils.ModelError, match="logits are NaN or inf"), np.errstate(all="ignore"):
        gpt2.generate(encoder.encode(prompt), params, 4, 5)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), prompt, "--models_dir", model.models_dir,
                             "--model_size", model.name, "--n_tokens_to_generate", "5"], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert result.stderr.splitlines() == ["error: the model's logits are NaN or inf: its forward pass overflows "
                                          "float32, so nothing it generates would mean anything"]
