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
import codecs
import contextlib
import csv
import ctypes
import errno
import hashlib
import io
import json
import math
import os
import re
import secrets
import shlex
import shutil
import stat
import sys
import tempfile
import zipfile

import numpy as np
import regex
from tqdm import tqdm

import utils
from cli import check, check_text, is_int, is_number, machine_memory, warn
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
BEST_SUFFIX = "-best"  # models/<out_name>-best: the weights of the lowest validation loss so far
BEST_NAME = re.compile(r"best-\d{6,}\.[0-9a-f]{6}")  # a best model's save, in the run's saves folder
BEST_PARTIAL_NAME = re.compile(r"best-\d{6,}\.[0-9a-f]{6}\.partial")
NEW_BEST_LINK = "best-link.tmp"

# What --resume may not change: every option that enters the arithmetic. The others may change on resume.
FIXED_ON_RESUME = ("dataset", "val_dataset", "text_column", "init_from", "n_layer", "n_head", "n_embd", "n_ctx",
                   "block_size", "batch_size", "grad_accum", "learning_rate", "warmup_steps", "lr_decay_steps",
                   "weight_decay", "grad_clip", "seed")
SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "n_ctx")  # the shape of a model from scratch; a loaded one has its own
# --patience is free too: like --max_steps it says where to stop, not what a step computes, and a run that stopped
# early can go on with more patience. Its count of evaluations without improvement comes from the log.
FREE_ON_RESUME = ("max_steps", "eval_every", "save_every", "patience", "sample_every", "sample_prompt",
                  "sample_length", "sample_temperature", "sample_top_k")
LATER_OPTIONS = FREE_ON_RESUME[3:]  # a run recorded before these existed takes their defaults on --resume
OPTIONS = FIXED_ON_RESUME + FREE_ON_RESUME
PROMPT_TOKENS = 16  # the default preview prompt: the first tokens of the validation text, at most

DAMAGED_STATE = ("--resume cannot continue it; its weights can still start a new run (--init_from {name} "
                 "--out_name NEW), or --overwrite starts this one again")
DAMAGED_MODEL = "--resume cannot continue it; --overwrite starts it again"


class RunError(utils.ModelError):
    """A run that cannot be read or written (a damaged file, a full disk): the CLI prints one line, exit 1."""


class Default:
    """A flag's value when the command line leaves it out. A new run uses the value; --resume uses the run's
    recorded one instead, so only a flag that is given can be refused for changing the run."""

    def __init__(self, value, shown=None):
        self.value, self.shown = value, shown

    def __repr__(self):  # what --help shows (fire writes "Type: Optional[]" beside a default shown as None)
        return self.shown or ("none" if self.value is None else repr(self.value))


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
    for name in ("warmup_steps", "eval_every", "save_every", "seed", "patience", "sample_every", "sample_top_k"):
        value = flags[name]
        check(is_int(value) and value >= 0, f"--{name} must be a whole number >= 0, got {value!r}")
    check(is_int(flags["sample_length"]) and flags["sample_length"] > 0,
          f"--sample_length must be a positive whole number, got {flags['sample_length']!r}")
    check(is_number(flags["sample_temperature"]) and flags["sample_temperature"] >= 0,
          f"--sample_temperature must be a number >= 0 (0: greedy), got {flags['sample_temperature']!r}")
    check(flags["sample_prompt"] is None or isinstance(flags["sample_prompt"], str),
          f"--sample_prompt must be text, got {flags['sample_prompt']!r}")
    check(not flags["patience"] or flags["eval_every"],
          "--patience counts evaluations of the validation loss: give --eval_every N (N > 0) with it")
    check(is_number(flags["learning_rate"]) and flags["learning_rate"] > 0,
          f"--learning_rate must be a positive number, got {flags['learning_rate']!r}")
    for name in ("weight_decay", "grad_clip"):
        value = flags[name]
        check(is_number(value) and value >= 0, f"--{name} must be a number >= 0, got {value!r}")
    for name in ("dataset", "val_dataset"):
        check(flags[name] is None or (isinstance(flags[name], str) and flags[name]),
              f"--{name} must be a path, got {flags[name]!r}")
    check(flags["text_column"] is None or (isinstance(flags["text_column"], str) and flags["text_column"]),
          f"--text_column must be a column's name, got {flags['text_column']!r}")


def warn_long_warmup(options, resume):
    """A warmup longer than the run never gets past it: the learning rate climbs until the last step, never to its
    peak, and the cosine never starts. Said once, at the start, with the peak it does reach."""
    warmup, max_steps, learning_rate = options["warmup_steps"], options["max_steps"], options["learning_rate"]
    if warmup <= max_steps:
        return
    peak = learning_rate * max_steps / warmup  # train.learning_rate_at(max_steps - 1, ...): the last update's
    hint = "" if resume else f"; --warmup_steps {max(1, max_steps // 10)} would warm up over a tenth of the run"
    warn(f"--warmup_steps {warmup} is longer than the run (--max_steps {max_steps}): the learning rate only climbs, "
         f"to {peak:.3g} of --learning_rate {learning_rate:.3g} at the last step, and never decays{hint}")


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
    owner = best_of(run_dir)
    if owner:  # --overwrite would not take it either: it is another run's
        return f"{run_dir} is the best model of the run {owner[0]}: choose another --out_name"
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
        options[name] = flags[name] if given(flags[name]) else recorded.get(name, options[name])
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
TEXT_EXTENSIONS = (".txt", ".md", ".rst")  # in a folder, read whole as one document each (any case: F.TXT too)
ROW_EXTENSIONS = (".jsonl", ".csv")  # one document per line or row, as a --dataset file or in a folder
PROGRESS_BYTES = 4 << 20  # a dataset this large takes a few seconds to tokenize: a progress bar shows them
PIECE_CHARS = 1 << 18  # tokenized at a time, so that the bar moves within a long document
SAFE_CUT = regex.compile(r"(?<=\S\n)(?=\S)")  # regex, not re: \S as the pre-tokenizer (encoder.py) means it
SNIFF_BYTES = 1 << 16  # of a file without an extension, read first: binary files are skipped without reading more
CSV_FIELD_LIMIT = 2**31 - 1  # Python's csv refuses fields above 128 KiB by default; a document can be longer


def kind_of(mode):
    return next((kind for test, kind in FILE_KINDS if test(mode)), "not a regular file")


class Dataset:
    """The documents of --dataset or --val_dataset, and what reading it found, for the start summary."""

    def __init__(self, path, flag):
        self.path, self.flag = path, flag
        self.texts = []  # one string per document, in reading order
        self.files = 0  # files that gave documents
        self.row_files = 0  # of them, .jsonl and .csv files
        self.skipped = {}  # why -> how many: ".png", "hidden", "a FIFO", ... (files), "an empty row" (rows)

    def skip(self, why):
        self.skipped[why] = self.skipped.get(why, 0) + 1


def file_kind(name):
    """How a file in a dataset folder is read, from its name: "text", "jsonl", "csv", "sniff" (no extension: read
    if it is UTF-8 text), or None (skipped, counted under its extension)."""
    extension = os.path.splitext(name)[1].lower()
    if extension in TEXT_EXTENSIONS:
        return "text"
    if extension in ROW_EXTENSIONS:
        return extension[1:]
    return "sniff" if extension == "" else None


def dataset_files(path, flag, dataset=None):
    """[(file, kind)] of a --dataset: the file itself (.jsonl and .csv by rows, anything else as text), or the
    files of a folder and its subfolders, sorted by their path in it, folder by folder (a/z.txt, a.txt, b.txt),
    by code point, so the same on every machine. In a folder, files are chosen by extension (file_kind); others,
    hidden ones (.git, .DS_Store) and links back to a folder already read are skipped and counted in `dataset`.
    Only regular files are ever opened: a FIFO would block the run forever, a device would never end; such
    entries, and broken links, are skipped, each named on stderr."""
    dataset = dataset or Dataset(path, flag)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise utils.UsageError(f"{flag} {path}: no such file or folder") from None
    except OSError as e:
        raise utils.UsageError(f"{flag} {path}: {e.strerror}") from None
    if stat.S_ISREG(info.st_mode):
        return [(path, file_kind(path) if file_kind(path) in ("jsonl", "csv") else "text")]
    if not stat.S_ISDIR(info.st_mode):
        raise utils.UsageError(f"{flag} {path} is {kind_of(info.st_mode)}, not a file or folder")
    files = []
    walk_folder(path, "", flag, dataset, files, {(info.st_dev, info.st_ino): path})
    return files


def walk_folder(root, relative, flag, dataset, files, seen):
    folder = os.path.join(root, relative)
    try:
        names = sorted(os.listdir(folder))  # code point order: the same whatever the locale
    except OSError as e:
        raise utils.UsageError(f"{flag} {folder}: {e.strerror}") from None
    for name in names:
        entry, file = os.path.join(relative, name), os.path.join(folder, name)
        if name.startswith("."):
            dataset.skip("hidden")
            continue
        try:
            info = os.stat(file)
        except OSError as e:
            # A link to nothing, to a link that loops, or through a file (x.txt/y) leads to no file: broken alike.
            # Anything else (no permission to look) is a file the run may have needed: one error naming it.
            if e.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                raise utils.UsageError(f"{flag} {file}: {e.strerror}") from None
            warn(f"{flag} {root}: skipping {entry}, a broken link")
            dataset.skip("a broken link")
            continue
        if stat.S_ISDIR(info.st_mode):  # a folder named notes.txt too: walked, never opened as a file
            key = (info.st_dev, info.st_ino)
            if key in seen:  # through a link: a folder on the way here (a loop), or one read already
                warn(f"{flag} {root}: skipping {entry}, the folder {seen[key]} again (a link)")
                dataset.skip("a folder read already")
                continue
            seen[key] = entry
            walk_folder(root, entry, flag, dataset, files, seen)
        elif not stat.S_ISREG(info.st_mode):
            warn(f"{flag} {root}: skipping {entry}, {kind_of(info.st_mode)}")
            dataset.skip(kind_of(info.st_mode))
        elif file_kind(name) is None:
            dataset.skip(os.path.splitext(name)[1].lower())
        else:
            files.append((file, file_kind(name)))


def read_text_file(file, flag, sniff=False):
    """A file's text. sniff: a file without an extension, which may be anything; None if it is not UTF-8 text (or
    holds NUL bytes, as binary files and UTF-16 text do), read no further than SNIFF_BYTES then."""
    # O_NONBLOCK: should the file have become a FIFO since it was looked at, opening it still returns at once
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            check(stat.S_ISREG(mode), f"{flag} {file} is {kind_of(mode)}, not a file")
            head = f.read(SNIFF_BYTES) if sniff else b""
            if sniff and not looks_like_text(head, final=len(head) < SNIFF_BYTES):
                return None
            data = head + f.read()
    except OSError as e:
        raise utils.UsageError(f"{flag} {file}: {e.strerror}") from None
    if sniff and not looks_like_text(data, final=True):
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise utils.UsageError(f"{flag} {file} is not UTF-8 text (byte {e.start} cannot be decoded)") from None


def looks_like_text(data, final):
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=final)  # a character cut at the end is fine
    except UnicodeDecodeError:
        return False
    return b"\0" not in data


def row_text(file, flag):
    """The text of a .jsonl or .csv file: UTF-8, with or without the byte-order mark spreadsheets write."""
    text = read_text_file(file, flag)
    return text.removeprefix("\ufeff")


def jsonl_documents(file, flag, field, dataset):
    """One document per line: the line's JSON object's `field` ("text" unless --text_column names another).
    Blank lines are no documents; an empty text is skipped and counted; anything else is one error naming the
    line."""
    field = field or "text"
    for number, line in enumerate(row_text(file, flag).split("\n"), 1):  # not splitlines: JSON strings may hold
        if not line.strip():                                              # U+2028, which it would cut at
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise utils.UsageError(f"{flag} {file} line {number} is not JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            kind = {list: "a list", str: "a string", bool: "true or false", type(None): "null"}.get(type(row),
                                                                                                 "a number")
            raise utils.UsageError(f'{flag} {file} line {number} is {kind}, not an object with a "{field}" field')
        if field not in row:
            fields = f"its fields are {', '.join(row)}" if row else "it has no fields"
            raise utils.UsageError(f'{flag} {file} line {number} has no "{field}" field ({fields}); every line '
                                   f'needs one{"" if field != "text" else ", or --text_column names another"}')
        text = row[field]
        if not isinstance(text, str):
            raise utils.UsageError(f'{flag} {file} line {number}: "{field}" is {json.dumps(text)[:40]}, not a '
                                   f'string')
        add_document(dataset, check_text(text, f"{flag} {file} line {number}"))


def csv_documents(file, flag, column, dataset):
    """One document per row of a CSV file whose first row names the columns: its only column, the column named
    by --text_column, or else one named `text`."""
    text = row_text(file, flag)
    lines = io.StringIO(text, newline="")
    reader = csv.reader(lines)
    csv.field_size_limit(CSV_FIELD_LIMIT)

    def checked_rows():  # the reader's, but a row that runs to the end of the file may be a quote never closed
        start = 0
        for row in reader:
            if lines.tell() == len(text):
                check_quotes_closed(text, start, f"{flag} {file}")
            start = lines.tell()
            yield row

    rows = checked_rows()
    try:
        header = next((row for row in rows if row), None)  # blank lines before the header are no rows either
        if header is None:
            return
        columns = ", ".join(header)
        if column is not None:
            check(column in header, f"{flag} {file} has no column {column!r} (--text_column): its columns are "
                                    f"{columns}")
        elif len(header) > 1:
            check("text" in header, f"{flag} {file} has {len(header)} columns ({columns}): --text_column NAME "
                                    f"says which one holds the text")
        index = header.index(column or ("text" if len(header) > 1 else header[0]))
        for row in rows:
            if not row:  # a blank line
                continue
            check(index < len(row), f"{flag} {file} line {reader.line_num} has {len(row)} field"
                                    f"{'s' * (len(row) != 1)}, no value for column {header[index]!r}")
            add_document(dataset, row[index])
    except csv.Error as e:
        raise utils.UsageError(f"{flag} {file} line {reader.line_num} is not CSV ({e})") from None


def check_quotes_closed(text, start, name):
    """The last row of a CSV file, from start, must close its quotes: Python's csv reads a quoted field that is
    never closed to the end of the file, every row after it in that one field, without a word. Only its strict
    reader refuses it ("unexpected end of data")."""
    try:
        for _ in csv.reader(io.StringIO(text[start:], newline=""), strict=True):
            pass
        return
    except csv.Error as e:
        if "unexpected end of data" not in str(e):
            return
    # Inside a quoted field every quote is doubled, and the lenient reader ended this one at the end of the file:
    # its text is all there is after its opening quote.
    field = list(csv.reader(io.StringIO(text[start:], newline="")))[-1][-1]
    opening = len(text) - len(field.replace('"', '""')) - 1
    opening = opening if opening >= start and text[opening] == '"' else start
    line = len(io.StringIO(text[:opening + 1], newline="").readlines())  # counted as csv counts its lines
    raise utils.UsageError(f'{name} line {line}: a quote (") opens a field there that the file never closes, so '
                           f'csv would read the rest of the file as that one field; close it, or double a quote '
                           f'that is text ("")')


def add_document(dataset, text, empty="an empty row"):
    if text == "":
        dataset.skip(empty)
    else:
        dataset.texts.append(text)


def dataset_texts(path, flag, text_column=None):
    """The Dataset of a --dataset or --val_dataset: a text file is one document, a .jsonl or .csv file one per
    row, a folder all of its files' (dataset_files)."""
    dataset = Dataset(path, flag)
    for file, kind in dataset_files(path, flag, dataset):
        if kind in ("text", "sniff"):
            text = read_text_file(file, flag, sniff=kind == "sniff")
            if text is None:
                dataset.skip("without an extension, not UTF-8 text")
                continue
            add_document(dataset, text.removeprefix("\ufeff"), "an empty file")  # a byte-order mark is no text
        else:
            dataset.row_files += 1
            (jsonl_documents if kind == "jsonl" else csv_documents)(file, flag, text_column, dataset)
        dataset.files += 1
    if not dataset.files:  # a folder with nothing to read
        skipped = f" (skipped {describe_skipped(dataset.skipped)})" if dataset.skipped else ""
        raise utils.UsageError(f"{flag} {path}: the folder holds no text files ("
                               f"{', '.join(TEXT_EXTENSIONS + ROW_EXTENSIONS)}, or UTF-8 text without an extension)"
                               + skipped)
    check(any(text.strip() for text in dataset.texts), f"{flag} {path} is empty")
    return dataset


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


def tokenize(texts, encoder, what="tokenizing"):  # -> [n_tokens] uint16
    """Every document's tokens followed by <|endoftext|>, one stream. uint16 holds GPT-2's 50257 ids in
    half the memory of int32; the stream is read a window at a time. Above PROGRESS_BYTES of text, a progress bar
    on stderr counts the bytes done (it is removed when done)."""
    ids = []
    total = sum(len(text.encode("utf-8")) for text in texts)
    with tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              leave=False, dynamic_ncols=True, disable=total < PROGRESS_BYTES) as bar:
        for text in texts:
            for piece in text_pieces(text):
                ids += encoder.encode(piece)
                bar.update(len(piece.encode("utf-8")) if total >= PROGRESS_BYTES else 0)
            ids.append(ENDOFTEXT)
    return np.array(ids, dtype=np.uint16)


def text_pieces(text, size=None):
    """text cut into pieces of about `size` characters, so that a progress bar moves within one long document.
    Each cut is after a newline between two characters that are not whitespace ("end.\nThe"): GPT-2's
    pre-tokenizer (encoder.PRETOKENIZE) ends a word at both sides of such a newline and makes it a word of its
    own, whatever follows, so the pieces' tokens, put together, are exactly the whole text's."""
    start, size = 0, size or PIECE_CHARS
    while len(text) - start > size:
        cut = SAFE_CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


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
    return os.path.join(parent or os.curdir, f".{name}.saves")  # --models_dir .: ./.<name>.saves, whose folder is .


def best_dir(run_dir):
    return os.path.normpath(run_dir) + BEST_SUFFIX


def best_step(name):  # best-<step>.<random> -> step
    return int(name[len("best-"):].split(".")[0])


def best_of(path):
    """(run name, best save) if path is a link that a run made to its best model, else None."""
    try:
        target = os.readlink(path)
    except OSError:
        return None
    head, name = os.path.split(target)
    run = saves_run(head) if "/" not in head else None
    return (run, name) if run and BEST_NAME.fullmatch(name) else None


def saves_run(folder):
    """The name of the run whose saves folder this is (.../.<name>.saves), or None."""
    base = os.path.basename(folder)
    return (base[1:-len(".saves")] or None) if base.startswith(".") and base.endswith(".saves") else None


def run_of(path):
    """The name of the run that owns the name path, or None: the run's link or its <name>-best (links into
    .<name>.saves), or a name with its .<name>.saves beside it. Anything else put there would break the run."""
    path = os.path.abspath(path)
    linked = saves_run(os.path.dirname(os.path.realpath(path))) if os.path.islink(path) else None
    names = [path, path[:-len(BEST_SUFFIX)]] if path.endswith(BEST_SUFFIX) else [path]
    beside = [os.path.basename(run_dir) for run_dir in names if os.path.isdir(saves_dir(run_dir))]
    return linked or (beside[0] if beside else None)


def check_best_dir(run_dir, eval_every, overwrite):
    """models/<out_name>-best must be free or this run's own, before any work: it is replaced at every new best."""
    best, name = best_dir(run_dir), os.path.basename(os.path.normpath(run_dir))
    owner = best_of(best)
    if eval_every and os.path.lexists(best) and (owner is None or owner[0] != name):
        what = f"the best model of the run {owner[0]}" if owner else "another model"
        raise utils.UsageError(f"{best} is {what}: this run keeps its best model under that name (move it away, "
                               f"or choose another --out_name)")
    if not eval_every and overwrite and owner and owner[0] == name:
        warn(f"{best} is the best model of the run that --overwrite replaces; without a validation loss "
             f"(--eval_every 0) this run keeps no best, so it stays as it is")


class Best:
    """The lowest validation loss in a run's log, its step, and how many evaluations came after it: what the best
    model and --patience go by. Taken from the logged values (6 decimals), so that a resumed run decides as an
    uninterrupted one did; a tie is no improvement."""

    def __init__(self, rows=()):
        self.step, self.loss, self.since = None, None, 0
        for row in rows:
            self.add(row)

    def add(self, row):
        if not row.get("val_loss"):
            return
        loss = float(row["val_loss"])
        if self.loss is None or loss < self.loss:
            self.step, self.loss, self.since = int(row["step"]), loss, 0
        else:
            self.since += 1

    def out_of_patience(self, patience):
        return bool(patience) and self.step is not None and self.since >= patience

    def stopped(self, patience):
        return (f"the validation loss has not improved for {patience} evaluation{'s' * (patience != 1)} (best "
                f"{self.loss:.4f} at step {self.step})")


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
    if isinstance(record, dict) and isinstance(record.get("options"), dict):
        record["options"].setdefault("text_column", None)  # a run from before --text_column read no rows
    ok = (isinstance(record, dict) and isinstance(record.get("options"), dict)
          and isinstance(record.get("fingerprints"), dict)
          and set(OPTIONS) - set(LATER_OPTIONS) <= set(record["options"])
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
        flat = utils.read_tf_checkpoint(utils.checkpoint_prefix(save_dir), hparams["n_layer"], finite=False)
    except utils.ModelError as e:
        raise RunError(f"{e}: {DAMAGED_MODEL}") from None
    shapes = {name: array.shape for name, array in flat.items()}
    for tensor, array in flat.items():  # (not `name`: damaged() names the run by it)
        found = utils.nonfinite(array)  # checked here, not by read_tf_checkpoint: the message names the run
        if found:
            raise damaged(os.path.basename(utils.checkpoint_prefix(save_dir)),
                          f"holds weights that are not finite ({found}) in {tensor}", DAMAGED_MODEL)
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
            if not np.isfinite(array).all():  # train.py never saves them: a damaged file, or a hand-made one
                raise damaged(STATE_FILE, f"holds numbers that are not finite (inf or nan) in {kind}/{name}")
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
    elif type(error).__name__ == "SafetensorError":  # safetensors' writer, likewise ("... (os error 28)")
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    else:
        return None
    return next((os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
                 if os.strerror(code) in message), message)


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
    .<name>.saves/ and the name is switched to each in turn. The best model is kept the same way: its saves
    (best-<step>.<random>) go into the same folder, and the link <name>-best is switched to each in turn."""

    def __init__(self, run_dir, hparams, vocab_dir, config, record, rows=(), overwrite=False):
        self.run_dir, self.hparams, self.vocab_dir, self.config = run_dir, hparams, vocab_dir, config
        self.record, self.rows, self.overwrite = record, list(rows), overwrite
        self.saves = saves_dir(run_dir)
        self.parent = os.path.dirname(self.saves)
        self.saved_step = None  # the step of this process's last save
        self.session = 1 + max((int(row.get("session") or 1) for row in self.rows), default=0)
        self.stack = contextlib.ExitStack()
        self.log = None
        self.best_dir = best_dir(run_dir)
        self.best = Best(self.rows)  # from the log: a resumed run remembers its best and its patience
        # A resumed run exists: a new best takes the name <name>-best at once. A new run's (or an --overwrite's)
        # waits for the run's first save, so that the name never holds the best of a run with nothing saved.
        self.run_exists = bool(self.rows)
        self.pending_best = None  # the name of a best save written but not linked yet
        # The step of the best that <name>-best holds when that step is past the save --resume continues from: the
        # process died between a new best and its next save, and the log it resumes from lost that step's
        # validation loss. The resumed run evaluates that step again (its weights are the same then, bit for
        # bit); until then the name keeps that best, and a new best waits as pending_best.
        self.best_ahead = None

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
            with self.readers_held(), self.best_readers_held():
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

    def best_readers_held(self):
        return utils.hold(self.best_dir, f"loading {os.path.basename(self.best_dir)}")

    def current(self):
        """The name of the save the run's link points at, or None (no link, a real folder, a foreign link)."""
        try:
            target = os.readlink(self.run_dir)
        except OSError:
            return None
        head, name = os.path.split(target)
        return name if head == os.path.basename(self.saves) and SAVE_NAME.fullmatch(name) else None

    def current_best(self):
        """The name of the best save that <name>-best points at, or None."""
        owner = best_of(self.best_dir)
        return owner[1] if owner and owner[0] == os.path.basename(os.path.normpath(self.run_dir)) else None

    def recover(self):
        put_back(self.run_dir)

    def remove_leftovers(self):
        """Only names this module makes, in the run's own folder, and never the current save nor the current best.
        A best save of the log's best step that never took the name (the process died between the run's first save
        and the switch; the name is free, or holds the best of the run that --overwrite replaced) takes it now,
        unless the name holds a best of a step past the save resumed from (best_ahead): then it waits as pending."""
        current, best = self.current(), self.current_best()
        self.best_ahead = self.step_ahead(best)
        if self.best.step is not None and (best is not None or not os.path.lexists(self.best_dir)):
            found = [entry for entry in os.listdir(self.saves) if entry != best and BEST_NAME.fullmatch(entry)
                     and best_step(entry) == self.best.step]
            if found:
                self.pending_best = found[0]
                if self.best_ahead is None:  # else it waits until the best ahead is evaluated again
                    best = found[0]
                    self.link_best()
        keep = (current, best, self.pending_best)
        for entry in os.listdir(self.saves):
            if entry not in keep and (SAVE_NAME.fullmatch(entry) or PARTIAL_NAME.fullmatch(entry)
                                      or BEST_NAME.fullmatch(entry) or BEST_PARTIAL_NAME.fullmatch(entry)
                                      or entry in (NEW_LINK, NEW_BEST_LINK, REPLACED, LIVE_LOG)):
                remove(os.path.join(self.saves, entry))

    def step_ahead(self, best):
        """The step of the best save `best` if it is past the save a --resume continues from, else None."""
        return best_step(best) if best is not None and self.run_exists and best_step(best) > len(self.rows) else None

    def log_step(self, **row):
        row["session"] = self.session
        self.rows.append(row)
        self.best.add(row)
        self.writer.writerow(row)
        self.log.flush()
        if self.best_ahead is not None and int(row["step"]) >= self.best_ahead and row.get("val_loss"):
            self.best_ahead = None  # the log knows that step's loss again: the name follows the log from now on
            if self.pending_best is not None and self.best.step != int(row["step"]):
                self.link_best()  # a best found before it is better; were it this step, save_best replaces it

    def save_due(self, step, interrupted):
        """A save every --save_every steps and at the end; on Ctrl-C too, except before the first save of an
        --overwrite, which keeps the old run as it was."""
        config = self.config
        scheduled = step == config["max_steps"] or (config["save_every"] and step % config["save_every"] == 0)
        return scheduled or (interrupted and not self.replacing())

    def replacing(self):
        """An --overwrite that has not replaced the old run yet (there is one, and this run has not saved)."""
        return self.overwrite and self.saved_step is None and os.path.lexists(self.run_dir)

    def check_finite(self, step, params):
        """A save never replaces a finite one with weights that are not (an update can overflow to inf with a
        finite loss; the next step's loss would be nan, but this save would have replaced the last good one)."""
        if not all(np.isfinite(a).all() for a in utils.flatten(params).values()):
            raise RunError(self.diverged(step, "its weights are not all finite numbers"))

    def save(self, step, params, optimizer, rng):
        """Write the save whole, then switch the run's name to it, then remove the previous one."""
        self.check_finite(step, params)
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
        self.run_exists = True
        if self.pending_best is not None and self.best_ahead is None:
            self.link_best()

    def save_best(self, step, params):
        """Keep params as <name>-best: written whole into the saves folder as a save is, then the link switched to
        it (at once, or at the run's first save), then the previous best removed."""
        self.check_finite(step, params)
        name = f"best-{step:06d}.{secrets.token_hex(3)}"
        partial, final = os.path.join(self.saves, name + ".partial"), os.path.join(self.saves, name)
        try:
            os.mkdir(partial)
            utils.save_release_model(partial, params, self.hparams, self.vocab_dir)  # fsyncs what it wrote
            os.rename(partial, final)
            utils.fsync_dir(self.saves)
        except BaseException as e:
            shutil.rmtree(partial, ignore_errors=True)
            if write_error(e):
                raise RunError(f"could not save the best model of step {step} as {self.best_dir}: "
                               f"{write_error(e)}; {self.kept()}") from None
            raise
        if self.pending_best is not None:  # an earlier best that never took the name: superseded
            remove(os.path.join(self.saves, self.pending_best))
        self.pending_best = name
        if self.run_exists and self.best_ahead is None:
            self.link_best()

    def link_best(self):
        """Switch <name>-best to the pending best save in one atomic os.replace, put that on disk, and only then
        remove the previous best. Readers converting the best model (gpt2.py) hold its lock: never under their
        feet."""
        name, self.pending_best = self.pending_best, None
        link = os.path.join(self.saves, NEW_BEST_LINK)
        try:
            with self.best_readers_held():
                previous = self.current_best()
                remove(link)
                os.symlink(os.path.join(os.path.basename(self.saves), name), link)
                os.replace(link, self.best_dir)
                utils.fsync_dir(self.parent)
                utils.fsync_dir(self.saves)
                if previous is not None and previous != name:
                    remove(os.path.join(self.saves, previous))
        except OSError as e:
            if self.current_best() != name:
                shutil.rmtree(os.path.join(self.saves, name), ignore_errors=True)
            raise RunError(f"could not make {self.best_dir} the best model: {write_error(e)}; {self.kept()}") from None

    def kept(self):
        if self.replacing():
            return f"{self.run_dir} is as it was, and the new run is discarded"
        return f"{self.run_dir} keeps its last save" if os.path.lexists(self.run_dir) else "nothing of the run is saved"

    def failed(self, step, error):
        return f"could not save step {step} of {self.run_dir}: {write_error(error)}; {self.kept()}"

    def diverged(self, step, error):
        return (f"training diverged at step {step}: {error}; {self.kept()} (a lower --learning_rate keeps a "
                f"new run finite)")

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
        if self.pending_best is not None and self.best_ahead is None:  # the best of a run never saved: discarded
            remove(os.path.join(self.saves, self.pending_best))                # with it
            self.pending_best = None
        if self.current() is None:  # nothing saved (an --overwrite stopped before its first save): no empty folder
            with contextlib.suppress(OSError):
                os.rmdir(self.saves)

    def interrupted(self, step, how="interrupted"):
        """The line Ctrl-C (or SIGTERM: how="terminated") ends with."""
        if self.saved_step == step:
            return f"{how}: saved step {step} in {self.run_dir}; --resume continues it"
        return (f"{how} before the new run's first save: {self.run_dir} is as it was, and the new run "
                f"({step} step{'s' * (step != 1)}) is discarded")

    def ahead_line(self):
        return (f"{self.best_dir} holds the best of step {self.best_ahead}, from past the save this run resumed "
                f"from (it stopped before saving again), whose validation loss the log lost: a run that evaluates "
                f"(--eval_every N) evaluates step {self.best_ahead} again")

    def out_of_patience(self):
        return self.best.out_of_patience(self.config["patience"])

    def summary(self, step):
        """The lines a finished run ends with: what was saved, how good it is, where the best is, how to run it."""
        last = self.rows[-1] if self.rows else {}
        lines = [f"saved step {step} in {self.run_dir}" + (f": validation loss {float(last['val_loss']):.4f}, "
                                                           f"perplexity {math.exp(float(last['val_loss'])):.2f}"
                                                           if last.get("val_loss") else "")]
        if self.best_ahead is not None and self.current_best() is not None:
            lines.append(self.ahead_line())
        elif self.best.step is not None and self.current_best() is not None:
            if self.best.step == step:
                lines.append(f"it is the best so far, also kept as {self.best_dir}")
            else:
                lines.append(f"the best, step {self.best.step} (validation loss {self.best.loss:.4f}, perplexity "
                             f"{math.exp(self.best.loss):.2f}), is kept as {self.best_dir}")
        name = os.path.basename(os.path.normpath(self.run_dir))
        command = f"python gpt2.py --model_size {shlex.quote(name)}"
        if os.path.normpath(self.parent) != "models":
            command += f" --models_dir {shlex.quote(self.parent)}"
        also = f" (the best: --model_size {shlex.quote(name + BEST_SUFFIX)})" if len(lines) > 1 else ""
        lines.append(f'run it: {command} "your prompt"{also}')
        return "\n".join(lines)


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
    owner = best_of(s.run_dir)
    check(owner is None, f"{s.run_dir} is the best model of the run {owner and owner[0]}: choose another --out_name")
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
    warn_long_warmup(options, s.resume)
    check_best_dir(s.run_dir, options["eval_every"], s.overwrite)
    shape_flags = [f"--{name}" for name in SHAPE_FLAGS if given(flags[name])]
    if shape_flags and not s.resume and options["init_from"] != "scratch":
        warn(f"{', '.join(shape_flags)} only shape{'s' * (len(shape_flags) == 1)} a model trained from scratch: "
             f"--init_from {options['init_from']} keeps its own shape")
    check(options["init_from"] != plain(flags["out_name"]) or s.resume,
          "--init_from and --out_name name the same folder: training writes a new one")
    s.data = dataset_texts(options["dataset"], "--dataset", options["text_column"])
    s.val_data = (dataset_texts(options["val_dataset"], "--val_dataset", options["text_column"])
                  if options["val_dataset"] else None)
    texts, val_texts = s.data.texts, s.val_data and s.val_data.texts
    if options["text_column"] is not None and not any(d and d.row_files for d in (s.data, s.val_data)):
        warn(f"--text_column {options['text_column']} only picks the column of .csv and .jsonl files, and "
             f"{' and '.join(f'{d.flag} {d.path}' for d in (s.data, s.val_data) if d)} hold"
             f"{'s' * (s.val_data is None)} none")
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
        best = Best(s.saved.rows)
        if best.out_of_patience(options["patience"]):
            raise utils.UsageError(f"{s.run_dir} stopped at step {s.saved.step}: {best.stopped(options['patience'])}; "
                                   f"give a larger --patience, or --patience 0, to go on")
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
            tokens = tokenize(these, s.encoder, "tokenizing " + ("--dataset" if these is texts else "--val_dataset"))
            s.uncached.append((tokens, path))
        streams.append(tokens)
    s.train_tokens, s.val_tokens = split_tokens(streams[0], streams[1], options["block_size"],
                                                options["eval_every"])
    if not s.resume:
        s.hparams = model_hparams(options["init_from"], s.models_dir, options)
    options.update({k: s.hparams[k] for k in ("n_layer", "n_head", "n_embd", "n_ctx")})  # the model's real shape
    check_training_memory(s.hparams)
    s.sample_prompt, options["sample_length"] = sample_prompt(options, flags, s.encoder, s.val_tokens)
    s.config = dict(options, recompute=recompute)
    s.record = {"options": options, "fingerprints": fingerprints}
    return s


def check_training_memory(hparams):
    """Refuse a model that could never train in this machine's memory, before anything is allocated: AdamW needs
    16 bytes a parameter before any activation (float32 weights, gradients and two moments)."""
    memory, need = machine_memory(), 16 * n_parameters(hparams)
    check(memory is None or need <= memory,
          f"a model of {n_parameters(hparams):,} parameters needs at least {need / 2**30:,.1f} GiB to train (its "
          f"weights, gradients and AdamW's two moments, 4 bytes each), more than this machine's "
          f"{memory and memory / 2**30:.1f} GiB of memory")


def sample_prompt(options, flags, encoder, val_tokens):
    """(prompt ids, new tokens) of the previews and the closing sample. The default prompt is the start of the
    validation text, which the model never trains on: what it writes after it shows what it learned, not what it
    memorized. Left to their defaults, the prompt and the length shrink to fit a small context; given, they must
    fit."""
    n_ctx, length, text = options["n_ctx"], options["sample_length"], options["sample_prompt"]
    if text is None:
        ids = [int(t) for t in val_tokens[:min(PROMPT_TOKENS, n_ctx // 2)]] or [ENDOFTEXT]
    else:
        ids = encoder.encode(text) or [ENDOFTEXT]  # "" starts from <|endoftext|>, as gpt2.py does
    room = n_ctx - len(ids) + 1  # the last new token is never fed back
    if length > room:
        what = f"--sample_prompt is {len(ids)} tokens" if text is not None else f"the prompt is {len(ids)} tokens"
        check(given(flags["sample_length"]) is False and room >= 1,
              f"{what}: with --sample_length {length} a sample needs {len(ids) + length - 1} positions, more than "
              f"the model's context of {n_ctx}")
        length = room
    return ids, length


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
            best = (f"; its best, step {run.best.step} (validation loss {run.best.loss:.4f}), is {run.best_dir}"
                    if run.best.step is not None and run.current_best() and run.best_ahead is None else "")
            print(f"resuming {s.run_dir} at step {s.saved.step} (session {run.session}), to step "
                  f"{s.config['max_steps']}{best}", file=sys.stderr)
        if s.resume and run.best_ahead is not None and run.current_best():
            warn(run.ahead_line())
        print("\n".join(start_summary(s)), file=sys.stderr, flush=True)
        yield run


# ---------------------------------------------------------------------------------------------- the summary

def count(n, noun, plural=None):
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def n_parameters(hparams):
    """The model's weights, each counted once (wte is also the LM head): the sizes of the release's tensors."""
    n_vocab, n_ctx, c, n_layer = hparams["n_vocab"], hparams["n_ctx"], hparams["n_embd"], hparams["n_layer"]
    block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c)  # ln_1, ln_2,
    return n_vocab * c + n_ctx * c + n_layer * block + 2 * c                                         # attn, mlp


def describe_skipped(skipped):
    """"3 .png, 1 without an extension, not UTF-8 text, 2 hidden": the commonest reasons first."""
    labels = {"a broken link": ("broken link", "broken links"), "a FIFO": ("FIFO", "FIFOs"),
              "a socket": ("socket", "sockets"), "a character device": ("character device", "character devices"),
              "a block device": ("block device", "block devices"), "an empty row": ("empty row", "empty rows"),
              "an empty file": ("empty file", "empty files"),
              "a folder read already": ("folder read already", "folders read already")}
    parts = sorted((-n, count(n, *labels.get(why, (why, why)))) for why, n in skipped.items())
    return ", ".join(text for _, text in sorted(parts, key=lambda part: (part[0], part[1].lower())))


def describe_dataset(data):
    line = (f"{data.flag.lstrip('-')}: {data.path} ({count(data.files, 'file')}, "
            f"{count(len(data.texts), 'document')}")
    return line + (f"; skipped {describe_skipped(data.skipped)})" if data.skipped else ")")


def passes_text(passes):
    return f"{passes:,.0f}" if passes >= 100 else f"{passes:.2f}" if passes >= 0.1 else f"{passes:.2g}"


def start_summary(s):
    """What the run read and what it will do, in a few lines on stderr before the first step."""
    config = s.config
    tokens_per_step = config["batch_size"] * config["block_size"] * config["grad_accum"]
    passes = config["max_steps"] * tokens_per_step / len(s.train_tokens)
    shape = (f"{count(s.hparams['n_layer'], 'layer')}, {count(s.hparams['n_head'], 'head')}, n_embd "
             f"{s.hparams['n_embd']}, context {s.hparams['n_ctx']}")
    origin = "the run's save" if s.resume else config["init_from"]
    val = "--val_dataset" if s.val_data else f"the last {VAL_FRACTION:.0%} of --dataset"
    lines = [describe_dataset(s.data)] + ([describe_dataset(s.val_data)] if s.val_data else []) + [
        f"tokens: {len(s.train_tokens):,} for training, {len(s.val_tokens):,} for validation ({val})",
        f"model: {n_parameters(s.hparams):,} parameters ({shape}), from {origin}",
        f"steps: {config['max_steps']:,} of {tokens_per_step:,} tokens (batch {config['batch_size']} x block "
        f"{config['block_size']} x grad_accum {config['grad_accum']}): {passes_text(passes)} "
        f"passes over the training tokens",
        f"run: {s.run_dir}"]
    return lines
