"""The generation controls (issue 21): each logits processor alone against HF transformers' on random and
adversarial rows, presence and frequency against OpenAI's formula, min-p against HF's warper, then greedy
generation against HF `generate` on the same weights, token for token; the flags' checks and warnings."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor, MinPLogitsWarper,
                                                    NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper)

import gpt2
from tests.conftest import ROOT
from tests.release_layout import hf_model
from tests.test_sampling import LOGITS_6, adversarial_logits, assert_frequencies, draws_from, kept, softmax64
from utils import UsageError, load_encoder_hparams_and_params

ROWS = adversarial_logits()
ROWS["all negative"] = -np.abs(ROWS["normal * 3"]) - 1.0
ROWS["zeros and signs"] = np.tile(np.array([0.0, -0.0, 1.0, -1.0], dtype=np.float32), 250)


def text_ids(kind, n_vocab=1000, n=60):
    """The ids a penalty looks at: random, a few tokens many times, or one token seen 50 times among others."""
    rng = np.random.default_rng(len(kind))
    if kind == "random":
        return rng.integers(0, n_vocab, n)
    if kind == "a few tokens, many times":
        return rng.choice([3, 17, 999], n)
    return np.r_[np.full(50, 17), rng.integers(0, n_vocab, 10)]  # "one token seen 50 times"


ID_KINDS = ["random", "a few tokens, many times", "one token seen 50 times"]


def processed(control, logits, ids, **kwargs):  # one row through process_logits -> [n_vocab]
    counts = np.zeros((1, len(logits)), dtype=np.float32)
    return gpt2.process_logits(logits[None], np.asarray(ids)[None], counts, len(ids), **{control: kwargs.pop("value")},
                               **kwargs)[0]


def hf(processor, logits, ids):  # [n_vocab] -> [n_vocab]
    return processor(torch.tensor(np.asarray(ids)[None]), torch.from_numpy(logits[None].copy()))[0].numpy()


# each processor alone, against HF's

@pytest.mark.parametrize("name, logits", ROWS.items())
@pytest.mark.parametrize("kind", ID_KINDS)
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_is_hfs(name, logits, kind, penalty):
    ids = text_ids(kind)
    ours = processed("repetition_penalty", logits, ids, value=penalty)
    assert ours.dtype == np.float32
    assert np.array_equal(ours, hf(RepetitionPenaltyLogitsProcessor(penalty), logits, ids))
    unseen = np.setdiff1d(np.arange(len(logits)), ids)
    assert np.array_equal(ours[unseen], logits[unseen])  # only tokens in the text are touched


def test_repetition_penalty_on_four_tokens():
    logits = np.array([2.0, -2.0, 0.0, 3.0], dtype=np.float32)
    # token 0 (positive) is divided, 1 (negative) multiplied, 2 (zero) stays, 3 unseen; seen twice is seen once
    assert processed("repetition_penalty", logits, [0, 1, 2, 0], value=2.0).tolist() == [1.0, -4.0, 0.0, 3.0]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(4))
def test_no_repeat_ngram_is_hfs(n, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 4, 40)  # a 4-token vocabulary: n-grams repeat often
    logits = rng.standard_normal(50).astype(np.float32)
    for length in range(len(ids) + 1):  # every prefix, from too short for any n-gram on
        ours = processed("no_repeat_ngram_size", logits, ids[:length], value=n)
        assert np.array_equal(ours, hf(NoRepeatNGramLogitsProcessor(n), logits, ids[:length])), length


def test_no_repeat_ngram_on_a_short_text():
    # "1 2 3 1 2": the 3-gram "1 2 3" exists, so after "1 2" token 3 is banned; 2-grams "2 3" and "2 4"...
    ids = np.array([1, 2, 3, 1, 2, 4, 1, 2])
    assert gpt2.repeated_ngram_ends(ids, 3).tolist() == [3, 4]
    assert gpt2.repeated_ngram_ends(ids, 2).tolist() == [3, 4]  # what followed "2"
    assert sorted(gpt2.repeated_ngram_ends(ids, 1).tolist()) == [1, 1, 1, 2, 2, 2, 3, 4]  # every token seen
    assert gpt2.repeated_ngram_ends(ids[:2], 3).tolist() == []
    logits = np.zeros(6, dtype=np.float32)
    assert processed("no_repeat_ngram_size", logits, ids, value=3).tolist() == [0, 0, 0, -np.inf, -np.inf, 0]


@pytest.mark.parametrize("min_new_tokens", [1, 5])
@pytest.mark.parametrize("n_new", [0, 4, 5, 6])
def test_min_new_tokens_is_hfs(min_new_tokens, n_new):
    logits = ROWS["normal * 3"].copy()
    logits = np.r_[logits, np.zeros(gpt2.ENDOFTEXT + 1 - len(logits), dtype=np.float32)]
    logits[gpt2.ENDOFTEXT] = 100.0  # <|endoftext|> the most likely
    prompt = [5, 6, 7]
    ids = prompt + [9] * n_new
    counts = np.zeros((1, len(logits)), dtype=np.float32)
    ours = gpt2.process_logits(logits[None], np.array([ids]), counts, n_new, min_new_tokens=min_new_tokens)[0]
    peer = MinNewTokensLengthLogitsProcessor(len(prompt), min_new_tokens, gpt2.ENDOFTEXT)
    assert np.array_equal(ours, hf(peer, logits, ids))
    assert (ours[gpt2.ENDOFTEXT] == -np.inf) == (n_new < min_new_tokens)


@pytest.mark.parametrize("name, logits", ROWS.items())
@pytest.mark.parametrize("presence, frequency", [(0.5, 0.0), (0.0, 0.7), (1.0, 0.25), (-0.5, -0.3)])
def test_presence_and_frequency_penalties_are_openais_formula(name, logits, presence, frequency):
    generated = text_ids("one token seen 50 times")
    counts = np.bincount(generated, minlength=len(logits)).astype(np.float32)[None]
    ours = gpt2.process_logits(logits[None], generated[None], counts, len(generated), presence_penalty=presence,
                               frequency_penalty=frequency)[0]
    expected = logits.astype(np.float64).copy()
    for token in range(len(logits)):  # OpenAI: logit - frequency * count - presence * (count > 0)
        count = int(np.sum(generated == token))
        expected[token] -= frequency * count + presence * (count > 0)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


def test_every_control_off_returns_the_models_logits_untouched():
    logits = np.broadcast_to(ROWS["normal * 3"], (2, 1000))  # read-only, as generate_steps' first step has them
    counts = np.zeros((2, 1000), dtype=np.float32)
    assert gpt2.process_logits(logits, np.zeros((2, 5), dtype=np.int64), counts, 0) is logits
    changed = gpt2.process_logits(logits, np.zeros((2, 5), dtype=np.int64), counts, 0, repetition_penalty=1.3)
    assert changed is not logits and changed.dtype == np.float32 and changed[0, 0] != logits[0, 0]


# min-p, HF's warper

@pytest.mark.parametrize("name, logits", adversarial_logits().items())
@pytest.mark.parametrize("min_p", [0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_min_p_keeps_what_hf_keeps(name, logits, min_p):
    peer = torch.isfinite(MinPLogitsWarper(min_p)(None, torch.from_numpy(logits[None]))[0]).numpy()
    assert np.array_equal(gpt2.min_p_mask(softmax64(logits)[None], min_p)[0], peer)


@pytest.mark.parametrize("min_p, expected", [
    (0.0, {0, 1, 2, 3}), (0.25, {0, 1, 2, 3}), (0.26, {0, 1, 3}), (0.5, {0, 1, 3}), (0.51, {1, 3}), (1.0, {1, 3})])
def test_min_p_keeps_exactly(min_p, expected):
    # by rank: 1 and 3 tied (0.4), 0 (0.2, half of the top), 2 (0.1, a quarter); exact in binary
    assert kept(gpt2.min_p_mask(np.array([[0.2, 0.4, 0.1, 0.4]]) / 1.1, min_p)[0]) == expected


def test_min_p_applies_after_top_p():
    # [0.4, 0.35, 0.25]: top_p 0.5 keeps tokens 0 and 1, then min_p 0.7 (of 0.4: 0.28) keeps both. The other way
    # round, min-p first would keep 0 and 1, renormalized to [0.53, 0.47], whose nucleus for 0.5 is token 0 alone.
    logits = np.log(np.array([0.4, 0.35, 0.25], dtype=np.float32))
    draws = gpt2.sample(np.broadcast_to(logits, (500, 3)), gpt2.sampling_rngs(0, 500), 1.0, top_p=0.5, min_p=0.7)
    assert set(draws.tolist()) == {0, 1}


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.3), (0.7, 0, 1.0, 0.2), (1.5, 4, 1.0, 0.5), (1.0, 0, 0.9, 0.4), (0.8, 5, 0.95, 0.1)])
def test_token_frequencies_with_min_p_match_hfs_warpers_in_order(temperature, top_k, top_p, min_p):
    logits = LOGITS_6
    scores = torch.from_numpy(logits[None].astype(np.float64)) / temperature
    for warper, on in ((TopKLogitsWarper(max(top_k, 1)), top_k), (TopPLogitsWarper(top_p), top_p < 1),
                       (MinPLogitsWarper(min_p), True)):
        scores = warper(None, scores) if on else scores
    expected = torch.softmax(scores, dim=-1)[0].numpy()
    assert 2 <= np.count_nonzero(expected) < len(logits)  # min-p did remove some, and left a choice
    counts = np.bincount(draws_from(logits, 20000, seed=5, temperature=temperature, top_k=top_k, top_p=top_p,
                                    min_p=min_p), minlength=len(logits))
    assert_frequencies(counts, expected)


# greedy generation against HF generate on the same weights

@pytest.fixture(scope="module")
def trained(trained_model):
    """The model trained during the run on two sentences: it continues them, repeats them, and ends them with
    <|endoftext|>, which is what the controls are for."""
    encoder, hparams, params = load_encoder_hparams_and_params(trained_model.name, trained_model.models_dir)
    return encoder, params, hparams["n_head"], hf_model(trained_model.tensors, trained_model.hparams)


def hf_greedy(hf_gpt2, ids, n, **options):
    options = {"eos_token_id": None, **options}
    with torch.no_grad():
        out = hf_gpt2.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=n, do_sample=False, pad_token_id=0, **options)
    return out[0, len(ids):].tolist()


REPEATING = "The lighthouse keeper climbed the spiral stairs every evening at dusk. The lighthouse keeper climbed"


@pytest.mark.parametrize("options", [dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=3),
                                     dict(repetition_penalty=0.8, no_repeat_ngram_size=2)])
def test_greedy_with_controls_is_hf_generate_token_for_token(trained, options):
    encoder, params, n_head, hf_gpt2 = trained
    ids = encoder.encode(REPEATING)
    ours = gpt2.generate(ids, params, n_head, 30, **options)
    assert ours == hf_greedy(hf_gpt2, ids, 30, **options)
    assert ours != gpt2.generate(ids, params, n_head, 30)  # the control changed the text
    if "no_repeat_ngram_size" in options:  # and what it promises holds: no new token repeats an n-gram, prompt's
        n, text = options["no_repeat_ngram_size"], ids + ours  # included (the prompt itself repeats some)
        ngrams = [tuple(text[i:i + n]) for i in range(len(text) - n + 1)]
        assert all(ngrams[i] not in ngrams[:i] for i in range(len(ids) - n + 1, len(ngrams)))


def test_min_new_tokens_against_hf_generate_where_endoftext_comes_early(tiny_model):
    # The tiny model with <|endoftext|>'s embedding moved towards ln_f's bias, which every final hidden state
    # carries: greedy decoding then picks it at once, and often.
    tensors = dict(tiny_model.tensors)
    tensors["model/wte"] = wte = np.array(tensors["model/wte"])
    wte[gpt2.ENDOFTEXT] += 0.7 * tensors["model/ln_f/b"]
    encoder, hparams, params = load_encoder_hparams_and_params(tiny_model.name, tiny_model.models_dir)
    params, n_head, hf_gpt2 = dict(params, wte=wte), hparams["n_head"], hf_model(tensors, tiny_model.hparams)
    ids = encoder.encode("Alan Turing theorized that computers would one day become")
    assert gpt2.generate(ids, params, n_head, 20)[0] == gpt2.ENDOFTEXT  # prone to end at once
    ours = gpt2.generate(ids, params, n_head, 20, min_new_tokens=6)
    assert gpt2.ENDOFTEXT not in ours[:6] and gpt2.ENDOFTEXT in ours[6:]
    peer = hf_greedy(hf_gpt2, ids, 20, min_new_tokens=6, eos_token_id=gpt2.ENDOFTEXT)  # HF stops at <|endoftext|>
    assert peer[-1] == gpt2.ENDOFTEXT and ours[:len(peer)] == peer
    assert hf_greedy(hf_gpt2, ids, 20)[:len(peer)] == gpt2.generate(ids, params, n_head, 20)[:len(peer)]


def test_presence_and_frequency_in_generation_count_only_generated_tokens(trained):
    # a reference loop straight from OpenAI's formula, without a cache: the counts start at 0 whatever the prompt
    encoder, params, n_head, _ = trained
    prompt = encoder.encode(REPEATING)
    presence, frequency = 0.8, 0.5
    text, counts = list(prompt), np.zeros(len(encoder.encoder), dtype=np.float64)
    for _ in range(25):
        logits = gpt2.gpt2(text, **params, n_head=n_head)[-1].astype(np.float64)
        token = int(np.argmax(logits - frequency * counts - presence * (counts > 0)))
        text.append(token)
        counts[token] += 1
    ours = gpt2.generate(prompt, params, n_head, 25, presence_penalty=presence, frequency_penalty=frequency)
    assert ours == text[len(prompt):]
    assert ours != gpt2.generate(prompt, params, n_head, 25)


def test_sampled_batches_with_controls_equal_the_samples_one_at_a_time(trained):
    encoder, params, n_head, _ = trained
    ids = encoder.encode(REPEATING)
    options = dict(temperature=1.0, min_p=0.05, repetition_penalty=1.2, presence_penalty=0.3, no_repeat_ngram_size=3)
    batched = gpt2.generate(ids, params, n_head, 15, seed=3, num_samples=3, **options)
    for i, stream in enumerate(np.random.SeedSequence(3).spawn(3)):
        alone = gpt2.generate_steps(ids, params, n_head, 15, [np.random.default_rng(stream)], **options)
        assert [int(step[0]) for step in alone] == batched[i]


# the command line: values checked before any work, one warning for min-p when greedy

def run_gpt2(*args, **kwargs):
    return subprocess.run([sys.executable, os.path.join(ROOT, "gpt2.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, **kwargs)


def test_controls_reach_main_from_the_command_line(tiny_model):
    model = dict(model_size=tiny_model.name, models_dir=tiny_model.models_dir, n_tokens_to_generate=12)
    options = dict(repetition_penalty=1.5, no_repeat_ngram_size=2, presence_penalty=0.5, frequency_penalty=0.25,
                   min_new_tokens=3, temperature=0.9, min_p=0.1, seed=1)
    expected = gpt2.main("Hello", **options, **model)
    assert expected != gpt2.main("Hello", **{**options, "repetition_penalty": 1.0, "presence_penalty": 0.0}, **model)
    result = run_gpt2("Hello", *(f"--{k}={v}" for k, v in {**options, **model}.items()))
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n" and result.stderr == ""


def test_min_p_at_temperature_0_warns(tiny_model):
    result = run_gpt2("Hello", "--min_p", "0.1", "--n_tokens_to_generate", "3", "--model_size", tiny_model.name,
                      "--models_dir", tiny_model.models_dir)
    assert result.returncode == 0
    assert result.stderr == ("warning: --min_p only matters when sampling, and --temperature is 0 (greedy): every "
                             "sample is the same most-likely text; add --temperature 1 to sample\n")


MIN_NEW_TOKENS_WARNING = ("warning: --min_new_tokens 10 is more than --n_tokens_to_generate 3: no sample gets that "
                          "long; <|endoftext|> is never chosen, as with --min_new_tokens 3\n")


@pytest.mark.parametrize("interactive", [False, True], ids=["one prompt", "interactive"])
def test_min_new_tokens_past_n_tokens_to_generate_warns_once(tiny_model, interactive):
    model = ["--n_tokens_to_generate", "3", "--model_size", tiny_model.name, "--models_dir", tiny_model.models_dir]
    args, stdin = (["-i"], "Hello\nHello\n") if interactive else (["Hello"], None)  # two prompts: still one line
    result = run_gpt2(*args, "--min_new_tokens", "10", *model, input=stdin)
    assert result.returncode == 0 and result.stderr == MIN_NEW_TOKENS_WARNING, result.stderr
    expected = gpt2.main("Hello", min_new_tokens=3, n_tokens_to_generate=3, model_size=tiny_model.name,
                         models_dir=tiny_model.models_dir) + "\n"
    assert result.stdout == (2 if interactive else 1) * expected
    reachable = run_gpt2(*args, "--min_new_tokens", "3", *model, input=stdin)  # as many as are generated: fine
    assert reachable.returncode == 0 and reachable.stderr == "" and reachable.stdout == result.stdout


@pytest.mark.filterwarnings("error")
def test_huge_penalties_push_tokens_out_without_a_warning():
    logits = np.array([[100.0, -100.0, 1.0, 0.5]], dtype=np.float32)
    counts = np.array([[0, 0, 4, 0]], dtype=np.float32)
    out = gpt2.process_logits(logits, np.array([[0, 1]]), counts, 4, repetition_penalty=1e38, frequency_penalty=1e38)
    assert out[0, 1] == -np.inf and out[0, 2] == -np.inf  # overflowed: out of the running
    assert 0 < out[0, 0] < 1e-30 and out[0, 3] == 0.5 and gpt2.sample(out, gpt2.sampling_rngs(0, 1)).tolist() == [3]


# gpt2.generate from Python: the command line's rules, not silently wrong tokens

BAD_VALUES = [  # what a reviewer found generate took (nan: [0, 0, 0, 0]; -1: the reversed distribution), and more
    dict(temperature=float("nan")), dict(temperature=-1.0), dict(temperature=float("inf")), dict(temperature="hot"),
    dict(temperature=1.0, min_p=2.0), dict(temperature=1.0, min_p=-0.1), dict(min_p=float("nan")),
    dict(presence_penalty=float("inf")), dict(frequency_penalty=1e39), dict(presence_penalty=float("nan")),
    dict(repetition_penalty=float("nan")), dict(repetition_penalty=0.0), dict(repetition_penalty=1e-50),
    dict(top_p=0.0), dict(top_p=float("nan")), dict(top_p=1.5),
    dict(no_repeat_ngram_size=-1), dict(no_repeat_ngram_size=2.5), dict(min_new_tokens=-3),
    dict(top_k=2.5), dict(top_k=-1), dict(top_k=True), dict(seed=-3), dict(seed=1.5),
]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    _, hparams, params = load_encoder_hparams_and_params(tiny_model.name, tiny_model.models_dir)
    return params, hparams["n_head"]


def cli_error(tmp_path, **values):
    """The line the command line ends with for these values (checked before any model is looked for)."""
    with pytest.raises(UsageError) as error:
        gpt2.main("Hello", models_dir=str(tmp_path / "no models"), **values)
    return str(error.value)


@pytest.mark.parametrize("values", BAD_VALUES, ids=lambda values: ",".join(f"{k}={v}" for k, v in values.items()))
def test_generate_refuses_what_the_command_line_refuses_in_its_words(tiny, tmp_path, values):
    params, n_head = tiny
    expected = cli_error(tmp_path, **values)
    assert expected.startswith("--")
    with pytest.raises(ValueError) as error:
        gpt2.generate([464, 3290], params, n_head, 4, **values)
    assert str(error.value) == expected[len("--"):]  # the same line, named as the keyword argument is


def test_generate_steps_refuses_a_bad_value_too(tiny):
    params, n_head = tiny
    with pytest.raises(ValueError, match=r"^temperature must be a number >= 0, got nan$"):
        next(gpt2.generate_steps([464], params, n_head, 4, gpt2.sampling_rngs(0, 1), temperature=float("nan")))
