"""The KV cache: same logits as recomputing everything, one position's work per step, float32 throughout."""
import numpy as np
import pytest

import gpt2
from utils import load_encoder_hparams_and_params


@pytest.fixture(scope="module", params=["tiny_model", "wide_model"])
def model(request):
    m = request.getfixturevalue(request.param)
    encoder, hparams, params = load_encoder_hparams_and_params(m.name, m.models_dir)
    return encoder, hparams, params


def test_cached_logits_match_uncached_at_every_step_of_50(model):
    encoder, hparams, params = model
    n_head = hparams["n_head"]
    ids = encoder.encode("Alan Turing theorized that computers would one day become")
    kv_cache = gpt2.new_kv_cache(params, n_head, capacity=len(ids) + 50)
    logits = gpt2.gpt2(ids, **params, n_head=n_head, kv_cache=kv_cache)  # the prompt, all positions
    np.testing.assert_allclose(logits, gpt2.gpt2(ids, **params, n_head=n_head), atol=1e-5, rtol=0)
    for step in range(50):
        ids.append(int(np.argmax(logits[-1])))
        logits = gpt2.gpt2(ids[-1:], **params, n_head=n_head, kv_cache=kv_cache)
        uncached = gpt2.gpt2(ids, **params, n_head=n_head)
        assert logits.dtype == np.float32 and logits.shape == (1, hparams["n_vocab"])
        diff = np.abs(logits[-1] - uncached[-1]).max()
        assert diff <= 1e-5, f"step {step}: max |cached - uncached| = {diff}"
    assert all(c.length == len(ids) for c in kv_cache)
    assert all(c.keys.dtype == np.float32 and c.values.dtype == np.float32 for c in kv_cache)


def test_generate_matches_recomputing_without_cache(model):
    encoder, hparams, params = model
    ids = encoder.encode("The meaning of life is")
    expected = []
    for _ in range(15):
        expected.append(int(np.argmax(gpt2.gpt2(ids + expected, **params, n_head=hparams["n_head"])[-1])))
    assert gpt2.generate(ids, params, hparams["n_head"], 15) == expected


def test_long_prompt_read_in_chunks_matches_one_pass(tiny_model):
    _, hparams, params = load_encoder_hparams_and_params(tiny_model.name, tiny_model.models_dir)
    ids = list(np.random.default_rng(0).integers(0, hparams["n_vocab"], gpt2.PREFILL_CHUNK * 2 + 17))
    expected = int(np.argmax(gpt2.gpt2(ids, **params, n_head=hparams["n_head"])[-1]))
    assert gpt2.generate(ids, params, hparams["n_head"], 1) == [expected]


def test_last_only_is_the_last_row(tiny_model):
    _, hparams, params = load_encoder_hparams_and_params(tiny_model.name, tiny_model.models_dir)
    ids = [464, 3139, 286, 1204, 318]
    full = gpt2.gpt2(ids, **params, n_head=hparams["n_head"])
    last = gpt2.gpt2(ids, **params, n_head=hparams["n_head"], last_only=True)
    assert last.shape == (hparams["n_vocab"],) and last.dtype == np.float32
    np.testing.assert_allclose(last, full[-1], atol=1e-5, rtol=0)


def test_last_only_fills_the_cache_and_runs_the_last_block_past_attention_for_the_last_position_alone(
        model, monkeypatch):
    _, hparams, params = model
    n_head, n_layer = hparams["n_head"], hparams["n_layer"]
    ids = np.random.default_rng(2).integers(0, hparams["n_vocab"], (2, 9))  # two rows, as score.py's windows
    full_cache, last_cache = (gpt2.new_kv_cache(params, n_head, 9) for _ in range(2))
    for cache in full_cache + last_cache:  # a batch axis in front of [n_head, capacity, d_head]
        cache.keys, cache.values = (np.zeros((2, *a.shape), dtype=a.dtype) for a in (cache.keys, cache.values))
    full = gpt2.gpt2(ids, **params, n_head=n_head, kv_cache=full_cache)
    mlp_rows, ffn = [], gpt2.ffn
    monkeypatch.setattr(gpt2, "ffn", lambda x, **mlp: mlp_rows.append(x.shape[-2]) or ffn(x, **mlp))
    last = gpt2.gpt2(ids, **params, n_head=n_head, kv_cache=last_cache, last_only=True)
    assert mlp_rows == [9] * (n_layer - 1) + [1]  # every position but in the last block: only the last one
    np.testing.assert_allclose(last, full[:, -1], atol=1e-5, rtol=0)
    for a, b in zip(last_cache, full_cache):  # the last block's keys and values too, for the positions to come
        assert a.length == 9
        np.testing.assert_allclose(a.keys, b.keys, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.values, b.values, atol=1e-5, rtol=0)


def test_cache_writes_in_place_and_never_copies_history():
    cache = gpt2.KVCache((2, 8, 4))
    buffer = cache.keys
    for step in range(8):
        k = np.full((2, 1, 4), step, dtype=np.float32)
        keys, values = cache.append(k, -k)
        assert cache.keys is buffer and np.shares_memory(keys, buffer)  # views of one buffer, not copies
        assert keys.shape == (2, step + 1, 4)
    np.testing.assert_array_equal(cache.keys[0, :, 0], np.arange(8))
    with pytest.raises(ValueError, match="holds 8 positions"):
        cache.append(k, k)


def test_refused_append_leaves_the_cache_as_it_was():
    cache = gpt2.KVCache((2, 4, 3))
    k = np.ones((2, 3, 3), dtype=np.float32)
    cache.append(k, k)
    with pytest.raises(ValueError, match="holds 4 positions, 6 were asked for"):
        cache.append(k, k)
    assert cache.length == 3
    keys, _ = cache.append(k[:, :1], k[:, :1])  # the one position left is still free
    assert keys.shape == (2, 4, 3)


def test_generate_fills_exactly_the_context_and_refuses_one_more(tiny_model):
    _, hparams, params = load_encoder_hparams_and_params(tiny_model.name, tiny_model.models_dir)
    n_head, n_ctx = hparams["n_head"], hparams["n_ctx"]
    ids = [int(i) for i in np.random.default_rng(1).integers(0, hparams["n_vocab"], n_ctx - 2)]
    new = gpt2.generate(ids, params, n_head, 3)  # n_ctx - 2 + 3 - 1 positions: the last token is never fed back
    assert new[-1] == int(np.argmax(gpt2.gpt2(ids + new[:-1], **params, n_head=n_head)[-1]))
    with pytest.raises(ValueError, match=f"{n_ctx - 2} input tokens and 4 new ones need {n_ctx + 1} positions, "
                                         f"more than the model's context of {n_ctx}"):
        gpt2.generate(ids, params, n_head, 4)


@pytest.mark.parametrize("call, message", [
    (lambda p: gpt2.generate([1, 2], p, 4, 3, num_samples=0), "num_samples must be a whole number >= 1"),
    (lambda p: next(gpt2.generate_steps([1, 2], p, 4, 3, rngs=[])), "num_samples must be at least 1, got 0"),
    (lambda p: gpt2.generate([1, 2], p, 4, -1), "n_tokens_to_generate must be a whole number >= 0, got -1"),
    (lambda p: gpt2.generate([1, 2], p, 4, 2.5), "n_tokens_to_generate must be a whole number >= 0, got 2.5"),
    (lambda p: gpt2.generate([1, 2], p, 4, "3"), "n_tokens_to_generate must be a whole number >= 0, got '3'"),
    (lambda p: gpt2.generate([1, 2], p, 4, True), "n_tokens_to_generate must be a whole number >= 0, got True"),
    (lambda p: gpt2.generate([1, 2], p, 4, 3, num_samples=2.5), r"num_samples must be a whole number >= 1 .*got 2.5"),
    (lambda p: gpt2.generate([1, 2], p, 4, 3, num_samples="3"), r"num_samples must be a whole number >= 1 .*got '3'"),
    (lambda p: gpt2.generate([1, 2], p, 4, 3, num_samples=True), r"num_samples must be a whole number >= 1 .*got True"),
    (lambda p: gpt2.generate([1, -1], p, 4, 3), r"token ids lie in 0\.\.\d+; inputs hold \[-1\]"),
    (lambda p: gpt2.generate(np.array([5, 10**6]), p, 4, 3), r"inputs hold \[1000000\]"),
    (lambda p: gpt2.generate([1, 2**70], p, 4, 3), r"inputs hold \[1180591620717411303424\]"),
    (lambda p: gpt2.generate([True], p, 4, 3), "token ids are integers; inputs hold True"),
    (lambda p: gpt2.generate(np.array([True]), p, 4, 3), "token ids are integers; inputs are bool"),
    (lambda p: gpt2.generate(np.array([1.5, 2.0], dtype=object), p, 4, 3), "token ids are integers; inputs hold 1.5"),
    (lambda p: gpt2.generate([[1, 2]], p, 4, 3), r"token ids are a list of ids; inputs have shape \(1, 2\)"),
    (lambda p: gpt2.generate(np.int64(5), p, 4, 3), r"token ids are a list of ids; inputs have shape \(\)"),
    (lambda p: gpt2.generate([], p, 4, 3), "inputs must hold at least one token"),
])
def test_generate_refuses_what_cannot_run(tiny_model, call, message):
    _, _, params = load_encoder_hparams_and_params(tiny_model.name, tiny_model.models_dir)
    with pytest.raises(ValueError, match=message):
        call(params)


def test_generate_takes_any_list_or_array_of_integer_ids(tiny_model):
    _, _, params = load_encoder_hparams_and_params(tiny_model.name, tiny_model.models_dir)
    expected = gpt2.generate([15496, 11, 995], params, 4, 3)
    for ids in ([np.uint64(15496), 11, 995], np.array([15496, 11, 995], dtype=object),
                np.array([15496, 11, 995], dtype=np.uint64), (15496, 11, 995)):  # the first became floats in NumPy
        assert gpt2.generate(ids, params, 4, 3) == expected


@pytest.mark.parametrize("n_q, n_k", [(1, 1), (1, 9), (5, 5), (5, 9)])
def test_attention_weights_match_torch_with_the_queries_last(n_q, n_k):
    """The mask covers only the last n_q keys and is shared between calls: the weights still equal torch's
    softmax over all n_k keys with query i at position n_k - n_q + i, twice in a row, batched or not."""
    import torch

    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, n_q, 8), dtype=np.float32) * 3
    k = rng.standard_normal((2, 3, n_k, 8), dtype=np.float32) * 3
    allowed = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)
    scores = torch.from_numpy(q) @ torch.from_numpy(k).transpose(-1, -2) / np.sqrt(8.0)
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).numpy()
    for _ in range(2):
        got = gpt2.attention_weights(q, k)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(gpt2.attention_weights(q[0], k[0]), expected[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cores, n_parts", [(2, 2), (3, 3), (4, 4), (64, 10)])
def test_a_prompt_read_in_parts_side_by_side_gives_the_logits_and_cache_of_one_chunk_at_a_time(
        model, monkeypatch, cores, n_parts):
    _, hparams, params = model
    n_head = hparams["n_head"]
    ids = list(np.random.default_rng(1).integers(0, hparams["n_vocab"], 8 * 5 + 3))  # six chunks of at most 8
    monkeypatch.setattr(gpt2, "PREFILL_CHUNK", 8)
    monkeypatch.setattr(gpt2.threads, "CORES", 1)
    one_at_a_time = gpt2.new_kv_cache(params, n_head, len(ids))
    expected = gpt2.prefill(ids, params, n_head, one_at_a_time)
    np.testing.assert_allclose(expected, gpt2.gpt2(ids, **params, n_head=n_head)[-1], atol=1e-5, rtol=0)
    monkeypatch.setattr(gpt2.threads, "CORES", cores)
    parts, in_turns = [], gpt2.threads.in_turns
    monkeypatch.setattr(gpt2.threads, "in_turns", lambda fn, n, shared: parts.append(n) or in_turns(fn, n, shared))
    side_by_side = gpt2.new_kv_cache(params, n_head, len(ids))
    logits = gpt2.prefill(ids, params, n_head, side_by_side)
    # One part per core, none shorter than PREFILL_CHUNK / 2 on average: 43 positions make at most 10 (64 cores)
    assert parts == [n_parts]
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    for a, b in zip(side_by_side, one_at_a_time):
        assert a.length == b.length == len(ids)
        np.testing.assert_allclose(a.keys, b.keys, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.values, b.values, atol=1e-5, rtol=0)


def test_a_prompt_read_in_parts_after_positions_already_cached_goes_on_from_them(model, monkeypatch):
    _, hparams, params = model
    n_head = hparams["n_head"]
    ids = list(np.random.default_rng(2).integers(0, hparams["n_vocab"], 5 + 8 * 4))
    monkeypatch.setattr(gpt2, "PREFILL_CHUNK", 8)
    monkeypatch.setattr(gpt2.threads, "CORES", 2)
    cache = gpt2.new_kv_cache(params, n_head, len(ids))
    gpt2.prefill(ids[:5], params, n_head, cache)  # one chunk: the path of one core
    logits = gpt2.prefill(ids[5:], params, n_head, cache)  # in parts, at positions 5..
    np.testing.assert_allclose(logits, gpt2.gpt2(ids, **params, n_head=n_head)[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_positions, n_cores, n_embd, n_parts",
                         [(1000, 2, 768, 2), (1024, 4, 768, 4), (300, 64, 1600, 2), (1280, 16, 8, 10)])
def test_a_prompt_is_cut_into_one_part_per_core_of_equal_work(n_positions, n_cores, n_embd, n_parts):
    """One part per core, but none shorter than PREFILL_CHUNK / 2 on average (300 positions on 64 cores: two).
    Each part's multiply-adds, summed position by position (12 n_embd^2 a block for the weights, 2 n_embd (p + 1)
    for attention to the p + 1 positions up to p), differ by at most two of the dearest position's: the cuts are
    whole positions (each within half a position of its ideal place). The last part is shorter than the first, as
    its positions cost more."""
    bounds = gpt2.prompt_parts(n_positions, n_cores, n_embd)
    assert len(bounds) == n_parts + 1 and bounds[0] == 0 and bounds[-1] == n_positions
    cost = [12 * n_embd ** 2 + 2 * n_embd * (p + 1) for p in range(n_positions)]
    work = [sum(cost[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert max(work) - min(work) <= 2 * cost[-1]
    assert bounds[1] - bounds[0] > bounds[-1] - bounds[-2]
