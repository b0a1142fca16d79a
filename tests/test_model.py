"""Logits and greedy tokens against HF transformers' GPT2LMHeadModel holding the same weights, at the test models'
small logits, at real GPT-2's magnitude and on a model trained during the run; and the model's pieces (layer_norm, attention, KVCache) alone."""
import numpy as np
import pytest
import torch

import gpt2
import gpt2_pico
from tests.release_layout import hf_model
from utils import load_encoder_hparams_and_params

PROMPT_30 = ("Alan Turing theorized that computers would one day become the most powerful machines on the planet, "
             "and he was right about that, as it turned out.")


@pytest.fixture(scope="module", params=["tiny_model", "wide_model", "realistic_model", "trained_model"])
def loaded(request):
    model = request.getfixturevalue(request.param)
    encoder, hparams, params = load_encoder_hparams_and_params(model.name, model.models_dir)
    return model, encoder, hparams, params, hf_model(model.tensors, model.hparams)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def test_prompt_is_30_tokens(loaded):
    _, encoder, *_ = loaded
    assert len(encoder.encode(PROMPT_30)) == 30


@pytest.mark.parametrize("impl", [gpt2, gpt2_pico], ids=["gpt2", "gpt2_pico"])
def test_logits_match_hf(loaded, impl):
    model, encoder, hparams, params, hf = loaded
    ids = encoder.encode(PROMPT_30)
    logits = impl.gpt2(ids, **params, n_head=hparams["n_head"])
    expected = hf_logits(hf, ids)
    assert logits.dtype == np.float32
    assert logits.shape == (30, hparams["n_vocab"])
    diff, magnitude = np.abs(logits - expected).max(), np.abs(expected).max()
    print(f"max |logits - HF| = {diff:.3g} of logits up to {magnitude:.3g} ({impl.__name__}, {model.name})")
    assert diff <= 1e-4 * max(1.0, magnitude / 30)  # float32 rounding grows with the logits' size


def test_greedy_tokens_match_hf(loaded):
    _, encoder, hparams, params, hf = loaded
    ids = encoder.encode(PROMPT_30)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = out[0, len(ids):].tolist()
    assert len(expected) == 20 and len(set(expected)) >= 5  # a degenerate model would make this test weak
    assert gpt2.generate(ids, params, hparams["n_head"], 20) == expected
    assert gpt2_pico.generate(ids, params, hparams["n_head"], 20) == expected


def test_realistic_model_has_real_gpt2_magnitudes(realistic_model):
    encoder, hparams, params = load_encoder_hparams_and_params(realistic_model.name, realistic_model.models_dir)
    logits = gpt2.gpt2(encoder.encode(PROMPT_30), **params, n_head=hparams["n_head"])
    assert 50 < np.abs(logits).max() < 200 and logits.std() > 10


# the pieces alone, against PyTorch (fast: no checkpoint)

def test_layer_norm_matches_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 64)) * 30 + 7  # a batch axis rides along; the offset must be removed
    x[0, 0] = 1e-3 * rng.standard_normal(64)  # variance 1e-6, where eps (1e-5) matters
    x[1, 1] = -40.0  # no variance at all: eps alone keeps it finite
    x, g, b = (a.astype(np.float32) for a in (x, rng.standard_normal(64), rng.standard_normal(64)))
    before = x.copy()
    ours = gpt2.layer_norm(x, g, b)
    expected = torch.nn.functional.layer_norm(torch.from_numpy(x), (64,), torch.from_numpy(g), torch.from_numpy(b),
                                              eps=1e-5).numpy()
    assert ours.dtype == np.float32 and ours.shape == x.shape
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(x, before)  # it works in an array of its own, not in the caller's


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_matches_torchs_tanh_gelu_and_leaves_its_input_alone(dtype):
    x = (np.random.default_rng(1).standard_normal((3, 4, 96)) * 4).astype(dtype)[:, ::2]  # a view, not contiguous
    before = x.copy()
    ours = gpt2.gelu(x)
    expected = torch.nn.functional.gelu(torch.from_numpy(np.ascontiguousarray(x)), approximate="tanh").numpy()
    assert ours.dtype == dtype and ours.shape == x.shape
    np.testing.assert_allclose(ours, expected, atol=1e-6 if dtype == np.float32 else 1e-12, rtol=1e-6)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("n_q, n_k", [(7, 7), (3, 7), (1, 7), (1, 1)])
def test_attention_matches_torch(n_q, n_k):
    # n_q < n_k: the queries are the last n_q positions, as with a cache; scores of GPT-2's size (tens)
    rng = np.random.default_rng(n_q * 10 + n_k)
    q, k, v = (rng.standard_normal((4, n, 16)).astype(np.float32) * 3 for n in (n_q, n_k, n_k))
    may_see = np.tril(np.ones((n_q, n_k), dtype=bool), k=n_k - n_q)  # query i sits at position n_k - n_q + i
    expected = torch.nn.functional.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)),
                                                                attn_mask=torch.from_numpy(may_see)).numpy()
    ours = gpt2.attention(q, k, v)
    assert ours.dtype == np.float32 and ours.shape == (4, n_q, 16)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)


def test_kv_cache_appends_in_place_and_repeats():
    rng = np.random.default_rng(0)
    new = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    cache = gpt2.KVCache((2, 5, 3))  # [n_head, capacity, d_head]
    assert cache.length == 0 and cache.keys.dtype == cache.values.dtype == np.float32
    k1, v1, k2, v2 = new(2, 2, 3), new(2, 2, 3), new(2, 1, 3), new(2, 1, 3)
    cache.append(k1, v1)
    keys, values = cache.append(k2, v2)
    assert cache.length == 3
    assert np.array_equal(keys, np.concatenate([k1, k2], axis=1))
    assert np.array_equal(values, np.concatenate([v1, v2], axis=1))
    assert np.shares_memory(keys, cache.keys) and np.shares_memory(values, cache.values)  # views, never copies

    batched = cache.repeat(4)  # [4, n_head, capacity, d_head], each a copy of the history
    assert batched.length == 3 and batched.keys.shape == (4, 2, 5, 3) and batched.keys.dtype == np.float32
    k3, v3 = new(4, 2, 1, 3), new(4, 2, 1, 3)
    keys, values = batched.append(k3, v3)
    assert batched.length == 4 and keys.shape == values.shape == (4, 2, 4, 3)
    for i in range(4):
        assert np.array_equal(keys[i], np.concatenate([k1, k2, k3[i]], axis=1))
        assert np.array_equal(values[i], np.concatenate([v1, v2, v3[i]], axis=1))
    assert cache.length == 3 and np.array_equal(cache.keys[:, 2:3], k2)  # the original goes on untouched

    keys, _ = cache.append(new(2, 2, 3), new(2, 2, 3))  # exactly to capacity
    assert cache.length == 5 and keys.shape == (2, 5, 3)
    with pytest.raises(ValueError):  # (its wording, and what length says afterwards, are test_kv_cache.py's)
        cache.append(new(2, 1, 3), new(2, 1, 3))


def test_a_single_continuation_goes_on_in_the_cache_itself():
    """repeat(1) copies nothing (a copy of 1558M's full context is 629 MB): the same buffers with a sample axis,
    the history and what is appended after it as with a copy; the cache it is called on keeps its shape."""
    rng = np.random.default_rng(0)
    cache = gpt2.KVCache((2, 5, 3))
    k1, v1 = rng.standard_normal((2, 2, 3), dtype=np.float32), rng.standard_normal((2, 2, 3), dtype=np.float32)
    cache.append(k1, v1)
    buffer = cache.keys
    single = cache.repeat(1)
    assert single.length == 2 and single.keys.shape == (1, 2, 5, 3) and np.shares_memory(single.keys, buffer)
    assert cache.keys is buffer and cache.keys.shape == (2, 5, 3)  # the cache it came from is as it was
    k2, v2 = rng.standard_normal((1, 2, 1, 3), dtype=np.float32), rng.standard_normal((1, 2, 1, 3), dtype=np.float32)
    keys, values = single.append(k2, v2)
    assert np.array_equal(keys[0], np.concatenate([k1, k2[0]], axis=1))
    assert np.array_equal(values[0], np.concatenate([v1, v2[0]], axis=1))


def test_importing_gpt2_for_the_model_imports_no_network_library():
    """`import gpt2` to call gpt2.gpt2 loads NumPy and the project's modules, not requests or tqdm (nor fire,
    filelock or TensorFlow): those are imported by the code that downloads, shows progress or parses argv."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys, gpt2; print(' '.join(sorted(m for m in ('requests', 'urllib3', 'tqdm', 'fire', 'filelock', "
            "'tensorflow') if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import gpt2 imported {result.stdout.strip()}"
