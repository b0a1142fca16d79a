"""Fetch OpenAI's GPT-2 release files and load the checkpoint into a nested dict of float32 arrays.

Several processes may share one models folder (two terminals, parallel jobs, containers on one volume). A lock
per model folder lets one of them download the model's files or write its converted params at a time; the others
wait, then use what it wrote.
"""
import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import urllib.parse

import numpy as np

from encoder import get_encoder

RELEASE_SIZES = ("124M", "355M", "774M", "1558M")
RELEASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
DATA = "model.ckpt.data-00000-of-00001"
TOKENIZER_FILES = ("hparams.json", "encoder.json", "vocab.bpe")  # small: fetched before the checkpoint
CHECKPOINT_FILES = ("checkpoint", "model.ckpt.index", DATA, "model.ckpt.meta")
RELEASE_FILES = tuple(sorted(TOKENIZER_FILES + CHECKPOINT_FILES))
CONVERTED = "numpy-params"

HPARAMS = {"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"}
N_VOCAB, N_MERGES = 50257, 50000
# The release's encoder.json and vocab.bpe are the same for every size: files with these hashes need no parsing.
VOCAB_SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}

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


class CheckpointDamaged(ModelError):
    """TensorFlow read the checkpoint's files but found their bytes wrong: the one failure that is worth
    downloading a release checkpoint again for. Anything else (no TensorFlow, no memory, no permission) is not
    the files' fault, and deleting them would only lose a good model."""


class TransientError(Exception):
    """A download failure worth retrying: a dropped connection, a timeout, a 5xx, a short file."""


DOWNLOAD_ATTEMPTS = 5
RETRY_DELAY = 1.0  # seconds before the first retry, doubled for each one after it
TIMEOUT = 30  # seconds without a byte from the server


# --- Locks: one process at a time writes a model folder --------------------------------------------------------

def lock_path(path, kind=""):
    """The lock file of a folder: hidden, beside it rather than in it, so that it is never listed as a model
    nor copied with one. `kind` names a second, independent lock on the same folder."""
    parent, name = os.path.split(os.path.normpath(path))
    return os.path.join(parent, f".{name}{kind}.lock")


def file_lock(path):
    # filelock takes an flock(2) on the file: the OS releases it when its process ends, however it ends (SIGKILL,
    # a crash, power loss), so a dead process never blocks the next. One object per path (is_singleton) makes a
    # second acquire in the same process count up instead of waiting on itself.
    from filelock import FileLock  # imported only when needed: a warm start takes no lock, and saves 20 ms

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return FileLock(path, is_singleton=True)


def hold(model_dir, doing):
    """Acquire model_dir's lock for `doing` ("downloading 124M"), waiting for another process that holds it;
    use as `with hold(...):`. Raises OSError if the lock file cannot be created (a read-only folder)."""
    lock = file_lock(lock_path(model_dir))
    try:
        return lock.acquire(blocking=False)
    except TimeoutError:  # filelock's Timeout
        print(f"waiting for another process to finish {doing} ...", file=sys.stderr, flush=True)
        return lock.acquire()


@contextlib.contextmanager
def exclusive(path):
    """Hold `path` (a folder that this process is about to write, such as a training run's) for the duration of
    the `with` block, or raise UsageError("another process is writing <path>") at once if another process holds
    it. The lock is the hidden file `.<name>.writer.lock` beside path, released by the OS if the holder dies; it
    is not the lock that downloads and conversions take, so gpt2.py can load the last save of a run in progress."""
    lock = file_lock(lock_path(path, kind=".writer"))
    try:
        lock.acquire(blocking=False)
    except TimeoutError:  # filelock's Timeout
        raise UsageError(f"another process is writing {path}") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def terminate_as_exit():
    """SIGTERM (kill, docker stop) ends a process without running `finally` blocks; while this holds, it raises
    SystemExit instead, so that temporary files are removed on the way out, as they are on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def exit_now(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def fsync_file(f):
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(path):
    """Make a rename inside path durable: without it, a crash may forget the rename."""
    if os.name == "nt":  # Windows cannot open a folder as a file, and makes renames durable by itself
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- Is a file what its name says? --------------------------------------------------------------------------------

def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


CHECKPOINT_LINE = re.compile(r'^model_checkpoint_path: "(.*)"', re.MULTILINE)  # in the `checkpoint` file


def checkpoint_problem(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        if not CHECKPOINT_LINE.search(f.read()):
            return "names no checkpoint"


def hparams_problem(path):
    try:
        hparams = read_json(path)
    except ValueError as e:  # UnicodeDecodeError is a ValueError too
        return f"not valid JSON ({e})"
    if not isinstance(hparams, dict) or not all(isinstance(hparams.get(k), int) for k in HPARAMS):
        return f"needs {', '.join(sorted(HPARAMS))} (whole numbers)"


def encoder_problem(path):
    if sha256_of(path) == VOCAB_SHA256["encoder.json"]:
        return None
    try:
        encoder = read_json(path)
    except ValueError as e:
        return f"not valid JSON ({e})"
    if not isinstance(encoder, dict):
        return "is not a JSON object"
    if len(encoder) != N_VOCAB:
        return f"holds {len(encoder)} entries, not {N_VOCAB}"


def vocab_problem(path):
    if sha256_of(path) == VOCAB_SHA256["vocab.bpe"]:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except ValueError:
        return "not UTF-8 text"
    if not lines[0].startswith("#version"):
        return "does not start with its #version line"
    merges = [line for line in lines[1:] if line]
    if len(merges) != N_MERGES or any(len(line.split()) != 2 for line in merges):
        return f"holds {len(merges)} lines, not {N_MERGES} merges of two symbols"


VALIDATORS = {"checkpoint": checkpoint_problem, "hparams.json": hparams_problem, "encoder.json": encoder_problem,
              "vocab.bpe": vocab_problem}


def file_problem(path, name):
    """What is wrong with the file at path as the model file `name` ("missing", "not valid JSON (...)"), or None.
    A file that exists but cannot be read (no permission, a disk error) is no reason to replace it: ModelError."""
    try:
        if os.path.getsize(path) == 0:
            return "empty"
        validate = VALIDATORS.get(name)
        return validate(path) if validate else None
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from None


def folder_problems(model_dir, names):
    problems = {name: file_problem(os.path.join(model_dir, name), name) for name in names}
    return {name: problem for name, problem in problems.items() if problem}


def checkpoint_problems(model_dir):
    """Problems of the files that hold the weights, wherever the `checkpoint` file says they are."""
    problems = folder_problems(model_dir, ["checkpoint"])
    if problems:
        return problems
    prefix = checkpoint_prefix(model_dir)
    data_files = glob.glob(glob.escape(prefix) + ".data-*") or [prefix + ".data-00000-of-00001"]
    return folder_problems(model_dir, [os.path.relpath(path, model_dir) for path in [prefix + ".index", *data_files]])


def report_problems(model_dir, problems):
    if problems:
        details = "; ".join(f"{name} {problem}" for name, problem in problems.items())
        raise ModelError(f"model folder {model_dir} cannot be loaded: {details}")


# --- Downloads ------------------------------------------------------------------------------------------------------

def models_url():
    """Where release files come from: $GPT2_MODELS_URL/<size>/<file>, by default (also when it is empty)
    OpenAI's public bucket."""
    url = os.environ.get("GPT2_MODELS_URL") or RELEASE_URL
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"GPT2_MODELS_URL must be an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


def fetch(url, partial):
    """Append url's bytes to the partial file, resuming where it stops if the server honours a Range request."""
    import requests  # imported when something downloads: `import gpt2` for the model alone needs no network
    from tqdm import tqdm

    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    # Identity encoding: Content-Length and Range then count the file's own bytes, not a compressed stream's.
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as response:
        if response.status_code == 416:  # the partial file is not a prefix of this file: start over
            os.remove(partial)
            raise TransientError("the server refused to resume")
        if response.status_code >= 500 or response.status_code == 429:
            raise TransientError(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            raise ModelError(f"could not download {url}: HTTP {response.status_code} {response.reason}")
        compressed = response.headers.get("Content-Encoding", "identity") != "identity"
        if response.status_code != 206:  # the server sent the whole file, not the rest of it
            have = 0
        elif compressed or not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            # (a compressed range counts the bytes of a compressed stream, not of the file)
            os.remove(partial)
            raise TransientError("the server resumed at the wrong place")
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(partial, "ab" if have else "wb") as f, tqdm(
                total=None if compressed else total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=os.path.basename(url)) as bar:
            for chunk in response.iter_content(chunk_size=1 << 20):
                bar.update(f.write(chunk))
            fsync_file(f)  # on disk before it is renamed into place
        # A server that compresses anyway: Content-Length counts the bytes on the wire, which raw.tell() counts too.
        received = have + response.raw.tell()
    if total is not None and received != total:
        raise TransientError(f"got {received} of {total} bytes")


def download_file(url, path):
    """Download url to path. The bytes go to path + ".part" and are renamed into place only once the byte count
    matches Content-Length and the file is valid for its name, so a file under its final name is always complete,
    even after Ctrl-C. Transient failures are retried with backoff, resuming the partial file."""
    import requests

    partial, name = path + ".part", os.path.basename(path)
    for attempt in range(DOWNLOAD_ATTEMPTS):
        if attempt:
            time.sleep(RETRY_DELAY * 2 ** (attempt - 1))
        try:
            fetch(url, partial)
            break
        except (TransientError, requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as e:
            failure = e
        except requests.RequestException as e:  # an URL requests cannot use: retrying will not help
            raise ModelError(f"could not download {url}: {e}") from None
        except OSError as e:  # requests' errors are OSErrors too, hence this order: here, writing failed
            with contextlib.suppress(OSError):
                os.remove(partial)  # a full disk: the piece would only take space that the user must free
            raise ModelError(f"could not write {path}: {e.strerror or e}") from None
    else:
        raise ModelError(f"could not download {url} after {DOWNLOAD_ATTEMPTS} attempts: {failure}")
    problem = file_problem(partial, name)
    if problem:  # an HTML page from a captive portal or a proxy, say: never under the release file's name
        os.remove(partial)
        raise ModelError(f"{url} did not send a usable {name}: {problem}")
    os.replace(partial, path)  # atomic


def download_release(model_size, model_dir, names, again=()):
    """Make sure the release files `names` are in the model folder and valid, downloading those that are missing
    or broken, and those in `again` (found damaged) unless another process replaced them meanwhile.

    `again` maps a name to the os.stat identity it had when it was found damaged."""
    if not again and not folder_problems(model_dir, names):
        return
    try:
        held = hold(model_dir, f"downloading {model_size}")
    except OSError as e:
        raise ModelError(f"cannot write in {os.path.dirname(model_dir) or '.'}: {e.strerror or e}") from None
    with held:
        try:
            os.makedirs(model_dir, exist_ok=True)
            for name in names:
                path = os.path.join(model_dir, name)
                if file_problem(path, name) or (name in again and identity(path) == again[name]):
                    download_file(f"{models_url()}/{model_size}/{name}", path)
        except OSError as e:
            raise ModelError(f"could not write in {model_dir}: {e.strerror or e}") from None
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(model_dir)  # removed only if empty: a first download that failed at once


def identity(path):
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


# --- Reading the checkpoint -----------------------------------------------------------------------------------------

def checkpoint_prefix(model_dir):
    """The checkpoint's path prefix, as named in the `checkpoint` file (relative to the model folder).

    A folder copied from elsewhere may name its checkpoint by an absolute path that no longer exists
    (gpt-2-simple on Colab writes "/content/checkpoint/run1/model-1000"): the same name in this folder is used."""
    with open(os.path.join(model_dir, "checkpoint"), encoding="utf-8", errors="replace") as f:
        match = CHECKPOINT_LINE.search(f.read())
    if not match:
        raise ModelError(f"{model_dir}/checkpoint does not name a checkpoint (no model_checkpoint_path line)")
    named = os.path.join(model_dir, match.group(1))
    here = os.path.join(model_dir, os.path.basename(match.group(1)))
    if not os.path.exists(named + ".index") and os.path.exists(here + ".index"):
        return here
    return named


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

    Raises CheckpointDamaged only when TensorFlow reads the files and finds them wrong; any other failure is a
    ModelError that says what it is.
    """
    for path in [prefix + ".index", *glob.glob(glob.escape(prefix) + ".data-*")]:
        try:  # a file we may not read is not a damaged one
            open(path, "rb").close()
        except OSError as e:
            raise ModelError(f"cannot read {path}: {e.strerror}") from None
    try:
        with silenced_stderr():  # TensorFlow's C++ start-up log is not for our users
            import tensorflow as tf  # slow to import, so only when a checkpoint is actually read
    except ImportError as e:
        raise ModelError(f"reading the checkpoint {prefix} needs TensorFlow (pip install tensorflow): {e}") from None
    flat = {}
    try:
        with silenced_stderr():
            reader = tf.train.load_checkpoint(prefix)
            for name in tensor_names(n_layer):
                array = reader.get_tensor(f"model/{name}").astype(np.float32)
                flat[name] = np.asfortranarray(array[0]) if array.ndim == 3 else array
    except MemoryError:
        raise ModelError(f"not enough memory to read the checkpoint {prefix}") from None
    except (tf.errors.OpError, IndexError, ValueError) as e:  # TF's words for a bad checksum, table or length
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointDamaged(f"cannot read the checkpoint {prefix}: {reason}") from None
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


def flatten(tree, name=""):
    """nest's inverse: {"h3/attn/c_attn/w": array, ...} for a params-shaped tree (params, its gradients, AdamW's
    moments). Keys go in sorted order, so two trees of the same shape give their arrays in the same order."""
    if isinstance(tree, dict):
        return {leaf: array for key in sorted(tree) for leaf, array in flatten(tree[key], f"{name}{key}/").items()}
    if isinstance(tree, list):  # the blocks: block i's names start with h{i}/
        return {leaf: array for i, block in enumerate(tree) for leaf, array in flatten(block, f"h{i}/").items()}
    return {name.rstrip("/"): tree}


# --- The converted copy: numpy-params/ ------------------------------------------------------------------------------

def checkpoint_fingerprint(prefix):
    """The sha256 of the checkpoint's .index, which records a CRC32C of every tensor: other weights make another
    index, even in files of the same size and modification time. The index is small, so this is cheap."""
    try:
        return sha256_of(prefix + ".index")
    except OSError as e:
        raise ModelError(f"cannot read {prefix}.index: {e.strerror}") from None


def checksum(array):
    """The array's bytes summed as 64-bit words, modulo 2**64. One pass at memory speed (about 25 ms for 124M,
    whose pages the first token reads anyway), where a sha256 takes over ten times as long. It is no defence against
    an attacker (who could as well replace the checkpoint), but a zeroed tail or a NaN written over a weight
    changes it."""
    words = array.ravel(order="K")  # memory order: a view for row- and column-major arrays alike
    if words.nbytes % 8:
        return int(words.view(np.uint32).sum(dtype=np.uint64))
    return int(words.view(np.uint64).sum())  # integer sums wrap around, exactly and in any order


def load_converted(converted_dir, fingerprint, n_layer):
    """The params converted on an earlier run, memory-mapped, or None if they are missing, stale or damaged."""
    try:
        manifest = read_json(os.path.join(converted_dir, "manifest.json"))
        if manifest["checkpoint"] != fingerprint or sorted(manifest["tensors"]) != sorted(tensor_names(n_layer)):
            return None
        flat = {}
        for name, expected in manifest["tensors"].items():
            array = np.load(os.path.join(converted_dir, name.replace("/", ".") + ".npy"), mmap_mode="r")
            array = np.asarray(array)  # a plain ndarray view of the mapping: np.memmap adds cost to every op
            if array.shape != tuple(expected["shape"]) or array.dtype != np.float32 or \
                    checksum(array) != expected["checksum"]:
                return None
            flat[name] = array
        return flat
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_converted(converted_dir, fingerprint, flat):
    """One .npy per tensor, so later runs map them straight from disk without importing TensorFlow.

    Written into a temporary folder that is renamed into place, every file fsynced first: a folder under the
    final name is always complete, even after a crash. The temporary folder is removed on any failure, Ctrl-C or
    SIGTERM. The caller holds the model's lock."""
    need = sum(array.nbytes for array in flat.values())
    if shutil.disk_usage(os.path.dirname(converted_dir)).free < need:  # better than gigabytes written for nothing
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: the copy needs {need / 1e6:.0f} MB")
    tmp_dir = f"{converted_dir}.tmp{os.getpid()}"
    try:
        os.makedirs(tmp_dir)
        tensors = {}
        for name, array in flat.items():
            with open(os.path.join(tmp_dir, name.replace("/", ".") + ".npy"), "wb") as f:
                np.save(f, array)
                fsync_file(f)
            tensors[name] = {"shape": list(array.shape), "checksum": checksum(array)}
        with open(os.path.join(tmp_dir, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump({"checkpoint": fingerprint, "tensors": tensors}, f, indent=1)
            fsync_file(f)
        fsync_dir(tmp_dir)
        shutil.rmtree(converted_dir, ignore_errors=True)
        os.rename(tmp_dir, converted_dir)
        fsync_dir(os.path.dirname(converted_dir))
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def warn_unsaved(converted_dir, error):
    print(f"warning: could not write {converted_dir} ({error.strerror or error}): the weights are read from the "
          f"TensorFlow checkpoint again on every run, so start-up stays slow", file=sys.stderr, flush=True)


def load_params(model_dir, n_layer):
    """Flat {name: float32 array}: mapped from the converted .npy files if they match the checkpoint,
    otherwise read from the checkpoint with TensorFlow and converted for next time. The converted copy is only a
    speed-up: when it cannot be written (a read-only folder, a full disk), a warning says so and the run goes on."""
    prefix = checkpoint_prefix(model_dir)
    fingerprint = checkpoint_fingerprint(prefix)
    converted_dir = os.path.join(model_dir, CONVERTED)
    flat = load_converted(converted_dir, fingerprint, n_layer)
    if flat is not None:
        return flat
    try:
        held = hold(model_dir, f"converting {os.path.basename(os.path.normpath(model_dir))}")
    except OSError as e:
        warn_unsaved(converted_dir, e)
        return read_tf_checkpoint(prefix, n_layer)
    with held, terminate_as_exit():
        flat = load_converted(converted_dir, fingerprint, n_layer)  # written while this process waited?
        if flat is None:
            for leftover in glob.glob(glob.escape(converted_dir) + ".tmp*"):  # its writer died: we hold the lock
                shutil.rmtree(leftover, ignore_errors=True)
            flat = read_tf_checkpoint(prefix, n_layer)
            try:
                save_converted(converted_dir, fingerprint, flat)
            except OSError as e:
                warn_unsaved(converted_dir, e)
    return flat


# --- Model folders --------------------------------------------------------------------------------------------------

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
    if os.path.exists(models_dir) and not os.path.isdir(models_dir):
        raise ModelError(f"--models_dir {models_dir} is a file, not a folder")
    if model_size not in RELEASE_SIZES and not os.path.isdir(os.path.join(models_dir, model_size)):
        found = ", ".join(local_models(models_dir)) or "none"
        raise UsageError(f"unknown model {model_size!r}: use one of {', '.join(RELEASE_SIZES)} (downloaded if "
                         f"missing) or a model folder in {models_dir} (found: {found})")


def prepare_tokenizer(model_size, models_dir):
    """The model's folder, checked to hold a valid hparams.json, encoder.json and vocab.bpe, downloading a
    release model's (and only those: the checkpoint can wait until the prompt has been checked against them).
    Another folder with a problem is reported with one line naming the file."""
    models_url()  # a bad GPT2_MODELS_URL is a usage error, reported before any work
    check_model_name(model_size, models_dir)
    model_dir = os.path.join(models_dir, model_size)
    if model_size in RELEASE_SIZES:
        download_release(model_size, model_dir, TOKENIZER_FILES)
    report_problems(model_dir, folder_problems(model_dir, TOKENIZER_FILES))
    return model_dir


def prepare_model(model_size, models_dir):
    """The model's folder, checked to hold a complete checkpoint. A release model's missing or broken files are
    downloaded (again); another folder with a problem is reported, never half-loaded."""
    model_dir = prepare_tokenizer(model_size, models_dir)
    if model_size in RELEASE_SIZES:
        download_release(model_size, model_dir, CHECKPOINT_FILES)
    report_problems(model_dir, checkpoint_problems(model_dir))
    return model_dir


def load_hparams(model_dir):
    return read_json(os.path.join(model_dir, "hparams.json"))


def load_model_params(model_size, models_dir, n_layer):
    """The params tree of a prepared model. A release checkpoint that TensorFlow finds damaged (a data file
    shorter than its index says, a checksum that does not match) is downloaded once more before giving up."""
    model_dir = os.path.join(models_dir, model_size)
    try:
        flat = load_params(model_dir, n_layer)
    except CheckpointDamaged:
        if model_size not in RELEASE_SIZES:
            raise
        damaged = ("model.ckpt.index", DATA)
        again = {name: identity(os.path.join(model_dir, name)) for name in damaged}
        download_release(model_size, model_dir, damaged, again)
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
    flat = flatten(params)
    names = tensor_names(hparams["n_layer"])
    tensors = [np.asarray(flat[name], dtype=np.float32) for name in names]
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
