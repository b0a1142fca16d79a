"""--interactive: the model loads once and continues prompt after prompt, on a terminal (through a
pseudo-terminal, so Ctrl-C is a real SIGINT) and from a pipe."""
import os
import subprocess
import sys

import pexpect
import pytest

import gpt2
from tests.conftest import ROOT

PROMPT = "Model prompt >>> "
SAMPLING = dict(n_tokens_to_generate=6, temperature=1.0, top_k=40, seed=7)


def flags(model, **kwargs):
    return ["--model_size", model.name, "--models_dir", model.models_dir, *(f"--{k}={v}" for k, v in kwargs.items())]


def spawn(*args):
    child = pexpect.spawn(sys.executable, [os.path.join(ROOT, "gpt2.py"), "--interactive", *args], cwd=ROOT,
                          encoding="utf-8", timeout=120)
    child.expect_exact(PROMPT)  # the model is loaded
    return child


def test_prompts_on_a_terminal_give_the_one_shot_texts_and_ctrl_d_exits_0(tiny_model, tmp_path):
    out = tmp_path / "out.txt"
    # stdout to a file, stdin and stderr on the terminal: the prompt and the typing stay off stdout
    command = " ".join([sys.executable, os.path.join(ROOT, "gpt2.py"), "--interactive", *flags(tiny_model, **SAMPLING)])
    child = pexpect.spawn("bash", ["-c", f"exec {command} > {out}"], cwd=ROOT, encoding="utf-8", timeout=120)
    prompts = ["Hello", "Alan Turing theorized", "Hello"]  # the same seed: the same text, whatever came before
    for prompt in ["", *prompts]:  # an empty line asks again
        child.expect_exact(PROMPT)
        child.sendline(prompt)
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    model = dict(model_size=tiny_model.name, models_dir=tiny_model.models_dir)
    expected = [gpt2.main(prompt, **SAMPLING, **model) for prompt in prompts]
    assert expected[0] != expected[1]
    assert out.read_text() == "".join(text + "\n" for text in expected)


def test_ctrl_c_stops_a_continuation_and_at_the_prompt_exits_0(wide_model):
    child = spawn(*flags(wide_model, n_tokens_to_generate=1000))  # long enough to be interrupted
    child.sendline("Hello")
    child.expect_exact("Hello\r\n")  # the echo
    child.expect(r"\S")  # the continuation has begun
    child.sendintr()
    child.expect_exact(PROMPT)  # back at the prompt, the model still loaded
    assert len(child.before) < 1000
    child.sendline("")
    child.expect_exact(PROMPT)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


def test_piped_prompts_one_per_line_and_a_too_long_one_is_reported(tiny_model):
    prompts = ["Hello", "", " ".join(["word"] * 1100), "Alan Turing theorized"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), "--interactive",
                             *flags(tiny_model, n_tokens_to_generate=6)], input="\n".join(prompts) + "\n",
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0
    model = dict(model_size=tiny_model.name, models_dir=tiny_model.models_dir, n_tokens_to_generate=6)
    assert result.stdout == "".join(gpt2.main(p, **model) + "\n" for p in ["Hello", "Alan Turing theorized"])
    assert result.stderr.splitlines() == ["error: the prompt is more than 1024 tokens, the model's whole context"]


def test_a_byte_order_mark_on_piped_prompts_is_not_part_of_the_prompt(tiny_model):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), "--interactive",
                             *flags(tiny_model, n_tokens_to_generate=6)], input=b"\xef\xbb\xbfHello\nHello\n",
                            capture_output=True, cwd=ROOT, timeout=300)  # a file saved by Notepad, piped in
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.decode("utf-8").splitlines()
    assert first == second


def test_windows_line_endings_on_piped_prompts_are_not_part_of_the_prompt(tiny_model):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), "--interactive",
                             *flags(tiny_model, n_tokens_to_generate=6)], input=b"hello\r\nhello\r\n\r\n",
                            capture_output=True, cwd=ROOT, timeout=300)  # a file saved on Windows, piped in
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    expected = gpt2.main("hello", n_tokens_to_generate=6, model_size=tiny_model.name, models_dir=tiny_model.models_dir)
    assert expected != gpt2.main("hello\r", n_tokens_to_generate=6, model_size=tiny_model.name,
                                 models_dir=tiny_model.models_dir)  # the "\r" would change the text
    assert result.stdout.decode("utf-8") == 2 * (expected + "\n")  # and the blank "\r\n" line asks again


def test_interactive_takes_no_prompt_file(tiny_model):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), "-i", "--prompt_file", "x.txt",
                             *flags(tiny_model)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: --interactive reads its prompts from standard input: give no prompt or " \
                            "--prompt_file\n"


@pytest.mark.parametrize("filters", [None, "ignore", "error"], ids=lambda f: f"PYTHONWARNINGS={f}")
def test_ignored_sampling_flags_warn_with_every_prompt(tiny_model, filters):
    # greedy (temperature 0) with --seed and --top_k: each continuation they do not change says so again, whatever
    # Python's warnings filters are (which would show a `warnings` message once, or not at all)
    env = {**os.environ, **({"PYTHONWARNINGS": filters} if filters else {})}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), "--interactive",
                             *flags(tiny_model, n_tokens_to_generate=6, seed=3, top_k=40)], input="Hello\nHello\n",
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    warning = ("warning: --top_k, --seed only matter when sampling, and --temperature is 0 (greedy): every sample is "
               "the same most-likely text; add --temperature 1 to sample")
    assert result.stderr.splitlines() == [warning, warning]
    greedy = gpt2.main("Hello", n_tokens_to_generate=6, model_size=tiny_model.name, models_dir=tiny_model.models_dir)
    assert result.stdout == 2 * (greedy + "\n")
