"""Fetch OpenAI's GPT-2 release files and load the checkpoint into a nested dict of float32 arrays."""
import glob
import json
import os
import re
import shutil

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
    """{name: float32 array} for every model tensor, the [1, in, out] conv weights squeezed to [in, out].

    The weights are laid out column-major (shape [in, out], memory [out][in]): generating one token multiplies
    a single vector by each of them, and NumPy's BLAS streams that product about 10% faster when each output's
    weights are contiguous. Results are the same either way.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up chatter is not for our users
    import tensorflow as tf  # slow to import, so only when a checkpoint is actually read

    reader = tf.train.load_checkpoint(prefix)
    flat = {}
    for name in tensor_names(n_layer):
        array = reader.get_tensor(f"model/{name}").astype(np.float32)
        flat[name] = np.asfortranarray(array[0]) if array.ndim == 3 else array
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


def checkpoint_fingerprint(prefix):
    """Size and modification time of the checkpoint's files: if either changes, the conversion is stale."""
    files = sorted(glob.glob(glob.escape(prefix) + ".data-*")) + [prefix + ".index"]
    return {os.path.basename(f): [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files}


def load_converted(converted_dir, fingerprint, n_layer):
    """The params converted on an earlier run, memory-mapped, or None if they are missing, stale or damaged."""
    try:
        with open(os.path.join(converted_dir, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest["checkpoint"] != fingerprint or sorted(manifest["shapes"]) != sorted(tensor_names(n_layer)):
            return None
        flat = {}
        for name, shape in manifest["shapes"].items():
            array = np.load(os.path.join(converted_dir, name.replace("/", ".") + ".npy"), mmap_mode="r")
            if array.shape != tuple(shape) or array.dtype != np.float32:
                return None
            flat[name] = np.asarray(array)  # a plain ndarray view of the mapping: np.memmap adds cost to every op
        return flat
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_converted(converted_dir, fingerprint, flat):
    """One .npy per tensor, so later runs map them straight from disk without importing TensorFlow.

    Written into a temporary folder that is renamed into place, with the manifest written last: a folder
    under the final name is always complete.
    """
    tmp_dir = f"{converted_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    for name, array in flat.items():
        np.save(os.path.join(tmp_dir, name.replace("/", ".") + ".npy"), array)
    manifest = {"checkpoint": fingerprint, "shapes": {name: list(a.shape) for name, a in flat.items()}}
    with open(os.path.join(tmp_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(converted_dir, ignore_errors=True)
    os.rename(tmp_dir, converted_dir)


def load_params(model_dir, n_layer):
    """Flat {name: float32 array}: mapped from the converted .npy files if they match the checkpoint,
    otherwise read from the checkpoint with TensorFlow and converted for next time."""
    prefix = checkpoint_prefix(model_dir)
    fingerprint = checkpoint_fingerprint(prefix)
    converted_dir = os.path.join(model_dir, "numpy-params")
    flat = load_converted(converted_dir, fingerprint, n_layer)
    if flat is None:
        flat = read_tf_checkpoint(prefix, n_layer)
        save_converted(converted_dir, fingerprint, flat)
    return flat


def prepare_model(model_size, models_dir):
    """The model's folder, with a release model's files downloaded if they are missing."""
    model_dir = os.path.join(models_dir, model_size)
    if model_size in RELEASE_SIZES:
        download_release(model_size, model_dir)
    return model_dir


def load_hparams(model_dir):
    with open(os.path.join(model_dir, "hparams.json"), encoding="utf-8") as f:
        return json.load(f)


def load_encoder_hparams_and_params(model_size, models_dir):
    model_dir = prepare_model(model_size, models_dir)
    hparams = load_hparams(model_dir)
    params = nest(load_params(model_dir, hparams["n_layer"]), hparams["n_layer"])
    return get_encoder(model_size, models_dir), hparams, params
