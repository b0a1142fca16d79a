"""Stop strings on streamed text: one sample's text as its tokens arrive, cut just before the first stop string it
contains, and how much of it can be printed so far.

    text = SampleText(encoder.stream_decoder(), ["\\n\\n", "THE END"])
    print(text.add(encoder.decode_bytes([token])), end="")  # for each token, until text.done
    print(text.finish())  # what was held back; text.text is the whole text

Matching works on whole characters (the decoder holds back a character's bytes until all have arrived), so a stop
string is caught whether it lies inside one token, across two, or across the bytes of one character. Printing
holds back only the end of the text that could still become a stop string: what is printed never has to be taken
back, and the printed text is exactly the returned one.
"""


class SampleText:
    def __init__(self, decoder, stops=()):
        self.decoder = decoder  # bytes in, whole characters out
        self.stops = list(stops)
        self.text = ""  # the sample's text so far, cut before a stop string once one has appeared
        self.shown = 0  # how many characters of it add and finish have handed out
        self.done = False  # a stop string appeared, or finish was called: nothing more is added

    def add(self, data, final=False):
        """Append a token's bytes; returns the text that can be printed now ("" once done)."""
        if self.done:
            return ""
        # A stop string can only start after what was shown: any earlier start would have been held back.
        self.text += self.decoder.decode(data, final=final)
        starts = [i for i in (self.text.find(stop, self.shown) for stop in self.stops) if i >= 0]
        if starts:  # the earliest one ends the sample, just before it
            self.text = self.text[:min(starts)]
            self.done = True
            return self.show(len(self.text))
        return self.show(len(self.text) - self.could_begin_a_stop())

    def finish(self):
        """The end of the sample (its last token came, or <|endoftext|>): returns everything not shown yet."""
        if self.done:
            return ""
        rest = self.add(b"", final=True)  # an unfinished character at the very end becomes U+FFFD, as decode does
        self.done = True
        return rest + self.show(len(self.text))

    def could_begin_a_stop(self):
        """The length of the longest end of the text that is the beginning of a stop string."""
        return max((n for stop in self.stops for n in range(1, len(stop)) if self.text.endswith(stop[:n])), default=0)

    def show(self, end):
        end = max(end, self.shown)
        shown, self.shown = self.text[self.shown:end], end
        return shown
