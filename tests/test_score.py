"""score.py against HF transformers' GPT2LMHeadModel holding the same weights, windows computed the HF way."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import score
import threads
from gpt2 import ENDOFTEXT
from tests.conftest import ROOT, make_model
from tests.release_layout import hf_model
from utils import load_encoder_hparams_and_params

N_CTX = 32  # a small context, so that a short text spans several windows
TEXT = ("Alan Turing theorized that computers would one day become the most powerful machines on the planet.\n"
        "He was right: today they fly planes, translate poems and play chess better than any grandmaster.\n"
        "Café, naïve, Straße and 東京 are words too, and so are numbers like 1024 or 3.14159.")


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """2 layers, n_embd 64, 4 heads, a context of N_CTX positions; with its params loaded and an HF twin."""
    model = make_model(tmp_path_factory, "short", n_layer=2, n_embd=64, n_head=4, n_ctx=N_CTX, seed=3)
    encoder, hparams, params = load_encoder_hparams_and_params(model.name, model.models_dir)
    return model, encoder, hparams, params, hf_model(model.tensors, model.hparams)


def hf_window_logprobs(hf, ids, n_ctx, stride):
    """Each token's log-probability and logits from the first window that predicts it, by HF's model and
    torch.log_softmax: window k feeds sequence[k*stride : k*stride + n_ctx] of sequence = [ENDOFTEXT] + ids."""
    sequence = [ENDOFTEXT, *ids]
    logprobs, logits = {}, {}
    for start in range(0, len(sequence) - 1, stride):
        window = sequence[start:start + n_ctx + 1]  # the inputs, and the token after the last one
        with torch.no_grad():
            window_logits = hf(torch.tensor([window[:-1]])).logits[0]
        window_logprobs = torch.log_softmax(window_logits, dim=-1)
        for j, target in enumerate(window[1:]):
            if start + j + 1 not in logprobs:  # position start + j + 1 is predicted here for the first time
                logprobs[start + j + 1] = window_logprobs[j, target].item()
                logits[start + j + 1] = window_logits[j].numpy()
    assert sorted(logprobs) == list(range(1, len(sequence)))
    return np.array([logprobs[p] for p in sorted(logprobs)]), np.array([logits[p] for p in sorted(logits)])


def run_main(capsys, model, text, tmp_path, *flags, **kwargs):
    path = tmp_path / "text.txt"
    path.write_bytes(text.encode("utf-8"))
    score.main(str(path), model_size=model.name, models_dir=model.models_dir, json=True, **kwargs)
    return json.loads(capsys.readouterr().out)


def test_a_byte_order_mark_is_not_scored(short_model, capsys, tmp_path):
    model, *_ = short_model
    with_bom = run_main(capsys, model, "\ufeff" + TEXT[:300], tmp_path)  # UTF-8 with a BOM, as Notepad saves it
    assert with_bom == run_main(capsys, model, TEXT[:300], tmp_path)


def test_a_text_of_the_bound_is_read_and_one_byte_more_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(score, "TEXT_BYTES_LIMIT", 10)
    (tmp_path / "ten.txt").write_bytes(b"0123456789")
    (tmp_path / "more.txt").write_bytes(b"0123456789x\xff")  # not UTF-8 past the bound: never read
    assert score.read_text(str(tmp_path / "ten.txt")) == "0123456789"
    with pytest.raises(ValueError, match=r"more.txt is more than .* GiB \(10 bytes\), the most score.py reads"):
        score.read_text(str(tmp_path / "more.txt"))


def test_the_text_spans_several_windows(short_model):
    _, encoder, *_ = short_model
    assert len(encoder.encode(TEXT)) > 2 * N_CTX


@pytest.mark.parametrize("stride", [N_CTX // 2, 7, N_CTX], ids=["default stride", "stride 7", "stride n_ctx"])
def test_logprobs_and_perplexity_match_hf(short_model, capsys, tmp_path, stride):
    model, encoder, _, _, hf = short_model
    expected, _ = hf_window_logprobs(hf, encoder.encode(TEXT), N_CTX, stride)
    result = run_main(capsys, model, TEXT, tmp_path, stride=None if stride == N_CTX // 2 else stride)
    assert result["n_tokens"] == len(expected)
    np.testing.assert_allclose(result["logprobs"], expected, rtol=0, atol=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(-np.mean(expected)), rel=1e-5)
    assert result["mean_nll"] == pytest.approx(-np.mean(expected), rel=1e-5)


def test_a_smaller_stride_scores_tokens_from_more_context(short_model):
    """Not the same numbers at every stride: a stride that changed nothing would pass the test above trivially."""
    _, encoder, hparams, params, _ = short_model
    ids = encoder.encode(TEXT)
    strided = [score.score_ids(ids, params, hparams["n_head"], N_CTX, s)["logprobs"] for s in (7, N_CTX)]
    np.testing.assert_allclose(strided[0][:N_CTX], strided[1][:N_CTX], atol=1e-5)  # the first window is the same
    assert np.abs(strided[0][N_CTX:] - strided[1][N_CTX:]).max() > 1e-3


def test_a_text_shorter_than_one_window(short_model, capsys, tmp_path):
    model, encoder, _, _, hf = short_model
    text = "Alan Turing theorized that"
    expected, _ = hf_window_logprobs(hf, encoder.encode(text), N_CTX, N_CTX // 2)
    result = run_main(capsys, model, text, tmp_path)
    assert result["n_tokens"] == len(expected) == 5 < N_CTX
    np.testing.assert_allclose(result["logprobs"], expected, rtol=0, atol=1e-4)


def test_bits_per_byte_by_hand(short_model, capsys, tmp_path):
    model, encoder, _, _, hf = short_model
    expected, _ = hf_window_logprobs(hf, encoder.encode(TEXT), N_CTX, N_CTX // 2)
    n_bytes = len(TEXT.encode("utf-8"))
    assert n_bytes > len(TEXT)  # multi-byte characters: bytes, not characters, are counted
    result = run_main(capsys, model, TEXT, tmp_path)
    assert result["bits_per_byte"] == pytest.approx(-np.sum(expected) / math.log(2) / n_bytes, rel=1e-5)


def test_per_token_ranks_and_candidates_against_argsort(short_model, capsys, tmp_path):
    model, encoder, _, _, hf = short_model
    ids = encoder.encode(TEXT)
    _, logits = hf_window_logprobs(hf, ids, N_CTX, 5)
    result = run_main(capsys, model, TEXT, tmp_path, stride=5, per_token=True, top=4)
    order = np.argsort(-logits, axis=-1)  # each position's tokens, most likely first
    expected_ranks = 1 + np.argmax(order == np.array(ids)[:, None], axis=-1)
    assert result["ranks"] == expected_ranks.tolist()
    assert len(set(result["ranks"])) > 10  # a broken rank would rarely land on the same numbers
    probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    for position, candidates in enumerate(result["candidates"]):
        assert [c["id"] for c in candidates] == order[position, :4].tolist()
        np.testing.assert_allclose([c["prob"] for c in candidates], probs[position, order[position, :4]], rtol=1e-4)
    # A token that ends inside a character (東京 is split) shows its bytes as \\xNN, not as a replacement character.
    assert result["tokens"] == [encoder.decode_bytes([i]).decode("utf-8", errors="backslashreplace") for i in ids]
    assert "".join(result["tokens"][:20]) == TEXT[:len("".join(result["tokens"][:20]))]
    # ...which a text holding "\xe6" would read as too: the ids give the exact bytes
    assert result["ids"] == ids and b"".join(encoder.decode_bytes([i]) for i in result["ids"]) == TEXT.encode("utf-8")


def test_per_token_table(short_model, capsys, tmp_path):
    model, encoder, *_ = short_model
    text = "Hi,\nwhat\tis\n東京?"
    as_json = run_main(capsys, model, text, tmp_path, per_token=True, top=2)
    score.main(str(tmp_path / "text.txt"), model_size=model.name, models_dir=model.models_dir, per_token=True, top=2)
    header, *rows = capsys.readouterr().out.splitlines()[:-4]  # the last 4 lines are the summary
    assert "rank" in header and "logprob" in header
    assert len(rows) == as_json["n_tokens"]
    for row, i, logprob, rank, candidates in zip(rows, encoder.encode(text), as_json["logprobs"], as_json["ranks"],
                                                 as_json["candidates"]):
        position, rest = row.split(maxsplit=1)
        shown = score.escape(encoder.decode_bytes([i]))
        assert rest.startswith(f"'{shown}'")
        assert "\n" not in shown and "\t" not in shown
        numbers = rest[len(shown) + 2:].split()
        assert float(numbers[0]) == pytest.approx(logprob, abs=1e-4) and int(numbers[1]) == rank
        assert f"'{score.escape(candidates[0]['token'].encode('utf-8'))}'" in rest
    assert "'\\n'" in "\n".join(rows) and "\\t" in "\n".join(rows)


def test_escape_shows_the_bytes_of_a_split_character():
    assert score.escape("東".encode("utf-8")[:2]) == "\\xe6\\x9d"
    assert score.escape(b" caf\xc3\xa9\n") == " café\\n"


def test_default_output(short_model, capsys, tmp_path):
    model, *_ = short_model
    as_json = run_main(capsys, model, TEXT, tmp_path)
    score.main(str(tmp_path / "text.txt"), model_size=model.name, models_dir=model.models_dir)
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 4

    def value(name):
        return float(re.search(rf"^{name}\s+(\S+)", out, re.MULTILINE).group(1))

    assert value("tokens") == as_json["n_tokens"]
    assert value("mean NLL") == pytest.approx(as_json["mean_nll"], abs=1e-4)
    assert value("perplexity") == pytest.approx(as_json["perplexity"], rel=1e-6)
    assert value("bits per byte") == pytest.approx(as_json["bits_per_byte"], abs=1e-4)


@pytest.mark.parametrize("top", [None, 3])
@pytest.mark.parametrize("cores, budget_rows, chunk, whole, parts", [
    (1, 1, 8, 0, []), (1, 3, 8, 0, []), (2, 2, 8, 8, [2]), (3, 3, 8, 9, []), (3, 2, 8, 0, [3] * 9),
    (2, 2, 256, 8, []), (4, 4, 8, 8, [4])],
    ids=["one core, one window per batch", "one core, three windows per batch",
         "two cores, a window on each, the odd one in two parts", "three cores, a window on each, none left",
         "three cores but the budget holds two windows: every window in parts",
         "two cores, the odd window too short to cut: in a batch", "four cores, the one left in four parts"])
def test_windows_side_by_side_in_parts_or_in_batches_give_the_same_scores(short_model, monkeypatch, top, cores,
                                                                           budget_rows, chunk, whole, parts):
    """9 windows: as many as can be a window per core side by side, and the rest each read a part per core (a
    window of 32 positions is cut when gpt2.PREFILL_CHUNK is 8, not when it is 256): every way, the scores of
    all windows at once."""
    _, encoder, hparams, params, _ = short_model
    ids = encoder.encode(TEXT)
    monkeypatch.setattr(threads, "CORES", 1)
    everything_at_once = score.score_ids(ids, params, hparams["n_head"], N_CTX, 5, top=top)
    assert len(list(score.windows(len(ids) + 1, N_CTX, 5))) == 9
    monkeypatch.setattr(threads, "CORES", cores)
    monkeypatch.setattr(score.gpt2, "PREFILL_CHUNK", chunk)
    monkeypatch.setattr(score, "LOGITS_BUDGET", budget_rows * N_CTX * hparams["n_vocab"] * 4)
    side_by_side, in_turns, seen = threads.side_by_side, threads.in_turns, {"whole": [], "parts": []}
    monkeypatch.setattr(threads, "side_by_side", lambda fn, items, **kwargs: (
        seen["whole"].append(items) if fn.__name__ == "scores_of" else None) or side_by_side(fn, items, **kwargs))
    monkeypatch.setattr(threads, "in_turns", lambda fn, n, shared: seen["parts"].append(n) or in_turns(fn, n, shared))
    scored = score.score_ids(ids, params, hparams["n_head"], N_CTX, 5, top=top)
    assert [len(items) for items in seen["whole"]] == ([whole] if whole else [])
    assert all(len(batch) == 1 for items in seen["whole"] for batch in items)
    assert seen["parts"] == parts
    assert scored.keys() == everything_at_once.keys()
    for key, value in everything_at_once.items():
        np.testing.assert_allclose(scored[key], value, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_positions, first, n_cores, n_parts", [
    (1024, 512, 2, 2), (1024, 0, 2, 2), (1024, 1023, 4, 4), (300, 150, 64, 2), (255, 100, 2, 1), (1024, 512, 1, 1)])
def test_a_window_is_cut_into_one_part_per_core_of_equal_work(n_positions, first, n_cores, n_parts):
    """As gpt2.prompt_parts cuts a prompt (one part per core, none shorter than PREFILL_CHUNK / 2 on average), but
    a new position (from first on) also costs n_embd n_vocab multiply-adds in the LM head: each part's
    multiply-adds, summed position by position, differ by at most two of the dearest position's."""
    n_layer, n_embd, n_vocab = 12, 768, 50257
    params = {"wte": np.zeros((n_vocab, n_embd), np.float32), "blocks": [{}] * n_layer}
    bounds = score.window_parts(n_positions, first, params, n_cores)
    assert len(bounds) == n_parts + 1 and bounds[0] == 0 and bounds[-1] == n_positions
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)
    cost = [n_layer * (12 * n_embd ** 2 + 2 * n_embd * (p + 1)) + (p >= first) * n_embd * n_vocab
            for p in range(n_positions)]
    work = [sum(cost[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert max(work) - min(work) <= 2 * max(cost)
    if first == n_positions // 2 and n_parts == 2:  # the context half is cheap: the first part takes more of it
        assert bounds[1] > first


def test_score_ids_refuses_token_ids_outside_the_vocabulary(short_model):
    _, _, hparams, params, _ = short_model
    n_vocab = hparams["n_vocab"]
    for ids, outside in (([1, -1, 2], -1), ([5, n_vocab], n_vocab)):
        with pytest.raises(ValueError, match=rf"token ids lie in 0\.\.{n_vocab - 1}; inputs hold \[{outside}\]"):
            score.score_ids(ids, params, hparams["n_head"], N_CTX, N_CTX // 2)
    for ids, what in (([True, False], "hold True"), ([1, 3.0], "hold 3.0"), (np.array([1.0]), "are float64"),
                      (np.array([1.5, 2.7], dtype=object), "hold 1.5"),  # was scored as ids 1 and 2
                      (np.array([True]), "are bool")):  # scored as ids 1 and 0, or an IndexError, before
        with pytest.raises(ValueError, match=f"token ids are integers; inputs {what}"):
            score.score_ids(ids, params, hparams["n_head"], N_CTX, N_CTX // 2)
    with pytest.raises(ValueError, match=r"token ids are a list of ids; inputs have shape \(2, 2\)"):
        score.score_ids([[1, 2], [3, 4]], params, hparams["n_head"], N_CTX, N_CTX // 2)


def test_score_ids_refuses_a_stride_outside_the_context_and_a_top_beyond_the_vocabulary(short_model):
    _, _, hparams, params, _ = short_model
    for stride in (0, -1, N_CTX + 1, 2.5, True):  # 0 and -1 never ended; N_CTX + 1 left tokens unscored
        with pytest.raises(ValueError, match=rf"stride must be a whole number in 1\.\.{N_CTX}, got {stride}"):
            score.score_ids(list(range(3 * N_CTX)), params, hparams["n_head"], N_CTX, stride)
    assert len(score.score_ids([1, 2], params, hparams["n_head"], N_CTX, np.int64(N_CTX))["logprobs"]) == 2
    n_vocab = hparams["n_vocab"]
    for top in (-1, n_vocab + 1, 1.5, True):  # n_vocab + 1 gave NumPy's "kth out of bounds"
        with pytest.raises(ValueError, match=rf"top must be a whole number in 0\.\.{n_vocab} \(or None\), got {top}"):
            score.score_ids([1, 2], params, hparams["n_head"], N_CTX, 4, top=top)
    assert score.score_ids([1, 2], params, hparams["n_head"], N_CTX, 4, top=n_vocab)["top_ids"].shape == (2, n_vocab)


def test_score_ids_takes_any_integer_array_and_an_empty_text(short_model):
    _, encoder, hparams, params, _ = short_model
    ids = encoder.encode(TEXT)[:40]
    as_list = score.score_ids(ids, params, hparams["n_head"], N_CTX, 8, top=2)
    for as_array in (*(np.array(ids, dtype=dtype) for dtype in (np.uint64, np.uint16, np.int32)),
                     [np.uint64(i) if k % 2 else i for k, i in enumerate(ids)]):  # uint64 and ints made floats
        as_array = score.score_ids(as_array, params, hparams["n_head"], N_CTX, 8, top=2)
        for key, value in as_list.items():  # (BLAS's threads may add in another order from one call to the next)
            np.testing.assert_allclose(as_array[key], value, rtol=0, atol=1e-6)
    empty = score.score_ids([], params, hparams["n_head"], N_CTX, 8, top=2)  # was "max() arg is an empty sequence"
    assert {key: value.shape for key, value in empty.items()} == {
        "logprobs": (0,), "ranks": (0,), "top_ids": (0, 2), "top_logprobs": (0, 2)}


def test_windows_score_every_token_once_with_enough_context():
    for n_positions, n_ctx, stride in [(2, 8, 4), (8, 8, 4), (9, 8, 4), (100, 8, 1), (100, 8, 3), (100, 8, 8)]:
        spans = list(score.windows(n_positions, n_ctx, stride))
        assert [start for start, _, _ in spans] == [k * stride for k in range(len(spans))]
        scored = [p for _, end, first in spans for p in range(first + 1, end + 1)]
        assert scored == list(range(1, n_positions))  # each target once, in order
        for k, (start, end, first) in enumerate(spans):
            assert end - start <= n_ctx
            if k:  # the least context a token scored here has: it is predicted from positions start..first
                assert first + 1 - start >= n_ctx - stride


@pytest.mark.parametrize("budget_rows", [2, 100], ids=["two rows per forward pass", "all rows at once"])
def test_target_logprobs_match_hf_and_a_batch_matches_its_rows(short_model, monkeypatch, budget_rows):
    _, _, hparams, params, hf = short_model
    inputs, targets = np.random.default_rng(0).integers(0, hparams["n_vocab"], (2, 3, 20))  # [batch, seq] twice
    monkeypatch.setattr(score, "LOGITS_BUDGET", budget_rows * 20 * hparams["n_vocab"] * 4)
    batch = score.target_logprobs(params, inputs, targets, hparams["n_head"])
    assert batch.shape == (3, 20) and batch.dtype == np.float32
    for row in range(3):
        one = score.target_logprobs(params, inputs[row:row + 1], targets[row:row + 1], hparams["n_head"])
        np.testing.assert_allclose(one[0], batch[row], rtol=0, atol=1e-5)
        with torch.no_grad():
            expected = torch.log_softmax(hf(torch.tensor(inputs[row:row + 1])).logits[0], dim=-1)
        np.testing.assert_allclose(batch[row], expected[np.arange(20), targets[row]].numpy(), rtol=0, atol=1e-4)


def test_target_logprobs_in_float64(short_model):
    _, _, hparams, params, hf = short_model
    def as_float64(tree):
        if isinstance(tree, dict):
            return {key: as_float64(value) for key, value in tree.items()}
        return [as_float64(block) for block in tree] if isinstance(tree, list) else tree.astype(np.float64)

    params64 = as_float64(params)
    inputs, targets = np.random.default_rng(1).integers(0, hparams["n_vocab"], (2, 2, 10))
    logprobs = score.target_logprobs(params64, inputs, targets, hparams["n_head"])
    assert logprobs.dtype == np.float64
    hf64 = hf.double()
    try:
        with torch.no_grad():
            expected = torch.log_softmax(hf64(torch.tensor(inputs)).logits, dim=-1)
    finally:
        hf.float()
    np.testing.assert_allclose(logprobs, np.take_along_axis(expected.numpy(), targets[..., None], -1)[..., 0],
                               rtol=0, atol=1e-9)


def test_log_softmax_at_real_gpt2_magnitudes():
    """Real GPT-2's logits are about 100 in size, a random model's about 1: the shift by the max must hold."""
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((6, 50257)) * 30 - 100).astype(np.float32)
    logits[:, 7] += 80  # one dominant token, as real models have
    ids = rng.integers(0, 50257, (6, 3))
    ids[:, 0] = 7
    expected = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    got = score.log_softmax_at(logits.copy(), ids)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(got, np.take_along_axis(expected, ids, -1), rtol=1e-6, atol=1e-4)


# ---------------------------------------------------------------------------------------- the command line

def run_cli(*args, stdin=None, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "score.py"), *args], capture_output=True, input=stdin,
                          cwd=cwd, timeout=300, env={**os.environ, "GPT2_MODELS_URL": "http://127.0.0.1:9"})


def test_cli_reads_names_as_text_and_stdin_and_keeps_stdout_clean(short_model, capsys, tmp_path):
    model, *_ = short_model
    expected = run_main(capsys, model, TEXT, tmp_path, stride=3, per_token=True)
    shutil.copytree(model.path, tmp_path / "2025" / "1,2")  # a models_dir and a model named like numbers
    (tmp_path / "2024").write_text(TEXT, encoding="utf-8")  # a file named like a number
    from_file = run_cli("2024", "--models_dir", "2025", "--model_size=1,2", "--stride", "3", "--per_token", "--json",
                        cwd=tmp_path)
    from_stdin = run_cli("--json", "-", "--models_dir=2025", "--model_size", "1,2", "--per_token", "True", "--stride=3",
                         stdin=TEXT.encode("utf-8"), cwd=tmp_path)
    for result in (from_file, from_stdin):
        assert result.returncode == 0, result.stderr.decode()
        assert json.loads(result.stdout) == expected
        assert b"scoring" in result.stderr  # the progress bar, on stderr: there are many windows at stride 3


def assert_one_line_error(result, code, *fragments):
    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert result.stdout == b""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def bad_models(short_model, tmp_path_factory):
    """A models folder with the short model and two whose tokenizer does not fit: a model that says it has fewer
    tokens than encoder.json, and an encoder.json that gives an id past the model's last token."""
    model, *_ = short_model
    models_dir = tmp_path_factory.mktemp("bad_models")
    ignore = shutil.ignore_patterns("numpy-params")
    shutil.copytree(model.path, models_dir / "short", ignore=ignore)
    shutil.copytree(model.path, models_dir / "fewer", ignore=ignore)
    hparams = json.loads((models_dir / "fewer" / "hparams.json").read_text())
    (models_dir / "fewer" / "hparams.json").write_text(json.dumps({**hparams, "n_vocab": 50000}))
    shutil.copytree(model.path, models_dir / "past", ignore=ignore)
    vocab = json.loads((models_dir / "past" / "encoder.json").read_text(encoding="utf-8"))
    vocab["!"] = 60000  # still 50257 entries, but "!" is now a token the model cannot have
    (models_dir / "past" / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    os.makedirs(models_dir / "broken")
    (models_dir / "broken" / "hparams.json").write_text(json.dumps(hparams))
    (models_dir / "empty.txt").write_bytes(b"")
    (models_dir / "latin1.txt").write_bytes("café".encode("latin-1"))
    (models_dir / "text.txt").write_text("Hello!", encoding="utf-8")
    return models_dir


BAD_INPUTS = [
    (["empty.txt"], 2, "empty.txt is empty"),
    (["latin1.txt"], 2, "latin1.txt is not UTF-8 text (byte 3 cannot be decoded)"),
    (["-"], 2, "standard input is empty"),
    (["missing.txt"], 2, "missing.txt: No such file"),
    ([], 2, "give the file to score, or - to read standard input"),
    (["text.txt", "--strides", "3"], 2, "unknown flag --strides; did you mean --stride?"),
    (["text.txt", "more.txt"], 2, "the path must be one argument, got 2 words"),
    (["text.txt", "--stride", "0"], 2, f"--stride must be between 1 and the model's context of {N_CTX}, got 0"),
    (["text.txt", "--stride", str(N_CTX + 1)], 2, f"context of {N_CTX}, got {N_CTX + 1}"),
    (["text.txt", "--stride", "2.5"], 2, "--stride must be a whole number, got 2.5"),
    (["text.txt", "--top", "-1"], 2, "--top must be a whole number >= 0, got -1"),
    (["text.txt", "--per_token", "--top", "50258"], 2, "--top must be at most the model's 50257 tokens, got 50258"),
    (["text.txt", "--model_size", "fewer"], 1, "hparams.json says n_vocab 50000, but encoder.json holds 50257 tokens"),
    (["text.txt", "--model_size", "past"], 1, "encoder.json maps '!' to 60000, not an id from 0 to 50256"),
    (["text.txt", "--model_size", "nowhere"], 2, "unknown model 'nowhere'"),
    (["text.txt", "--model_size", "broken"], 1, "cannot be loaded: encoder.json missing; vocab.bpe missing"),
]


@pytest.mark.parametrize("args, code, message", BAD_INPUTS, ids=[" ".join(a) or "no path" for a, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_an_exit_code(bad_models, args, code, message):
    flags = [] if "--model_size" in args else ["--model_size", "short"]
    result = run_cli(*args, *flags, "--models_dir", str(bad_models), stdin=b"", cwd=bad_models)
    assert_one_line_error(result, code, message)
    for name in ("short", "fewer", "past"):  # each stopped before loading any weights
        assert not os.path.exists(bad_models / name / "numpy-params")


def test_a_top_without_per_token_is_a_warning_and_the_default_none(bad_models):
    quiet = run_cli("text.txt", "--model_size", "short", "--models_dir", str(bad_models), cwd=bad_models)
    warned = run_cli("text.txt", "--top", "3", "--model_size", "short", "--models_dir", str(bad_models), cwd=bad_models)
    assert quiet.returncode == warned.returncode == 0, warned.stderr.decode()
    assert quiet.stderr == b"" and warned.stdout == quiet.stdout
    assert warned.stderr.decode().splitlines() == [
        "warning: --top 3 changes nothing without --per_token, whose table lists the candidates"]


def test_help_says_what_the_stride_buys():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr.decode()
    shown = result.stdout + result.stderr  # fire shows help on stderr when it is not a terminal
    assert b"predicted from at least n_ctx - stride tokens" in shown
    assert b"the first tokens of each window are predicted from little context" in shown  # all of it


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(score, "main", interrupted)
    monkeypatch.setattr(sys, "argv", ["score.py", "text.txt"])
    with pytest.raises(SystemExit) as exit:
        score.cli()
    assert exit.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_backslash_token_is_escaped_so_the_table_reads_back():
    assert score.escape(b"\\") == "\\\\" and score.escape(b"a\n\t") == "a\\n\\t"
    assert score.escape(b"\xe6\x9d") == "\\xe6\\x9d" and score.escape(" Turing".encode()) == " Turing"


def test_an_error_in_a_part_of_a_window_is_raised_with_no_thread_left_and_blas_as_it_was(short_model, monkeypatch):
    """A part that fails (here a KeyboardInterrupt, as Ctrl-C lands in a thread's wait) ends score_ids with that
    error once the other part is done: no thread is left inside BLAS and BLAS's thread count is what it was."""
    _, encoder, hparams, params, _ = short_model
    monkeypatch.setattr(threads, "CORES", 2)
    monkeypatch.setattr(score.gpt2, "PREFILL_CHUNK", 8)
    original, calls = score.window_scores, []

    def failing_in_the_second_part(*args):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)
    monkeypatch.setattr(score, "window_scores", failing_in_the_second_part)
    controller = threads.blas_controller()
    before = [lib.num_threads for lib in controller.lib_controllers]
    with pytest.raises(KeyboardInterrupt):  # one window of 32 (N_CTX) tokens, read in two parts
        score.score_ids(encoder.encode(TEXT)[:N_CTX - 1], params, hparams["n_head"], N_CTX, 5)
    assert calls == ["side_by_side"] * 2
    assert not [t for t in threading.enumerate() if t.name == "side_by_side"]
    assert [lib.num_threads for lib in controller.lib_controllers] == before


def test_a_small_stride_batches_by_attention_memory_not_only_logits():
    params = {"wte": np.zeros((50257, 768), np.float32), "blocks": [{}] * 12}
    # stride 1 on 124M's shape: one new position per window, but 12 x 1024 x 1024 attention scores each
    assert score.rows_within_budget(1, 1024, params, n_head=12) * 12 * 1024 * 1024 * 4 <= score.LOGITS_BUDGET
    assert score.rows_within_budget(512, 1024, params, n_head=12) == score.LOGITS_BUDGET // (512 * 50257 * 4)


def test_ctrl_c_in_the_middle_of_scoring_windows_side_by_side(short_model, tmp_path):
    """A real SIGINT while the windows are scored on threads of their own: the one line and 130, at once."""
    model, encoder, *_ = short_model
    (tmp_path / "long.txt").write_text(TEXT * 100, encoding="utf-8")  # thousands of windows at stride 1
    with open(tmp_path / "stderr", "w+b") as stderr:
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "score.py"), str(tmp_path / "long.txt"),
                                    "--stride", "1", "--model_size", model.name, "--models_dir", model.models_dir],
                                   stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT)
        deadline = time.monotonic() + 300
        while b"scoring" not in (tmp_path / "stderr").read_bytes():  # the progress bar: the windows are under way
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_bytes()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        try:
            out, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("score.py went on after Ctrl-C")
    err = (tmp_path / "stderr").read_bytes()
    assert process.returncode == 130 and out == b"", err
    assert err.endswith(b"interrupted\n") and b"Traceback" not in err, err


@pytest.fixture(scope="module")
def extreme_models(tmp_path_factory):
    """Two models whose logits are far past real GPT-2's: one so sure of itself that a text's mean NLL passes 709
    nats (its perplexity past float64's range), and one whose forward pass overflows float32 (finite weights)."""
    sure = make_model(tmp_path_factory, "sure", n_layer=2, n_embd=64, n_head=4, seed=2, logit_scale=2000.0)
    overflowing = make_model(tmp_path_factory, "overflowing", n_layer=2, n_embd=64, n_head=4, seed=2, logit_scale=1e38)
    return sure, overflowing


def test_a_perplexity_past_float64_is_inf_and_null_in_json(extreme_models, tmp_path):
    sure, _ = extreme_models
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    args = (str(tmp_path / "t.txt"), "--models_dir", sure.models_dir, "--model_size", sure.name)
    table, as_json = run_cli(*args), run_cli(*args, "--json")
    for result in (table, as_json):
        assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr.decode()
    report = json.loads(as_json.stdout)  # strict JSON: Python's json would take Infinity, so look for null
    assert report["mean_nll"] > math.log(sys.float_info.max) and report["perplexity"] is None
    assert b"Infinity" not in as_json.stdout and np.isfinite(report["logprobs"]).all()
    assert -np.mean(report["logprobs"]) == pytest.approx(report["mean_nll"], rel=1e-6)
    assert re.search(r"^perplexity +inf$", table.stdout.decode(), re.M), table.stdout.decode()


def test_a_forward_pass_that_overflows_is_one_line_not_nan_scores(extreme_models, tmp_path):
    _, overflowing = extreme_models
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    for extra in ((), ("--json",), ("--per_token",)):
        result = run_cli(str(tmp_path / "t.txt"), "--models_dir", overflowing.models_dir, "--model_size",
                         overflowing.name, *extra)
        assert_one_line_error(result, 1, "overflows float32", "log-probability of token ")
