"""Fetch OpenAI's GPT-2 release files and load the checkpoint into a nested dict of float32 arrays."""
import contextlib
import glob
import json
import os
import re
import shutil
import sys
import time

import numpy as np
import requests
from tqdm import tqdm

from encoder import get_encoder

RELEASE_SIZES = ("124M", "355M", "774M", "1558M")
RELEASE_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
                 "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
RELEASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"

HPARAMS = {"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"}

# Checkpoint variable names below "model/"; every block "h{i}/" holds the same twelve.
TOP_TENSORS = ("wte", "wpe", "ln_f/g", "ln_f/b")
BLOCK_TENSORS = ("ln_1/g", "ln_1/b", "attn/c_attn/w", "attn/c_attn/b", "attn/c_proj/w", "attn/c_proj/b",
                 "ln_2/g", "ln_2/b", "mlp/c_fc/w", "mlp/c_fc/b", "mlp/c_proj/w", "mlp/c_proj/b")


def tensor_names(n_layer):
    return [*TOP_TENSORS, *(f"h{i}/{name}" for i in range(n_layer) for name in BLOCK_TENSORS)]


class UsageError(ValueError):
    """An argument that cannot work; the CLI prints the message and exits with 2."""


class ModelError(RuntimeError):
    """A model that cannot be downloaded or loaded; the CLI prints the message and exits with 1."""


class TransientError(Exception):
    """A download failure worth retrying: a dropped connection, a timeout, a 5xx, a short file."""


DOWNLOAD_ATTEMPTS = 5
RETRY_DELAY = 1.0  # seconds before the first retry, doubled for each one after it
TIMEOUT = 30  # seconds without a byte from the server


def models_url():
    """Where release files come from: $GPT2_MODELS_URL/<size>/<file>, by default OpenAI's public bucket."""
    return os.environ.get("GPT2_MODELS_URL", RELEASE_URL).rstrip("/")


def fetch(url, partial):
    """Append url's bytes to the partial file, resuming where it stops if the server honours a Range request."""
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as response:
        if response.status_code == 416:  # the partial file is not a prefix of this file: start over
            os.remove(partial)
            raise TransientError("the server refused to resume")
        if response.status_code >= 500 or response.status_code == 429:
            raise TransientError(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            raise ModelError(f"could not download {url}: HTTP {response.status_code} {response.reason}")
        if response.status_code != 206:  # the server sent the whole file, not the rest of it
            have = 0
        elif not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            os.remove(partial)
            raise TransientError("the server resumed at the wrong place")
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(partial, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=os.path.basename(url)) as bar:
            for chunk in response.iter_content(chunk_size=1 << 20):
                bar.update(f.write(chunk))
    size = os.path.getsize(partial)
    if total is not None and size != total:
        raise TransientError(f"got {size} of {total} bytes")


def download_file(url, path):
    """Download url to path. The bytes go to path + ".part" and are renamed into place only once the byte count
    matches Content-Length, so a file under its final name is always complete, even after Ctrl-C. Transient
    failures are retried with backoff, resuming the partial file."""
    partial = path + ".part"
    for attempt in range(DOWNLOAD_ATTEMPTS):
        if attempt:
            time.sleep(RETRY_DELAY * 2 ** (attempt - 1))
        try:
            fetch(url, partial)
            os.replace(partial, path)  # atomic
            return
        except (TransientError, requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as e:
            failure = e
    raise ModelError(f"could not download {url} after {DOWNLOAD_ATTEMPTS} attempts: {failure}")


def download_release(model_size, model_dir):
    """Download those of the release's files that the model folder lacks."""
    os.makedirs(model_dir, exist_ok=True)
    for filename in RELEASE_FILES:
        path = os.path.join(model_dir, filename)
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            download_file(f"{models_url()}/{model_size}/{filename}", path)


def checkpoint_prefix(model_dir):
    """The checkpoint's path prefix, as named in the `checkpoint` file (relative to the model folder)."""
    with open(os.path.join(model_dir, "checkpoint"), encoding="utf-8", errors="replace") as f:
        match = re.search(r'^model_checkpoint_path: "(.*)"', f.read(), re.MULTILINE)
    if not match:
        raise ModelError(f"{model_dir}/checkpoint does not name a checkpoint (no model_checkpoint_path line)")
    return os.path.join(model_dir, match.group(1))


@contextlib.contextmanager
def silenced_stderr():
    """Send file descriptor 2 to /dev/null: TensorFlow's C++ libraries log there as they load, whatever
    TF_CPP_MIN_LOG_LEVEL says. Python exceptions still propagate and are reported by the caller."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def read_tf_checkpoint(prefix, n_layer):
    """{name: float32 array} for every model tensor, the [1, in, out] conv weights squeezed to [in, out].

    The weights are laid out column-major (shape [in, out], memory [out][in]): generating one token multiplies
    a single vector by each of them, and NumPy's BLAS streams that product about 10% faster when each output's
    weights are contiguous. Results are the same either way.
    """
    flat = {}
    try:
        with silenced_stderr():  # TensorFlow's C++ start-up log is not for our users
            import tensorflow as tf  # slow to import, so only when a checkpoint is actually read

            reader = tf.train.load_checkpoint(prefix)
            for name in tensor_names(n_layer):
                array = reader.get_tensor(f"model/{name}").astype(np.float32)
                flat[name] = np.asfortranarray(array[0]) if array.ndim == 3 else array
    except Exception as e:  # TensorFlow reports damage as OpError, IndexError, ValueError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot read the checkpoint {prefix}: {reason}") from e
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


def local_models(models_dir):
    try:
        return sorted(name for name in os.listdir(models_dir)
                      if os.path.isfile(os.path.join(models_dir, name, "checkpoint")))
    except OSError:
        return []


def check_model_name(model_size, models_dir):
    """Only the release sizes download; any other name must be a model folder that is already there."""
    if not isinstance(model_size, str) or not model_size or "/" in model_size or os.sep in model_size \
            or ".." in model_size:
        raise UsageError(f"--model_size must be a release size or the name of a folder in {models_dir}, "
                         f"not a path: got {model_size!r}")
    if model_size not in RELEASE_SIZES and not os.path.isdir(os.path.join(models_dir, model_size)):
        found = ", ".join(local_models(models_dir)) or "none"
        raise UsageError(f"unknown model {model_size!r}: use one of {', '.join(RELEASE_SIZES)} (downloaded if "
                         f"missing) or a model folder in {models_dir} (found: {found})")


def model_dir_problems(model_dir):
    """{file name: what is wrong with it} for what keeps a folder from holding a loadable checkpoint."""
    def problem(name):
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            return "missing"
        if os.path.getsize(path) == 0:
            return "empty"
        return None

    names = ("checkpoint", "hparams.json", "encoder.json", "vocab.bpe")
    problems = {name: reason for name in names if (reason := problem(name))}
    if problems:
        return problems
    try:
        prefix = os.path.relpath(checkpoint_prefix(model_dir), model_dir)
    except ModelError:
        return {"checkpoint": "names no checkpoint"}
    try:
        hparams = load_hparams(model_dir)
    except ValueError as e:
        return {"hparams.json": f"not valid JSON ({e})"}
    if not isinstance(hparams, dict) or not HPARAMS <= set(hparams):
        problems["hparams.json"] = f"needs {', '.join(sorted(HPARAMS))}"
    data_files = glob.glob(glob.escape(os.path.join(model_dir, prefix)) + ".data-*")
    data_files = [os.path.relpath(path, model_dir) for path in data_files]
    problems.update({name: reason for name in [prefix + ".index", *data_files] if (reason := problem(name))})
    if not data_files:
        problems[prefix + ".data-00000-of-00001"] = "missing"
    return problems


def prepare_model(model_size, models_dir):
    """The model's folder, checked to hold a complete checkpoint. A release model's missing or empty files are
    downloaded (again); another folder with a problem is reported, never half-loaded."""
    check_model_name(model_size, models_dir)
    model_dir = os.path.join(models_dir, model_size)
    if model_size in RELEASE_SIZES:
        download_release(model_size, model_dir)
    problems = model_dir_problems(model_dir)
    if problems and model_size in RELEASE_SIZES:  # a file under its release name is broken: fetch it again
        for name in problems:
            if os.path.exists(os.path.join(model_dir, name)):
                os.remove(os.path.join(model_dir, name))
        download_release(model_size, model_dir)
        problems = model_dir_problems(model_dir)
    if problems:
        details = "; ".join(f"{name} {reason}" for name, reason in problems.items())
        raise ModelError(f"model folder {model_dir} cannot be loaded: {details}")
    return model_dir


TOKENIZER_FILES = ("hparams.json", "encoder.json", "vocab.bpe")


def prepare_tokenizer(model_size, models_dir):
    """The model's folder with just the small files that measure a prompt (downloaded first for a release
    model), so a prompt too long for the context is refused before the weights are fetched."""
    check_model_name(model_size, models_dir)
    model_dir = os.path.join(models_dir, model_size)
    for name in TOKENIZER_FILES:
        path = os.path.join(model_dir, name)
        if model_size in RELEASE_SIZES and (not os.path.exists(path) or os.path.getsize(path) == 0):
            os.makedirs(model_dir, exist_ok=True)
            download_file(f"{models_url()}/{model_size}/{name}", path)
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            problem = f"{name} {'empty' if os.path.exists(path) else 'missing'}"
            raise ModelError(f"model folder {model_dir} cannot be loaded: {problem}")
    try:
        hparams = load_hparams(model_dir)
    except ValueError as e:
        raise ModelError(f"model folder {model_dir} cannot be loaded: hparams.json not valid JSON ({e})") from None
    if not isinstance(hparams, dict) or not HPARAMS <= set(hparams):
        raise ModelError(f"model folder {model_dir} cannot be loaded: hparams.json needs {', '.join(sorted(HPARAMS))}")
    return model_dir


def load_hparams(model_dir):
    with open(os.path.join(model_dir, "hparams.json"), encoding="utf-8") as f:
        return json.load(f)


def load_model_params(model_size, models_dir, n_layer):
    """The params tree of a prepared model. A release checkpoint that does not read (a data file shorter than
    its index says, say) is downloaded once more before giving up."""
    model_dir = os.path.join(models_dir, model_size)
    try:
        flat = load_params(model_dir, n_layer)
    except ModelError:
        if model_size not in RELEASE_SIZES:
            raise
        for name in ("model.ckpt.index", "model.ckpt.data-00000-of-00001"):
            os.remove(os.path.join(model_dir, name))
        download_release(model_size, model_dir)
        flat = load_params(model_dir, n_layer)
    return nest(flat, n_layer)


def load_encoder_hparams_and_params(model_size, models_dir):
    model_dir = prepare_model(model_size, models_dir)
    hparams = load_hparams(model_dir)
    return get_encoder(model_size, models_dir), hparams, load_model_params(model_size, models_dir, hparams["n_layer"])


def save_release_model(model_dir, params, hparams, vocab_dir, prefix="model.ckpt"):
    """Write params (the tree gpt2.py unpacks) into model_dir in OpenAI's release layout, so that everything
    that loads a release model loads it: a TF1 name-based checkpoint with the conv weights as [1, in, out],
    `checkpoint`, hparams.json, and encoder.json and vocab.bpe copied from vocab_dir. The caller picks a fresh
    model_dir and renames it into place when this returns (see train.py)."""
    def tensor(name):  # "h3/attn/c_attn/w" -> params["blocks"][3]["attn"]["c_attn"]["w"]
        keys = name.split("/")
        tree = params["blocks"][int(keys.pop(0)[1:])] if keys[0].startswith("h") else params
        for key in keys:
            tree = tree[key]
        return tree

    names = tensor_names(hparams["n_layer"])
    tensors = [np.asarray(tensor(name), dtype=np.float32) for name in names]
    tensors = [t[None] if name.endswith("/w") else t for name, t in zip(names, tensors)]  # [in, out] -> [1, in, out]
    os.makedirs(model_dir, exist_ok=True)
    with silenced_stderr():  # TensorFlow's C++ start-up log
        import tensorflow as tf

        tf.raw_ops.SaveV2(prefix=os.path.join(model_dir, prefix), tensor_names=[f"model/{n}" for n in names],
                          shape_and_slices=[""] * len(names), tensors=tensors)
        meta = tf.compat.v1.MetaGraphDef()  # the release ships TF1's graph here; loaders never need it
        meta.meta_info_def.tensorflow_version = tf.__version__
    with open(os.path.join(model_dir, f"{prefix}.meta"), "wb") as f:
        f.write(meta.SerializeToString())
    with open(os.path.join(model_dir, "checkpoint"), "w", encoding="utf-8") as f:
        f.write(f'model_checkpoint_path: "{prefix}"\nall_model_checkpoint_paths: "{prefix}"\n')
    with open(os.path.join(model_dir, "hparams.json"), "w", encoding="utf-8") as f:
        json.dump(hparams, f, indent=2)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(os.path.join(vocab_dir, name), os.path.join(model_dir, name))
