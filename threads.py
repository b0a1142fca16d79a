"""How many BLAS threads a decode step uses: whichever count the last steps measured fastest.

A decode step multiplies one vector by every weight, a memory-bound product. On a quiet 2-core machine two
BLAS threads stream the weights faster than one; beside another CPU-bound process, two threads wait on each
other for a core (OpenBLAS spins at every hand-over) and a step takes about 3x as long as with one thread. No
rule decided in advance is right in both cases, and the load average lags by a minute, so the steps time
themselves: each count is tried on one step, the fastest is kept, and each other count gets a step again now and
then (the slower it was, the more rarely), so a machine that gets busy (or quiet) mid-run is followed. Prefill and scoring, which are
compute-bound matrix products, keep the default.

Without threadpoolctl (or a BLAS it knows), there is one choice, the default, and nothing changes.
"""
import collections
import contextlib
import functools
import time

TRIAL_BUDGET = 0.01  # what retrying the slower counts may cost, as a share of the decode time
MIN_INTERVAL = 8  # steps between two trials of one count, however close the counts' speeds
MAX_INTERVAL = 200  # however slow a count was, it is tried again within this many steps: the machine may be quiet now
KEEP = 3  # a count's speed is the best of its last KEEP steps: noise only ever adds time


@functools.lru_cache(maxsize=1)
def blas_controller():
    """threadpoolctl's handle on the BLAS NumPy loaded, or None."""
    try:
        import numpy  # noqa: F401  (threadpoolctl finds only the libraries already loaded)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    controller = ThreadpoolController().select(user_api="blas")
    return controller if controller.lib_controllers else None


def thread_choices():
    """The counts to choose from: one thread, and the default (which honours OPENBLAS_NUM_THREADS and the like)."""
    controller = blas_controller()
    if controller is None:
        return [None]  # the default, whatever it is
    default = max(lib.num_threads for lib in controller.lib_controllers)
    return sorted({1, default}, reverse=True)  # the default first


def choose(step, timings, last_run, choices, budget=TRIAL_BUDGET):
    """The thread count for decode step `step` (0, 1, ...). timings: {count: its recent step times in seconds};
    last_run: {count: the last step it ran}. Each count runs once first; then the fastest runs, and each other
    count again only when enough steps have passed that retrying it costs at most `budget` of the time: a count
    r times slower than the fastest costs r - 1 steps' time, so it waits (r - 1) / budget steps (busy machine,
    r about 3: 200 steps; quiet, r about 1.3: 30), at most MAX_INTERVAL."""
    for count in choices:
        if not timings.get(count):
            return count
    speed = {count: min(timings[count]) for count in choices}
    fastest = min(choices, key=speed.get)
    for count in choices:
        wait = min(MAX_INTERVAL, max(MIN_INTERVAL, (speed[count] / speed[fastest] - 1) / budget))
        if count != fastest and step - last_run[count] >= wait:
            return count
    return fastest


class DecodeThreads:
    """Times each decode step run through `step()` and sets the BLAS thread count of the next one."""

    def __init__(self, choices=None):
        self.choices = choices or thread_choices()
        self.timings = collections.defaultdict(lambda: collections.deque(maxlen=KEEP))
        self.last_run = {}
        self.steps = 0

    @contextlib.contextmanager
    def step(self):
        count = choose(self.steps, self.timings, self.last_run, self.choices)
        controller = blas_controller()
        limit = controller.limit(limits=count) if controller is not None and count is not None \
            else contextlib.nullcontext()
        with limit:
            start = time.perf_counter()
            yield
            self.timings[count].append(time.perf_counter() - start)
        self.last_run[count] = self.steps
        self.steps += 1
