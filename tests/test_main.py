"""main() and the command line: prompts from anywhere, several samples, streaming, stopping at <|endoftext|>."""
import os
import subprocess
import sys

import numpy as np
import pytest

import gpt2
from tests.conftest import ROOT


@pytest.fixture
def run(tiny_model):
    def run_main(prompt="", **kwargs):
        return gpt2.main(prompt, model_size=tiny_model.name, models_dir=tiny_model.models_dir, **kwargs)
    return run_main


@pytest.fixture
def cli(tiny_model):
    def run_cli(*args, stdin=None):
        cmd = [sys.executable, os.path.join(ROOT, "gpt2.py"), *args, "--model_size", tiny_model.name,
               "--models_dir", tiny_model.models_dir]
        return subprocess.run(cmd, capture_output=True, text=True, input=stdin, timeout=300)
    return run_cli


@pytest.fixture
def scripted_tokens(monkeypatch):
    """Makes generation emit given token ids, so what main does with them can be checked exactly."""
    def script(*per_sample):
        def steps(inputs, params, n_head, n_tokens_to_generate, rngs, *args, **controls):
            assert len(rngs) == len(per_sample)
            for step in zip(*per_sample):
                yield np.array(step)
        monkeypatch.setattr(gpt2, "generate_steps", steps)
    return script


def test_a_run_that_needs_exactly_the_whole_context(run, cli):
    # The last new token is never fed back: 1020 prompt tokens + 5 new ones use 1024 positions, as OpenAI's
    # unconditional 1024 tokens from <|endoftext|> do.
    result = cli(" a" * 1020, "--n_tokens_to_generate", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout == run(" a" * 1020, n_tokens_to_generate=5) + "\n"


def test_cli_reads_a_multi_line_prompt_from_stdin(run, cli):
    prompt = "First line\nsecond line\n\n"
    result = cli("-", "--n_tokens_to_generate", "5", stdin=prompt)
    assert result.returncode == 0, result.stderr
    assert result.stdout == run(prompt, n_tokens_to_generate=5) + "\n"


def test_cli_reads_a_prompt_file(run, cli, tmp_path):
    path = tmp_path / "prompt.txt"
    prompt = "Café menu:\n\tcrème brûlée 🍮\n"
    path.write_text(prompt, encoding="utf-8")
    result = cli("--prompt_file", str(path), "--n_tokens_to_generate", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout == run(prompt, n_tokens_to_generate=5) + "\n"
    assert run(prompt_file=str(path), n_tokens_to_generate=5) == run(prompt, n_tokens_to_generate=5)


def test_a_prompt_files_byte_order_mark_is_not_part_of_the_prompt(run, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"\xef\xbb\xbfNotepad wrote this")  # UTF-8 with a BOM, as Notepad saves it
    assert run(prompt_file=str(path), n_tokens_to_generate=5) == run("Notepad wrote this", n_tokens_to_generate=5)


def test_empty_prompt_starts_from_endoftext(run, tiny_model):
    from utils import load_encoder_hparams_and_params

    encoder, hparams, params = load_encoder_hparams_and_params(tiny_model.name, tiny_model.models_dir)
    expected = encoder.decode(gpt2.generate([gpt2.ENDOFTEXT], params, hparams["n_head"], 10))
    assert run("", n_tokens_to_generate=10) == expected


def test_several_samples_return_a_list_and_print_each(run, cli):
    texts = run("Hello", n_tokens_to_generate=8, temperature=1.0, seed=4, num_samples=3)
    assert isinstance(texts, list) and len(texts) == 3 and len(set(texts)) == 3
    result = cli("Hello", "--n_tokens_to_generate", "8", "--temperature", "1.0", "--seed", "4", "--num_samples", "3")
    assert result.returncode == 0, result.stderr
    for i, text in enumerate(texts, 1):
        assert f"sample {i} of 3" in result.stdout and text in result.stdout
    assert run("Hello", n_tokens_to_generate=8, temperature=1.0, seed=4) == texts[0]  # sample 1 is the one-sample run


def test_seed_reproduces_text_on_the_command_line(cli):
    args = ("Hello", "--n_tokens_to_generate", "10", "--temperature", "1", "--top_k", "40", "--top_p", "0.9",
            "--seed", "123")
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


def test_streaming_never_prints_half_a_character(run, tiny_model, scripted_tokens, monkeypatch):
    from encoder import get_encoder

    encoder = get_encoder(tiny_model.name, tiny_model.models_dir)
    text = "smile 🙂, family 👨‍👩‍👧 done"
    ids = encoder.encode(text)
    assert any("\ufffd" in encoder.decode([i]) for i in ids)  # some tokens end inside a character
    scripted_tokens(ids)
    writes = []

    class Recorder:
        def write(self, s):
            writes.append(s)

        def flush(self):
            writes.append(None)  # flushed

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert run("x", n_tokens_to_generate=len(ids), stream=True) == text
    printed = [w for w in writes if w]
    assert "".join(printed) == text + "\n"
    assert not any("\ufffd" in w for w in printed)
    assert None in writes[:len(writes) // 2]  # flushed as it went, not only at the end


def test_stop_at_endoftext_ends_each_sample(run, scripted_tokens):
    eot = gpt2.ENDOFTEXT
    hello, world = 15496, 995  # "Hello", " world"
    scripted_tokens([hello, eot, world, world], [hello, world, world, eot])
    assert run("x", n_tokens_to_generate=4, num_samples=2, temperature=1.0, stop_at_endoftext=True) == [
        "Hello", "Hello world world"]
    scripted_tokens([hello, eot, world, world], [hello, world, world, eot])
    assert run("x", n_tokens_to_generate=4, num_samples=2, temperature=1.0) == [
        "Hello<|endoftext|> world world", "Hello world world<|endoftext|>"]


def test_stop_at_endoftext_stops_generating_once_every_sample_has_stopped(run, scripted_tokens, monkeypatch):
    taken = []

    def steps(*args, **controls):
        for token in (15496, gpt2.ENDOFTEXT, 995, 995):
            taken.append(token)
            yield np.array([token])

    monkeypatch.setattr(gpt2, "generate_steps", steps)
    assert run("x", n_tokens_to_generate=4, stop_at_endoftext=True) == "Hello"
    assert len(taken) == 2


def test_prompt_too_long_for_the_context_fails_before_loading_weights(run, monkeypatch):
    import utils

    monkeypatch.setattr(utils, "load_params", lambda *a: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=r"the prompt is 1000 tokens .* 40: together they need 1039 positions, "
                                         r"more than .* 1024"):
        run(" a" * 1000)


def test_a_huge_prompt_is_refused_without_encoding_all_of_it(tiny_model, monkeypatch):
    import encoder

    merged = []
    word_ids = encoder.Encoder.word_ids
    monkeypatch.setattr(encoder.Encoder, "word_ids", lambda self, word: merged.append(word) or word_ids(self, word))
    prompt = " ".join(f"w{i}" for i in range(200_000))  # distinct words, so no cache hides the work
    with pytest.raises(ValueError, match=r"^the prompt is more than 1024 tokens, the model's whole context$"):
        gpt2.main(prompt, model_size=tiny_model.name, models_dir=tiny_model.models_dir)
    assert 0 < len(merged) <= 1025  # each word is at least one token: encoding stopped right after the context
