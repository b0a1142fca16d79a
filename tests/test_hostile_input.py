"""Hostile and broken input is bounded: a huge prompt is refused before it is read, locks never collide, a mirror
that trickles or lies about its length ends in one line, a closed stdin or stdout is one line. Memory bombs run in
a child under resource.setrlimit; anything that could hang has a deadline."""
import os
import re
import subprocess
import sys
import textwrap

import pytest

import cli
import utils
from encoder import get_encoder
from tests.test_download import server  # noqa: F401  (the fixture: a loopback mirror)
from tests.conftest import ROOT

OFFLINE = {"GPT2_MODELS_URL": "http://127.0.0.1:9"}


def run(args, timeout=120, **kwargs):
    """A child process, killed after timeout seconds; the test then fails showing what it printed."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, **OFFLINE, **kwargs.pop("env", {})}, **kwargs)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{args} did not end within {timeout} s; stdout {e.stdout!r}, stderr {e.stderr!r}")


def assert_one_line(result, code, line):
    assert "Traceback" not in result.stderr, result.stderr
    assert (result.returncode, result.stdout, result.stderr) == (code, "", line + "\n")


# ---------------------------------------------------------------------------------------- huge prompts

MEASURED = """
import resource, subprocess, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))  # the child inherits it: a bomb dies, not the machine
result = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=100)
sys.stderr.write(result.stderr)
print(result.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux
"""


def run_measured(args, limit=4 << 30):
    """args in a grandchild under an address-space limit; (exit code, stderr, its peak RSS in MB). The
    intermediate process has no other child, so RUSAGE_CHILDREN is the command's own peak."""
    result = run([sys.executable, "-c", MEASURED.format(limit=limit), *args], timeout=150,
                 env={"OPENBLAS_NUM_THREADS": "1"})
    code, peak_kib = result.stdout.split()
    return int(code), result.stderr, int(peak_kib) / 1024


@pytest.fixture(scope="module")
def huge_prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    with open(folder / "zeros.txt", "wb") as f:
        f.truncate(1 << 30)  # `truncate -s 1G`: a gigabyte of NUL bytes, sparse on disk
    (folder / "one_letter.txt").write_bytes(b"a" * (20 << 20))  # 20 MB, one word
    (folder / "just_over.txt").write_bytes(b" the" * (1024 * 128 // 4) + b"x")  # n_ctx x 128 bytes, and one more
    return folder


@pytest.mark.parametrize("name, size", [("zeros.txt", 1 << 30), ("one_letter.txt", 20 << 20),
                                        ("just_over.txt", 1024 * 128 + 1)])
def test_a_huge_prompt_file_is_refused_before_it_is_read(tiny_model, huge_prompts, name, size):
    """Once 146 s and 3.6 GB (20 MB of one letter), or killed by the kernel at 22.9 GB (1 GB of NUL bytes). A
    prompt that fits 1024 tokens has at most 1024 x 128 bytes (GPT-2's longest token): no more is read."""
    path = huge_prompts / name
    assert os.path.getsize(path) == size
    code, stderr, peak_mb = run_measured([sys.executable, "gpt2.py", "--prompt_file", str(path), "--model_size",
                                          tiny_model.name, "--models_dir", tiny_model.models_dir])
    assert "Traceback" not in stderr
    assert (code, stderr) == (2, f"error: --prompt_file {path} is more than 131072 bytes, more than the model's "
                                 f"context can hold: the prompt was not read further\n")
    assert peak_mb < 100, f"peak RSS {peak_mb:.0f} MB"


def test_a_huge_prompt_on_stdin_is_refused_after_reading_its_bound(tiny_model, huge_prompts):
    with open(huge_prompts / "zeros.txt", "rb") as stdin:
        result = run([sys.executable, "gpt2.py", "-", "--model_size", tiny_model.name, "--models_dir",
                      tiny_model.models_dir], stdin=stdin)
    assert_one_line(result, 2, "error: the prompt on standard input is more than 131072 bytes, more than the "
                               "model's context can hold: the prompt was not read further")


@pytest.mark.parametrize("command, source", [("{python} score.py /dev/zero {model}", "/dev/zero"),
                                             ("yes | {python} score.py - {model}", "standard input")],
                         ids=["/dev/zero", "endless pipe"])
def test_an_endless_text_to_score_is_refused_after_reading_its_bound(tiny_model, command, source):
    """score.py read all of its input before anything else: an endless one grew until MemoryError (here, under the
    address-space limit) or the kernel's OOM killer. It reads at most score.TEXT_BYTES_LIMIT (1 GiB) and one more."""
    model = f"--model_size {tiny_model.name} --models_dir {tiny_model.models_dir}"
    code, stderr, peak_mb = run_measured(["bash", "-c", command.format(python=sys.executable, model=model)])
    assert "Traceback" not in stderr
    assert (code, stderr) == (2, f"error: {source} is more than 1 GiB (1073741824 bytes), the most score.py reads: "
                                 f"it was not read further; score it in parts\n")
    assert peak_mb < 1700, f"peak RSS {peak_mb:.0f} MB"


def test_a_prompt_at_the_bound_is_read_and_measured_in_tokens(tiny_model, tmp_path):
    (tmp_path / "long.txt").write_bytes(b" the" * (1024 * 128 // 4))  # exactly the bound: 32768 tokens
    result = run([sys.executable, "gpt2.py", "--prompt_file", str(tmp_path / "long.txt"), "--model_size",
                  tiny_model.name, "--models_dir", tiny_model.models_dir])
    assert_one_line(result, 2, "error: the prompt is more than 1024 tokens, the model's whole context")


def test_one_long_word_is_never_merged_past_the_context(tiny_model, monkeypatch):
    """The BPE of a word of n letters costs O(n log n); a word whose bytes alone need more ids than the context
    holds (at least one id per 128 bytes) is not merged at all."""
    encoder = get_encoder(tiny_model.name, tiny_model.models_dir)
    assert encoder.longest_token == 128
    hello = encoder.encode("Hello")
    bpe = encoder.bpe
    monkeypatch.setattr(encoder, "bpe", lambda word: bpe(word) if len(word) < 10 else pytest.fail(
        f"merged a word of {len(word)} letters"))
    ids = encoder.encode("Hello " + "a" * 200_000, max_tokens=1024)
    assert len(ids) == 1025 and ids[:len(hello)] == hello


def test_a_long_word_that_could_fit_is_merged_as_usual(tiny_model):
    encoder = get_encoder(tiny_model.name, tiny_model.models_dir)
    word = "ab" * 150  # 300 letters: at least 3 ids, so it may fit 1024
    assert encoder.encode(word, max_tokens=1024) == encoder.encode(word)


def test_a_huge_interactive_line_is_refused_and_the_loop_goes_on(tiny_model):
    lines = b"a" * (300 << 10) + b"\nHello\n"  # 300 KB without a newline, then a real prompt
    result = run([sys.executable, "gpt2.py", "-i", "--n_tokens_to_generate", "2", "--model_size", tiny_model.name,
                  "--models_dir", tiny_model.models_dir], input=lines.decode())
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == ("error: the prompt is more than 131072 bytes, more than the model's context can "
                             "hold\n")
    assert result.stdout.count("\n") == 1  # Hello's continuation


def test_the_memory_check_names_the_model_when_one_sample_cannot_fit():
    huge = {"n_layer": 1024, "n_embd": 65536, "n_vocab": 50257}  # within the bounds, but 512 GiB of caches
    with pytest.raises(utils.UsageError) as error:
        cli.check_memory(huge, 1, 1024)
    assert str(error.value).startswith("the model (n_layer 1024, n_embd 65536, n_vocab 50257) needs about 512.0 GiB "
                                       "for the key/value caches of 1024 positions, more than this machine's")
    small = {"n_layer": 2, "n_embd": 64, "n_vocab": 50257}
    with pytest.raises(utils.UsageError, match="^--num_samples 1000000000 needs about"):
        cli.check_memory(small, 10**9, 1024)


# ---------------------------------------------------------------------------------------- stdin, stdout closed

@pytest.mark.parametrize("command, line", [
    ("gpt2.py - {model} <&-", "error: standard input is closed, so there is no prompt to read from it (`-`)"),
    ("gpt2.py -i {model} <&-", "error: standard input is closed, so --interactive has no prompts to read"),
    ("score.py - {model} <&-", "error: standard input is closed, so there is no text to read from it (`-`)"),
    ("gpt2.py Hello {model} >&-", "error: standard output is closed (>&-): there is nowhere to write the output"),
    ("score.py README.md {model} >&-",
     "error: standard output is closed (>&-): there is nowhere to write the output"),
], ids=["gpt2 stdin", "gpt2 -i stdin", "score stdin", "gpt2 stdout", "score stdout"])
def test_a_closed_stdin_or_stdout_is_one_line(tiny_model, command, line):
    model = f"--model_size {tiny_model.name} --models_dir {tiny_model.models_dir}"
    result = run(["bash", "-c", f"exec {sys.executable} {command.format(model=model)}"])
    assert_one_line(result, 2, line)


# ---------------------------------------------------------------------------------------- locks

@pytest.mark.parametrize("a, b", [
    (("foo.writer", ".download"), ("foo", ".writer")),  # were both .foo.writer.lock
    (("foo.download", ".writer"), ("foo", ".download")),
    (("foo", ".download"), ("foo", ".writer")),
    (("a.b", ".writer"), ("a", ".writer")),
])
def test_lock_names_differ_for_different_folders_or_kinds(tmp_path, a, b):
    assert utils.lock_path(str(tmp_path / a[0]), a[1]) != utils.lock_path(str(tmp_path / b[0]), b[1])


def test_the_download_lock_of_foo_writer_is_not_the_writer_lock_of_foo(tmp_path):
    """gpt2.py on a model named foo.writer once waited for the training of a run named foo."""
    code = textwrap.dedent(f"""
        import utils
        with utils.hold({str(tmp_path / "foo.writer")!r}, "downloading foo.writer"):
            print("held")
    """)
    with utils.exclusive(str(tmp_path / "foo")):
        result = run([sys.executable, "-c", code], timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "held\n", "")


# ---------------------------------------------------------------------------------------- downloads



@pytest.mark.parametrize("length", ["abc", "-1", "12x", ""])
def test_a_content_length_that_is_no_number_is_one_line(tmp_path, server, length):
    server.faults = {"hparams.json": [f"length:{length}"]}
    result = run([sys.executable, "gpt2.py", "Hello", "--models_dir", str(tmp_path)],
                 env={"GPT2_MODELS_URL": server.url})
    assert_one_line(result, 1, f"error: could not download {server.url}/124M/hparams.json: the server sent "
                               f"Content-Length {length!r}, which is not a number of bytes")
    assert not os.path.exists(tmp_path / "124M" / "hparams.json")


def test_a_trickling_mirror_ends_the_attempt_and_the_next_one_resumes(tmp_path, server, monkeypatch):
    """A byte every 50 ms is 20 bytes/s: under a floor of 1000 bytes/s over 1 s, the attempt ends; the retry
    asks for the rest (Range) and gets it at full speed."""
    monkeypatch.setattr(utils, "SPEED_LIMIT", 1000)
    monkeypatch.setattr(utils, "STALL_SECONDS", 1)
    server.faults = {"encoder.json": ["slow"]}
    utils.prepare_tokenizer("124M", str(tmp_path))
    ranges = [r for name, r in server.requests if name == "encoder.json"]
    assert len(ranges) == 2 and ranges[0] is None and re.fullmatch(r"bytes=\d+-", ranges[1])
    with open(tmp_path / "124M" / "encoder.json", "rb") as f:
        assert f.read() == server.files["encoder.json"]


def test_a_mirror_that_always_trickles_is_one_line_after_its_attempts(tmp_path, server, monkeypatch):
    monkeypatch.setattr(utils, "SPEED_LIMIT", 1000)
    monkeypatch.setattr(utils, "STALL_SECONDS", 1)
    server.faults = {"encoder.json": ["slow"] * utils.DOWNLOAD_ATTEMPTS}
    with pytest.raises(utils.ModelError) as error:
        utils.prepare_tokenizer("124M", str(tmp_path))
    assert re.fullmatch(rf"could not download {server.url}/124M/encoder.json after 5 attempts: the transfer ran "
                        r"below 1000 bytes/s for 1 s \(\d+ bytes in \d+ s\)", str(error.value))
    assert not os.path.exists(tmp_path / "124M" / "encoder.json")


def test_the_progress_bar_moves_with_bytes(tmp_path, server, monkeypatch, capsys):
    """At 20 bytes/s, hparams.json's 86 bytes show on the bar as they come, not as 0 until the end."""
    monkeypatch.setattr(utils, "SPEED_LIMIT", 1)
    server.faults = {"hparams.json": ["slow"]}
    utils.prepare_tokenizer("124M", str(tmp_path))
    counts = {float(n) for n in re.findall(r"hparams\.json: .*?\| *([0-9.]+)/86\.0", capsys.readouterr().err)}
    assert len(counts - {0, 86}) >= 2, counts  # at least two counts between none and all
