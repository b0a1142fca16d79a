"""Loading release-layout checkpoints into the params tree."""

import numpy as np

from tests.release_layout import write_model_dir
from utils import load_encoder_hparams_and_params


def test_params_tree_mirrors_checkpoint_names(tiny_model):
    encoder, hparams, params = load_encoder_hparams_and_params(tiny_model.name, tiny_model.models_dir)
    assert hparams == tiny_model.hparams
    assert len(params["blocks"]) == hparams["n_layer"]
    t = tiny_model.tensors
    np.testing.assert_array_equal(params["wte"], t["model/wte"])
    np.testing.assert_array_equal(params["ln_f"]["g"], t["model/ln_f/g"])
    np.testing.assert_array_equal(params["blocks"][1]["attn"]["c_attn"]["w"], t["model/h1/attn/c_attn/w"][0])
    np.testing.assert_array_equal(params["blocks"][1]["mlp"]["c_proj"]["b"], t["model/h1/mlp/c_proj/b"])
    assert params["blocks"][0]["mlp"]["c_fc"]["w"].shape == (64, 256)  # [1, in, out] -> [in, out]
    assert sorted(params["blocks"][0]) == ["attn", "ln_1", "ln_2", "mlp"]

    def leaves(tree):
        if isinstance(tree, dict):
            return [leaf for value in tree.values() for leaf in leaves(value)]
        if isinstance(tree, list):
            return [leaf for value in tree for leaf in leaves(value)]
        return [tree]

    assert len(leaves(params)) == 4 + 12 * hparams["n_layer"]
    assert all(leaf.dtype == np.float32 for leaf in leaves(params))
    assert encoder.encode(" hello") == [23748]


def test_fine_tuned_folder_with_other_checkpoint_name_loads(tmp_path, tiny_model):
    # gpt-2-simple saves runs as models_dir/run1 with checkpoints named model-<step>
    write_model_dir(str(tmp_path / "run1"), n_layer=1, n_embd=32, n_head=2, n_ctx=64, seed=3, prefix="model-1000")
    _, hparams, params = load_encoder_hparams_and_params("run1", str(tmp_path))
    assert hparams["n_layer"] == 1 and params["wpe"].shape == (64, 32)


def test_absolute_checkpoint_path_from_another_machine_is_found_in_the_folder(tmp_path):
    # gpt-2-simple on Colab names the checkpoint by where it was written: /content/checkpoint/run1/model-1000
    _, tensors = write_model_dir(str(tmp_path / "run1"), n_layer=1, n_embd=32, n_head=2, n_ctx=64, seed=3,
                                 prefix="model-1000")
    (tmp_path / "run1" / "checkpoint").write_text('model_checkpoint_path: "/content/checkpoint/run1/model-1000"\n'
                                                  'all_model_checkpoint_paths: "/content/checkpoint/run1/model-1000"\n')
    _, _, params = load_encoder_hparams_and_params("run1", str(tmp_path))
    np.testing.assert_array_equal(params["wte"], tensors["model/wte"])
