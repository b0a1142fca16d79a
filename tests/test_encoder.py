"""Our BPE against tiktoken's "gpt2" encoding, token for token."""
import os

import pytest

from encoder import bytes_to_unicode, get_encoder
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
