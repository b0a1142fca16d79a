"""Our BPE against tiktoken's "gpt2" encoding, token for token."""
import os
import random

import pytest

import encoder as encoder_module
from encoder import Encoder, bytes_to_unicode, get_encoder
from tests.release_layout import real_vocab_file

CORPUS = [
    # English prose
    "Alan Turing theorized that computers would one day become the most powerful machines on the planet.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness,",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! \"Quoted,\" she said; (parenthetical) -- dash…",
    # source code
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "const re = /^\\s*(\\d+)\\.(\\d+)$/g; x => x?.y ?? z;   if (a !== b && c >= d) {}",
    # whitespace runs
    "tabs\there\t\tand\t\t\tthere", "crlf\r\nline\r\n\r\nend\r\n", "   leading spaces", "trailing spaces   ",
    "  two  spaces  between  ", "\n\n\nnewlines\n\n", " \t \n mixed \u00a0nbsp\u2003em-space", "",
    " ", "\t", "\n",
    # contractions, lower and upper case
    "I'm sure you've seen it; they'll say we'd done what's right, isn't it?",
    "I'M SURE YOU'VE SEEN IT; THEY'LL SAY WE'D DONE WHAT'S RIGHT, ISN'T IT?",
    "it's 'quoted' 'S 'T 'Re 'vE", "don't won't can't shan't y'all",
    # digits and numbers
    "0 1 12 123 1234 12345 123456789012345678901234567890", "3.14159 -2.5e-10 1,000,000 $19.99 50% #1 v2.0.1",
    "Phone: +1 (555) 123-4567; date 2024-02-29T13:37:00Z", "٣٤٥ ४५६ 三百",
    # scripts
    "日本語のテキストと中文文本以及한국어 텍스트", "東京は日本の首都です。北京是中国的首都。",
    "اللغة العربية جميلة جدا، أليس كذلك؟", "हिन्दी भाषा देवनागरी लिपि में लिखी जाती है।",
    "Ελληνικά και русский язык", "ภาษาไทย ไม่มีช่องว่าง",
    # combining marks
    "e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353a\u0354\u0355\u0356l\u0357\u0358g\u0359o\u035a", "cafe\u0301 vs café",
    # emoji: ZWJ sequences, skin tones, flags, keycaps
    "👨‍👩‍👧‍👦 family 👩🏽‍💻 coder 👍🏻👍🏿 🏳️‍🌈 🇯🇵🇺🇸 1️⃣ ❤️‍🔥", "😀😃😄😁😆😅😂🤣",
    # <|endoftext|> is plain text to GPT-2's encoder
    "<|endoftext|>", "before<|endoftext|>after", "<|endoftext|> <|endoftext|><|endoftext|>",
    # control characters
    "nul\x00bell\x07esc\x1b[31mred\x1b[0m del\x7f", "\x01\x02\x03\x0b\x0c\x1c\x1d\x1e\x1f", "\u200b\u200d\ufeff\u2028",
    # long runs of one character
    "a" * 5000, " " * 3000, "!" * 1000, "\n" * 500, "🙂" * 300, "ab" * 2000,
]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    models_dir = tmp_path_factory.mktemp("vocab")
    os.makedirs(models_dir / "vocab")
    for name in ("encoder.json", "vocab.bpe"):
        os.symlink(real_vocab_file(name), models_dir / "vocab" / name)
    return get_encoder("vocab", str(models_dir))


def test_byte_table_is_reversible_and_printable():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord(" ")] == "Ġ" and table[ord("A")] == "A"


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_ids_match_tiktoken(encoder, tiktoken_gpt2, text):
    assert encoder.encode(text) == tiktoken_gpt2.encode(text, disallowed_special=())


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_decode_inverts_encode(encoder, text):
    assert encoder.decode(encoder.encode(text)) == text


def test_whole_corpus_as_one_text(encoder, tiktoken_gpt2):
    text = "\n".join(CORPUS)
    ids = encoder.encode(text)
    assert ids == tiktoken_gpt2.encode(text, disallowed_special=())
    assert encoder.decode(ids) == text


def test_endoftext_is_text_not_the_special_token(encoder):
    assert 50256 not in encoder.encode("<|endoftext|>")
    assert encoder.decode([50256]) == "<|endoftext|>"


def test_invalid_utf8_decodes_to_replacement_character(encoder):
    # "🙂" is four bytes spread over tokens; the first of them alone is not valid UTF-8
    ids = encoder.encode("🙂")
    assert len(ids) > 1
    assert encoder.decode(ids[:1]) == "\ufffd"


ALPHABETS = {
    "latin": "abcdefghijklmnopqrstuvwxyz",
    "mixed case and digits": "aAbBeEsStT0123456789",
    "greek": "αβγδεζηθικλμνξοπρστυφχψω",
    "cyrillic": "абвгдеёжзийклмнопрстуфхцчшщ",
    "cjk": "的一是不了人我在有他这中大来上国个到说们",
    "emoji": "🙂🙃😀😂👍🏻👍🏿🇯🇵❤️",
    "bytes": "".join(map(chr, range(0x80, 0x100))),
}


@pytest.mark.parametrize("alphabet", ALPHABETS.values(), ids=ALPHABETS.keys())
def test_long_random_words_match_tiktoken(encoder, tiktoken_gpt2, alphabet):
    # Long words are where the merge order matters most: thousands of candidate pairs, many of equal rank
    rng = random.Random(len(alphabet))
    for length in (1, 2, 3, 50, 1000, 20_000):
        word = "".join(rng.choices(alphabet, k=length))
        assert encoder.encode(word) == tiktoken_gpt2.encode(word, disallowed_special=()), (alphabet, length)


@pytest.mark.parametrize("run", ["a" * 20_001, "ab" * 10_000, "aab" * 7000, "\u00e9" * 9999, "1" * 5000 + "x"])
def test_long_runs_match_tiktoken(encoder, tiktoken_gpt2, run):
    # Runs of one pattern are the worst case for "merge the leftmost of equal pairs first"
    assert encoder.encode(run) == tiktoken_gpt2.encode(run, disallowed_special=())


def test_bpe_merges_the_lowest_ranked_pair_first_and_the_leftmost_of_equals():
    # A toy vocabulary, where the answer can be worked out by hand
    merges = [("b", "c"), ("a", "b"), ("a", "a"), ("aa", "a"), ("a", "bc")]
    toy = Encoder({}, merges)
    assert toy.bpe("abc") == ["abc"]  # (b, c) outranks (a, b), so a + bc, not ab + c
    assert toy.bpe("aaa") == ["aaa"]  # (a, a) leftmost first: aa + a, which is ranked
    assert toy.bpe("aaaa") == ["aa", "aa"]  # then the next pair of a's, and (aa, aa) is not ranked
    assert toy.bpe("abab") == ["ab", "ab"]
    assert toy.bpe("cab") == ["c", "ab"]
    assert toy.bpe("") == [] and toy.bpe("x") == ["x"] and toy.bpe("xy") == ["x", "y"]


def test_word_cache_stays_bounded(encoder):
    encoder.cached_word_ids.cache_clear()
    letters = "abcdefghijklmnopqrstuvwxyz"
    n_words = encoder_module.CACHED_WORDS + 500
    words = [" " + "".join(letters[i // 26**k % 26] for k in range(4)) for i in range(n_words)]  # all different
    encoder.encode("".join(words))
    info = encoder.cached_word_ids.cache_info()
    assert info.currsize == encoder_module.CACHED_WORDS and info.misses == len(words)
    long_word = "x" * (encoder_module.CACHED_WORD_LENGTH + 1)
    encoder.encode(long_word)
    encoder.encode(long_word)
    assert encoder.cached_word_ids.cache_info().misses == len(words)  # the long word was never looked up in the cache


@pytest.mark.parametrize("max_tokens", [0, 1, 7, 30, 1000])
def test_max_tokens_gives_a_prefix_longer_than_max_tokens(encoder, max_tokens):
    text = CORPUS[0] + " " + CORPUS[3] + " " + CORPUS[26]
    full = encoder.encode(text)
    assert len(full) < 1000
    assert encoder.encode(text, max_tokens=1000) == full  # never reached: the whole encoding
    if max_tokens < len(full):
        ids = encoder.encode(text, max_tokens=max_tokens)
        assert max_tokens < len(ids) < len(full)
        assert ids == full[:len(ids)]


def test_max_tokens_stops_early_on_a_huge_text(encoder, monkeypatch):
    words_merged = []
    word_ids = encoder.word_ids
    monkeypatch.setattr(encoder, "cached_word_ids", lambda word: words_merged.append(word) or word_ids(word))
    huge = "one two three four five six " * 1_000_000  # 6 million words
    ids = encoder.encode(huge, max_tokens=1024)
    assert len(words_merged) == 1025  # every word here is one token: nothing after the stop was encoded
    assert len(ids) == 1025 and ids == encoder.encode(huge[:10_000])[:1025]
