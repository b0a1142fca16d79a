"""The hand-written backward pass (train.py) against PyTorch autograd and against finite differences."""
import numpy as np
import pytest

import train
from tests.release_layout import hf_model, hf_name
from utils import flatten, nest


def params_of(model, dtype=np.float32):
    """The params tree of a test checkpoint, as writable arrays of dtype."""
    flat = {name.removeprefix("model/"): np.array(a[0] if a.ndim == 3 else a, dtype=dtype)
            for name, a in model.tensors.items()}
    return nest(flat, model.hparams["n_layer"])


def random_batch(n_vocab, batch, seq, seed=0):
    tokens = np.random.default_rng(seed).integers(0, n_vocab, size=(batch, seq + 1))
    return tokens[:, :-1], tokens[:, 1:]  # the targets are the inputs shifted by one


def torch_loss_and_grads(model, inputs, targets):
    import torch

    hf = hf_model(model.tensors, model.hparams)
    logits = hf(torch.from_numpy(inputs)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1))
    loss.backward()
    grads = dict(hf.named_parameters())
    return loss.item(), {name.removeprefix("model/"): grads[hf_name(name)].grad.numpy() for name in model.tensors}


@pytest.mark.parametrize("model_name", ["tiny_model", "wide_model"])
def test_gradients_equal_pytorch_autograd(request, model_name):
    model = request.getfixturevalue(model_name)
    inputs, targets = random_batch(model.hparams["n_vocab"], batch=3, seq=24)
    loss, grads = train.loss_and_grads(params_of(model), inputs, targets, model.hparams["n_head"])
    torch_loss, torch_grads = torch_loss_and_grads(model, inputs, targets)

    assert isinstance(loss, float) and loss == pytest.approx(torch_loss, abs=1e-5)
    ours = flatten(grads)
    assert set(ours) == set(torch_grads)
    worst = {}
    for name, expected in torch_grads.items():
        assert ours[name].dtype == np.float32 and ours[name].shape == expected.shape, name
        worst[name] = np.max(np.abs(ours[name] - expected)) / np.max(np.abs(expected))
    print(f"\n{model_name}: loss {loss:.6f} vs torch {torch_loss:.6f}; worst relative gradient difference "
          f"{max(worst.values()):.2e} ({max(worst, key=worst.get)})")
    assert max(worst.values()) <= 1e-4, worst


def test_gradients_keep_the_params_tree(tiny_model):
    params = params_of(tiny_model)
    inputs, targets = random_batch(tiny_model.hparams["n_vocab"], batch=2, seq=5)
    _, grads = train.loss_and_grads(params, inputs, targets, tiny_model.hparams["n_head"])
    assert {k: v.shape for k, v in flatten(grads).items()} == {k: v.shape for k, v in flatten(params).items()}
    assert isinstance(grads["blocks"], list) and len(grads["blocks"]) == len(params["blocks"])


def test_lm_loss_is_the_training_loss(tiny_model):
    params = params_of(tiny_model)
    inputs, targets = random_batch(tiny_model.hparams["n_vocab"], batch=2, seq=9, seed=3)
    loss, _ = train.loss_and_grads(params, inputs, targets, tiny_model.hparams["n_head"])
    assert train.lm_loss(params, inputs, targets, tiny_model.hparams["n_head"]) == pytest.approx(loss, rel=1e-6)


def test_gradients_equal_finite_differences_in_float64(tiny_model):
    params = params_of(tiny_model, np.float64)
    n_head = tiny_model.hparams["n_head"]
    inputs, targets = random_batch(tiny_model.hparams["n_vocab"], batch=2, seq=6, seed=1)
    _, grads = train.loss_and_grads(params, inputs, targets, n_head)
    grads = flatten(grads)
    assert all(g.dtype == np.float64 for g in grads.values())
    rng = np.random.default_rng(0)
    h = 1e-5  # in float64 the loss (about 11) is exact to about 1e-14, so a difference quotient to about 1e-9
    for name, leaf in flatten(params).items():
        coordinates = [tuple(rng.integers(0, n) for n in leaf.shape) for _ in range(3)]
        if name == "wte":  # rows the inputs look up get both uses' gradient; others only the LM head's
            coordinates += [(inputs[0, 0], 5), (inputs[1, 2], 0)]
        if name == "wpe":  # positions past the sequence get no gradient at all
            coordinates += [(0, 3), (5, 1), (6, 2)]
        for index in coordinates:
            saved = leaf[index]
            leaf[index] = saved + h
            above = train.lm_loss(params, inputs, targets, n_head)
            leaf[index] = saved - h
            below = train.lm_loss(params, inputs, targets, n_head)
            leaf[index] = saved
            numeric = (above - below) / (2 * h)
            assert grads[name][index] == pytest.approx(numeric, rel=1e-5, abs=1e-8), (name, index)


def test_a_batch_gradient_is_the_mean_of_its_examples(tiny_model):
    params = params_of(tiny_model, np.float64)
    n_head = tiny_model.hparams["n_head"]
    inputs, targets = random_batch(tiny_model.hparams["n_vocab"], batch=3, seq=7, seed=2)
    loss, grads = train.loss_and_grads(params, inputs, targets, n_head)
    alone = [train.loss_and_grads(params, inputs[i:i + 1], targets[i:i + 1], n_head) for i in range(3)]
    assert loss == pytest.approx(np.mean([one_loss for one_loss, _ in alone]), rel=1e-12)
    for name, batch_grad in flatten(grads).items():
        mean_grad = np.mean([flatten(g)[name] for _, g in alone], axis=0)
        np.testing.assert_allclose(batch_grad, mean_grad, rtol=1e-9, atol=1e-14, err_msg=name)


def test_every_backward_keeps_the_stated_contract():
    """train.py's docstring: *_backward(dout, cache) -> (dx, grads), grads under the weights' own names; pieces
    without weights return dx alone, those whose input is token ids grads alone. Nothing is handed in to be filled."""
    import inspect

    backwards = {name: f for name, f in vars(train).items() if name.endswith("_backward")}
    assert len(backwards) == 13
    for name, f in backwards.items():
        assert len(inspect.signature(f).parameters) == 2 and list(inspect.signature(f).parameters)[1] == "cache", name

    rng = np.random.default_rng(0)
    def rand(*shape):  # noqa: E306
        return rng.standard_normal(shape).astype(np.float32)
    x, w, b, wte, wpe = rand(2, 3, 4), rand(4, 5), rand(5), rand(7, 4), rand(6, 4)
    out, cache = train.linear_forward(x, w, b)
    dx, grads = train.linear_backward(rand(*out.shape), cache)
    assert dx.shape == x.shape and {k: g.shape for k, g in grads.items()} == {"w": w.shape, "b": b.shape}
    logits, cache = train.lm_head_forward(x, wte)
    dx, grads = train.lm_head_backward(rand(*logits.shape), cache)
    assert dx.shape == x.shape and {k: g.shape for k, g in grads.items()} == {"wte": wte.shape}
    ids = np.array([[1, 2, 1], [0, 6, 6]])
    out, cache = train.embedding_forward(ids, wte, wpe)
    grads = train.embedding_backward(rand(*out.shape), cache)
    assert {k: g.shape for k, g in grads.items()} == {"wte": wte.shape, "wpe": wpe.shape}
    out, cache = train.gelu_forward(x)
    assert train.gelu_backward(rand(*x.shape), cache).shape == x.shape
    # dloss scales the gradient: the chain rule from whatever comes after the loss
    halves = [train.cross_entropy_backward(dloss, train.cross_entropy_forward(logits.copy(), ids)[1])
              for dloss in (1.0, 0.5)]  # (the forward works in place on the logits: a copy each)
    np.testing.assert_allclose(halves[1], 0.5 * halves[0], rtol=1e-6)


def test_recompute_gives_the_same_gradients(tiny_model):
    """--recompute computes each block's activations again in the backward: the same numbers, bit for bit."""
    params, n_head = params_of(tiny_model), tiny_model.hparams["n_head"]
    inputs, targets = random_batch(tiny_model.hparams["n_vocab"], batch=2, seq=11, seed=4)
    loss, grads = train.loss_and_grads(params, inputs, targets, n_head)
    recomputed_loss, recomputed = train.loss_and_grads(params, inputs, targets, n_head, recompute=True)
    assert recomputed_loss == loss
    for name, g in flatten(grads).items():
        np.testing.assert_array_equal(flatten(recomputed)[name], g, err_msg=name)


@pytest.mark.parametrize("chunk", [1, 5, 22])  # a position at a time, chunks that do not divide 22, one chunk
def test_the_lm_head_and_loss_in_chunks_equal_them_whole(chunk, monkeypatch):
    """lm_head_loss_forward, LOGITS_CHUNK positions at a time, against the whole batch's logits through
    lm_head_forward, cross_entropy_forward and their backwards: equal to float32 rounding."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 11, 16)).astype(np.float32)
    wte = rng.standard_normal((97, 16)).astype(np.float32)
    targets = rng.integers(0, 97, (2, 11))
    logits, lm_head_cache = train.lm_head_forward(x, wte)
    whole_loss, cross_entropy_cache = train.cross_entropy_forward(logits, targets)
    whole_dx, whole_grads = train.lm_head_backward(train.cross_entropy_backward(0.5, cross_entropy_cache),
                                                   lm_head_cache)

    monkeypatch.setattr(train, "LOGITS_CHUNK", chunk)
    loss, cache = train.lm_head_loss_forward(x, wte, targets)
    dx, grads = train.lm_head_loss_backward(0.5, cache)
    assert loss == pytest.approx(whole_loss, rel=1e-6)
    assert dx.shape == x.shape and dx.dtype == np.float32 and grads["wte"].dtype == np.float32
    np.testing.assert_allclose(dx, whole_dx, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads["wte"], whole_grads["wte"], rtol=1e-5, atol=1e-7)


def test_work_shared_over_the_cores_equals_the_plain_op():
    """on_every_core splits the first axis into blocks, one thread per core: the same numbers as one call, bit for
    bit, for an elementwise formula, attention head by head (a tuple of results), and blocks of one row."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((37, 13)).astype(np.float32)
    for block_bytes in (1, 200, 1 << 20):  # a row per block, a few rows, everything in one block per core
        np.testing.assert_array_equal(train.on_every_core(train.gelu, x, block_bytes=block_bytes), train.gelu(x))
    q, k, v = (rng.standard_normal((9, 7, 4)).astype(np.float32) for _ in range(3))
    out, weights = train.on_every_core(train.attention_with_weights, q, k, v, block_bytes=64)
    expected_weights = train.attention_weights(q, k)
    np.testing.assert_array_equal(weights, expected_weights)
    np.testing.assert_allclose(out, expected_weights @ v, rtol=1e-6, atol=1e-7)
