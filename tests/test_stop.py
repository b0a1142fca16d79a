"""Stop strings (--stop): caught inside one token, across two, across the bytes of one character; several at once;
streamed output byte-identical to the returned text, holding back only what could still become a stop string;
samples of a batch stopping at different steps; the command line and interactive mode."""
import codecs
import os
import subprocess
import sys

import numpy as np
import pytest

import gpt2
from stopping import SampleText
from tests.conftest import ROOT
from tests.test_main import run, scripted_tokens  # noqa: F401  (fixtures)


def sample_text(stops):
    return SampleText(codecs.getincrementaldecoder("utf-8")(errors="replace"), stops)


def feed(stops, chunks):
    """What add prints for each chunk of bytes, then what finish prints, and the text."""
    text = sample_text(stops)
    printed = [text.add(chunk.encode() if isinstance(chunk, str) else chunk) for chunk in chunks]
    return printed, text.finish(), text.text


# SampleText alone, on chunks of bytes

@pytest.mark.parametrize("stops, chunks, printed, rest, text", [
    (["o w"], ["hello wor", "ld!"], ["hell", ""], "", "hell"),  # inside one chunk: nothing after it is taken
    (["world"], ["hello wo", "rld and more"], ["hello ", ""], "", "hello "),  # across two: "wo" was held back
    (["abc"], ["xa", "b", "d"], ["x", "", "abd"], "", "xabd"),  # "ab" held back until "d" ruled it out
    (["abc"], ["xab"], ["x"], "ab", "xab"),  # held back to the end: printed by finish
    (["🙂"], [b"smile \xf0\x9f", b"\x99\x82 more"], ["smile ", ""], "", "smile "),  # across an emoji's bytes
    (["e 🙂"], [b"smile \xf0\x9f", b"\x99\x82 more"], ["smil", ""], "", "smil"),
    (["more", " m"], ["a more"], ["a"], "", "a"),  # several: the earliest wins
    (["b", "abc"], ["xab"], ["xa"], "", "xa"),  # the sample ends as soon as one is there
    (["aa"], ["a", "a"], ["", ""], "", ""),  # at the very start
    ([], ["no stops ", b"\xf0\x9f"], ["no stops ", ""], "\ufffd", "no stops \ufffd"),  # a cut character, as decode
    (["zz"], ["a\n", "\n"], ["a\n", "\n"], "", "a\n\n"),
])
def test_sample_text_cuts_before_the_stop_and_holds_back_only_a_possible_start(stops, chunks, printed, rest, text):
    assert feed(stops, chunks) == (printed, rest, text)


def reference(stops, token_bytes):
    """Token by token, the whole text decoded afresh: the first time it contains a stop string, cut before the
    earliest one."""
    for k in range(1, len(token_bytes) + 1):
        text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(b"".join(token_bytes[:k]))
        starts = [text.find(stop) for stop in stops if stop in text]
        if starts:
            return text[:min(starts)]
    return b"".join(token_bytes).decode("utf-8", errors="replace")


@pytest.mark.parametrize("seed", range(30))
def test_sample_text_against_a_reference_on_random_chunks(seed):
    rng = np.random.default_rng(seed)
    alphabet = ["a", "b", "é", "🙂", "\n", " "]
    text = "".join(rng.choice(alphabet, 40)).encode()
    cuts = np.sort(rng.choice(np.arange(1, len(text)), 15, replace=False))
    token_bytes = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]  # some end inside a character
    stops = ["".join(rng.choice(alphabet, rng.integers(1, 4))) for _ in range(rng.integers(1, 4))]
    sample = sample_text(stops)
    printed = []
    for data in token_bytes:
        printed.append(sample.add(data))
        if sample.done:
            break
        held = sample.text[sample.shown:]
        # what is held back could still become a stop string, and nothing shown could
        assert held == "" or any(stop.startswith(held) for stop in stops)
        assert not any(stop.startswith(sample.text[i:]) for i in range(sample.shown) for stop in stops)
    printed.append(sample.finish())
    assert sample.text == reference(stops, token_bytes)
    assert "".join(printed) == sample.text


# through main: the tokens of a known text, stopped

TEXT = "Hello world, smile 🙂, family 👨‍👩‍👧 done"


@pytest.fixture
def text_ids(tiny_model):
    from encoder import get_encoder

    encoder = get_encoder(tiny_model.name, tiny_model.models_dir)
    ids = encoder.encode(TEXT)
    pieces = [encoder.decode_bytes([i]) for i in ids]
    assert b" world" in pieces and b" \xf0\x9f\x91" in pieces  # 👨's four bytes are in two tokens
    return ids


class Recorder:
    def __init__(self):
        self.writes = []

    def write(self, s):
        self.writes.append(s)

    def flush(self):
        pass


@pytest.mark.parametrize("stop, expected", [
    ("orl", "Hello w"),  # inside the one token " world"
    ("lo wo", "Hel"),  # across "Hello" and " world"
    ("🙂", "Hello world, smile "),  # inside the one token " 🙂"
    ("👨", "Hello world, smile 🙂, family "),  # across the bytes of an emoji, which are in two tokens
    ("\u200d👩", "Hello world, smile 🙂, family 👨"),  # a zero-width joiner and the next emoji
    (["family", ", s"], "Hello world"),  # several: the earliest
    (["done", "👧 d"], "Hello world, smile 🙂, family 👨\u200d👩\u200d"),
    ("not there", TEXT),
])
def test_main_stops_and_streams_exactly_what_it_returns(run, scripted_tokens, text_ids, monkeypatch, stop, expected):
    scripted_tokens(text_ids)
    assert run("x", n_tokens_to_generate=len(text_ids), stop=stop) == expected
    scripted_tokens(text_ids)
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert run("x", n_tokens_to_generate=len(text_ids), stop=stop, stream=True) == expected
    assert "".join(out.writes) == expected + "\n"  # byte for byte: nothing printed was later taken back


def test_generation_ends_at_the_token_that_completes_the_stop(run, text_ids, monkeypatch):
    taken = []

    def steps(*args, **controls):
        for token in text_ids:
            taken.append(token)
            yield np.array([token])

    monkeypatch.setattr(gpt2, "generate_steps", steps)
    assert run("x", n_tokens_to_generate=len(text_ids), stop=", sm") == "Hello world"
    assert len(taken) == 4  # "Hello", " world", ",", " smile"


def test_samples_of_a_batch_stop_at_different_steps(run, monkeypatch, capsys):
    hello, world, comma, bang = 15496, 995, 11, 0  # "Hello", " world", ",", "!"
    per_sample = [[hello, world, bang, hello, world, comma],  # "!" at step 2
                  [hello, comma, world, world, world, world],  # never
                  [world, comma, hello, hello, hello, hello]]  # "ld," at step 1
    taken = []

    def steps(*args, **controls):
        for step in zip(*per_sample):
            taken.append(step)
            yield np.array(step)

    monkeypatch.setattr(gpt2, "generate_steps", steps)
    options = dict(n_tokens_to_generate=6, num_samples=3, temperature=1.0, stop=["!", "ld,"])
    assert run("x", **options) == ["Hello world", "Hello, world world world world", " wor"]
    assert len(taken) == 6
    per_sample[1] = [hello, comma, world, comma, hello, hello]  # now "ld," at step 3
    taken.clear()
    capsys.readouterr()
    texts = run("x", **options, stream=True)
    assert texts == ["Hello world", "Hello, wor", " wor"]  # a sample that stopped took nothing more
    assert len(taken) == 4  # the batch ended when its last sample stopped
    printed = capsys.readouterr().out
    assert printed == "".join(f"{'=' * 30} sample {i} of 3 {'=' * 30}\n{text}\n" for i, text in enumerate(texts, 1))


# the command line and interactive mode, on the tiny model

def gpt2_cli(model, *args, stdin=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), *args, "--model_size", model.name,
                           "--models_dir", model.models_dir], capture_output=True, text=True, input=stdin, cwd=ROOT,
                          timeout=300)


def test_stop_given_several_times_on_the_command_line(tiny_model):
    model = dict(model_size=tiny_model.name, models_dir=tiny_model.models_dir, n_tokens_to_generate=20)
    whole = gpt2.main("Alan Turing theorized", **model)
    stops = [whole[12:15], whole[5:8]]  # the second comes first
    expected = gpt2.main("Alan Turing theorized", stop=stops, **model)
    assert expected == whole[:whole.find(stops[1])] and len(expected) <= 5
    assert gpt2.main("Alan Turing theorized", stop=stops[0], **model) == whole[:whole.find(stops[0])]
    result = gpt2_cli(tiny_model, "Alan Turing theorized", "--n_tokens_to_generate", "20", "--stop", stops[0],
                      "--stop", stops[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n" and result.stderr == ""


def test_stop_in_interactive_mode(tiny_model):
    model = dict(model_size=tiny_model.name, models_dir=tiny_model.models_dir, n_tokens_to_generate=12)
    prompts = ["Hello", "Alan Turing theorized", "Hello"]
    whole = gpt2.main("Hello", **model)
    stop = whole[8:11]
    expected = [gpt2.main(prompt, stop=stop, **model) for prompt in prompts]
    assert expected[0] == whole[:whole.find(stop)] and len(expected[0]) <= 8 and expected[1]
    result = gpt2_cli(tiny_model, "--interactive", "--n_tokens_to_generate", "12", "--stop", stop,
                      stdin="\n".join(prompts) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(text + "\n" for text in expected)


def test_stop_strings_reach_main_verbatim_and_in_order():
    import cli

    got = {}

    def main(prompt="", n_tokens_to_generate=40, stop=None, *, stream=False):
        got.update(prompt=prompt, stop=stop)

    stops = ["\n", "it's", '"quoted"', "5", "--", "[1, 2]", "None", " ", "🙂"]
    cli.run(main, ["Hello", *(f"--stop={text}" for text in stops)])
    assert got == {"prompt": "Hello", "stop": stops}
    cli.run(main, ["Hello", "--stop", "Q:"])
    assert got["stop"] == ["Q:"]


def test_a_typed_backslash_n_is_a_warning(tiny_model):
    result = gpt2_cli(tiny_model, "Hello", "--n_tokens_to_generate", "3", "--stop", "\\n", "--stop", "x")
    assert result.returncode == 0
    assert result.stderr == ("warning: --stop \"\\n\" holds \\n as typed, a backslash and a letter, not a newline or "
                             "a tab; in bash, --stop $'\\n' is a newline\n")
