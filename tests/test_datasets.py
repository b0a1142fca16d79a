"""train.py's datasets and what it says at the start: folders read recursively, text files by extension and by
content, .jsonl and .csv one document per row, the skipped files counted and named, <|endoftext|> after every
document (checked against tiktoken), the start summary's numbers, the long-warmup warning, --help."""
import csv
import hashlib
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

import cli
import runs
import train
import utils
from tests.conftest import ROOT
from tests.test_train import PARAGRAPH, finish, models_dir, paragraph, run_train  # noqa: F401

ENDOFTEXT = 50256
OPTIONS = dict(init_from="scratch", n_layer=1, n_head=2, n_embd=16, n_ctx=32, block_size=8, batch_size=2,
               learning_rate=1e-2, warmup_steps=1, eval_every=0, save_every=0, seed=0)
CLI_OPTIONS = [arg for name, value in OPTIONS.items() for arg in (f"--{name}", str(value))]


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def expected_tokens(tiktoken_gpt2, documents):
    """The token stream a run must train on, by tiktoken: each document's tokens, then <|endoftext|>."""
    return [t for doc in documents for t in tiktoken_gpt2.encode(doc, disallowed_special=()) + [ENDOFTEXT]]


def cached_streams(models_dir):
    """{token count: tokens} of the token cache: what the run tokenized, as it saved it."""
    folder = os.path.join(models_dir, "token-cache")
    return {len(a): a.tolist() for a in (np.load(os.path.join(folder, name)) for name in os.listdir(folder))}


def summary(err):
    """{"dataset": ..., "tokens": ..., ...}: the start summary's lines by their first word."""
    return {m[1]: m[2] for m in re.finditer(r"^(dataset|val_dataset|tokens|model|steps|run): (.*)$", err, re.M)}


@pytest.fixture
def folder(tmp_path):
    """A dataset folder of every kind of entry, and the documents it holds in the order they must be read."""
    root = tmp_path / "texts"
    docs = {
        "a.txt": "Alpha is a plain text file.",
        "b/inner.md": "# Beta\n\nA markdown file in a subfolder.",
        "b/c/deep.RST": "Gamma\n=====\n\nA reStructuredText file two levels down, its extension in capitals.",
        "notes.txt/inside.txt": "Delta lives in a folder named notes.txt, which is walked, not read.",
        "README": "Epsilon has no extension and is UTF-8: café.",
        "z.TXT": "Zeta is last by name.",
    }
    for name, text in docs.items():
        write(root / name, text)
    write(root / "photo.png", b"\x89PNG\r\n\x1a\n\x00\x00")
    write(root / "b" / "data.json", "{}")
    write(root / "program", b"\x7fELF\x02\x01\x01\x00\x00\x00")  # no extension, not UTF-8
    write(root / "utf16", "Not UTF-8".encode("utf-16"))  # no extension, NUL bytes: not taken as text
    write(root / ".hidden.txt", "A hidden file is not read.")
    write(root / ".git" / "HEAD", "ref: refs/heads/main\n")
    order = ["a.txt", "b/c/deep.RST", "b/inner.md", "notes.txt/inside.txt", "README", "z.TXT"]
    order.sort(key=lambda p: p.split("/"))  # by path, folder by folder (code points: uppercase first)
    return root, [docs[name] for name in order]


# ---------------------------------------------------------------------------------------------- a folder

def test_a_folder_is_read_recursively_in_path_order_by_extension_and_content(folder):
    root, documents = folder
    data = runs.dataset_texts(str(root), "--dataset")
    assert data.texts == documents
    assert data.files == len(documents)
    assert data.skipped == {".png": 1, ".json": 1, "without an extension, not UTF-8 text": 2, "hidden": 2}


def test_fifos_devices_sockets_and_broken_links_are_never_opened_and_are_named(tmp_path, capfd):
    root = tmp_path / "texts"
    write(root / "sub" / "a.md", PARAGRAPH)
    os.mkfifo(root / "sub" / "pipe")  # opening it would wait for a writer for ever
    os.symlink("/dev/zero", root / "zero.txt")  # reading it would never end
    os.symlink(str(root / "gone"), root / "broken.md")
    os.symlink("..", root / "sub" / "up")  # a loop: the folder itself again
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(root / "sub" / "socket.txt"))
    try:
        data = runs.dataset_texts(str(root), "--dataset")
    finally:
        listening.close()
    assert data.texts == [PARAGRAPH]
    assert capfd.readouterr().err.splitlines() == [
        f"warning: --dataset {root}: skipping broken.md, a broken link",
        f"warning: --dataset {root}: skipping sub/pipe, a FIFO",
        f"warning: --dataset {root}: skipping sub/socket.txt, a socket",
        f"warning: --dataset {root}: skipping sub/up, the folder {root} again (a link)",
        f"warning: --dataset {root}: skipping zero.txt, a character device"]
    assert data.skipped == {"a broken link": 1, "a FIFO": 1, "a socket": 1, "a folder read already": 1,
                            "a character device": 1}
    assert runs.describe_skipped(data.skipped) == ("1 broken link, 1 character device, 1 FIFO, "
                                                   "1 folder read already, 1 socket")


def test_a_folder_without_text_is_one_line(tmp_path):
    write(tmp_path / "images" / "photo.png", b"\x89PNG")
    write(tmp_path / "images" / "program", b"\x7fELF\x00")
    with pytest.raises(utils.UsageError) as refused:
        runs.dataset_texts(str(tmp_path / "images"), "--dataset")
    assert str(refused.value) == ("--dataset {}: the folder holds no text files (.txt, .md, .rst, .jsonl, .csv, or "
                                  "UTF-8 text without an extension) (skipped 1 .png, 1 without an extension, not UTF-8 "
                                  "text)".format(tmp_path / "images"))
    write(tmp_path / "images" / "empty.txt", " \n")
    with pytest.raises(utils.UsageError, match=r"^--dataset .*images is empty$"):
        runs.dataset_texts(str(tmp_path / "images"), "--dataset")


# ---------------------------------------------------------------------------------------------- rows

def test_jsonl_is_one_document_per_line(tmp_path):
    rows = [{"text": "First line's document.", "id": 1}, {"text": "Second,\nwith a newline\u2028and U+2028."},
            {"text": ""}, {"text": "Third."}]
    path = write(tmp_path / "data.JSONL", "\ufeff" + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
                 + "\n\n")
    data = runs.dataset_texts(str(path), "--dataset")
    assert data.texts == ["First line's document.", "Second,\nwith a newline\u2028and U+2028.", "Third."]
    assert (data.files, data.skipped) == (1, {"an empty row": 1})
    other = write(tmp_path / "other.jsonl", json.dumps({"body": "Chosen by --text_column."}) + "\n")
    assert runs.dataset_texts(str(other), "--dataset", "body").texts == ["Chosen by --text_column."]


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": "ok", oops}'], 'line 2 is not JSON (Expecting property name enclosed in double '
                                                 'quotes, column 16)'),
    (['{"text": "ok"}', '{"body": "x", "id": 2}'], 'line 2 has no "text" field (its fields are body, id); every '
                                                   'line needs one, or --text_column names another'),
    (['["text"]'], 'line 1 is a list, not an object with a "text" field'),
    (['{}'], 'line 1 has no "text" field (it has no fields); every line needs one, or --text_column names another'),
    (['{"text": 12}'], 'line 1: "text" is 12, not a string'),
    (['{"text": "\\ud800"}'], "line 1 is not valid UTF-8 text (character 0 cannot be encoded)"),
])
def test_a_bad_jsonl_line_is_one_error_naming_file_and_line(tmp_path, lines, message):
    path = write(tmp_path / "data.jsonl", "\n".join(lines))
    with pytest.raises(utils.UsageError) as refused:
        runs.dataset_texts(str(path), "--dataset")
    assert str(refused.value) == f"--dataset {path} {message}"


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def test_csv_is_one_document_per_row(tmp_path):
    one = write_csv(tmp_path / "one.csv", [["story"], ["A row, with a comma."], ["Two\nlines, quoted."], [""]])
    data = runs.dataset_texts(str(one), "--dataset")
    assert data.texts == ["A row, with a comma.", "Two\nlines, quoted."] and data.skipped == {"an empty row": 1}
    named = write_csv(tmp_path / "named.CSV", [["id", "text", "label"], ["1", "The text column.", "x"]])
    assert runs.dataset_texts(str(named), "--dataset").texts == ["The text column."]
    chosen = write_csv(tmp_path / "chosen.csv", [["id", "text", "body"], ["1", "not this", "This one."]])
    assert runs.dataset_texts(str(chosen), "--dataset", "body").texts == ["This one."]
    long = write_csv(tmp_path / "long.csv", [["text"], ["x" * 200_000]])  # above csv's default field limit
    assert runs.dataset_texts(str(long), "--dataset").texts == ["x" * 200_000]
    blank_first = tmp_path / "blank_first.csv"  # blank lines before the header: the header is the first row
    blank_first.write_text("\n\ntext\nhello\n", encoding="utf-8")
    assert runs.dataset_texts(str(blank_first), "--dataset").texts == ["hello"]
    blank = tmp_path / "blank.csv"
    blank.write_text("\n", encoding="utf-8")
    with pytest.raises(utils.UsageError, match="is empty"):
        runs.dataset_texts(str(blank), "--dataset")


def test_text_files_lose_their_byte_order_mark_and_empty_ones_are_no_documents(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / "bom.txt").write_bytes("\ufeffWritten by Notepad.".encode("utf-8"))
    (root / "empty.txt").write_bytes(b"")
    (root / "sub" / "empty.md").write_bytes("\ufeff".encode("utf-8"))
    data = runs.dataset_texts(str(root), "--dataset")
    assert data.texts == ["Written by Notepad."] and data.skipped == {"an empty file": 2} and data.files == 3
    assert "skipped 2 empty files" in runs.describe_dataset(data)
    with pytest.raises(utils.UsageError, match="is empty"):
        runs.dataset_texts(str(root / "empty.txt"), "--dataset")


def test_a_csv_column_that_is_not_there_is_one_error_listing_the_columns(tmp_path):
    path = write_csv(tmp_path / "data.csv", [["id", "body", "label"], ["1", "text", "x"]])
    with pytest.raises(utils.UsageError) as refused:
        runs.dataset_texts(str(path), "--dataset")
    assert str(refused.value) == (f"--dataset {path} has 3 columns (id, body, label): --text_column NAME says which "
                                  f"one holds the text")
    with pytest.raises(utils.UsageError) as refused:
        runs.dataset_texts(str(path), "--val_dataset", "story")
    assert str(refused.value) == (f"--val_dataset {path} has no column 'story' (--text_column): its columns are id, "
                                  f"body, label")
    short = write_csv(tmp_path / "short.csv", [["id", "body"], ["1", "fine"], ["2"]])
    with pytest.raises(utils.UsageError) as refused:
        runs.dataset_texts(str(short), "--dataset", "body")
    assert str(refused.value) == f"--dataset {short} line 3 has 1 field, no value for column 'body'"


UNCLOSED = [  # (the file, the line where its unclosed quote opens)
    ('text\nhello\n"unterminated\nmore\nlines\n', 3),
    ('text\n"no newline at the end', 2),
    ('id,text\n1,"a\nb"\n2,"c ""q"" \nd\n', 4),  # the row's second field, a line after the row begins
    ('id,text\n1,ok\n"2,oops\n3,x\n', 3),  # the rows after it swallowed into one field, no value for "text"
    ('text\r\nhello\r\n"x\r\ny\r\n', 3),
    ('"text\nhello\n', 1),  # the header itself
]


@pytest.mark.parametrize("content, line", UNCLOSED, ids=range(len(UNCLOSED)))
def test_a_csv_quote_never_closed_is_one_error_naming_its_line(tmp_path, content, line):
    """Python's csv reads a quoted field that is never closed to the end of the file: every row after it was one
    document, silently."""
    path = tmp_path / "data.csv"
    path.write_bytes(content.encode("utf-8"))
    with pytest.raises(utils.UsageError) as refused:
        runs.dataset_texts(str(path), "--dataset")
    assert str(refused.value) == (f'--dataset {path} line {line}: a quote (") opens a field there that the file '
                                  f'never closes, so csv would read the rest of the file as that one field; close '
                                  f'it, or double a quote that is text ("")')


def test_csv_quotes_closed_at_the_end_of_the_file_are_read(tmp_path):
    for content, texts in [('text\n"abc"""\n', ['abc"']), ('text\n"ok"', ["ok"]), ('text\nhello\n"a\nb"\n\n\n',
                                                                                   ["hello", "a\nb"])]:
        path = tmp_path / "data.csv"
        path.write_bytes(content.encode("utf-8"))
        assert runs.dataset_texts(str(path), "--dataset").texts == texts


def test_a_csv_quote_never_closed_stops_train_py_with_one_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('text\nhello\n"unterminated\nmore\n', encoding="utf-8")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset", str(path), "--out_name",
                             "run", "--models_dir", str(tmp_path / "models"), *CLI_OPTIONS], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [f'error: --dataset {path} line 3: a quote (") opens a field there that the '
                                          f'file never closes, so csv would read the rest of the file as that one '
                                          f'field; close it, or double a quote that is text ("")']
    assert not os.path.exists(tmp_path / "models" / "run")


def test_rows_are_read_inside_folders(tmp_path):
    root = tmp_path / "mixed"
    write(root / "a.txt", "A whole file.")
    write(root / "b" / "rows.jsonl", '{"body": "jsonl row"}\n')
    write_csv(root / "c.csv", [["id", "body"], ["1", "csv row"]])
    data = runs.dataset_texts(str(root), "--dataset", "body")
    assert data.texts == ["A whole file.", "jsonl row", "csv row"] and (data.files, data.row_files) == (3, 2)


def test_text_column_without_rows_to_pick_from_is_a_warning(models_dir, paragraph, capfd):
    train.main(paragraph, "run", text_column="body", max_steps=1, models_dir=models_dir, **OPTIONS)
    assert [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning")] == [
        f"warning: --text_column body only picks the column of .csv and .jsonl files, and --dataset {paragraph} "
        f"holds none"]


# ---------------------------------------------------------------------------------------------- tokens

def test_every_document_is_followed_by_endoftext_in_the_tokens_trained_on(models_dir, tmp_path, tiktoken_gpt2):
    root = tmp_path / "mixed"
    write(root / "a.md", PARAGRAPH)
    write(root / "b" / "rows.jsonl", "\n".join(json.dumps({"text": t}) for t in ("One.", "Two <|endoftext|> x.")))
    write_csv(root / "c.csv", [["text"], ["Three, from a CSV."]])
    val = write_csv(tmp_path / "val.csv", [["text"], ["Validation text."]])
    train.main(str(root), "run", val_dataset=str(val), max_steps=1, models_dir=models_dir, **OPTIONS)
    streams = cached_streams(models_dir)
    documents = [PARAGRAPH, "One.", "Two <|endoftext|> x.", "Three, from a CSV."]
    expected = expected_tokens(tiktoken_gpt2, documents)  # the literal text <|endoftext|> is no special token
    assert streams[len(expected)] == expected
    assert streams[len(expected_tokens(tiktoken_gpt2, ["Validation text."]))] == expected_tokens(
        tiktoken_gpt2, ["Validation text."])
    assert [i for i, t in enumerate(expected) if t == ENDOFTEXT] == [
        len(expected_tokens(tiktoken_gpt2, documents[:k + 1])) - 1 for k in range(len(documents))]


def test_text_column_applies_to_the_validation_file_too(models_dir, paragraph, tmp_path, tiktoken_gpt2):
    val = write_csv(tmp_path / "val.csv", [["id", "story"], ["1", "Validation, by its column."]])
    train.main(paragraph, "run", val_dataset=str(val), text_column="story", max_steps=1, models_dir=models_dir,
               **OPTIONS)
    expected = expected_tokens(tiktoken_gpt2, ["Validation, by its column."])
    assert cached_streams(models_dir)[len(expected)] == expected
    with open(os.path.join(models_dir, "run", "train_config.json")) as f:
        assert json.load(f)["options"]["text_column"] == "story"


def test_long_texts_are_tokenized_in_pieces_that_give_the_whole_texts_tokens(tiktoken_gpt2):
    """The pieces are cut only where GPT-2's pre-tokenizer ends a word on both sides: the tokens are the whole
    text's, whatever the whitespace around the cuts."""
    encoder = runs.load_encoder(os.path.dirname(tiktoken_vocab()))
    rng = np.random.default_rng(0)
    atoms = ["word", " word", "\n", "\n\n", "  \n", " \n", "\t", ".", "'s", "12", " 3", "é", "\u2028", "\x1c",
             "\u3000", "\r\n", "  ", "x\n'", ":\n-"]
    text = "".join(rng.choice(atoms, size=4000))
    pieces = list(runs.text_pieces(text, size=7))
    assert len(pieces) > 100 and "".join(pieces) == text
    whole = tiktoken_gpt2.encode(text, disallowed_special=())
    assert [t for piece in pieces for t in encoder.encode(piece)] == whole
    assert runs.tokenize([text, text], encoder).tolist() == whole + [ENDOFTEXT] + whole + [ENDOFTEXT]


def tiktoken_vocab():
    from tests.release_layout import real_vocab_file

    return real_vocab_file("encoder.json")


def test_a_large_dataset_shows_a_progress_bar_while_it_is_tokenized(monkeypatch, capfd):
    encoder = runs.load_encoder(os.path.dirname(tiktoken_vocab()))
    text = (PARAGRAPH + "\n") * 40  # 9 KB
    runs.tokenize([text], encoder, "tokenizing --dataset")
    assert capfd.readouterr().err == ""  # small: no bar
    monkeypatch.setattr(runs, "PROGRESS_BYTES", 4096)
    monkeypatch.setattr(runs, "PIECE_CHARS", 1024)
    updates = []

    class Bar(runs.tqdm):  # tqdm itself, its updates recorded
        def update(self, n=1):
            updates.append(n)
            return super().update(n)

    monkeypatch.setattr(runs, "tqdm", Bar)
    tokens = runs.tokenize([text], encoder, "tokenizing --dataset")
    err = capfd.readouterr().err
    assert err.startswith("\rtokenizing --dataset:   0%|") and "/10.2k [" in err and "B/s]" in err
    assert len(updates) >= 9 and sum(updates) == len(text.encode())  # by bytes, within the one document
    assert err.endswith("\r") and err.split("\r")[-2].strip() == ""  # blanked out when done (leave=False)
    assert tokens.tolist() == encoder.encode(text) + [ENDOFTEXT]


# ---------------------------------------------------------------------------------------------- resuming

def test_a_run_on_one_txt_file_from_before_these_forms_still_resumes(models_dir, paragraph):
    """A run's record knows its text by a fingerprint: for one .txt file, the sha256 of its text and a NUL, as the
    previous train.py computed it. A record without text_column (it had none) resumes as it was."""
    train.main(paragraph, "run", max_steps=1, models_dir=models_dir, **OPTIONS)
    record_path = os.path.join(models_dir, "run", "train_config.json")
    with open(record_path) as f:
        record = json.load(f)
    assert record["fingerprints"]["dataset"] == hashlib.sha256(PARAGRAPH.encode("utf-8") + b"\0").hexdigest()
    del record["options"]["text_column"]
    with open(record_path, "w") as f:
        json.dump(record, f)
    train.main(paragraph, "run", resume=True, max_steps=2, models_dir=models_dir)
    with open(record_path) as f:
        assert json.load(f)["options"]["text_column"] is None


# ---------------------------------------------------------------------------------------------- the start

def checkpoint_parameters(run_dir):
    """The model's parameters, from the checkpoint's own variable shapes (TensorFlow's reader)."""
    import tensorflow as tf

    return sum(int(np.prod(shape)) for _, shape in tf.train.list_variables(utils.checkpoint_prefix(run_dir)))


def test_the_start_summary_counts_what_was_read_and_what_the_run_will_do(models_dir, folder, tiktoken_gpt2, capfd):
    root, documents = folder
    os.symlink(str(root / "gone"), root / "broken.txt")
    options = {**OPTIONS, "batch_size": 3, "grad_accum": 2}
    capfd.readouterr()
    train.main(str(root), "run", max_steps=4, models_dir=models_dir, **options)
    err = capfd.readouterr().err
    lines = summary(err)
    tokens = len(expected_tokens(tiktoken_gpt2, documents))
    n_train = int(tokens * 0.9)
    assert lines["dataset"] == (f"{root} ({len(documents)} files, {len(documents)} documents; skipped 2 hidden, 2 "
                                f"without an extension, not UTF-8 text, 1 .json, 1 .png, 1 broken link)")
    assert lines["tokens"] == (f"{n_train:,} for training, {tokens - n_train:,} for validation (the last 10% of "
                               f"--dataset)")
    n_parameters = checkpoint_parameters(os.path.join(models_dir, "run"))
    assert lines["model"] == (f"{n_parameters:,} parameters (1 layer, 2 heads, n_embd 16, context 32), from scratch")
    per_step = 3 * 8 * 2
    assert lines["steps"] == (f"4 of {per_step} tokens (batch 3 x block 8 x grad_accum 2): {4 * per_step / n_train:.2f}"
                              f" passes over the training tokens")
    assert lines["run"] == os.path.join(models_dir, "run")
    assert err.index("run: ") < err.index("step/s")  # before the first step


def test_the_summary_of_a_validation_file_and_a_release_shaped_model(models_dir, paragraph, tmp_path, tiktoken_gpt2,
                                                                      tiny_model, capfd):
    val = write(tmp_path / "val.jsonl", "\n".join(json.dumps({"text": t}) for t in ("One.", "", "Two.")))
    train.main(paragraph, "tuned", val_dataset=str(val), init_from="tiny", block_size=8, batch_size=2,
               max_steps=1, eval_every=0, warmup_steps=0, models_dir=tiny_model.models_dir, overwrite=True)
    lines = summary(capfd.readouterr().err)
    assert lines["val_dataset"] == f"{val} (1 file, 2 documents; skipped 1 empty row)"
    n_train, n_val = (len(expected_tokens(tiktoken_gpt2, d)) for d in ([PARAGRAPH], ["One.", "Two."]))
    assert lines["tokens"] == f"{n_train:,} for training, {n_val:,} for validation (--val_dataset)"
    n_parameters = sum(a.size for a in tiny_model.tensors.values())
    assert n_parameters == checkpoint_parameters(os.path.join(tiny_model.models_dir, "tuned"))
    assert lines["model"] == f"{n_parameters:,} parameters (2 layers, 4 heads, n_embd 64, context 1024), from tiny"
    assert runs.n_parameters({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_layer": 12}) == 124_439_808


def test_the_command_line_prints_the_summary_and_a_bad_row_is_one_line(models_dir, paragraph, tmp_path):
    run = run_train("--dataset", paragraph, "--out_name", "run", "--max_steps", "1", *CLI_OPTIONS, "--models_dir",
                    models_dir)
    out, err = finish(run)
    assert run.returncode == 0, err
    assert [line.split(":")[0] for line in err.splitlines() if re.match(r"^\w+: ", line)] == [
        "dataset", "tokens", "model", "steps", "run"]
    assert f"dataset: {paragraph} (1 file, 1 document)\n" in err
    bad = write(tmp_path / "bad.jsonl", '{"text": "fine"}\nnot json\n')
    run = run_train("--dataset", str(bad), "--out_name", "run2", "--max_steps", "1", *CLI_OPTIONS, "--models_dir",
                    models_dir)
    out, err = finish(run)
    assert (run.returncode, out, err) == (2, "", f"error: --dataset {bad} line 2 is not JSON (Expecting value, "
                                                 f"column 1)\n")


# ---------------------------------------------------------------------------------------------- the warmup

def test_a_warmup_longer_than_the_run_is_one_warning_with_the_peak_it_reaches(models_dir, paragraph, capfd):
    options = {**OPTIONS, "warmup_steps": 10, "learning_rate": 3e-4}
    train.main(paragraph, "run", max_steps=3, models_dir=models_dir, **options)
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    peak = train.learning_rate_at(2, 3e-4, 10, 3)  # the last update's
    assert warnings == [f"warning: --warmup_steps 10 is longer than the run (--max_steps 3): the learning rate only "
                        f"climbs, to {peak:.3g} of --learning_rate 0.0003 at the last step, and never decays; "
                        f"--warmup_steps 1 would warm up over a tenth of the run"]
    with open(os.path.join(models_dir, "run", "log.csv"), newline="") as f:
        lrs = [float(row["lr"]) for row in csv.DictReader(f)]
    assert lrs == sorted(lrs) and lrs[-1] == pytest.approx(peak, rel=1e-5)  # it climbed, to that peak
    train.main(paragraph, "run", max_steps=3, overwrite=True, models_dir=models_dir, **{**options, "warmup_steps": 2})
    assert "warning" not in capfd.readouterr().err


def test_the_issues_example_of_a_long_warmup(capfd):
    options = {"warmup_steps": 100, "max_steps": 30, "learning_rate": 3e-4}
    runs.warn_long_warmup(options, resume=False)
    assert train.learning_rate_at(29, 3e-4, 100, 30) == pytest.approx(9e-05)
    assert capfd.readouterr().err == (
        "warning: --warmup_steps 100 is longer than the run (--max_steps 30): the learning rate only climbs, to "
        "9e-05 of --learning_rate 0.0003 at the last step, and never decays; --warmup_steps 3 would warm up over a "
        "tenth of the run\n")
    runs.warn_long_warmup({**options, "warmup_steps": 31}, resume=True)  # on --resume it cannot change: no hint
    assert capfd.readouterr().err == (
        "warning: --warmup_steps 31 is longer than the run (--max_steps 30): the learning rate only climbs, to "
        "0.00029 of --learning_rate 0.0003 at the last step, and never decays\n")
    for warmup in (30, 29, 0):  # the peak is reached, at the last step at the latest
        runs.warn_long_warmup({**options, "warmup_steps": warmup}, resume=False)
    assert capfd.readouterr().err == ""


# ---------------------------------------------------------------------------------------------- --help

def test_help_describes_every_flag_with_its_type_and_default():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    text = result.stdout
    assert "SYNOPSIS\n    train.py <flags>\n" in text and "Optional[" not in text and "POSITIONAL" not in text
    assert "python train.py --dataset TEXT --out_name NAME [flags]" in text
    blocks = dict(re.findall(r"^    (?:-\w, )?--(\w+)=\w+\n((?:        .*\n?)+)", text, re.M))
    flags = cli.flags_of(train.main)
    assert list(blocks) == list(flags)
    for name, parameter in flags.items():
        lines = [line.strip() for line in blocks[name].splitlines()]
        assert lines[0].startswith("Type: ") and lines[1].startswith("Default: ") and len(lines) == 3, (name, lines)
        default = runs.plain(parameter.default)
        shown = {None: "none"}.get(default, repr(default)) if name != "lr_decay_steps" else "max_steps"
        assert lines[1] == f"Default: {shown}", name
        assert len(lines[2]) > 20, name  # a description, whole (fire's parser cuts one at a line like "x: y")
    assert blocks["text_column"].splitlines()[0].strip() == "Type: str"
    assert blocks["dataset"].rstrip().endswith("Every document is followed by <|endoftext|>")
