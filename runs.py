"""The plumbing of a training run, so that train.py can stay the tutorial: the flags and their checks, the dataset
read and tokenized (with a cache), and the run's folder, with its saves, its record of how it was started and its
log. train.py imports this module; it never imports train.

A run named `story` lives in two places under --models_dir:

    story -> .story.saves/000500.3fa2c1   a relative symbolic link to the current save
    .story.saves/                         the run's own folder
        000500.3fa2c1/                    a save: the release layout, train_state.npz, log.csv, train_config.json
        live-log.csv                      the log as the run goes (each save copies it in)

A save is written whole into a folder of its own, every file and the folder fsynced, and only then does the link
`story` change, in one atomic os.replace; the previous save is removed after that. So whatever moment a process
dies (a kill, a power cut), `story` names a complete save, and everything that loads a model folder (gpt2.py,
score.py, --init_from) loads it unchanged: a link to a folder is a folder.
"""
import contextlib
import csv
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
import zipfile

import numpy as np

import utils
from cli import check, is_int, is_number, warn
from encoder import load_encoder
from gpt2 import ENDOFTEXT

VAL_FRACTION = 0.1  # without --val_dataset, the last 10% of the tokens are held out for validation
STATE_FILE = "train_state.npz"  # beside the model: AdamW's moments, the step, the batch generator's state
LOG_FILE = "log.csv"
CONFIG_FILE = "train_config.json"  # the options the run was started with and fingerprints of its data
TOKEN_CACHE = "token-cache"  # the folder in --models_dir that keeps tokenized datasets
LOG_COLUMNS = ("step", "train_loss", "val_loss", "lr", "tokens_per_s", "session")
LIVE_LOG = "live-log.csv"
NEW_LINK = "link.tmp"  # the link being made, in the saves folder (where its relative target resolves to nothing)
REPLACED = "replaced"  # where a real folder goes while a link takes its name, on systems without an exchange
SAVE_NAME = re.compile(r"\d{6,}\.[0-9a-f]{6}")  # <step>.<random>: a name never used twice, even by --overwrite
PARTIAL_NAME = re.compile(r"\d{6,}\.[0-9a-f]{6}\.partial")

# What --resume may not change: every option that enters the arithmetic. The others may change on resume.
FIXED_ON_RESUME = ("dataset", "val_dataset", "init_from", "n_layer", "n_head", "n_embd", "n_ctx", "block_size",
                   "batch_size", "grad_accum", "learning_rate", "warmup_steps", "lr_decay_steps", "weight_decay",
                   "grad_clip", "seed")
SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "n_ctx")  # the shape of a model from scratch; a loaded one has its own
FREE_ON_RESUME = ("max_steps", "eval_every", "save_every")
OPTIONS = FIXED_ON_RESUME + FREE_ON_RESUME

DAMAGED_STATE = ("--resume cannot continue it; its weights can still start a new run (--init_from {name} "
                 "--out_name NEW), or --overwrite starts this one again")
DAMAGED_MODEL = "--resume cannot continue it; --overwrite starts it again"


class RunError(utils.ModelError):
    """A run that cannot be read or written (a damaged file, a full disk): the CLI prints one line, exit 1."""


class Default:
    """A flag's value when the command line leaves it out. A new run uses the value; --resume uses the run's
    recorded one instead, so only a flag that is given can be refused for changing the run."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):  # what --help shows
        return repr(self.value)


def given(value):
    return not isinstance(value, Default)


def plain(value):
    return value.value if isinstance(value, Default) else value


# ---------------------------------------------------------------------------------------------- the flags

def check_flags(flags):
    """The flags that must be whole numbers or positive, with one message each."""
    for name in ("block_size", "batch_size", "grad_accum", "max_steps", "lr_decay_steps", "n_layer", "n_head",
                 "n_embd", "n_ctx"):
        value = flags[name]
        check(is_int(value) and value > 0, f"--{name} must be a positive whole number, got {value!r}")
    for name in ("warmup_steps", "eval_every", "save_every", "seed"):
        value = flags[name]
        check(is_int(value) and value >= 0, f"--{name} must be a whole number >= 0, got {value!r}")
    check(is_number(flags["learning_rate"]) and flags["learning_rate"] > 0,
          f"--learning_rate must be a positive number, got {flags['learning_rate']!r}")
    for name in ("weight_decay", "grad_clip"):
        value = flags[name]
        check(is_number(value) and value >= 0, f"--{name} must be a number >= 0, got {value!r}")
    for name in ("dataset", "val_dataset"):
        check(flags[name] is None or (isinstance(flags[name], str) and flags[name]),
              f"--{name} must be a path, got {flags[name]!r}")


def check_models_dir(models_dir):
    check(isinstance(models_dir, str) and models_dir, f"--models_dir must name a folder, got {models_dir!r}")
    check(not os.path.exists(models_dir) or os.path.isdir(models_dir),
          f"--models_dir {models_dir} is a file, not a folder")
    existing = models_dir
    while not os.path.exists(existing):  # the folder is made later: what matters is the first one that exists
        existing = os.path.dirname(os.path.abspath(existing))
    check(os.access(existing, os.W_OK), f"cannot write in --models_dir {models_dir}: "
                                        f"{'read-only file system' if read_only(existing) else 'permission denied'}")


def read_only(path):
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def already_exists(run_dir):
    if os.path.exists(os.path.join(run_dir, STATE_FILE)):
        return f"{run_dir} already exists: --resume continues it, --overwrite starts it again"
    return f"{run_dir} already exists and is no saved training run: --overwrite replaces it"


def check_out_name(out_name, models_dir, resume, overwrite):
    check(out_name is not None, f"--out_name is required: the run's folder name in {models_dir}; python train.py "
                                f"--help lists every flag")
    check(isinstance(out_name, str) and out_name and "/" not in out_name and os.sep not in out_name
          and out_name not in (".", "..") and not out_name.startswith("."),
          f"--out_name must be a folder name in {models_dir}, not a path: got {out_name!r}")
    check(out_name not in utils.RELEASE_SIZES, f"--out_name {out_name} is a release model's name: choose another")
    check(out_name != TOKEN_CACHE, f"--out_name {TOKEN_CACHE} is where tokenized datasets are kept: choose another")
    check(isinstance(resume, bool) and isinstance(overwrite, bool), "--resume and --overwrite take no value")
    check(not (resume and overwrite), "give --resume or --overwrite, not both")
    run_dir = os.path.join(models_dir, out_name)
    if resume:
        check(os.path.exists(os.path.join(run_dir, STATE_FILE)),
              f"--resume: {run_dir} holds no saved training run ({STATE_FILE}); start one without --resume")
    else:
        check(overwrite or not os.path.lexists(run_dir), already_exists(run_dir))
    return run_dir


def check_init_from(init_from, models_dir, flags):
    """What can be known about --init_from and the model's shape before anything is downloaded."""
    if init_from == "scratch":
        check(flags["n_embd"] % flags["n_head"] == 0,
              f"--n_embd {flags['n_embd']} must be divisible by --n_head {flags['n_head']}")
        check(flags["block_size"] <= flags["n_ctx"], f"--block_size {flags['block_size']} is longer than --n_ctx "
                                                     f"{flags['n_ctx']}, the model's context")
        return
    utils.check_model_name(init_from, models_dir, flag="--init_from", also=("scratch",))
    if init_from in utils.RELEASE_SIZES:  # every release model reads 1024 positions
        check(flags["block_size"] <= 1024, f"--block_size {flags['block_size']} is longer than {init_from}'s "
                                           f"context of 1024")


def vocabulary_dir(init_from, models_dir):
    """The folder whose encoder.json and vocab.bpe tokenize the dataset: the model's (124M's for a model from
    scratch). Of a release, only those small files are downloaded now: the dataset is checked before the weights
    are fetched."""
    return utils.prepare_tokenizer("124M" if init_from == "scratch" else init_from, models_dir)


def model_hparams(init_from, models_dir, flags):
    """The hparams of the model to train: the flags' shape from scratch, else the (downloaded) model's."""
    if init_from == "scratch":
        return {"n_vocab": 50257, **{k: flags[k] for k in ("n_ctx", "n_embd", "n_head", "n_layer")}}
    hparams = utils.load_hparams(utils.prepare_model(init_from, models_dir))
    check(flags["block_size"] <= hparams["n_ctx"], f"--block_size {flags['block_size']} is longer than "
                                                   f"{init_from}'s context of {hparams['n_ctx']}")
    return hparams


def resolve_options(flags, record, run_dir):
    """{option: value}: on a new run the flags (defaults filled in); on --resume the run's recorded options, with
    --max_steps, --eval_every and --save_every as given. A given option that would change the run is refused,
    naming the recorded value. The data are compared by fingerprint later (check_fingerprints)."""
    options = {name: plain(flags[name]) for name in OPTIONS}
    if record is None:
        return options
    recorded = record["options"]
    for name in FIXED_ON_RESUME:
        if name in ("dataset", "val_dataset"):
            options[name] = flags[name] if given(flags[name]) else recorded[name]
        elif given(flags[name]) and flags[name] != recorded[name]:
            raise utils.UsageError(f"--{name} {flags[name]!r} would change the run: {run_dir} was started with "
                                   f"--{name} {recorded[name]!r}, and --resume continues it as it was (leave "
                                   f"--{name} out, or start a new run)")
        else:
            options[name] = recorded[name]
    for name in FREE_ON_RESUME:
        options[name] = flags[name] if given(flags[name]) else recorded[name]
    return options


def check_fingerprints(record, options, fingerprints, run_dir):
    """The data of a resumed run must be the data it was trained on: same text, same vocabulary."""
    recorded, was = record["fingerprints"], record["options"]
    for name in ("dataset", "val_dataset"):
        if recorded[name] == fingerprints[name]:
            continue
        if was[name] is None:
            raise utils.UsageError(f"--{name} {options[name]}: {run_dir} was started without --{name} (it holds "
                                   f"out the last 10% of --dataset), and --resume continues it as it was")
        if fingerprints[name] is None:
            raise utils.UsageError(f"{run_dir} was started with --{name} {was[name]}: --resume needs the same text")
        raise utils.UsageError(f"--{name} {options[name]} is not the text {run_dir} was trained on (--{name} "
                               f"{was[name]}, sha256 {recorded[name][:12]}..., now {fingerprints[name][:12]}...): "
                               f"--resume continues on the same data; give --{name} with that text")
    if recorded["vocabulary"] != fingerprints["vocabulary"]:
        raise RunError(f"{run_dir}/encoder.json and vocab.bpe are not the vocabulary the run was trained with: "
                       f"restore them; {DAMAGED_MODEL}")


# ---------------------------------------------------------------------------------------------- the data

FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def kind_of(mode):
    return next((kind for test, kind in FILE_KINDS if test(mode)), "not a regular file")


def dataset_files(path, flag):
    """The files of a --dataset: the file itself, or a folder's .txt files in name order. Only regular files are
    ever opened: a FIFO would block the run forever, a device would never end. Inside a folder, such entries
    (and broken links) are skipped, each named on stderr."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise utils.UsageError(f"{flag} {path}: no such file or folder") from None
    except OSError as e:
        raise utils.UsageError(f"{flag} {path}: {e.strerror}") from None
    if stat.S_ISREG(mode):
        return [path]
    if not stat.S_ISDIR(mode):
        raise utils.UsageError(f"{flag} {path} is {kind_of(mode)}, not a file or folder")
    try:
        names = sorted(name for name in os.listdir(path) if name.endswith(".txt"))
    except OSError as e:
        raise utils.UsageError(f"{flag} {path}: {e.strerror}") from None
    files = []
    for name in names:
        file = os.path.join(path, name)
        try:
            mode = os.stat(file).st_mode
        except FileNotFoundError:
            warn(f"{flag} {path}: skipping {name}, a broken link")
            continue
        except OSError as e:
            raise utils.UsageError(f"{flag} {file}: {e.strerror}") from None
        if not stat.S_ISREG(mode):
            warn(f"{flag} {path}: skipping {name}, {kind_of(mode)}")
            continue
        files.append(file)
    check(files, f"{flag} {path}: the folder holds no .txt files")
    return files


def read_text_file(file, flag):
    # O_NONBLOCK: should the file have become a FIFO since it was looked at, opening it still returns at once
    fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        check(stat.S_ISREG(mode), f"{flag} {file} is {kind_of(mode)}, not a file")
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise utils.UsageError(f"{flag} {file} is not UTF-8 text (byte {e.start} cannot be decoded)") from None


def dataset_texts(path, flag):
    """The documents of a .txt file or of a folder's .txt files (sorted by name), as strings."""
    texts = []
    for file in dataset_files(path, flag):
        try:
            texts.append(read_text_file(file, flag))
        except OSError as e:
            raise utils.UsageError(f"{flag} {file}: {e.strerror}") from None
    check(any(text.strip() for text in texts), f"{flag} {path} is empty")
    return texts


def text_fingerprint(texts):
    """The sha256 of the documents, in order: what the run's record and the token cache know the text by."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")  # the separator keeps "ab" + "c" apart from "a" + "bc"
    return digest.hexdigest()


def vocabulary_fingerprint(vocab_dir):
    digest = hashlib.sha256()
    for name in ("encoder.json", "vocab.bpe"):
        try:
            with open(utils.tokenizer_file(vocab_dir, name), "rb") as f:  # or HF's vocab.json, merges.txt
                digest.update(f.read() + b"\0")
        except OSError as e:
            raise RunError(f"cannot read {utils.tokenizer_file(vocab_dir, name)}: {e.strerror}") from None
    return digest.hexdigest()


def token_cache_path(cache_dir, text_digest, vocab_digest):
    """Where the tokens of a text are kept: named by the text and the vocabulary, so an edited text, or the same
    text under another vocabulary, is tokenized afresh, and an unchanged one never again."""
    return os.path.join(cache_dir, hashlib.sha256(f"{text_digest} {vocab_digest}".encode()).hexdigest() + ".npy")


def cached_tokens(path):
    """The cached token stream, or None if it is missing or damaged (it is then tokenized and written again)."""
    try:
        tokens = np.load(path)
    except (OSError, ValueError, EOFError):
        return None
    return tokens if tokens.dtype == np.uint16 and tokens.ndim == 1 and len(tokens) else None


def tokenize(texts, encoder):  # -> [n_tokens] uint16
    """Every document's tokens followed by <|endoftext|>, one stream. uint16 holds GPT-2's 50257 ids in
    half the memory of int32; the stream is read a window at a time."""
    ids = []
    for text in texts:
        ids += encoder.encode(text) + [ENDOFTEXT]
    return np.array(ids, dtype=np.uint16)


def save_tokens(tokens, path):
    """Write the cache file under a temporary name, fsync it and rename it into place: another run reading the
    cache never sees half a file, and a crash never leaves one. On any failure the temporary file is removed."""
    cache_dir = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with open(fd, "wb") as f:
            np.save(f, tokens)
            utils.fsync_file(f)
        os.replace(tmp, path)
        tmp = None
        utils.fsync_dir(cache_dir)
    except OSError as e:
        raise RunError(f"cannot write the token cache {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def split_tokens(tokens, val_tokens, block_size, eval_every):
    """(training tokens, validation tokens): --val_dataset's, or the last 10% of the dataset's."""
    check(len(tokens) >= block_size + 1, f"--dataset has {len(tokens)} tokens, fewer than --block_size + 1 = "
                                         f"{block_size + 1}")
    if val_tokens is None:
        split = int(len(tokens) * (1.0 - VAL_FRACTION))
        check(split >= block_size + 1, f"--dataset has {len(tokens)} tokens: its first 90%, for training, are "
                                       f"fewer than --block_size + 1 = {block_size + 1} (give --val_dataset or a "
                                       f"smaller --block_size)")
        tokens, val_tokens = tokens[:split], tokens[split:]
    check(not eval_every or len(val_tokens) >= 2,
          f"the validation text is {len(val_tokens)} token{'s' * (len(val_tokens) != 1)}: a validation loss needs "
          f"at least 2 (give a longer --val_dataset, more text, or --eval_every 0)")
    return tokens, val_tokens


# ---------------------------------------------------------------------------------------------- the saved run

def saves_dir(run_dir):
    parent, name = os.path.split(os.path.normpath(run_dir))
    return os.path.join(parent, f".{name}.saves")


def read_config(run_dir):
    """The run's record (train_config.json), or None for a run saved by a train.py that wrote none."""
    path = os.path.join(run_dir, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e}): {DAMAGED_STATE}"
                       .format(name=os.path.basename(run_dir))) from None
    ok = (isinstance(record, dict) and isinstance(record.get("options"), dict)
          and isinstance(record.get("fingerprints"), dict) and set(OPTIONS) <= set(record["options"])
          and {"dataset", "val_dataset", "vocabulary"} <= set(record["fingerprints"]))
    if not ok:
        raise RunError(f"{path} is not a record train.py wrote (it needs options and fingerprints): "
                       + DAMAGED_STATE.format(name=os.path.basename(run_dir)))
    return record


class Saved:
    """A save read back whole: the weights, AdamW's moments, the step, the batch generator and the log's rows."""

    def __init__(self, save_dir, hparams, params, m, v, adam_t, step, rng, rows):
        self.save_dir, self.hparams, self.params = save_dir, hparams, params
        self.m, self.v, self.adam_t, self.step, self.rng, self.rows = m, v, adam_t, step, rng, rows


def read_saved_run(run_dir):
    """Everything --resume needs from the run's current save, every file checked: a file that is missing, empty,
    truncated, of the wrong shape or garbage is one RunError naming it and what to do."""
    save_dir = os.path.realpath(run_dir)  # read one save, even if another process saves a newer one meanwhile
    name = os.path.basename(os.path.normpath(run_dir))

    def damaged(file, problem, hint=DAMAGED_STATE):
        return RunError(f"{os.path.join(run_dir, file)} {problem}: {hint.format(name=name)}")

    for file, problem in utils.folder_problems(save_dir, ("hparams.json", "encoder.json", "vocab.bpe")).items():
        raise damaged(file, f"is {problem}" if problem in ("missing", "empty") else problem, DAMAGED_MODEL)
    hparams = utils.load_hparams(save_dir)
    for file, problem in utils.checkpoint_problems(save_dir).items():
        raise damaged(file, f"is {problem}" if problem in ("missing", "empty") else problem, DAMAGED_MODEL)
    try:
        flat = utils.read_tf_checkpoint(utils.checkpoint_prefix(save_dir), hparams["n_layer"])
    except utils.ModelError as e:
        raise RunError(f"{e}: {DAMAGED_MODEL}") from None
    shapes = {name: array.shape for name, array in flat.items()}
    params = utils.nest({n: np.ascontiguousarray(a) for n, a in flat.items()}, hparams["n_layer"])
    m, v, adam_t, step, rng = read_state(save_dir, shapes, damaged)
    rows = read_log(os.path.join(save_dir, LOG_FILE), step, damaged)
    return Saved(save_dir, hparams, params, m, v, adam_t, step, rng, rows)


def read_state(save_dir, shapes, damaged):
    """AdamW's moments (flat, by tensor name, each the shape of its weight), its update count, the step and the
    batch generator, from train_state.npz."""
    path = os.path.join(save_dir, STATE_FILE)
    try:
        if os.path.getsize(path) == 0:
            raise damaged(STATE_FILE, "is empty")
        with np.load(path) as state:
            missing = [key for key in ("step", "adam_t", "rng", *(f"{kind}/{name}" for kind in "mv" for name in shapes))
                       if key not in state.files]
            if missing:
                raise damaged(STATE_FILE, f"has no {missing[0]}")
            moments = {kind: {name: state[f"{kind}/{name}"] for name in shapes} for kind in "mv"}
            step, adam_t, rng_state = state["step"], state["adam_t"], state["rng"]
    except FileNotFoundError:
        raise damaged(STATE_FILE, "is missing") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise damaged(STATE_FILE, f"is damaged ({e})") from None
    for kind in "mv":
        for name, array in moments[kind].items():
            if array.shape != shapes[name] or array.dtype != np.float32:
                raise damaged(STATE_FILE, f"holds {kind}/{name} as {array.dtype} {list(array.shape)}, where the "
                                          f"weight is float32 {list(shapes[name])}")
    if not (step.shape == () and adam_t.shape == () and np.issubdtype(step.dtype, np.integer)
            and np.issubdtype(adam_t.dtype, np.integer) and step >= 1 and adam_t >= 1):
        raise damaged(STATE_FILE, "holds no valid step and update count")
    try:
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(str(rng_state))
        rng.bit_generator.random_raw()  # a state the generator took but cannot run would fail here
        rng.bit_generator.state = json.loads(str(rng_state))
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        raise damaged(STATE_FILE, f"holds no valid state of the batch generator ({type(e).__name__}: {e})") from None
    return moments["m"], moments["v"], int(adam_t), int(step), rng


def read_log(path, step, damaged):
    """The rows of the saved log.csv, which must be steps 1..step with numbers where numbers belong."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames
    except FileNotFoundError:
        raise damaged(LOG_FILE, "is missing") from None
    except (OSError, ValueError, csv.Error) as e:
        raise damaged(LOG_FILE, f"cannot be read ({e})") from None
    if not header:
        raise damaged(LOG_FILE, "is empty")
    if tuple(header) not in (LOG_COLUMNS, LOG_COLUMNS[:-1]):  # an older train.py wrote no session column
        raise damaged(LOG_FILE, f"is garbled: its header is {','.join(header)}, not {','.join(LOG_COLUMNS)}")
    for i, row in enumerate(rows):
        try:
            ok = int(row["step"]) == i + 1 and None not in row and all(row[k] is not None for k in header)
            for key in ("train_loss", "lr", "tokens_per_s") + (("val_loss",) if row["val_loss"] else ()):
                float(row[key])
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise damaged(LOG_FILE, f"is garbled at row {i + 2}: {','.join(str(v) for v in row.values())}")
    if len(rows) < step:
        raise damaged(LOG_FILE, f"has rows for {len(rows)} steps, not the {step} saved")
    return rows[:step]


# ---------------------------------------------------------------------------------------------- the run folder

def fsynced_write(path, write, mode="wb"):
    with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
        write(f)
        utils.fsync_file(f)


def exchange(a, b):
    """Swap two names in one atomic step (Linux's renameat2 with RENAME_EXCHANGE): a real folder can then become a
    link with no moment where its name is missing. False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def write_error(error):
    """What went wrong in writing, as the system says it, or None for an error that is no failure to write.
    TensorFlow's SaveV2 reports a full disk as one of its own errors, whose message ends with the system's."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(error, tf.errors.OpError):
        message = error.message.strip().splitlines()[0] if error.message.strip() else type(error).__name__
        return next((os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
                     if os.strerror(code) in message), message)
    return None


def put_back(run_dir):
    """A real folder that a process moved aside for a link and died before the link took its name (only on
    systems without an atomic exchange) goes back under its name, by whichever train.py next opens the run."""
    replaced = os.path.join(saves_dir(run_dir), REPLACED)
    if os.path.lexists(run_dir) or not os.path.isdir(replaced):
        return
    try:
        with utils.exclusive(run_dir):  # the one process that may write the run (the lock counts up if held)
            if not os.path.lexists(run_dir) and os.path.isdir(replaced):
                os.rename(replaced, run_dir)
                utils.fsync_dir(os.path.dirname(saves_dir(run_dir)))
    except OSError as e:
        raise RunError(f"cannot put {replaced} back as {run_dir}: {e.strerror or e}") from None


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class Run:
    """The run's folder while this process trains it. `with Run(...)` takes the run's writer lock (a second run on
    the name is refused), puts back what a dead process left half-done and removes its leftovers; saves go into
    .<name>.saves/ and the name is switched to each in turn."""

    def __init__(self, run_dir, hparams, vocab_dir, config, record, rows=(), overwrite=False):
        self.run_dir, self.hparams, self.vocab_dir, self.config = run_dir, hparams, vocab_dir, config
        self.record, self.rows, self.overwrite = record, list(rows), overwrite
        self.saves = saves_dir(run_dir)
        self.parent = os.path.dirname(self.saves)
        self.saved_step = None  # the step of this process's last save
        self.session = 1 + max((int(row.get("session") or 1) for row in self.rows), default=0)
        self.stack = contextlib.ExitStack()
        self.log = None

    def __enter__(self):
        try:
            os.makedirs(self.parent, exist_ok=True)
            self.stack.enter_context(utils.exclusive(self.run_dir))
        except OSError as e:
            raise RunError(f"cannot write in {self.parent}: {e.strerror or e}") from None
        try:
            self.open()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc):
        try:
            if self.log is not None:  # the run ends here, whatever ended it: its last save holds its log
                self.close_log()
        finally:
            self.stack.close()

    def open(self):
        try:
            new = not os.path.isdir(self.saves)
            os.makedirs(self.saves, exist_ok=True)
            if new:
                utils.fsync_dir(self.parent)
            with self.readers_held():
                self.recover()
                self.remove_leftovers()
        except OSError as e:
            raise RunError(f"cannot write in {self.parent}: {e.strerror or e}") from None

    def start_log(self):
        """The log of this process's steps, beside the saves, starting with the saved rows."""
        try:
            self.log = open(os.path.join(self.saves, LIVE_LOG), "w", newline="", encoding="utf-8")
            self.writer = csv.DictWriter(self.log, LOG_COLUMNS)
            self.writer.writeheader()
            self.writer.writerows(self.rows)
            self.log.flush()
        except OSError as e:
            raise RunError(f"cannot write {os.path.join(self.saves, LIVE_LOG)}: {e.strerror or e}") from None

    def readers_held(self):
        """The lock that a process loading the run takes while it converts a save to numpy-params/: the name is
        never switched, nor a save removed, under its feet."""
        return utils.hold(self.run_dir, f"loading {os.path.basename(self.run_dir)}")

    def current(self):
        """The name of the save the run's link points at, or None (no link, a real folder, a foreign link)."""
        try:
            target = os.readlink(self.run_dir)
        except OSError:
            return None
        head, name = os.path.split(target)
        return name if head == os.path.basename(self.saves) and SAVE_NAME.fullmatch(name) else None

    def recover(self):
        put_back(self.run_dir)

    def remove_leftovers(self):
        """Only names this module makes, in the run's own folder, and never the current save."""
        current = self.current()
        for entry in os.listdir(self.saves):
            if entry != current and (SAVE_NAME.fullmatch(entry) or PARTIAL_NAME.fullmatch(entry)
                                     or entry in (NEW_LINK, REPLACED, LIVE_LOG)):
                remove(os.path.join(self.saves, entry))

    def log_step(self, **row):
        row["session"] = self.session
        self.rows.append(row)
        self.writer.writerow(row)
        self.log.flush()

    def save_due(self, step, interrupted):
        """A save every --save_every steps and at the end; on Ctrl-C too, except before the first save of an
        --overwrite, which keeps the old run as it was."""
        config = self.config
        scheduled = step == config["max_steps"] or (config["save_every"] and step % config["save_every"] == 0)
        return scheduled or (interrupted and not (self.overwrite and self.saved_step is None))

    def save(self, step, params, optimizer, rng):
        """Write the save whole, then switch the run's name to it, then remove the previous one."""
        name = f"{step:06d}.{secrets.token_hex(3)}"
        partial, final = os.path.join(self.saves, name + ".partial"), os.path.join(self.saves, name)
        try:
            os.mkdir(partial)
            utils.save_release_model(partial, params, self.hparams, self.vocab_dir)  # fsyncs what it wrote
            moments = {f"{kind}/{n}": a for kind, tree in (("m", optimizer.m), ("v", optimizer.v))
                       for n, a in utils.flatten(tree).items()}
            fsynced_write(os.path.join(partial, STATE_FILE), lambda f: np.savez(
                f, step=step, adam_t=optimizer.t, rng=json.dumps(rng.bit_generator.state), **moments))
            fsynced_write(os.path.join(partial, LOG_FILE), self.write_log, mode="w")
            fsynced_write(os.path.join(partial, CONFIG_FILE),
                          lambda f: json.dump(self.record, f, indent=1), mode="w")
            utils.fsync_dir(partial)
            os.rename(partial, final)  # a folder under a save's name is complete and on disk
            utils.fsync_dir(self.saves)
        except BaseException as e:
            shutil.rmtree(partial, ignore_errors=True)
            if write_error(e):
                raise RunError(self.failed(step, e)) from None
            raise
        try:
            with self.readers_held():
                previous = self.current()
                self.point_at(name)
                if previous is not None:
                    remove(os.path.join(self.saves, previous))
                remove(os.path.join(self.saves, NEW_LINK))  # a real folder that the link replaced
        except OSError as e:
            if self.current() != name:
                shutil.rmtree(final, ignore_errors=True)
            raise RunError(self.failed(step, e)) from None
        self.saved_step = step
        self.vocab_dir = final  # the previous save, whose vocabulary the next save would copy, is gone

    def failed(self, step, error):
        kept = (f"{self.run_dir} keeps its last save" if os.path.lexists(self.run_dir)
                else "nothing of the run is saved")
        return f"could not save step {step} of {self.run_dir}: {write_error(error)}; {kept}"

    def write_log(self, f):
        writer = csv.DictWriter(f, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows)

    def point_at(self, name):
        """Make the run's name a link to the save `name`, in one atomic step, and put that on disk."""
        link = os.path.join(self.saves, NEW_LINK)
        remove(link)
        # Relative, so the models folder can move; inside the saves folder the link resolves to nothing, so a
        # link left there by a dead process is never mistaken for a model.
        os.symlink(os.path.join(os.path.basename(self.saves), name), link)
        if os.path.isdir(self.run_dir) and not os.path.islink(self.run_dir):
            # A real folder (a run of an older train.py, or a model that --overwrite replaces): a link cannot be
            # renamed over a folder, but the two can swap names. The folder is then at NEW_LINK, to be removed.
            if not exchange(link, self.run_dir):
                os.rename(self.run_dir, os.path.join(self.saves, REPLACED))  # recover() puts it back if we die
                os.replace(link, self.run_dir)
                utils.fsync_dir(self.parent)
                os.rename(os.path.join(self.saves, REPLACED), link)
        else:
            os.replace(link, self.run_dir)
        utils.fsync_dir(self.parent)
        utils.fsync_dir(self.saves)

    def close_log(self):
        """The run has ended: its last save holds the whole log."""
        self.log.close()
        self.log = None
        remove(os.path.join(self.saves, LIVE_LOG))
        if self.current() is None:  # nothing saved (an --overwrite stopped before its first save): no empty folder
            with contextlib.suppress(OSError):
                os.rmdir(self.saves)

    def interrupted(self, step):
        """The line Ctrl-C ends with."""
        if self.saved_step == step:
            return f"interrupted: saved step {step} in {self.run_dir}; --resume continues it"
        return (f"interrupted before the new run's first save: {self.run_dir} is as it was, and the new run "
                f"({step} step{'s' * (step != 1)}) is discarded")


# ---------------------------------------------------------------------------------------------- the setup

class Setup:
    """Everything a run needs before it writes anything: the options, the model's shape, the vocabulary, the
    tokens, and on --resume the saved state."""


def setup(flags):
    """Every check, the data read and tokenized, and on --resume the run's save read back; nothing is written."""
    s = Setup()
    s.models_dir = plain(flags["models_dir"])
    check_models_dir(s.models_dir)
    s.resume, s.overwrite = plain(flags["resume"]), plain(flags["overwrite"])
    recompute = plain(flags.get("recompute", False))  # memory against time: the same arithmetic, never recorded
    check(isinstance(recompute, bool), "--recompute takes no value")
    if isinstance(flags["out_name"], str) and flags["out_name"] and os.sep not in flags["out_name"]:
        put_back(os.path.join(s.models_dir, flags["out_name"]))
    s.run_dir = check_out_name(plain(flags["out_name"]), s.models_dir, s.resume, s.overwrite)
    record = read_config(s.run_dir) if s.resume else None
    if s.resume and record is None:
        warn(f"{s.run_dir} records no options (an older train.py saved it): --resume continues it with the "
             f"command line's")
    options = resolve_options(flags, record, s.run_dir)
    if options["lr_decay_steps"] is None:
        options["lr_decay_steps"] = options["max_steps"]
    check(options["dataset"] is not None, "--dataset is required (on --resume, the run's own is used); "
                                          "python train.py --help lists every flag")
    check_flags(options)
    shape_flags = [f"--{name}" for name in SHAPE_FLAGS if given(flags[name])]
    if shape_flags and not s.resume and options["init_from"] != "scratch":
        warn(f"{', '.join(shape_flags)} only shape{'s' * (len(shape_flags) == 1)} a model trained from scratch: "
             f"--init_from {options['init_from']} keeps its own shape")
    check(options["init_from"] != plain(flags["out_name"]) or s.resume,
          "--init_from and --out_name name the same folder: training writes a new one")
    texts = dataset_texts(options["dataset"], "--dataset")
    val_texts = dataset_texts(options["val_dataset"], "--val_dataset") if options["val_dataset"] else None
    for name in ("dataset", "val_dataset"):  # recorded whole: a resume may start from another folder
        options[name] = options[name] and os.path.abspath(options[name])
    fingerprints = {"dataset": text_fingerprint(texts),
                    "val_dataset": text_fingerprint(val_texts) if val_texts is not None else None}
    s.saved = None
    if s.resume:
        with utils.exclusive(s.run_dir):  # a run training now would remove the save being read: refused instead
            s.saved = read_saved_run(s.run_dir)
        s.hparams, s.vocab_dir = s.saved.hparams, s.saved.save_dir
        check(options["block_size"] <= s.hparams["n_ctx"], f"--block_size {options['block_size']} is longer than "
                                                           f"the run's context of {s.hparams['n_ctx']}")
        check(s.saved.step < options["max_steps"], f"{s.run_dir} is already at step {s.saved.step}: give a "
                                                   f"--max_steps above it to go on")
    else:
        check_init_from(options["init_from"], s.models_dir, options)
        s.vocab_dir = vocabulary_dir(options["init_from"], s.models_dir)
    fingerprints["vocabulary"] = vocabulary_fingerprint(s.vocab_dir)
    if record is not None:
        check_fingerprints(record, options, fingerprints, s.run_dir)

    s.encoder = load_encoder(s.vocab_dir)
    cache_dir = os.path.join(s.models_dir, TOKEN_CACHE)
    s.uncached = []  # (tokens, path) to write once the run holds its lock
    streams = []
    for these, digest in ((texts, fingerprints["dataset"]), (val_texts, fingerprints["val_dataset"])):
        if these is None:
            streams.append(None)
            continue
        path = token_cache_path(cache_dir, digest, fingerprints["vocabulary"])
        tokens = cached_tokens(path)
        if tokens is None:
            tokens = tokenize(these, s.encoder)
            s.uncached.append((tokens, path))
        streams.append(tokens)
    s.train_tokens, s.val_tokens = split_tokens(streams[0], streams[1], options["block_size"],
                                                options["eval_every"])
    if not s.resume:
        s.hparams = model_hparams(options["init_from"], s.models_dir, options)
    options.update({k: s.hparams[k] for k in ("n_layer", "n_head", "n_embd", "n_ctx")})  # the model's real shape
    s.config = dict(options, recompute=recompute)
    s.record = {"options": options, "fingerprints": fingerprints}
    return s


@contextlib.contextmanager
def open_run(s):
    """The Run of a setup, held: the lock taken, leftovers gone, the token cache written."""
    with Run(s.run_dir, s.hparams, s.vocab_dir, s.config, s.record, s.saved.rows if s.saved else (),
             s.overwrite) as run:
        if s.resume and os.path.realpath(s.run_dir) != s.saved.save_dir:
            raise RunError(f"{s.run_dir} was saved again by another process while this one started: run --resume "
                           f"again")
        if not s.resume:  # checked again now that no other run can create the name
            check(s.overwrite or not os.path.lexists(s.run_dir), already_exists(s.run_dir))
        for tokens, path in s.uncached:
            save_tokens(tokens, path)
        run.start_log()
        if s.resume:
            print(f"resuming {s.run_dir} at step {s.saved.step} (session {run.session}), to step "
                  f"{s.config['max_steps']}", file=sys.stderr)
        yield run
