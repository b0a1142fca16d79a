"""Fetch OpenAI's GPT-2 release files and load the checkpoint into a nested dict of float32 arrays.

Several processes may share one models folder (two terminals, parallel jobs, containers on one volume). A lock
per model folder lets one of them download the model's files or write its converted params at a time; the others
wait, then use what it wrote.
"""
import contextlib
import errno
import functools
import glob
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import urllib.parse

import numpy as np

from encoder import bytes_to_unicode, load_encoder

RELEASE_SIZES = ("124M", "355M", "774M", "1558M")
RELEASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
DATA = "model.ckpt.data-00000-of-00001"
TOKENIZER_FILES = ("hparams.json", "encoder.json", "vocab.bpe")  # small: fetched before the checkpoint
CHECKPOINT_FILES = ("checkpoint", "model.ckpt.index", DATA, "model.ckpt.meta")
RELEASE_FILES = tuple(sorted(TOKENIZER_FILES + CHECKPOINT_FILES))
CONVERTED = "numpy-params"

HPARAMS = {"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"}
# Far beyond any GPT-2 (1558M: n_embd 1600, 25 heads, 48 layers, n_ctx 1024), yet small enough that nothing
# counted from them (tensor names, cache sizes) can take the machine before the checkpoint is compared with them.
HPARAMS_LIMIT = {"n_vocab": 2**20, "n_ctx": 2**20, "n_embd": 2**16, "n_head": 2**10, "n_layer": 2**10}
# OpenAI's sizes: a folder under one of these names that says otherwise holds another model.
RELEASE_HPARAMS = {size: {"n_vocab": 50257, "n_ctx": 1024, "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer}
                   for size, n_layer, n_embd, n_head in (("124M", 12, 768, 12), ("355M", 24, 1024, 16),
                                                         ("774M", 36, 1280, 20), ("1558M", 48, 1600, 25))}
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
TIMEOUT = 30  # seconds to connect, and without a single byte from the server
# The stall rule, as curl's --speed-limit/--speed-time: an attempt that receives less than SPEED_LIMIT bytes a
# second on average over STALL_SECONDS ends (and is retried, resuming): a mirror sending a byte a second would
# otherwise never time out, since every read gets its byte well within TIMEOUT.
SPEED_LIMIT = 10 * 1024  # bytes per second: 124M's 498 MB would take 14 hours at this speed
STALL_SECONDS = 60


# --- Locks: one process at a time writes a model folder --------------------------------------------------------

# The kinds of lock a folder has. Each lock file is named ".<folder><kind>.lock", and no kind ends with another
# (".download" and ".writer" end in different letters), so two locks have the same file name only if they are
# the same kind of lock on the same folder: the download lock of a model named "foo.writer" is not the writer
# lock of a run named "foo", as it was when the download lock had no kind.
LOCK_KINDS = (".download", ".writer")


def lock_path(path, kind=".download"):
    """The lock file of a folder: hidden, beside it rather than in it, so that it is never listed as a model
    nor copied with one. `kind` (one of LOCK_KINDS) names independent locks on the same folder."""
    assert kind in LOCK_KINDS, kind
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
    except TimeoutError:  # filelock's Timeout, also where no file can be made (/proc): then it is no other process
        try:
            os.close(os.open(lock.lock_file, os.O_RDWR | os.O_CREAT, 0o644))
        except OSError as e:
            raise OSError(e.errno, f"cannot create files in {os.path.dirname(lock.lock_file) or '.'} "
                                   f"({e.strerror})") from None
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


def fsync_path(path):
    """fsync a file by its name: for files that another library wrote and closed (TensorFlow's SaveV2)."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes only what it may write
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path):
    """Every file in the folder, then the folder itself, onto the disk: a folder about to be renamed into place is
    then whole after a power cut, not a set of names pointing at empty files."""
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False):
            fsync_path(entry.path)
    fsync_dir(path)


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


def is_whole(value):
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is a Python int


def hparams_values_problem(hparams):
    """What makes these hparams impossible for a GPT-2, or None. Checked before any size in them is used to
    allocate or count anything: `n_layer: 1000000000` would otherwise build 12e9 tensor names."""
    if not isinstance(hparams, dict):
        return "is not a JSON object"
    for name in sorted(HPARAMS):
        if name not in hparams:
            return f"has no {name}"
        value = hparams[name]
        if not is_whole(value) or not 1 <= value <= HPARAMS_LIMIT[name]:
            return f"has {name} {json.dumps(value)}, not a whole number from 1 to {HPARAMS_LIMIT[name]}"
    if hparams["n_embd"] % hparams["n_head"]:
        return f"has n_embd {hparams['n_embd']}, which n_head {hparams['n_head']} does not divide into equal heads"


def hparams_problem(path):
    try:
        hparams = read_json(path)
    except ValueError as e:  # UnicodeDecodeError is a ValueError too
        return f"not valid JSON ({e})"
    return hparams_values_problem(hparams)


def unique_keys(pairs):
    """json's object_pairs_hook: a JSON object that names a key twice would otherwise keep the last silently."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def encoder_problem(path):
    """encoder.json maps N_VOCAB distinct symbols, spelled in bytes_to_unicode's 256 characters, to the ids
    0..N_VOCAB-1, each id once; every single byte is a symbol (the BPE starts from them)."""
    if sha256_of(path) == VOCAB_SHA256["encoder.json"]:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            encoder = json.load(f, object_pairs_hook=unique_keys)
    except ValueError as e:
        return f"not valid JSON ({e})"
    if not isinstance(encoder, dict):
        return "is not a JSON object"
    if len(encoder) != N_VOCAB:
        return f"holds {len(encoder)} entries, not {N_VOCAB}"
    byte_symbols = set(bytes_to_unicode().values())
    seen = set()
    for symbol, i in encoder.items():
        if not is_whole(i) or not 0 <= i < N_VOCAB:
            return f"maps {symbol!r} to {json.dumps(i)}, not an id from 0 to {N_VOCAB - 1}"
        if i in seen:
            return f"gives the id {i} to two symbols (one is {symbol!r})"
        seen.add(i)
        if not symbol or not set(symbol) <= byte_symbols:
            return f"holds the symbol {symbol!r}, not spelled in GPT-2's byte alphabet"
    missing = byte_symbols - encoder.keys()
    if missing:
        return f"has no id for the byte symbol {min(missing)!r}"


def read_merges(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    return lines[0], [line for line in lines[1:] if line]


def vocab_problem(path):
    if sha256_of(path) == VOCAB_SHA256["vocab.bpe"]:
        return None
    try:
        header, merges = read_merges(path)
    except ValueError:
        return "not UTF-8 text"
    if not header.startswith("#version"):
        return "does not start with its #version line"
    if len(merges) != N_MERGES:
        return f"holds {len(merges)} lines, not {N_MERGES} merges"
    for number, line in enumerate(merges, 2):
        if len(line.split(" ")) != 2 or "" in line.split(" "):
            return f"line {number} is {line!r}, not two symbols separated by one space"


def merges_problem(model_dir, encoder_name="encoder.json", vocab_name="vocab.bpe"):
    """What makes vocab.bpe's merges unusable with encoder.json (or HF's merges.txt with vocab.json), or None:
    each merge joins two symbols of encoder.json into a third, or the tokenizer would meet a symbol it has no id
    for. Both files are valid alone (file_problem); the release's pair, known by its hashes, needs no parsing."""
    encoder_path, vocab_path = os.path.join(model_dir, encoder_name), os.path.join(model_dir, vocab_name)
    if sha256_of(encoder_path) == VOCAB_SHA256["encoder.json"] and sha256_of(vocab_path) == VOCAB_SHA256["vocab.bpe"]:
        return None
    encoder = read_json(encoder_path)
    for number, line in enumerate(read_merges(vocab_path)[1], 2):
        for symbol in (*line.split(" "), line.replace(" ", "")):
            if symbol not in encoder:
                return f"{vocab_name} line {number} ({line!r}) needs the symbol {symbol!r}, which {encoder_name} lacks"


# HF's layout holds encoder.json and vocab.bpe as vocab.json and merges.txt (hf.py): they are checked alike.
VALIDATORS = {"checkpoint": checkpoint_problem, "hparams.json": hparams_problem, "encoder.json": encoder_problem,
              "vocab.bpe": vocab_problem, "vocab.json": encoder_problem, "merges.txt": vocab_problem}


# The small files are parsed whole: one far larger than its kind ever is would only fill memory.
SIZE_LIMIT = {"checkpoint": 1 << 20, "hparams.json": 1 << 20, "encoder.json": 16 << 20, "vocab.bpe": 16 << 20,
              "vocab.json": 16 << 20, "merges.txt": 16 << 20}


def file_problem(path, name):
    """What is wrong with the file at path as the model file `name` ("missing", "not valid JSON (...)"), or None.
    A file that exists but cannot be read (no permission, a disk error) is no reason to replace it: ModelError."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty"
        if size > SIZE_LIMIT.get(name, size):
            return f"is {size / 2**20:.0f} MiB, more than {SIZE_LIMIT[name] >> 20} MiB: no GPT-2 {name} is that large"
        if not os.path.isfile(path):
            return "is not a regular file"
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
    with requests.get(url, headers=headers, stream=True, timeout=min(TIMEOUT, STALL_SECONDS)) as response:
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
        if length is not None and not re.fullmatch(r"[0-9]{1,20}", length.strip()):
            raise ModelError(f"could not download {url}: the server sent Content-Length {length!r}, which is not "
                             f"a number of bytes")
        total = have + int(length) if length is not None else None
        with open(partial, "ab" if have else "wb") as f, tqdm(
                total=None if compressed else total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=os.path.basename(url)) as bar:
            for chunk in received_chunks(response):
                bar.update(f.write(chunk))  # the bar moves with every chunk, however small
            fsync_file(f)  # on disk before it is renamed into place
        # A server that compresses anyway: Content-Length counts the bytes on the wire, which raw.tell() counts too.
        received = have + response.raw.tell()
    if total is not None and received != total:
        raise TransientError(f"got {received} of {total} bytes")


def received_chunks(response):
    """The body's bytes as they arrive (read1: whatever the connection has, up to 1 MiB, without waiting for a
    full MiB), ending the attempt by the stall rule when they come slower than SPEED_LIMIT for STALL_SECONDS."""
    import requests
    import urllib3  # requests' own transport, already imported with it

    read = getattr(response.raw, "read1", None) or response.raw.read  # urllib3 < 2 has no read1
    window_start, window_bytes = time.monotonic(), 0
    while True:
        try:  # urllib3's failures as requests reports them, as its iter_content does
            chunk = read(1 << 20, decode_content=True)
        except urllib3.exceptions.ProtocolError as e:  # a dropped connection, a body cut short
            raise requests.exceptions.ChunkedEncodingError(e) from None
        except urllib3.exceptions.ReadTimeoutError as e:
            raise requests.exceptions.ConnectionError(e) from None
        except urllib3.exceptions.DecodeError as e:
            raise requests.exceptions.ContentDecodingError(e) from None
        if not chunk:
            return
        yield chunk
        window_bytes += len(chunk)
        elapsed = time.monotonic() - window_start
        if elapsed >= STALL_SECONDS:
            if window_bytes < SPEED_LIMIT * elapsed:
                raise TransientError(f"the transfer ran below {SPEED_LIMIT} bytes/s for {STALL_SECONDS} s "
                                     f"({window_bytes} bytes in {elapsed:.0f} s)")
            window_start, window_bytes = time.monotonic(), 0


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
    """The checkpoint's path prefix, as named in the `checkpoint` file, always inside the model folder.

    A folder copied from elsewhere may name its checkpoint by an absolute path that no longer exists
    (gpt-2-simple on Colab writes "/content/checkpoint/run1/model-1000"), and a hostile one may name a file of
    someone else's: any name that leads out of the folder (absolute, or through "..") is taken by its file name
    in this folder, so nothing outside the folder is ever read."""
    with open(os.path.join(model_dir, "checkpoint"), encoding="utf-8", errors="replace") as f:
        match = CHECKPOINT_LINE.search(f.read())
    if not match:
        raise ModelError(f"{model_dir}/checkpoint does not name a checkpoint (no model_checkpoint_path line)")
    named, inside = match.group(1), os.path.abspath(model_dir)
    path = os.path.abspath(os.path.join(model_dir, named))
    if not os.path.isabs(named) and path != inside and os.path.commonpath([path, inside]) == inside:
        return os.path.join(model_dir, os.path.relpath(path, inside))
    name = re.split(r"[/\\]", named)[-1]  # a Windows path names its file after a backslash
    if name in ("", ".", ".."):
        raise ModelError(f"{model_dir}/checkpoint names {named!r}, which is no checkpoint file")
    return os.path.join(model_dir, name)


# --- The checkpoint's index: every tensor's name and shape, without reading the weights ----------------------------
# A TensorFlow checkpoint's .index is a LevelDB-format table: blocks of key/value entries, where a key is a
# variable's name and its value a BundleEntryProto (dtype, shape, where its bytes are in the data file). Reading
# it here takes about a millisecond and no TensorFlow (whose import takes seconds), so the shapes are compared
# with hparams.json before any weight is read, on every run, warm or cold.

TABLE_MAGIC = 0xdb4775248b80fb57  # the last 8 bytes of every table
FOOTER_SIZE = 48  # two block handles, padded, then the magic number
BLOCK_TRAILER = 5  # after each block: its compression type (1 byte) and a CRC (4)
MAX_INDEX_BYTES = 64 << 20  # 1558M's index is 18 KB; a file this large is no GPT-2 index


class UnreadableIndex(ValueError):
    """The .index file is not a table we can read."""


def varint(data, pos):
    """A protobuf/LevelDB base-128 varint at data[pos:] -> (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise UnreadableIndex("a number runs past its end")
        byte = data[pos]
        value |= (byte & 0x7f) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def proto_fields(data):
    """(field number, value) for each field of a serialized protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(data, pos)
        elif wire in (1, 5):  # fixed64, fixed32
            value, pos = data[pos:pos + (8 if wire == 1 else 4)], pos + (8 if wire == 1 else 4)
        elif wire == 2:
            length, pos = varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        else:
            raise UnreadableIndex(f"a protobuf field of wire type {wire}")
        if pos > len(data):
            raise UnreadableIndex("a protobuf field runs past its end")
        yield field, value


def table_block(data, handle):
    """The key/value entries of the block a handle (offset, size varints) points to."""
    offset, pos = varint(handle, 0)
    size, _ = varint(handle, pos)
    if offset + size + BLOCK_TRAILER > len(data) - FOOTER_SIZE:
        raise UnreadableIndex("a block lies outside the file")
    if data[offset + size] != 0:
        raise UnreadableIndex("a compressed block")
    block = data[offset:offset + size]
    if len(block) < 4:
        raise UnreadableIndex("a block too short for its restart count")
    n_restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 * (n_restarts + 1)
    if end < 0:
        raise UnreadableIndex("a block with more restarts than bytes")
    pos, key = 0, b""
    while pos < end:
        shared, pos = varint(block, pos)
        unshared, pos = varint(block, pos)
        length, pos = varint(block, pos)
        if shared > len(key) or pos + unshared + length > end:
            raise UnreadableIndex("an entry runs past its block")
        key = key[:shared] + block[pos:pos + unshared]
        yield key, block[pos + unshared:pos + unshared + length]
        pos += unshared + length


def entry_shape(entry):
    """The shape in a BundleEntryProto: field 2, a TensorShapeProto whose field 2 repeats Dim {1: size}."""
    for field, value in proto_fields(entry):
        if field == 2:  # the fields after it say where the bytes are: not needed here
            return tuple(dict(proto_fields(dim)).get(1, 0) for shape_field, dim in proto_fields(value)
                         if shape_field == 2)
    return ()


def index_shapes(prefix):
    """{variable name: shape} of every tensor in the checkpoint at prefix, read from its .index alone."""
    path = prefix + ".index"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INDEX_BYTES + 1)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from None
    try:
        if len(data) > MAX_INDEX_BYTES:
            raise UnreadableIndex(f"larger than {MAX_INDEX_BYTES >> 20} MB")
        if len(data) < FOOTER_SIZE or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
            raise UnreadableIndex("no table footer")
        _, pos = varint(data, len(data) - FOOTER_SIZE)  # the metaindex handle: offset, size
        _, pos = varint(data, pos)
        shapes = {}
        for _, handle in table_block(data, data[pos:len(data) - 8]):
            for key, entry in table_block(data, handle):
                if key:  # the empty key holds the bundle's header, not a tensor
                    shapes[key.decode("utf-8", errors="replace")] = entry_shape(entry)
        return shapes
    except UnreadableIndex as e:
        raise ModelError(f"cannot read the checkpoint index {path}: {e}") from None


def expected_shapes(hparams):
    """{variable name: shape} of every tensor a checkpoint with these (checked) hparams holds."""
    n_vocab, n_ctx, n_embd = hparams["n_vocab"], hparams["n_ctx"], hparams["n_embd"]
    block = {"ln_1/g": (n_embd,), "ln_1/b": (n_embd,), "ln_2/g": (n_embd,), "ln_2/b": (n_embd,),
             "attn/c_attn/w": (1, n_embd, 3 * n_embd), "attn/c_attn/b": (3 * n_embd,),
             "attn/c_proj/w": (1, n_embd, n_embd), "attn/c_proj/b": (n_embd,),
             "mlp/c_fc/w": (1, n_embd, 4 * n_embd), "mlp/c_fc/b": (4 * n_embd,),
             "mlp/c_proj/w": (1, 4 * n_embd, n_embd), "mlp/c_proj/b": (n_embd,)}
    shapes = {"wte": (n_vocab, n_embd), "wpe": (n_ctx, n_embd), "ln_f/g": (n_embd,), "ln_f/b": (n_embd,)}
    shapes.update({f"h{i}/{name}": shape for i in range(hparams["n_layer"]) for name, shape in block.items()})
    return {f"model/{name}": shape for name, shape in shapes.items()}


BLOCK_NAME = re.compile(r"model/h(\d+)/")


def checkpoint_mismatch(shapes, hparams):
    """The first way the checkpoint's tensors (shapes: from index_shapes) disagree with hparams.json, as a phrase
    naming the tensor or the value, or None. Names outside model/ (a step counter, say) are not the model's."""
    blocks = {int(m.group(1)) for m in map(BLOCK_NAME.match, shapes) if m}
    if blocks != set(range(hparams["n_layer"])):
        found = f"blocks h0..h{max(blocks)}" if blocks == set(range(len(blocks))) else \
            f"blocks {', '.join(f'h{i}' for i in sorted(blocks)[:5])}{' ...' * (len(blocks) > 5)}" if blocks else \
            "no blocks"
        return f"the checkpoint holds {found}, but hparams.json says n_layer {hparams['n_layer']}"
    expected = expected_shapes(hparams)
    for name, shape in expected.items():
        if name not in shapes:
            return f"the checkpoint has no tensor {name}"
        if shapes[name] != shape:
            return (f"the checkpoint's {name} is {list(shapes[name])}, but hparams.json "
                    f"({', '.join(f'{k} {hparams[k]}' for k in ('n_vocab', 'n_ctx', 'n_embd'))}) makes it {list(shape)}")
    extra = sorted(name for name in shapes if name.startswith("model/") and name not in expected)
    if extra:
        return f"the checkpoint holds {extra[0]}, which no GPT-2 has"


def check_checkpoint(model_dir, hparams):
    """Raise ModelError unless every tensor of the folder's checkpoint has the shape hparams.json implies. Reads
    the index only: this runs before any weight is read, and takes about a millisecond."""
    mismatch = checkpoint_mismatch(index_shapes(checkpoint_prefix(model_dir)), hparams)
    if mismatch:
        raise ModelError(f"model folder {model_dir} cannot be loaded: {mismatch}")


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


def read_tf_checkpoint(prefix, n_layer, finite=True):
    """{name: float32 array} for every model tensor, the [1, in, out] conv weights squeezed to [in, out].

    The weights are laid out as decode_order says: generating one token multiplies a single vector by each of
    them, and how fast NumPy's BLAS streams that product depends on the layout. Results are the same either way.

    Raises CheckpointDamaged only when TensorFlow reads the files and finds them wrong; any other failure is a
    ModelError that says what it is, as is a tensor holding NaN or inf (unless finite is False: the caller checks).
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
                flat[name] = array[0] if array.ndim == 3 else array
                if finite:
                    refuse_nonfinite(f"the checkpoint {prefix}", f"model/{name}", flat[name])
    except MemoryError:
        raise ModelError(f"not enough memory to read the checkpoint {prefix}") from None
    except (tf.errors.OpError, IndexError, ValueError) as e:  # TF's words for a bad checksum, table or length
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointDamaged(f"cannot read the checkpoint {prefix}: {reason}") from None
    return in_decode_order(flat)


def nonfinite(array, chunk=1 << 20):
    """"NaN", "inf", "NaN and inf", or None when every number of the array is finite. The sum is one pass
    without a temporary array (NaN and inf survive any sum; a finite sum means every term is finite); only when
    it is not finite (or overflows) are the numbers looked at, in chunks, so peak memory does not double."""
    numbers = array.ravel(order="K")  # a view, in memory order
    with np.errstate(over="ignore"):  # an overflowing sum is no error: the chunks below tell
        total = numbers.sum()
    if np.isfinite(total):
        return None
    nan = inf = False
    for start in range(0, numbers.size, chunk):
        part = numbers[start:start + chunk]
        nan, inf = nan or bool(np.isnan(part).any()), inf or bool(np.isinf(part).any())
    return " and ".join(kind for kind, found in (("NaN", nan), ("inf", inf)) if found) or None


def refuse_nonfinite(where, name, array):
    """ModelError naming the tensor if it holds NaN or inf: such weights make every logit NaN or garbage."""
    found = nonfinite(array)
    if found:
        raise ModelError(f"{where}: tensor {name} holds {found}; the model is damaged (or its training diverged)")


def decode_order(name, shape):
    """The memory order of a tensor in which one token's x @ w streams fastest through OpenBLAS: for a linear
    weight [in, out], "C" (row-major) if it widens (c_attn, c_fc), "F" (column-major: each output's weights
    contiguous) if it narrows or keeps the width (the two c_proj); for wte, what lm_head_order measures; "C" for
    the rest. 124M on 2 cores, one alternating run: decode 50.6 tok/s so, 47.5 with every weight column-major,
    44.2 row-major."""
    if name == "wte":
        return lm_head_order(*shape)
    return "F" if name.endswith("/w") and shape[0] >= shape[1] else "C"


HEAD_TIMED_BYTES = 32 << 20  # a smaller wte stays in the CPU's caches, where either order streams fast


@functools.lru_cache(maxsize=None)
def lm_head_order(n_vocab, n_embd):
    """"C" (each token's row contiguous) or "F" (each of the n_embd columns contiguous): the order of wte in which
    one token's LM head, x @ wte.T, runs faster with this machine's BLAS, timed once per process on a matrix of
    wte's width twice HEAD_TIMED_BYTES in size (past the caches). The two matrix-vector kernels rank differently
    by CPU: on a 2-core AMD EPYC (AVX2) 124M's head took 6.6-7.1 ms in rows and 5.0-5.8 ms in columns (decode
    1.05x-1.12x as fast); an earlier machine streamed rows faster (43 against 34 GB/s). Either way the numbers
    are the same; a lookup wte[ids] in columns gathers each row from n_embd places (6 ms for 1024 ids, not 0.6)."""
    if n_vocab * n_embd * 4 <= HEAD_TIMED_BYTES:
        return "C"
    shape = (2 * HEAD_TIMED_BYTES // (4 * n_embd), n_embd)
    orders = {order: np.ones(shape, dtype=np.float32, order=order) for order in "CF"}
    x = np.ones((1, n_embd), dtype=np.float32)
    best = dict.fromkeys(orders, math.inf)
    for _ in range(3):  # in turn, round after round: a busy moment slows one round of both, not one order
        for order, matrix in orders.items():
            start = time.perf_counter()
            x @ matrix.T
            best[order] = min(best[order], time.perf_counter() - start)
    return min(best, key=best.get)


def in_decode_order(flat, time_head=True):
    """{name: array}, each tensor laid out as decode_order says (a view of those that already are). time_head=False
    leaves wte as it is, untimed: for a load on every run, where lm_head_order's 0.1-0.4 s would cost more than
    it gains."""
    return {name: a if name == "wte" and not time_head else np.asarray(a, order=decode_order(name, a.shape))
            for name, a in flat.items()}


def laid_out_for_decode(flat):
    """Whether every tensor already is in decode_order (a copy converted by an earlier version is not). wte may
    be in either order: lm_head_order chose when the copy was made, and timing it on every load would cost start-up."""
    return all(a.flags.c_contiguous or a.flags.f_contiguous if name == "wte"
               else a.flags[decode_order(name, a.shape) + "_CONTIGUOUS"] for name, a in flat.items())


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


def loaded_shapes(prefix, n_layer):
    """{name: shape} of each tensor as load_params returns it (the conv weights squeezed to [in, out]), from the
    checkpoint's index: what the converted copy must hold too."""
    shapes = index_shapes(prefix)
    missing = [name for name in tensor_names(n_layer) if f"model/{name}" not in shapes]
    if missing:
        raise ModelError(f"the checkpoint {prefix} has no tensor model/{missing[0]}")
    # Shapes that agree with hparams.json can still ask for more memory than the machine has; no tensor is larger
    # than the file that holds it, so that bounds what reading them allocates. 2 bytes: the smallest float a
    # checkpoint holds (float16; GPT-2's are float32).
    numbers = sum(math.prod(shape) for shape in shapes.values())
    stored = sum(os.path.getsize(path) for path in glob.glob(glob.escape(prefix) + ".data-*"))
    if numbers * 2 > stored:
        raise CheckpointDamaged(f"cannot read the checkpoint {prefix}: its data files hold {stored} bytes, too few "
                                f"for the {numbers} numbers its index lists")
    return {name: shapes[f"model/{name}"][1:] if name.endswith("/w") else shapes[f"model/{name}"]
            for name in tensor_names(n_layer)}


def load_converted(converted_dir, fingerprint, shapes):
    """The params converted on an earlier run, memory-mapped, or None if they are missing, stale or damaged.
    shapes ({name: shape}, from the checkpoint's index) are the tensors it must hold: its manifest is trusted for
    nothing that the checkpoint says otherwise. The copy may be in an earlier version's layout (laid_out_for_decode
    tells)."""
    try:
        manifest = read_json(os.path.join(converted_dir, "manifest.json"))
        # "finite": written by a version that refuses NaN and inf, so the checksums vouch for finite numbers; an
        # earlier copy is converted again from the checkpoint, which is checked (no pass here on every warm load)
        if (manifest["checkpoint"] != fingerprint or sorted(manifest["tensors"]) != sorted(shapes)
                or manifest.get("finite") is not True):
            return None
        flat = {}
        for name, expected in manifest["tensors"].items():
            if tuple(expected["shape"]) != shapes[name]:  # before the file is mapped
                return None
            array = np.load(os.path.join(converted_dir, name.replace("/", ".") + ".npy"), mmap_mode="r")
            array = np.asarray(array)  # a plain ndarray view of the mapping: np.memmap adds cost to every op
            if array.shape != shapes[name] or array.dtype != np.float32 or checksum(array) != expected["checksum"]:
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
            json.dump({"checkpoint": fingerprint, "finite": True, "tensors": tensors}, f, indent=1)
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
    otherwise read from the checkpoint with TensorFlow (or from a copy in an earlier version's layout) and
    converted for next time. The converted copy is only a speed-up: when it cannot be written (a read-only
    folder, a full disk), a warning says so and the run goes on."""
    prefix = checkpoint_prefix(model_dir)
    fingerprint = checkpoint_fingerprint(prefix)
    shapes = loaded_shapes(prefix, n_layer)
    converted_dir = os.path.join(model_dir, CONVERTED)
    flat = load_converted(converted_dir, fingerprint, shapes)
    if flat is not None and laid_out_for_decode(flat):
        return flat
    # A copy in an earlier version's layout holds the checkpoint's numbers: it is laid out anew from itself
    # (no TensorFlow), and used as it is where no new copy can be written (a read-only folder, a full disk).
    earlier = flat
    try:
        held = hold(model_dir, f"converting {os.path.basename(os.path.normpath(model_dir))}")
    except OSError as e:
        if earlier is not None:
            return earlier
        warn_unsaved(converted_dir, e)
        return read_tf_checkpoint(prefix, n_layer)
    with held, terminate_as_exit():
        flat = load_converted(converted_dir, fingerprint, shapes)  # written while this process waited?
        if flat is None or not laid_out_for_decode(flat):
            for leftover in glob.glob(glob.escape(converted_dir) + ".tmp*"):  # its writer died: we hold the lock
                shutil.rmtree(leftover, ignore_errors=True)
            flat = in_decode_order(earlier) if earlier is not None else read_tf_checkpoint(prefix, n_layer)
            try:
                save_converted(converted_dir, fingerprint, flat)
            except OSError as e:
                if earlier is not None:
                    return earlier
                warn_unsaved(converted_dir, e)
    return flat


# --- Model folders --------------------------------------------------------------------------------------------------

def local_models(models_dir):
    """The model folders in models_dir; hidden ones (a run's .<name>.tmp... and .<name>.old... folders while it
    saves) are no models of their own."""
    try:
        return sorted(name for name in os.listdir(models_dir)
                      if not name.startswith(".") and
                      any(os.path.isfile(os.path.join(models_dir, name, f)) for f in ("checkpoint", "config.json")))
    except OSError:
        return []


def is_bare_name(model_size):
    return "/" not in model_size and os.sep not in model_size and model_size not in (".", "..") \
        and not model_size.startswith("~")


def model_kind(model_size, models_dir):
    """What a model name stands for, without looking it up anywhere: "release" (a release size), "folder" (a
    folder in models_dir), "path" (an existing folder: ./x, ../runs/x, /abs/x), "hub" (a Hub repo id,
    owner/name[@revision]), or None. An existing path wins over a repo id, as in transformers' from_pretrained."""
    import hf

    if model_size in RELEASE_SIZES:
        return "release"
    if is_bare_name(model_size):  # never a path nor a repo id, even if ./<name> exists
        return "folder" if os.path.isdir(os.path.join(models_dir, model_size)) else None
    if os.path.isdir(os.path.expanduser(model_size)):
        return "path"
    return "hub" if hf.parse_repo_id(model_size) else None


def resolve_model(model_size, models_dir):
    """The local folder a model name stands for: models_dir/<name> for a release size or a folder there, the
    path itself, or a Hub repo's snapshot in huggingface_hub's cache (its small files fetched now, the weights by
    prepare_model). The name must have passed check_model_name."""
    kind = model_kind(model_size, models_dir)
    if kind == "hub":
        import hf

        return hf.hub_folder(model_size)
    return os.path.expanduser(model_size) if kind == "path" else os.path.join(models_dir, model_size)


def check_model_name(model_size, models_dir, flag="--model_size", also=()):
    """Only the release sizes and Hub repo ids download; any other name must be a model folder that is already
    there. `also` names other values the flag takes (train.py's "scratch")."""
    if not isinstance(model_size, str) or not model_size:
        raise UsageError(f"{flag} must be a model name, a folder or a Hub repo id, got {model_size!r}")
    if not isinstance(models_dir, (str, os.PathLike)) or not os.fspath(models_dir):  # "" is no folder: models
        raise UsageError(f"--models_dir must name a folder, got {models_dir!r}")  # would land in the current one
    if os.path.exists(models_dir) and not os.path.isdir(models_dir):
        raise ModelError(f"--models_dir {models_dir} is a file, not a folder")
    path = os.path.expanduser(model_size)  # a file there is a path the user meant, never a Hub repo id (owner/name)
    if not is_bare_name(model_size) and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {model_size!r} is a file, not a model folder")
    if model_kind(model_size, models_dir) is None:
        found = ", ".join(local_models(models_dir)) or "none"
        here = f"; for the folder {model_size} here, write ./{model_size}" if is_bare_name(model_size) and \
            os.path.isdir(model_size) else ""
        if not is_bare_name(model_size):
            raise UsageError(f"no such model folder {model_size!r}, and it is no Hub repo id (owner/name)")
        raise UsageError(f"unknown {'model' if flag == '--model_size' else flag} {model_size!r}: use "
                         f"{''.join(name + ', ' for name in also)}one of {', '.join(RELEASE_SIZES)} (downloaded if "
                         f"missing), a model folder in {models_dir} (found: {found}), a path to a model folder, or "
                         f"a Hugging Face Hub repo id such as openai-community/gpt2{here}")


def prepare_tokenizer(model_size, models_dir):
    """The model's folder, checked to hold a valid hparams.json, encoder.json and vocab.bpe, downloading a
    release model's (and only those: the checkpoint can wait until the prompt has been checked against them).
    Another folder with a problem is reported with one line naming the file."""
    models_url()  # a bad GPT2_MODELS_URL is a usage error, reported before any work
    check_model_name(model_size, models_dir)
    model_dir = resolve_model(model_size, models_dir)
    if is_hf_layout(model_dir):
        return prepare_hf_tokenizer(model_dir)
    if model_size in RELEASE_SIZES:
        download_release(model_size, model_dir, TOKENIZER_FILES)
    report_problems(model_dir, folder_problems(model_dir, TOKENIZER_FILES))
    check_tokenizer_folder(model_size, model_dir)
    return model_dir


def from_openai():
    """Whether release sizes come from OpenAI's bucket. A mirror (GPT2_MODELS_URL) may serve any model under a
    release size's name, as the tests' mirror does; its checkpoint is still checked against its hparams.json."""
    return not os.environ.get("GPT2_MODELS_URL") or models_url() == RELEASE_URL


def check_tokenizer_folder(model_size, model_dir):
    """The checks that need more than one of the small files, after each was found valid alone: a release size's
    hparams are the release's, hparams.json's n_vocab is encoder.json's size, and vocab.bpe's merges make
    symbols encoder.json has. Raises ModelError naming the file and the value."""
    hparams = read_json(os.path.join(model_dir, "hparams.json"))  # valid alone: file_problem said so
    release = RELEASE_HPARAMS.get(model_size) if from_openai() else None
    for name in sorted(release or ()):
        if hparams[name] != release[name]:
            raise ModelError(f"{model_dir}/hparams.json says {name} {hparams[name]}, but OpenAI's {model_size} has "
                             f"{name} {release[name]}: the folder holds another model (give it a name of its own, "
                             f"or remove it to download {model_size})")
    if hparams["n_vocab"] != N_VOCAB:
        raise ModelError(f"{model_dir}/hparams.json says n_vocab {hparams['n_vocab']}, but encoder.json holds "
                         f"{N_VOCAB} tokens")
    problem = merges_problem(model_dir)
    if problem:
        raise ModelError(f"model folder {model_dir} cannot be loaded: {problem}")


def prepare_model(model_size, models_dir):
    """The model's folder, checked to hold a complete checkpoint. A release model's missing or broken files are
    downloaded (again); another folder with a problem is reported, never half-loaded."""
    model_dir = prepare_tokenizer(model_size, models_dir)
    if is_hf_layout(model_dir):
        return prepare_hf_model(model_dir)
    if model_size in RELEASE_SIZES:
        download_release(model_size, model_dir, CHECKPOINT_FILES)
    report_problems(model_dir, checkpoint_problems(model_dir))
    load_hparams(model_dir)  # which compares the checkpoint's index with hparams.json
    return model_dir


def load_hparams(model_dir):
    """hparams.json, checked: whole numbers within HPARAMS_LIMIT, and, once the folder holds a checkpoint, the
    shapes of its tensors (from the index, before any weight is read). Raises ModelError naming the value."""
    if is_hf_layout(model_dir):
        import hf

        return hf.check_config(model_dir)
    path = os.path.join(model_dir, "hparams.json")
    problem = file_problem(path, "hparams.json")
    if problem:
        raise ModelError(f"model folder {model_dir} cannot be loaded: hparams.json {problem}")
    hparams = read_json(path)
    if not checkpoint_problems(model_dir):
        check_checkpoint(model_dir, hparams)
    return hparams


# --- Hugging Face's layout (hf.py does the work) --------------------------------------------------------------------

def is_hf_layout(model_dir):
    import hf

    return hf.is_hf_folder(model_dir)


def prepare_hf_tokenizer(model_dir):
    """An HF folder checked to be a GPT-2 that the forward pass implements, with its tokenizer files."""
    import hf

    hf.check_tokenizer(model_dir, hf.check_config(model_dir)["n_vocab"])
    return model_dir


def prepare_hf_model(model_dir):
    """An HF folder (a Hub repo's weights fetched now) whose tensors fit its config.json, checked from the
    safetensors header before any data is read."""
    import hf

    hf.fetch_weights(model_dir)
    hf.check_weights(model_dir, hf.check_config(model_dir))
    return model_dir


def load_model_params(model_size, models_dir, n_layer):
    """The params tree of a prepared model. A release checkpoint that TensorFlow finds damaged (a data file
    shorter than its index says, a checksum that does not match) is downloaded once more before giving up."""
    model_dir = resolve_model(model_size, models_dir)
    if is_hf_layout(model_dir):
        import hf

        return nest(hf.load_params(model_dir, hf.check_config(model_dir)), n_layer)
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
    return load_encoder(model_dir), hparams, load_model_params(model_size, models_dir, hparams["n_layer"])


def save_release_model(model_dir, params, hparams, vocab_dir, prefix="model.ckpt"):
    """Write params (the tree gpt2.py unpacks) into model_dir in OpenAI's release layout, so that everything
    that loads a release model loads it: a TF1 name-based checkpoint with the conv weights as [1, in, out],
    `checkpoint`, hparams.json, and encoder.json and vocab.bpe copied from vocab_dir. The caller picks a fresh
    model_dir and renames it into place when this returns (see runs.py): every file written here, TensorFlow's
    included, is on disk by then."""
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
    for name in ("encoder.json", "vocab.bpe"):  # or HF's names for them, vocab.json and merges.txt
        shutil.copyfile(tokenizer_file(vocab_dir, name), os.path.join(model_dir, name))
    fsync_folder(model_dir)


def tokenizer_file(model_dir, name):
    import hf

    return hf.tokenizer_source(model_dir, name)
