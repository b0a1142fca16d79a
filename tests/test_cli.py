"""The command line, run the way a user runs it."""
import os
import subprocess
import sys

import pytest

import gpt2
from tests.conftest import ROOT


def run_cli(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("script", ["gpt2.py", "gpt2_pico.py"])
def test_cli_prints_only_the_continuation(tiny_model, script):
    prompt = "Alan Turing theorized that computers would one day become"
    expected = gpt2.main(prompt, n_tokens_to_generate=8, model_size=tiny_model.name, models_dir=tiny_model.models_dir)
    result = run_cli(script, prompt, "--n_tokens_to_generate", "8", "--model_size", tiny_model.name,
                     "--models_dir", tiny_model.models_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
