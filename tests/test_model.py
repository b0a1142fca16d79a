"""Logits and greedy tokens against HF transformers' GPT2LMHeadModel holding the same weights."""
import numpy as np
import pytest
import torch

import gpt2
import gpt2_pico
from tests.release_layout import hf_model
from utils import load_encoder_hparams_and_params

PROMPT_30 = ("Alan Turing theorized that computers would one day become the most powerful machines on the planet, "
             "and he was right about that, as it turned out.")


@pytest.fixture(scope="module", params=["tiny_model", "wide_model"])
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
    _, encoder, hparams, params, hf = loaded
    ids = encoder.encode(PROMPT_30)
    logits = impl.gpt2(ids, **params, n_head=hparams["n_head"])
    expected = hf_logits(hf, ids)
    assert logits.dtype == np.float32
    assert logits.shape == (30, hparams["n_vocab"])
    diff = np.abs(logits - expected).max()
    print(f"max |logits - HF| = {diff:.3g} ({impl.__name__}, n_embd {hparams['n_embd']})")
    assert diff <= 1e-4


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
