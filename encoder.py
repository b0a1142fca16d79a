"""GPT-2's byte-level BPE tokenizer: text <-> token ids.

Text is first cut into words by a regex, each word's UTF-8 bytes are spelled with 256 printable
characters, and adjacent symbols are merged pairwise, lowest-ranked merge first, until no ranked pair is
left. Each final symbol is one token id from encoder.json.
"""
import codecs
import functools
import heapq
import json
import os

import regex

# GPT-2's pre-tokenizer: contractions, letters, numbers, other symbols, each optionally led by one
# space; whitespace runs give all but their last space to the preceding run so " word" stays together.
PRETOKENIZE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

# The word cache's bounds: this many words, each of at most this many characters (longer words are rare, and
# caching them would let a few runs of random text fill memory).
CACHED_WORDS = 50_000
CACHED_WORD_LENGTH = 100


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
        # Symbols spell one byte per character, so this is the most bytes one token covers (128 for GPT-2):
        # a text of n bytes needs at least n / longest_token ids.
        self.longest_token = max(map(len, encoder), default=1)
        # word -> its ids. Prose repeats words, so most lookups hit; the least recently used words are
        # dropped beyond CACHED_WORDS, so a long-lived Encoder that meets millions of words stays small.
        self.cached_word_ids = functools.lru_cache(maxsize=CACHED_WORDS)(self.word_ids)

    def bpe(self, word):
        """Merge the characters of one pre-tokenized word into GPT-2 symbols.

        The adjacent pair ranked lowest in vocab.bpe is merged first (the leftmost, if it occurs more than
        once), then the next lowest, until no adjacent pair is ranked. Rescanning the word for the best pair
        after each merge would cost O(n^2) on a long word; instead the candidate pairs wait in a heap ordered
        by (rank, position) and the symbols form a linked list, so each merge only re-pairs its two new
        neighbours: O(n log n).

        The ids are those of openai's loop, which merges every occurrence of the best pair at once: a pair holding
        a symbol that rank r made was learned after r, so ranks leave the heap in openai's order, and within a
        rank left to right, an overlapped occurrence going stale just as openai's left-to-right scan skips it.
        """
        symbols = list(word)  # symbols[i] is None once it has been merged into the symbol on its left
        after = [*range(1, len(word)), None]  # index of the next live symbol
        before = [None, *range(len(word) - 1)]  # index of the previous live symbol
        n = len(word)

        def candidate(i):  # the pair starting at symbols[i] as one heap key, or None if it is not ranked
            if i is None or after[i] is None:
                return None
            rank = self.bpe_ranks.get((symbols[i], symbols[after[i]]))
            return None if rank is None else rank * n + i  # one int orders by rank, then position, and fast

        candidates = [key for key in map(candidate, range(n)) if key is not None]
        heapq.heapify(candidates)
        while candidates:
            rank, i = divmod(heapq.heappop(candidates), n)
            j = after[i]
            if symbols[i] is None or j is None or self.bpe_ranks.get((symbols[i], symbols[j])) != rank:
                continue  # stale: one side of this pair has been merged into another symbol since
            symbols[i], symbols[j] = symbols[i] + symbols[j], None  # j joins i
            after[i] = after[j]
            if after[j] is not None:
                before[after[j]] = i
            for key in (candidate(before[i]), candidate(i)):  # the merged symbol pairs anew with both neighbours
                if key is not None:
                    heapq.heappush(candidates, key)
        return [s for s in symbols if s is not None]

    def word_ids(self, word):
        """The ids of one pre-tokenized word: its UTF-8 bytes spelled in printable characters, then merged."""
        spelled = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
        return [self.encoder[symbol] for symbol in self.bpe(spelled)]

    def encode(self, text, max_tokens=None):
        """The token ids of text. With max_tokens, stop early once the text is known to need more than max_tokens
        ids: the result is then longer than max_tokens, and a huge text is refused without encoding all of it.
        It is a prefix of the full encoding, except that a long word whose bytes alone need more ids than are
        left is not merged at all (a word of a million letters would cost seconds): the ids of its first bytes
        stand in for it."""
        ids = []
        for match in PRETOKENIZE.finditer(text):  # finditer, not findall: the words are cut only as needed
            word = match[0]
            if len(word) <= CACHED_WORD_LENGTH:
                ids.extend(self.cached_word_ids(word))
            elif max_tokens is not None and -(-len(word.encode("utf-8")) // self.longest_token) > max_tokens - len(ids):
                spelled = word.encode("utf-8")[:max_tokens - len(ids) + 1]
                ids.extend(self.encoder[self.byte_encoder[b]] for b in spelled)
            else:
                ids.extend(self.word_ids(word))
            if max_tokens is not None and len(ids) > max_tokens:
                break
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
    return load_encoder(os.path.join(models_dir, model_name))


def tokenizer_files(model_dir):
    """The names of a model folder's two tokenizer files: encoder.json and vocab.bpe in OpenAI's release, or the same
    two tables under Hugging Face's names, vocab.json and merges.txt. The checks of a folder check these two."""
    if os.path.exists(os.path.join(model_dir, "encoder.json")):
        return "encoder.json", "vocab.bpe"
    return "vocab.json", "merges.txt"


def load_encoder(model_dir):
    """The tokenizer of a model folder, from its tokenizer_files."""
    vocab, merges = tokenizer_files(model_dir)
    with open(os.path.join(model_dir, vocab), encoding="utf-8") as f:
        encoder = json.load(f)
    with open(os.path.join(model_dir, merges), encoding="utf-8") as f:
        lines = f.read().split("\n")
    bpe_merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return Encoder(encoder, bpe_merges)
