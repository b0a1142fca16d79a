"""Sampling: each filter alone on hand-made distributions and against HF's warpers, token frequencies after
every filter, extreme temperatures; then seeds and batched samples on the tiny checkpoint."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

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


def draws_from(logits, n, seed=0, **kwargs):
    """n independent draws from one logits row, in batches (one random stream per draw)."""
    out = []
    for rngs in np.array_split(gpt2.sampling_rngs(seed, n), max(1, n // 500)):
        out.append(gpt2.sample(np.broadcast_to(logits, (len(rngs), len(logits))), list(rngs), **kwargs))
    return np.concatenate(out)


def softmax64(x):
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def kept(mask):
    return set(np.flatnonzero(mask).tolist())


ALL = {0, 1, 2, 3}


# top_k alone

@pytest.mark.parametrize("logits, top_k, expected", [
    ([1.0, 3.0, 2.0, 0.0], 1, {1}),
    ([1.0, 3.0, 2.0, 0.0], 2, {1, 2}),
    ([1.0, 3.0, 2.0, 0.0], 3, {0, 1, 2}),
    ([1.0, 3.0, 2.0, 2.0], 2, {1, 2, 3}),  # a tie at the k-th: both kept, as HF's TopKLogitsWarper does
    ([2.0, 2.0, 2.0, 0.0], 1, {0, 1, 2}),
    ([1.0, 3.0, 2.0, 2.0], 3, {1, 2, 3}),  # the ties are above the k-th: exactly k
    ([1.0, 3.0, 2.0, 0.0], 0, ALL),  # 0: off
    ([1.0, 3.0, 2.0, 0.0], 4, ALL),
    ([1.0, 3.0, 2.0, 0.0], 60000, ALL),
])
def test_top_k_keeps_exactly(logits, top_k, expected):
    mask = gpt2.top_k_mask(np.array([logits], dtype=np.float32), top_k)
    assert mask.shape == (1, 4) and mask.dtype == bool
    assert kept(mask[0]) == expected


def test_top_k_works_row_by_row():
    logits = np.array([[1.0, 3.0, 2.0, 0.0], [4.0, -1.0, 0.0, 4.5]], dtype=np.float32)
    mask = gpt2.top_k_mask(logits, 2)
    assert kept(mask[0]) == {1, 2} and kept(mask[1]) == {0, 3}


# top_p alone: probabilities that are exact in binary, so "adds up to exactly top_p" is exact too

PROBS = [0.125, 0.5, 0.0625, 0.25, 0.0625]  # by rank: 1 (0.5), 3 (0.25), 0 (0.125), then 2 and 4 tied (0.0625)


@pytest.mark.parametrize("top_p, expected", [
    (1e-9, {1}),  # the most likely token always stays
    (0.4, {1}),  # token 1 crosses 0.4 and is kept
    (0.5, {1}),  # token 1 reaches 0.5 exactly: enough
    (0.5 + 1e-9, {1, 3}),
    (0.75, {1, 3}),  # reached exactly by two tokens
    (0.8, {0, 1, 3}),
    (0.875, {0, 1, 3}),
    (0.9, {0, 1, 2, 3, 4}),  # token 2 crosses 0.9; token 4 is tied with it and kept too
    (0.999, {0, 1, 2, 3, 4}),
    (1.0, {0, 1, 2, 3, 4}),  # 1.0: off
])
def test_top_p_keeps_exactly(top_p, expected):
    mask = gpt2.top_p_mask(np.array([PROBS]), top_p)
    assert mask.shape == (1, 5) and mask.dtype == bool
    assert kept(mask[0]) == expected


def test_top_p_keeps_what_rounding_would_hide():
    # 1.0 is off even where the running sum reaches 1 before the tail; and a top_p the sum never reaches
    # (its last bits lost to rounding) keeps every token rather than none
    assert kept(gpt2.top_p_mask(np.array([[0.5, 0.5, 1e-20]]), 1.0)[0]) == {0, 1, 2}
    assert kept(gpt2.top_p_mask(np.array([[0.5, 0.25, 0.25 - 1e-12]]), 1 - 1e-13)[0]) == {0, 1, 2}


def test_top_p_works_row_by_row():
    mask = gpt2.top_p_mask(np.array([PROBS, PROBS[::-1]]), 0.8)
    assert kept(mask[0]) == {0, 1, 3} and kept(mask[1]) == {1, 3, 4}


def test_temperature_0_is_argmax_row_by_row():
    logits = np.array([[1.0, 3.0, 2.0, 0.0], [4.0, -1.0, 0.0, 4.5]], dtype=np.float32)
    assert gpt2.sample(logits, gpt2.sampling_rngs(0, 2), temperature=0, top_k=1, top_p=0.1).tolist() == [1, 3]
    assert gpt2.sample(logits, gpt2.sampling_rngs(0, 2)).tolist() == [1, 3]  # greedy is the default


# the draw alone: inverse CDF

@pytest.mark.parametrize("probs, u, token", [
    ([0.125, 0.375, 0.25, 0.25], 0.0, 0),
    ([0.125, 0.375, 0.25, 0.25], 0.124, 0),
    ([0.125, 0.375, 0.25, 0.25], 0.125, 1),  # a draw on a boundary belongs to the token after it
    ([0.125, 0.375, 0.25, 0.25], 0.4999, 1),
    ([0.125, 0.375, 0.25, 0.25], 0.5, 2),
    ([0.125, 0.375, 0.25, 0.25], 0.75, 3),
    ([0.125, 0.375, 0.25, 0.25], np.nextafter(1.0, 0.0), 3),
    ([0.0, 0.5, 0.0, 0.5], 0.0, 1),  # tokens of probability 0 are never drawn
    ([0.0, 0.5, 0.0, 0.5], 0.5, 3),
    ([0.0, 2.0, 0.0, 6.0], 0.2, 1),  # unnormalized: u is scaled by the total (8)
    ([0.0, 2.0, 0.0, 6.0], 0.25, 3),
    ([0.5, 0.5, 0.0, 0.0], 1.0, 1),  # even if u * total rounds up to the total, never a token of probability 0
])
def test_draw_inverts_the_cdf(probs, u, token):
    # in a batch beside another row, which draws with its own number
    assert gpt2.draw(np.array([probs, [0.0, 0.0, 1.0, 0.0]]), [u, 0.5]).tolist() == [token, 2]


# against HF transformers' warpers, on random and adversarial logits

def adversarial_logits():
    rng = np.random.default_rng(0)
    rows = {f"normal * {s}": rng.standard_normal(1000) * s for s in (0.1, 1, 3, 30)}  # 30: GPT-2's magnitude
    rows["small integers (ties)"] = rng.integers(-3, 4, 1000)
    rows["rounded, GPT-2's magnitude (ties)"] = np.round(rng.standard_normal(1000) * 30)
    rows["one dominant token"] = np.where(np.arange(1000) == 17, 100.0, 0.0)
    rows["all equal"] = np.full(1000, 5.0)
    rows["three close leaders, tail underflows"] = np.r_[100.0, 99.99, 99.98, rng.standard_normal(997) * 30 - 900]
    rows["linear ramp -100 .. 100"] = np.linspace(-100, 100, 1000)
    return {name: row.astype(np.float32) for name, row in rows.items()}


def hf_kept(warper, logits):  # [n_vocab] -> [n_vocab] of bool
    return torch.isfinite(warper(None, torch.from_numpy(logits[None]))[0]).numpy()


@pytest.mark.parametrize("name, logits", adversarial_logits().items())
@pytest.mark.parametrize("top_k", [1, 2, 5, 50, 999, 1000])
def test_top_k_keeps_what_hf_keeps(name, logits, top_k):
    assert np.array_equal(gpt2.top_k_mask(logits[None], top_k)[0], hf_kept(TopKLogitsWarper(top_k), logits))


@pytest.mark.parametrize("name, logits", adversarial_logits().items())
@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.5, 0.9, 0.95, 0.999])
def test_top_p_keeps_what_hf_keeps(name, logits, top_p):
    # HF sorts, and of tokens tied at the crossing it keeps whichever its sort put first; we keep all of them.
    # So: the same set, plus the tokens tied with the least likely one HF keeps.
    hf = hf_kept(TopPLogitsWarper(top_p), logits)
    hf_and_ties = hf | (logits == logits[hf].min())
    assert np.array_equal(gpt2.top_p_mask(softmax64(logits)[None], top_p)[0], hf_and_ties)


# frequencies: what sample draws, against the distribution HF's warpers leave

def hf_distribution(logits, temperature, top_k, top_p):
    """softmax of the logits after HF's temperature, top-k and top-p warpers, in HF's order."""
    scores = torch.from_numpy(logits[None].astype(np.float64)) / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


def assert_frequencies(counts, expected):
    """Each count is Binomial(n, p): within 5 standard deviations (about 1 in 10^6 by chance, and the seeds
    are fixed); a token of probability 0 never drawn."""
    n = counts.sum()
    tolerance = 5 * np.sqrt(n * expected * (1 - expected))
    assert np.all(np.abs(counts - n * expected) <= tolerance), (counts, np.round(n * expected))
    assert np.all(counts[expected == 0] == 0), (counts, expected)


LOGITS_6 = np.array([1.0, 2.0, -1.0, 0.5, 1.5, 0.0], dtype=np.float32)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 3, 1.0),  # k - 1 tokens, or the k + 1-th, or a uniform draw among the k would fail
    (1.0, 1, 1.0),
    (1.0, 0, 0.6),  # the token crossing top_p is kept: dropping it (openai/gpt-2's rule) would fail
    (1.0, 0, 0.9),
    (0.5, 0, 1.0),
    (2.0, 0, 1.0),
    (0.7, 4, 0.8),  # top_k first, then the nucleus of what is left, renormalized
])
def test_token_frequencies_match_hf(temperature, top_k, top_p):
    expected = hf_distribution(LOGITS_6, temperature, top_k, top_p)
    assert 2 <= np.count_nonzero(expected) or top_k == 1
    counts = np.bincount(draws_from(LOGITS_6, 20000, seed=4, temperature=temperature, top_k=top_k, top_p=top_p),
                         minlength=len(LOGITS_6))
    assert_frequencies(counts, expected)


def test_top_k_applies_before_top_p():
    # top_k=2 leaves [0.4, 0.35] -> [0.53, 0.47], whose nucleus for 0.5 is token 0 alone; top_p first would
    # keep tokens 0 and 1
    logits = np.log(np.array([0.4, 0.35, 0.25], dtype=np.float32))
    assert set(draws_from(logits, 2000, temperature=1.0, top_k=2, top_p=0.5).tolist()) == {0}
    assert set(draws_from(logits, 2000, temperature=1.0, top_p=0.5).tolist()) == {0, 1}


# extreme temperatures (with NumPy's warnings turned into errors)

@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("temperature", [1e-12, 1e-40, 1e-300, 5e-324])
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (40, 0.9)])
def test_tiny_temperatures_are_greedy(temperature, top_k, top_p):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((8, 50257)) * 30).astype(np.float32)  # GPT-2's magnitude
    greedy = np.argmax(logits, axis=-1)
    logits[:4, 0] = np.nextafter(logits[np.arange(4), greedy[:4]], -np.inf)  # runners-up one float32 step behind
    tokens = gpt2.sample(logits, gpt2.sampling_rngs(0, 8), temperature=temperature, top_k=top_k, top_p=top_p)
    assert tokens.tolist() == greedy.tolist()


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("temperature", [1e6, 1e308, float("inf")])
def test_huge_temperatures_are_uniform_over_what_is_kept(temperature):
    logits = np.array([100.0, -100.0, 50.0, 0.0, -50.0], dtype=np.float32)
    counts = np.bincount(draws_from(logits, 6000, seed=2, temperature=temperature, top_k=3), minlength=5)
    assert_frequencies(counts, np.array([1, 0, 1, 1, 0]) / 3)
    counts = np.bincount(draws_from(logits, 6000, seed=3, temperature=temperature), minlength=5)
    assert_frequencies(counts, np.full(5, 0.2))


def test_samples_never_fall_outside_top_k(next_token_logits):
    top_20 = set(np.argsort(-next_token_logits)[:20].tolist())
    draws = draws_from(next_token_logits, 500, temperature=1.5, top_k=20)
    assert set(draws.tolist()) <= top_20
    assert len(set(draws.tolist())) > 10  # and they do spread over it


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9])
def test_samples_never_fall_outside_the_nucleus(next_token_logits, top_p):
    probs = softmax64(next_token_logits)
    order = np.argsort(-probs)
    n_nucleus = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1  # fewest tokens reaching top_p
    nucleus = set(order[:n_nucleus].tolist())
    draws = draws_from(next_token_logits, 500, temperature=1.0, top_p=top_p)
    assert set(draws.tolist()) <= nucleus


def test_top_k_and_top_p_compose(next_token_logits):
    # top_k first, then the nucleus of what is left, renormalized
    logits = next_token_logits
    top_50 = np.argsort(-logits)[:50]
    probs = softmax64(logits[top_50])
    n_nucleus = int(np.searchsorted(np.cumsum(probs), 0.5)) + 1
    allowed = set(top_50[:n_nucleus].tolist())
    draws = draws_from(logits, 2000, temperature=1.0, top_k=50, top_p=0.5)
    assert set(draws.tolist()) <= allowed


def test_top_k_beyond_the_vocabulary_keeps_every_token(next_token_logits):
    unlimited = draws_from(next_token_logits, 500, seed=9, temperature=1.0)
    assert np.array_equal(draws_from(next_token_logits, 500, seed=9, temperature=1.0, top_k=60000), unlimited)


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


@pytest.mark.filterwarnings("error")
def test_realistic_logits_sample_cleanly_and_tiny_temperatures_are_greedy(realistic_model):
    # logits of real GPT-2's size (about -90 to 90): the draws are peaked, never NaN, never a warning
    encoder, hparams, params = load_encoder_hparams_and_params(realistic_model.name, realistic_model.models_dir)
    ids, n_head = encoder.encode(PROMPT), hparams["n_head"]
    greedy = gpt2.generate(ids, params, n_head, 10)
    assert gpt2.generate(ids, params, n_head, 10, temperature=1e-30, seed=0) == greedy
    sampled = gpt2.generate(ids, params, n_head, 10, temperature=1.0, top_k=40, top_p=0.9, seed=0, num_samples=3)
    assert all(len(s) == 10 and all(0 <= t < hparams["n_vocab"] for t in s) for s in sampled)
    logits = gpt2.gpt2(ids, **params, n_head=n_head, last_only=True)
    assert {s[0] for s in sampled} <= set(np.argsort(-logits)[:40].tolist())
