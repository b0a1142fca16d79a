"""GPT-2's byte-level BPE tokenizer: text <-> token ids.

Text is first cut into words by a regex, each word's UTF-8 bytes are spelled with 256 printable
characters, and adjacent symbols are merged pairwise, lowest-ranked merge first, until no ranked pair is
left. Each final symbol is one token id from encoder.json.
"""
import codecs
import json
import os

import regex

# GPT-2's pre-tokenizer: contractions, letters, numbers, other symbols, each optionally led by one
# space; whitespace runs give all but their last space to the preceding run so " word" stays together.
PRETOKENIZE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode():
    """A reversible byte -> character table in which every character is printable.

    encoder.json and vocab.bpe are text files, so every byte needs a visible stand-in: bytes that are
    already printable Latin-1 keep their own character, the others (controls, space, ...) are shifted to
    256, 257, ... in byte order. Space (0x20), for example, becomes 'Ġ' (U+0120).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 256
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(shifted)
            shifted += 1
    return table


class Encoder:
    def __init__(self, encoder, bpe_merges):
        self.encoder = encoder  # symbol string -> id
        self.decoder = {i: s for s, i in encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(bpe_merges)}
        self.cache = {}  # word -> its symbols; prose repeats words, so most lookups hit

    def bpe(self, word):
        """Merge the characters of one pre-tokenized word into GPT-2 symbols."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word)
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of `best`, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[word] = symbols
        return symbols

    def encode(self, text):
        ids = []
        for word in PRETOKENIZE.findall(text):
            spelled = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(spelled))
        return ids

    def decode_bytes(self, ids):
        """The raw bytes of ids: a token may end inside a multi-byte UTF-8 character."""
        return bytes(self.byte_decoder[c] for c in "".join(self.decoder[i] for i in ids))

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """An incremental decoder: feed it token bytes, it returns only whole characters."""
        return codecs.getincrementaldecoder("utf-8")(errors="replace")


def get_encoder(model_name, models_dir):
    model_dir = os.path.join(models_dir, model_name)
    with open(os.path.join(model_dir, "encoder.json"), encoding="utf-8") as f:
        encoder = json.load(f)
    with open(os.path.join(model_dir, "vocab.bpe"), encoding="utf-8") as f:
        lines = f.read().split("\n")[1:]  # the first line is a "#version" header
    bpe_merges = [tuple(line.split()) for line in lines if line]
    return Encoder(encoder, bpe_merges)
