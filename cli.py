"""The command line of every script (gpt2.py, gpt2_pico.py, train.py, score.py): argv checked against `main`'s
signature, values checked before anything is downloaded, errors as one line on stderr, and the interactive loop.

    run(main)  # what `python gpt2.py ...` does

Nothing here imports gpt2: the scripts hand their `main` in, so `python gpt2.py` never loads gpt2 twice.
"""
import codecs
import contextlib
import difflib
import inspect
import io
import math
import numbers
import os
import re
import shlex
import sys
import warnings

import numpy as np
import numpy.random  # noqa: F401 -- NumPy 2 imports it on first use, and a Ctrl-C that lands inside that import
# is swallowed (sampling went on to the end and exited 0): every script imports it here, before main runs

import startup
import utils

# The flags that take text: fire would turn `--prompt_file 2024` into a number and `--prompt 1,2` into a tuple.
TEXT_FLAGS = {"prompt", "prompt_file", "model_size", "models_dir", "stop"}
REPEATABLE_FLAGS = {"stop"}  # given several times, each value counts (a list); any other flag keeps its last value
INTERACTIVE_PROMPT = "Model prompt >>> "
PROMPT_HEAD_BYTES = 1 << 20  # read before the model's context is known: enough to tell text from not-text
EXIT_BROKEN_PIPE = 141  # what the shell reports for `cat`, `yes` or `git log` when a reader such as `head` quits


def check(ok, message):
    if not ok:
        raise utils.UsageError(message)


def is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_arguments(n_tokens_to_generate=40, temperature=0.0, top_k=0, top_p=1.0, seed=None, num_samples=1,
                    stop_at_endoftext=False, interactive=False, stop=None, min_p=0.0, repetition_penalty=1.0,
                    presence_penalty=0.0, frequency_penalty=0.0, no_repeat_ngram_size=0, min_new_tokens=0, **_):
    """Raise UsageError for the first value that cannot work."""
    check(is_int(n_tokens_to_generate) and n_tokens_to_generate >= 1,
          f"--n_tokens_to_generate must be a whole number >= 1, got {n_tokens_to_generate!r}")
    check(is_int(num_samples) and num_samples >= 1, f"--num_samples must be a whole number >= 1, got {num_samples!r}")
    for name, value in (("stop_at_endoftext", stop_at_endoftext), ("interactive", interactive)):
        check(isinstance(value, bool), f"--{name} must be True or False, got {value!r}")
    check_stops(stop)
    check_sampling(temperature, top_k, top_p, seed, min_p, repetition_penalty, presence_penalty, frequency_penalty,
                   no_repeat_ngram_size, min_new_tokens)


def check_sampling(temperature=0.0, top_k=0, top_p=1.0, seed=None, min_p=0.0, repetition_penalty=1.0,
                   presence_penalty=0.0, frequency_penalty=0.0, no_repeat_ngram_size=0, min_new_tokens=0, dashes="--"):
    """Raise UsageError (a ValueError) for the first value that steers sampling and cannot work. One set of rules
    for the command line (`--top_k`) and for gpt2.generate (`top_k`, dashes=""): a nan or a negative temperature
    given from Python would otherwise sample silently wrong tokens."""
    check(is_number(temperature) and temperature >= 0,
          f"{dashes}temperature must be a number >= 0, got {temperature!r}")
    check(is_int(top_k) and top_k >= 0, f"{dashes}top_k must be a whole number >= 0 (0: off), got {top_k!r}")
    check(is_number(top_p) and 0 < top_p <= 1, f"{dashes}top_p must be a number in (0, 1] (1: off), got {top_p!r}")
    check(seed is None or (is_int(seed) and seed >= 0), f"{dashes}seed must be a whole number >= 0, got {seed!r}")
    check(is_number(min_p) and 0 <= min_p <= 1, f"{dashes}min_p must be a number in [0, 1] (0: off), got {min_p!r}")
    # Logits are float32: a penalty beyond these bounds overflows them (or is inf itself, and inf * 0 is nan).
    check(is_number(repetition_penalty) and 1e-30 <= repetition_penalty <= 1e30,
          f"{dashes}repetition_penalty must be a number in [1e-30, 1e30] (1: off), got {repetition_penalty!r}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        check(is_number(value) and abs(value) <= 1e30,
              f"{dashes}{name} must be a number in [-1e30, 1e30] (0: off), got {value!r}")
    for name, value in (("no_repeat_ngram_size", no_repeat_ngram_size), ("min_new_tokens", min_new_tokens)):
        check(is_int(value) and value >= 0, f"{dashes}{name} must be a whole number >= 0 (0: off), got {value!r}")


def check_logits(logits):
    """Logits that are NaN or inf come from a forward pass that overflows float32 (weights far past any trained
    GPT-2's), never from a prompt: sampled, they give token 0 over and over (argmax takes NaN as the largest)."""
    if not np.isfinite(logits).all():
        raise utils.ModelError("the model's logits are NaN or inf: its forward pass overflows float32, so nothing "
                               "it generates would mean anything")


def check_stops(stop):
    """--stop: text, or (given several times) a list of texts, none of them empty."""
    stops = [stop] if isinstance(stop, str) else stop
    check(stops is None or (isinstance(stops, (list, tuple)) and all(isinstance(s, str) for s in stops)),
          f"--stop must be text, got {stop!r}")
    for text in stops or []:
        check(text != "", "--stop must not be empty: every text contains the empty string")
        check_text(text, "--stop")


def warn(message):
    """A usage warning: one line on stderr. Not Python's `warnings`: PYTHONWARNINGS=ignore would hide it, -W error
    would turn it into a traceback, and it would show only once per place in the code (once per interactive run)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def warn_unused_flags(temperature=0.0, top_k=0, top_p=1.0, seed=None, num_samples=1, min_p=0.0, **_):
    """Sampling flags given at temperature 0 change nothing: a warning, not an error, so a script that always
    passes --seed keeps working."""
    if temperature != 0:
        return
    unused = [f"--{name}" for name, off in (("top_k", top_k == 0), ("top_p", top_p == 1), ("min_p", min_p == 0),
                                            ("seed", seed is None), ("num_samples", num_samples == 1)) if not off]
    if unused:
        warn(f"{', '.join(unused)} only matter{'s' * (len(unused) == 1)} when sampling, and --temperature is 0 "
             f"(greedy): every sample is the same most-likely text; add --temperature 1 to sample")


def warn_unreachable_min_new_tokens(n_tokens_to_generate, min_new_tokens):
    """A --min_new_tokens past --n_tokens_to_generate cannot be honoured: no sample gets that long. A warning, as a
    --warmup_steps past --max_steps is (and as in HF's generate): the run does what the shorter minimum would."""
    if min_new_tokens > n_tokens_to_generate:
        warn(f"--min_new_tokens {min_new_tokens} is more than --n_tokens_to_generate {n_tokens_to_generate}: no sample "
             f"gets that long; <|endoftext|> is never chosen, as with --min_new_tokens {n_tokens_to_generate}")


def warn_literal_escapes(stop):
    """`--stop "\\n"` is a backslash and an n: a user who meant a newline would never see it match."""
    for text in [stop] if isinstance(stop, str) else stop or []:
        escapes = [f"\\{c}" for c in "nt" if f"\\{c}" in text]
        if escapes:
            warn(f'--stop "{text}" holds {" and ".join(escapes)} as typed, a backslash and a letter, not a newline or '
                 f"a tab; in bash, --stop $'\\n' is a newline")


def check_text(text, source):
    """Text that cannot be written as UTF-8 (a lone surrogate, from invalid UTF-8 in argv) cannot be encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise utils.UsageError(f"{source} is not valid UTF-8 text (character {e.start} cannot be encoded)") from None
    return text


def open_prompt(prompt, prompt_file=None):
    """Check where the prompt comes from, before anything is downloaded, and open it: a function
    read(max_bytes=None) that returns its text. A file is opened once, so a pipe (`--prompt_file <(cmd)`) or a
    FIFO is read by the same open that checked it."""
    check(isinstance(prompt, str), f"the prompt must be text, got {prompt!r}")
    check(prompt_file is None or isinstance(prompt_file, str), f"--prompt_file must be a path, got {prompt_file!r}")
    if prompt_file is None and prompt != "-":
        text = check_text(prompt, "the prompt")
        return lambda max_bytes=None: text
    check(prompt_file is None or prompt == "", "give either a prompt or --prompt_file, not both")
    if prompt_file is None:
        source = "the prompt on standard input"
        check(sys.stdin is not None, "standard input is closed, so there is no prompt to read from it (`-`)")
        stream = sys.stdin.buffer
    else:
        source = f"--prompt_file {prompt_file}"
        try:
            stream = open(prompt_file, "rb")
        except OSError as e:
            raise utils.UsageError(f"{source}: {e.strerror}") from None

    def not_utf8(e):
        return utils.UsageError(f"{source} is not UTF-8 text (byte {e.start} cannot be decoded)")

    try:  # the first MiB now, so that a prompt that is not text is refused before any download
        head = stream.read(PROMPT_HEAD_BYTES)
        # a character cut at the end of the head is no error, unless the head is all there is
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < PROMPT_HEAD_BYTES)
    except UnicodeDecodeError as e:
        raise not_utf8(e) from None
    except OSError as e:
        raise utils.UsageError(f"{source}: {e.strerror}") from None

    def read(max_bytes=None):
        try:
            data = head + (stream.read() if max_bytes is None else stream.read(max(0, max_bytes + 1 - len(head))))
            if prompt_file is not None:
                stream.close()
            check(max_bytes is None or len(data) <= max_bytes, f"{source} is more than {max_bytes} bytes, more "
                  f"than the model's context can hold: the prompt was not read further")
            return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark (Notepad's) is no text
        except UnicodeDecodeError as e:
            raise not_utf8(e) from None
        except OSError as e:
            raise utils.UsageError(f"{source}: {e.strerror}") from None
    return read


def read_prompt(prompt, prompt_file=None, max_bytes=None):
    """The prompt's text: as given, or read from standard input ("-") or from prompt_file. With max_bytes, a
    longer prompt is refused after reading max_bytes + 1 bytes of it."""
    return open_prompt(prompt, prompt_file)(max_bytes)


def prompt_bytes_limit(n_ctx, encoder):
    """The most bytes a prompt that fits n_ctx tokens can have: each token covers at most longest_token bytes."""
    return n_ctx * encoder.longest_token


def check_fits(n_prompt, n_tokens_to_generate, n_ctx):
    """n_prompt above n_ctx may be a count that stopped early (Encoder.encode's max_tokens)."""
    check(n_prompt <= n_ctx, f"the prompt is more than {n_ctx} tokens, the model's whole context")
    # The last new token is returned, never fed back, so it takes no position of the context.
    check(n_prompt + n_tokens_to_generate - 1 <= n_ctx,
          f"the prompt is {n_prompt} token{'s' * (n_prompt != 1)} and --n_tokens_to_generate is "
          f"{n_tokens_to_generate}: together they need {n_prompt + n_tokens_to_generate - 1} positions, more than "
          f"the model's context of {n_ctx}")


def machine_memory():
    """This machine's memory in bytes, or None where the system does not tell."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(hparams, num_samples, n_positions):
    """Refuse a batch whose key/value caches could never fit in this machine's memory, before loading anything."""
    caches = hparams["n_layer"] * 2 * num_samples * n_positions * hparams["n_embd"] * 4  # float32 keys and values
    sampling = num_samples * hparams["n_vocab"] * 32  # logits and their float64 probabilities and sums, per sample
    memory, need = machine_memory(), caches + sampling
    if memory is None or need <= memory:
        return
    one = need / num_samples
    check(one <= memory, f"the model (n_layer {hparams['n_layer']}, n_embd {hparams['n_embd']}, n_vocab "
                         f"{hparams['n_vocab']}) needs about {one / 2**30:.1f} GiB for the key/value caches of "
                         f"{n_positions} positions, more than this machine's {memory / 2**30:.1f} GiB of memory")
    raise utils.UsageError(f"--num_samples {num_samples} needs about {need / 2**30:.1f} GiB for its caches, more "
                           f"than this machine's {memory / 2**30:.1f} GiB of memory")


# ---- argv -> fire ----

def flags_of(main):
    """main's parameters that are flags; keyword-only ones (stream) are for Python callers only."""
    return {name: p for name, p in inspect.signature(main).parameters.items()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD}


def is_bool_flag(parameter):
    return isinstance(parameter.default, bool)


def looks_like_flag(arg):
    # "-" (stdin), "-5" and "-I think so" are prompts; "-n" or "-seed" are flags spelled wrong.
    return arg.startswith("--") or (arg[:1] == "-" and arg[1:2].isalpha() and " " not in arg)


def parse_argv(argv, main, positional="prompt", short_flags=None):
    """{flag: the text given for it} from argv, checked against main's signature; the one bare word, if any, is the
    value of `positional` (the prompt; None: no bare words). Raises UsageError naming every unknown flag. A flag
    given twice keeps its last value, as argparse does. short_flags is the script's table of one-letter flags,
    {"i": "interactive"}: chosen, never derived from first letters, where a new flag would silently take one away."""
    flags = flags_of(main)
    values, words, unknown = {}, [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":  # everything after it is prompt text, even "-x"
            words += args
            break
        if not looks_like_flag(arg):
            words.append(arg)
            continue
        name, has_value, value = arg.lstrip("-").partition("=")
        if not arg.startswith("--"):
            name = (short_flags or {}).get(name, "-" + name)
        if name not in flags:
            unknown.append(arg.partition("=")[0])
            continue
        if not has_value:
            if is_bool_flag(flags[name]):  # a bare boolean flag is True; only True/False after it is its value
                value = args.pop(0) if args and args[0].lower() in ("true", "false") else "True"
            else:  # the next argument, unless it is another flag: -1 can be a value, --seed cannot
                check(bool(args) and not args[0].startswith("--"), f"--{name} needs a value")
                value = args.pop(0)
        if is_bool_flag(flags[name]) and value.lower() in ("true", "false"):
            value = value.capitalize()
        if name in REPEATABLE_FLAGS:
            values.setdefault(name, []).append(value)
        else:
            values[name] = value
    if unknown:
        raise utils.UsageError(f"unknown flag{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                               f"{closest_flags(unknown, flags)}")
    if words:
        check(positional is not None, f"unexpected argument {words[0]!r}: every value goes with its --flag; "
                                      f"{script_name()} --help lists them")
        check(len(words) == 1, f"the {positional} must be one argument, got {len(words)} words; quote it: "
                               f"{script_name()} {shlex.quote(' '.join(words))}")
        check(positional not in values, f"give the {positional} once: as the first argument or with --{positional}")
        values[positional] = words[0]
    return values


def closest_flags(unknown, flags):
    close = {match for arg in unknown for match in difflib.get_close_matches(arg.lstrip("-"), flags, n=2, cutoff=0.5)}
    listing = ", ".join(f"--{name}" for name in flags if name in close)
    return (f"did you mean {listing}? " if listing else "") + f"`{script_name()} --help` lists them all"


def script_name():
    return f"python {os.path.basename(sys.argv[0]) or 'gpt2.py'}"


def fire_command(values, text_flags=TEXT_FLAGS):
    """argv for fire: text flags as quoted Python strings (a repeated one as a list of them), which fire hands over
    exactly as typed."""
    return [f"--{name}={value!r}" if name in text_flags else f"--{name}={value}" for name, value in values.items()]


class Shown:
    """A default as --help should show it: fire prints "Type: Optional[...]" for every None default."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


HELP_TYPES = {"prompt": str, "n_tokens_to_generate": int, "model_size": str, "models_dir": str, "temperature": float,
              "top_k": int, "top_p": float, "seed": int, "num_samples": int, "stop_at_endoftext": bool,
              "prompt_file": str, "interactive": bool, "stop": str, "min_p": float, "repetition_penalty": float,
              "presence_penalty": float, "frequency_penalty": float, "no_repeat_ngram_size": int,
              "min_new_tokens": int,
              # train.py's
              "dataset": str, "out_name": str, "val_dataset": str, "text_column": str, "init_from": str,
              "n_layer": int, "n_head": int, "n_embd": int, "n_ctx": int, "block_size": int, "batch_size": int,
              "grad_accum": int, "max_steps": int, "learning_rate": float, "warmup_steps": int,
              "lr_decay_steps": int, "weight_decay": float, "grad_clip": float, "eval_every": int,
              "save_every": int, "patience": int, "sample_every": int, "sample_prompt": str, "sample_length": int,
              "sample_temperature": float, "sample_top_k": int, "resume": bool, "overwrite": bool,
              "recompute": bool}


def help_stub(main, positional="prompt"):
    """A function fire can show --help for: main's flags with their types, `positional` as the synopsis' positional
    argument, None defaults spelled out, a flag without a default shown as required (fire would list it as
    positional, which the command line refuses) and keyword-only parameters left out."""
    def stub(*args, **kwargs):
        pass

    parameters = []
    for name, p in flags_of(main).items():
        default = Shown("none") if p.default is None else p.default
        if default is inspect.Parameter.empty:
            default = Shown("required")
        if name == positional:
            default = inspect.Parameter.empty
        parameters.append(p.replace(default=default, annotation=HELP_TYPES.get(name, p.annotation)))
    stub.__signature__ = inspect.Signature(parameters)
    stub.__doc__ = main.__doc__
    stub.__name__ = main.__name__
    return stub


def utf8_stdout():
    """stdout in UTF-8, whatever the console's encoding (GPT-2 writes any character; a cp1252 stdout cannot take
    them all). A closed stdout (`>&-`) is refused before any work: the output would have nowhere to go."""
    check(sys.stdout is not None, "standard output is closed (>&-): there is nowhere to write the output")
    sys.stdout.reconfigure(encoding="utf-8")


@contextlib.contextmanager
def one_line_errors():
    """What every script does with a failure: one line on stderr and an exit code, never a traceback."""
    try:
        startup.hand_over()  # from here on, Ctrl-C is the KeyboardInterrupt below
        with warnings.catch_warnings():
            # NumPy warns of a float32 overflow in lines of its own; the scripts tell what came of one in their
            # line (logits or log-probabilities not finite, a training run diverged). The filter is the process's:
            # it holds in score.py's and the prefill's threads too.
            warnings.filterwarnings("ignore", "(overflow|invalid value) encountered", RuntimeWarning)
            yield
    except (utils.UsageError, utils.ModelError) as e:  # a bad argument exits with 2, a model that fails with 1
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2 if isinstance(e, utils.UsageError) else 1)
    except KeyboardInterrupt:  # downloads in flight keep only their .part files
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except MemoryError as e:  # a shape or batch too large for this machine
        # NumPy names the array it could not allocate; Python's own MemoryError (a list, a string) is empty
        cause = str(e) or "the input or the model is too large for this machine"
        sys.stderr.write(f"error: not enough memory: {cause}\n")
        sys.exit(1)
    except BrokenPipeError:  # the reader of stdout has gone (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or exiting would flush to it once more
        sys.exit(EXIT_BROKEN_PIPE)
    except OSError as e:  # one that nothing above names: standard output on a full disk (> /dev/full), say
        sys.stderr.write(f"error: {': '.join(str(part) for part in (e.filename, e.strerror or e) if part)}\n")
        sys.exit(1)


def show_help(main, short_flags=None):
    """fire's help for main, on stdout (asked-for help is output), with only the one-letter flags of the script's
    own table: fire offers a letter for every flag whose first letter is unique, which the command line refuses."""
    import fire

    text, short_flags = io.StringIO(), short_flags or {}
    try:
        with contextlib.redirect_stderr(text), contextlib.redirect_stdout(text):
            fire.Fire(main, command=["--", "--help"])  # after "--": no "INFO: Showing help" line; exits 0
    finally:
        print(re.sub(r"^(\s*)-(\w), --(\w+)", lambda m: m.group(0) if short_flags.get(m.group(2)) == m.group(3)
                     else f"{m.group(1)}--{m.group(3)}", text.getvalue(), flags=re.MULTILINE), end="", flush=True)


def asks_for_help(argv):
    return any(arg in ("-h", "--help") for arg in argv[:argv.index("--") if "--" in argv else len(argv)])


def run(main, argv=None, short_flags=None):
    """The whole command line: `python script.py [PROMPT] [--flag value ...]`, exit codes 0, 1, 2, 130 or 141."""
    import fire

    argv = sys.argv[1:] if argv is None else argv
    with one_line_errors():
        utf8_stdout()
        if asks_for_help(argv):
            return show_help(help_stub(main), short_flags)
        values = parse_argv(argv, main, short_flags=short_flags)
        if "prompt" not in values and flags_of(main)["prompt"].default is inspect.Parameter.empty:
            raise utils.UsageError(f'give a prompt ("" to generate unconditionally); {script_name()} --help for more')
        fire.Fire(lambda **kwargs: call_main(main, kwargs), command=fire_command(values))


def run_script(main, text_flags, positional=None, argv=None, short_flags=None):
    """The command line of train.py and score.py, checked as gpt2.py's is: unknown flags are refused before
    anything runs (fire would run main first, then complain), text flags stay text, errors are one line."""
    import fire

    argv = sys.argv[1:] if argv is None else argv
    with one_line_errors():
        utf8_stdout()
        if asks_for_help(argv):
            return show_help(help_stub(main, positional), short_flags)
        values = parse_argv(argv, main, positional, short_flags)
        missing = [name for name, p in flags_of(main).items() if p.default is inspect.Parameter.empty
                   and name not in values]
        check(not missing, f"{', '.join('--' + name for name in missing)} {'is' if len(missing) == 1 else 'are'} "
                           f"required; {script_name()} --help lists every flag")
        fire.Fire(lambda **kwargs: main(**kwargs), command=fire_command(values, text_flags))


def call_main(main, kwargs):
    check_arguments(**kwargs)  # before main runs: gpt2_pico's main checks nothing itself
    if "stream" in inspect.signature(main).parameters:
        main(**kwargs, stream=True)
    else:
        print(main(**kwargs))


# ---- interactive mode ----

class LineTooLong(utils.UsageError):
    pass


def read_line(tty, max_bytes=None):
    """The next prompt from standard input, without its newline; None at the end of input. A piped line of more
    than max_bytes raises LineTooLong once it has been skipped, a block at a time, without keeping it."""
    if not tty:
        limit = -1 if max_bytes is None else max_bytes + 1
        line = sys.stdin.buffer.readline(limit)
        if max_bytes is not None and len(line) > max_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = sys.stdin.buffer.readline(1 << 16)
            raise LineTooLong(f"the prompt is more than {max_bytes} bytes, more than the model's context can hold")
        if not line:
            return None
        # "\r\n" too: a file saved on Windows ends its lines so, and the "\r" would be a token of the prompt
        return line.decode("utf-8").removesuffix("\n").removesuffix("\r").removeprefix("\ufeff")  # (a BOM: no text)
    # input() edits the line with readline only when stdin and stdout are terminals, and readline writes the
    # prompt and the echo to stdout. stdout is for the continuations, so it points at stderr for the moment.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        return input(INTERACTIVE_PROMPT)
    except EOFError:
        return None
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def prompt_loop(continue_prompt, max_bytes=None):
    """Continue prompt after prompt from standard input with the loaded model, until Ctrl-D or Ctrl-C at the
    prompt (status 0). continue_prompt(text) prints the continuation to stdout; a piped line longer than
    max_bytes is refused without being read whole."""
    check(sys.stdin is not None, "standard input is closed, so --interactive has no prompts to read")
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
        except ImportError:
            pass
    while True:
        try:
            line = read_line(tty, max_bytes)
        except KeyboardInterrupt:
            line = None
        except LineTooLong as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        except UnicodeDecodeError as e:
            print(f"error: the prompt is not UTF-8 text (byte {e.start} cannot be decoded)", file=sys.stderr)
            continue
        if line is None:
            if tty:
                print(file=sys.stderr)  # end the prompt's line
            return
        if not line:
            continue
        try:
            continue_prompt(line)
        except utils.UsageError as e:  # a prompt too long for the context: say so and ask again
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:  # stops this continuation only
            print(flush=True)
