"""Fetch OpenAI's GPT-2 release files and load the checkpoint into a nested dict of float32 arrays."""
import json
import os
import re

import numpy as np
import requests
from tqdm import tqdm

from encoder import get_encoder

RELEASE_SIZES = ("124M", "355M", "774M", "1558M")
RELEASE_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
                 "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
RELEASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"

# Checkpoint variable names below "model/"; every block "h{i}/" holds the same twelve.
TOP_TENSORS = ("wte", "wpe", "ln_f/g", "ln_f/b")
BLOCK_TENSORS = ("ln_1/g", "ln_1/b", "attn/c_attn/w", "attn/c_attn/b", "attn/c_proj/w", "attn/c_proj/b",
                 "ln_2/g", "ln_2/b", "mlp/c_fc/w", "mlp/c_fc/b", "mlp/c_proj/w", "mlp/c_proj/b")


def tensor_names(n_layer):
    return [*TOP_TENSORS, *(f"h{i}/{name}" for i in range(n_layer) for name in BLOCK_TENSORS)]


class ModelError(RuntimeError):
    """A model that cannot be downloaded or loaded; the CLI prints the message and exits with 1."""


def download_file(url, path):
    try:
        response = requests.get(url, stream=True, timeout=30)
        response.raise_for_status()
    except requests.RequestException as e:
        raise ModelError(f"could not download {url}: {e}") from e
    total = int(response.headers.get("content-length", 0))
    partial = path + ".part"
    with open(partial, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
        for chunk in response.iter_content(chunk_size=1 << 20):
            bar.update(f.write(chunk))
    os.replace(partial, path)  # atomic: a file under its final name is complete


def download_release(model_size, model_dir):
    os.makedirs(model_dir, exist_ok=True)
    for filename in RELEASE_FILES:
        path = os.path.join(model_dir, filename)
        if not os.path.exists(path):
            download_file(f"{RELEASE_URL}/{model_size}/{filename}", path)


def checkpoint_prefix(model_dir):
    """The checkpoint's path prefix, as named in the `checkpoint` file (relative to the model folder)."""
    with open(os.path.join(model_dir, "checkpoint"), encoding="utf-8") as f:
        match = re.search(r'^model_checkpoint_path: "(.*)"', f.read(), re.MULTILINE)
    return os.path.join(model_dir, match.group(1))


def read_tf_checkpoint(prefix, n_layer):
    """{name: float32 array} for every model tensor, the [1, in, out] conv weights squeezed to [in, out]."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up chatter is not for our users
    import tensorflow as tf  # slow to import, so only when a checkpoint is actually read

    reader = tf.train.load_checkpoint(prefix)
    flat = {}
    for name in tensor_names(n_layer):
        array = reader.get_tensor(f"model/{name}").astype(np.float32)
        flat[name] = array[0] if array.ndim == 3 else array
    return flat


def nest(flat, n_layer):
    """{"h3/attn/c_attn/w": array} -> params["blocks"][3]["attn"]["c_attn"]["w"]: the tree gpt2.py unpacks."""
    params = {"blocks": [{} for _ in range(n_layer)]}
    for name, array in flat.items():
        keys = name.split("/")
        tree = params
        if keys[0].startswith("h"):  # "h3" is block 3; no top-level name starts with "h"
            tree = params["blocks"][int(keys.pop(0)[1:])]
        for key in keys[:-1]:
            tree = tree.setdefault(key, {})
        tree[keys[-1]] = array
    return params


def load_encoder_hparams_and_params(model_size, models_dir):
    model_dir = os.path.join(models_dir, model_size)
    if model_size in RELEASE_SIZES:
        download_release(model_size, model_dir)
    encoder = get_encoder(model_size, models_dir)
    with open(os.path.join(model_dir, "hparams.json"), encoding="utf-8") as f:
        hparams = json.load(f)
    flat = read_tf_checkpoint(checkpoint_prefix(model_dir), hparams["n_layer"])
    return encoder, hparams, nest(flat, hparams["n_layer"])
