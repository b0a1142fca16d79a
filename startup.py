"""Ctrl-C while a script is still starting: one line, "interrupted", and exit 130, as once it runs.

The scripts' imports take seconds (NumPy, fire, tqdm, and TensorFlow where a release checkpoint is read), and a
KeyboardInterrupt raised inside one of them ends in a traceback through importlib. Each script imports this module
before anything else: when that script is the program (`python gpt2.py ...`), SIGINT says the line and exits until
cli.one_line_errors takes over (`hand_over`), which then handles Ctrl-C as a KeyboardInterrupt as it always did.
Imported by anything else (`import gpt2` in Python or a test, bench.py), it changes nothing.

It imports nothing slow itself: it has to be in place before the slow imports begin.
"""
import os
import signal
import sys

HERE = os.path.dirname(os.path.realpath(__file__))
SCRIPTS = {"gpt2.py", "train.py", "score.py", "export.py"}  # each runs its main under cli.one_line_errors


def interrupted_while_starting(signum, frame):
    # os._exit rather than an exception: nothing has been written yet, and an exception could be swallowed by the
    # import in flight (as one in NumPy's numpy.random was, cli.py notes) or meet a half-imported module on the way out
    os.write(2, b"interrupted\n")
    os._exit(130)


def is_the_program():
    """Whether one of SCRIPTS is the program being run, rather than some program that imports it."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)  # real paths: a script run through a link counts
    return path is not None and os.path.realpath(path) in {os.path.join(HERE, name) for name in SCRIPTS}


def hand_over():
    """Ctrl-C is a KeyboardInterrupt again from here on, for the script's own handling (cleanup, train.py's save)."""
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# Only where Ctrl-C would raise KeyboardInterrupt: a SIGINT that the shell set to be ignored (`nohup`, a background
# job) stays ignored.
if is_the_program() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, interrupted_while_starting)
