"""Sampling: temperature, top_k, top_p, seeds, batched samples, on the tiny checkpoint and on the sampler itself."""
import math

import numpy as np
import pytest

import gpt2
from utils import load_encoder_hparams_and_params

PROMPT = "Alan Turing theorized that computers would one day become"


@pytest.fixture(scope="module")
def tiny(tiny_model):
    encoder, hparams, params = load_encoder_hparams_and_params(tiny_model.name, tiny_model.models_dir)
    return encoder, params, hparams["n_head"], encoder.encode(PROMPT)


@pytest.fixture(scope="module")
def next_token_logits(tiny):
    _, params, n_head, ids = tiny
    return gpt2.gpt2(ids, **params, n_head=n_head, last_only=True)  # [n_vocab]


def draw(logits, n, seed=0, **kwargs):
    """n independent draws from one logits row, in batches (one random stream per draw)."""
    out = []
    for rngs in np.array_split(gpt2.sampling_rngs(seed, n), max(1, n // 500)):
        out.append(gpt2.sample(np.broadcast_to(logits, (len(rngs), len(logits))), list(rngs), **kwargs))
    return np.concatenate(out)


def softmax64(x):
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def test_samples_never_fall_outside_top_k(next_token_logits):
    top_20 = set(np.argsort(-next_token_logits)[:20].tolist())
    draws = draw(next_token_logits, 2000, temperature=1.5, top_k=20)
    assert set(draws.tolist()) <= top_20
    assert len(set(draws.tolist())) > 10  # and they do spread over it


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9])
def test_samples_never_fall_outside_the_nucleus(next_token_logits, top_p):
    probs = softmax64(next_token_logits)
    order = np.argsort(-probs)
    n_nucleus = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1  # fewest tokens reaching top_p
    nucleus = set(order[:n_nucleus].tolist())
    draws = draw(next_token_logits, 2000, temperature=1.0, top_p=top_p)
    assert set(draws.tolist()) <= nucleus


def test_top_k_and_top_p_compose(next_token_logits):
    # top_k first, then the nucleus of what is left, renormalized
    logits = next_token_logits
    top_50 = np.argsort(-logits)[:50]
    probs = softmax64(logits[top_50])
    n_nucleus = int(np.searchsorted(np.cumsum(probs), 0.5)) + 1
    allowed = set(top_50[:n_nucleus].tolist())
    draws = draw(logits, 2000, temperature=1.0, top_k=50, top_p=0.5)
    assert set(draws.tolist()) <= allowed


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_token_frequencies_match_softmax(temperature):
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0, -5.0], dtype=np.float32)
    n = 40000
    counts = np.bincount(draw(logits, n, seed=1, temperature=temperature), minlength=len(logits))
    expected = softmax64(logits / temperature)
    # each count is Binomial(n, p): allow 5 standard deviations (about 1 in 10^6 per token by chance)
    tolerance = 5 * np.sqrt(n * expected * (1 - expected)) + 1
    assert np.all(np.abs(counts - n * expected) <= tolerance), (counts, n * expected)


def test_top_k_beyond_the_vocabulary_keeps_every_token(next_token_logits):
    unlimited = draw(next_token_logits, 500, seed=9, temperature=1.0)
    assert np.array_equal(draw(next_token_logits, 500, seed=9, temperature=1.0, top_k=60000), unlimited)


def test_top_k_1_and_a_tiny_top_p_are_greedy(tiny):
    _, params, n_head, ids = tiny
    greedy = gpt2.generate(ids, params, n_head, 20)
    assert gpt2.generate(ids, params, n_head, 20, temperature=1.0, top_k=1, seed=3) == greedy
    assert gpt2.generate(ids, params, n_head, 20, temperature=1.0, top_p=1e-6, seed=3) == greedy
    assert gpt2.generate(ids, params, n_head, 20, temperature=1.0, seed=3) != greedy  # sampling does sample


def test_same_seed_same_text_different_seed_different_text(tiny):
    _, params, n_head, ids = tiny
    runs = [gpt2.generate(ids, params, n_head, 20, temperature=1.0, seed=seed) for seed in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.8, top_k=40, top_p=0.9)])
def test_batched_samples_equal_the_same_samples_one_at_a_time(tiny, options):
    _, params, n_head, ids = tiny
    batched = gpt2.generate(ids, params, n_head, 15, seed=11, num_samples=4, **options)
    assert len(batched) == 4 and len({tuple(s) for s in batched}) == 4
    for i, stream in enumerate(np.random.SeedSequence(11).spawn(4)):  # sample i's own random stream
        alone = gpt2.generate_steps(ids, params, n_head, 15, [np.random.default_rng(stream)], **options)
        assert [int(step[0]) for step in alone] == batched[i]


def test_batch_reads_the_prompt_once_then_one_pass_per_step(tiny, monkeypatch):
    _, params, n_head, ids = tiny
    shapes = []
    forward = gpt2.gpt2

    def recording_gpt2(inputs, *args, **kwargs):
        shapes.append(np.shape(inputs))
        return forward(inputs, *args, **kwargs)

    monkeypatch.setattr(gpt2, "gpt2", recording_gpt2)
    gpt2.generate(ids, params, n_head, 5, temperature=1.0, seed=0, num_samples=8)
    assert shapes == [(len(ids),)] + [(8, 1)] * 4


def test_generate_without_num_samples_returns_one_list(tiny):
    _, params, n_head, ids = tiny
    one = gpt2.generate(ids, params, n_head, 5, temperature=1.0, seed=2)
    assert isinstance(one, list) and all(isinstance(t, int) for t in one)
    assert gpt2.generate(ids, params, n_head, 5, temperature=1.0, seed=2, num_samples=1) == [one]


def test_sampler_handles_extreme_temperatures():
    logits = np.array([[0.0, 1.0, 50.0, 2.0]], dtype=np.float32)
    rngs = gpt2.sampling_rngs(0, 1)
    assert gpt2.sample(logits, rngs, temperature=1e-4).tolist() == [2]
    assert 0 <= gpt2.sample(logits, rngs, temperature=1e4)[0] < 4
    assert not math.isnan(gpt2.softmax(logits / 1e-4).sum())
