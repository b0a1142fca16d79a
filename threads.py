"""How many BLAS threads a decode step uses: whichever count the last steps measured fastest; and work shared
out over the cores (at the end): training's elementwise work (on_every_core), scoring's windows
(side_by_side), a prompt's parts (in_turns).

A decode step multiplies one vector by every weight, a memory-bound product. On a quiet 2-core machine two
BLAS threads stream the weights faster than one; beside another CPU-bound process, two threads wait on each
other for a core (OpenBLAS spins at every hand-over) and a step takes about 3x as long as with one thread. No
rule decided in advance is right in both cases, and the load average lags by a minute, so the steps time
themselves: the default count runs until its threads get less CPU time than they had wall time (another process
holds a core), then one thread is tried, the faster is kept, and the other gets a step again now and then (the
slower it was, the more rarely), so a machine that gets busy (or quiet) mid-run is followed. A prompt of
one chunk and scoring batches not side by side, compute-bound matrix products, choose the same way: beside a
CPU-bound process a 256-position forward pass took 5.9 s on one thread and 18.4 s on two. What a count
measured is kept for the life of the process (a call starts from what the last one learned), but a count not run
for MAX_AGE seconds runs again at the next step: what it measured beside a process that has since ended says
nothing about the machine now.

Without threadpoolctl (or a BLAS it knows), there is one choice, the default, and nothing changes.
"""
import collections
import contextlib
import functools
import math
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

TRIAL_BUDGET = 0.01  # what retrying the slower counts may cost, as a share of the decode time
MIN_INTERVAL = 8  # steps between two trials of one count, however close the counts' speeds
MAX_INTERVAL = 200  # however slow a count was, it is tried again within this many steps: the machine may be quiet now
MAX_AGE = 30.0  # ... and within this many seconds, however few steps ran since (between calls, say)
STARVED = 0.75  # the default count is starved when its threads got less than this share of a core each
KEEP = 3  # a count's speed is the best of its last KEEP steps: noise only ever adds time
FIRST_TRIAL = 3  # steps a count other than the default runs when first tried: the first steps after a change to
# fewer threads are slowed by the thread just stopped, which spins on for a while (OpenBLAS: about 0.1 s). Beside a
# CPU-bound process the first two one-thread steps took 49-64 ms, the later ones 29-31 ms: judged on those two,
# a call went back to two threads (40-48 ms a step) for the rest of its tokens


@functools.lru_cache(maxsize=1)
def blas_controller():
    """threadpoolctl's handle on the BLAS NumPy loaded, or None."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    controller = ThreadpoolController().select(user_api="blas")
    return controller if controller.lib_controllers else None


def limit(count):
    """A context in which BLAS runs every product on `count` threads (None: its default); without threadpoolctl,
    the default."""
    controller = blas_controller()
    if controller is None or count is None or all(lib.num_threads == count for lib in controller.lib_controllers):
        return contextlib.nullcontext()  # already so: each decode step asks, and setting it costs two BLAS calls
    return controller.limit(limits=count)


def thread_choices():
    """The counts to choose from: one thread, and the default (which honours OPENBLAS_NUM_THREADS and the like)."""
    controller = blas_controller()
    if controller is None:
        return [None]  # the default, whatever it is
    default = max(lib.num_threads for lib in controller.lib_controllers)
    return sorted({1, default}, reverse=True)  # the default first


def choose(step, timings, last_run, choices, starved, stale=(), budget=TRIAL_BUDGET):
    """The thread count for step `step` (0, 1, ...). choices: the counts, the default first; timings: {count: its
    recent step times}; last_run: {count: the last step it ran}; starved: whether the default's last step got
    fewer cores than it has threads (another process holds one); stale: the counts that last ran MAX_AGE seconds
    ago or more.

    The default runs until it is starved; then each other count runs FIRST_TRIAL steps, and from then on the
    fastest runs, each other count again only when enough steps have passed that retrying it costs at most
    `budget` of the time: a count r times slower than the fastest costs r - 1 steps' time, so it waits
    (r - 1) / budget steps (busy machine, r about 3: 200 steps; quiet, r about 1.3: 30), at most MAX_INTERVAL;
    a stale count runs again at once."""
    untried = [count for count in choices if len(timings.get(count, ())) < (1 if count == choices[0] else FIRST_TRIAL)]
    if choices[0] in untried or (untried and not starved):
        return choices[0]
    if untried:
        return untried[0]
    speed = {count: min(timings[count]) for count in choices}
    fastest = min(choices, key=speed.get)
    for count in choices:
        wait = min(MAX_INTERVAL, max(MIN_INTERVAL, (speed[count] / speed[fastest] - 1) / budget))
        if count != fastest and (step - last_run[count] >= wait or count in stale):
            return count
    return fastest


class ThreadChoice:
    """Times each step of one kind of work run through `step()` and sets the BLAS thread count of the next."""

    def __init__(self, choices=None):
        self.choices = choices or thread_choices()
        self.timings = collections.defaultdict(lambda: collections.deque(maxlen=KEEP))
        self.last_run = {}
        self.last_run_at = {}  # {count: time.perf_counter() at the end of its last step}
        self.steps = 0
        self.starved = False
        self.cleared = False  # the default's timings were dropped at its last step, which was starved

    @contextlib.contextmanager
    def step(self, work=1):
        """work: how much the step does (positions, say), so that steps of different sizes compare per unit."""
        now = time.perf_counter()
        stale = [count for count, at in self.last_run_at.items() if now - at >= MAX_AGE]
        if self.cleared and self.steps - self.last_run[self.choices[0]] >= MIN_INTERVAL:  # (see below)
            stale.append(self.choices[0])
        count = choose(self.steps, self.timings, self.last_run, self.choices, self.starved, stale)
        with limit(count):
            start, cpu_start = time.perf_counter(), time.process_time()
            yield
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if count == self.choices[0] and count is not None:  # waiting BLAS threads spin, so a core of ours counts
            starved = cpu < STARVED * count * wall  # as busy unless another process has it
            # The machine just got busy: the default's earlier, faster steps say nothing of it now (kept, they won
            # the default back for two slow steps or more after one thread's trial). Judged on one starved step
            # alone, though, it runs again within MIN_INTERVAL steps (above), not up to MAX_INTERVAL: a load spike
            # of a few steps must not hold one thread for long.
            self.cleared = starved and not self.starved
            if self.cleared:
                self.timings[count].clear()
            self.starved = starved
        self.timings[count].append(wall / work)
        self.last_run[count], self.last_run_at[count] = self.steps, time.perf_counter()
        self.steps += 1


CHOICES = {}  # one per kind of work, kept for the life of the process: the next call starts from what it learned
ADAPT = True  # False: every step runs with the default count (bench.py, to time what that gives)


def choice(kind):
    """The ThreadChoice of one kind of work ("decode", "prefill", "score"): steps of one kind are alike."""
    if not ADAPT:
        return ThreadChoice(choices=[None])
    if kind not in CHOICES:
        CHOICES[kind] = ThreadChoice()
    return CHOICES[kind]


# Training's elementwise work and attention, shared out over the cores (train.py). The cores this process may
# run on (taskset, a container's cpuset), not all the machine has: a thread more than cores only waits its turn.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
POOL = ThreadPoolExecutor(CORES)


def on_every_core(fn, *arrays, block_bytes=1 << 20):
    """fn(*arrays), for an fn that treats each index of the arrays' first axis on its own (an elementwise formula
    over rows, attention head by head), computed a block of that axis at a time by one thread per core; fn's
    result (an array or a tuple of arrays) is joined back along the first axis.

    Why: NumPy runs an elementwise formula on one core, and each of its steps makes a fresh array the size of the
    activations; OpenBLAS splits every small attention product over both cores, whose threads then wait for each
    other (10x slower beside another busy process). Here each thread takes whole blocks, BLAS runs on one thread
    per block, NumPy releases the GIL inside each operation, and a block's temporaries stay in the CPU's cache."""
    n_blocks = CORES * math.ceil(arrays[0].nbytes / (block_bytes * CORES))  # every core gets as many
    rows = max(1, math.ceil(len(arrays[0]) / n_blocks))
    starts = range(0, len(arrays[0]), rows)
    with limit(1):  # BLAS on the calling thread: the pool already keeps every core busy
        results = list(POOL.map(lambda start: fn(*(a[start:start + rows] for a in arrays)), starts))
    if isinstance(results[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*results))
    return np.concatenate(results)


def side_by_side(fn, items, stop=None):
    """Yields fn(item) for each item, in order, computed by CORES threads of their own side by side, each taking
    the next item when it is done and running BLAS on itself alone; for items that are whole pieces of work
    (score.py's windows) with small results.

    Why: a forward pass through BLAS's own threads runs only its matrix products on every core; the elementwise
    work between them (GELU, softmax, layer norms, a third of scoring) runs on one, while the other core's BLAS
    thread spins, waiting for the next product. Whole items side by side keep every core busy with all of it:
    on two cores, scoring 5000 tokens went from 254-281 to 291-316 tok/s (alternating rounds). A caller that
    stops reading (an error, Ctrl-C) waits for the items in flight, and no more are taken: a program that exits
    while a thread is still inside OpenBLAS hangs or crashes in OpenBLAS's exit handler (6% of Ctrl-Cs, when these
    threads were left running), and a thread cannot be stopped safely from outside. stop: an Event set when the
    caller stops reading, before the threads are waited for; an fn that watches it can end early."""
    items = list(items)
    todo = enumerate(items)
    take = threading.Lock()  # one thread at a time takes the next item
    done = queue.SimpleQueue()  # (index, result, exception) as each item is done, in any order
    stop = stop or threading.Event()  # the caller stopped reading: take no more items

    running, ended = [min(CORES, len(items))], threading.Condition()  # how many workers have not ended yet

    def work():
        try:
            while not stop.is_set():
                with take:
                    index, item = next(todo, (None, None))
                if index is None:
                    return
                try:
                    done.put((index, fn(item), None))
                except BaseException as e:  # the caller sees it in the item's turn
                    done.put((index, None, e))
        finally:
            with ended:
                running[0] -= 1
                ended.notify_all()

    with limit(1):
        for _ in range(running[0]):
            threading.Thread(target=work, daemon=True, name="side_by_side").start()
        arrived = {}
        try:
            for index in range(len(items)):
                while index not in arrived:
                    i, result, error = done.get()
                    arrived[i] = result, error
                result, error = arrived.pop(index)
                if error is not None:
                    raise error
                yield result
        finally:
            stop.set()
            wait_through_ctrl_c(ended, lambda: running[0] == 0)  # every thread out of BLAS before the limit is lifted


def wait_through_ctrl_c(ended, all_ended):
    """Waits until all_ended() (true under the Condition ended, which each worker notifies as it ends), though Ctrl-C
    is pressed again meanwhile: the first one is what brought the caller here, and a second that cut the wait short
    let the program exit with a thread inside BLAS (a crash in OpenBLAS's exit handler, 2 of 12 double Ctrl-Cs while
    scoring). Not Thread.join: on Python 3.11 a join cut short by Ctrl-C marks a thread that still runs as ended,
    so joining it again returns at once. The Ctrl-C is raised once every worker has ended."""
    interrupted = None
    while not sys.is_finalizing():  # (threads no longer run then: it would wait for ever)
        try:
            with ended:
                if ended.wait_for(all_ended, timeout=1):
                    break
        except KeyboardInterrupt as e:
            interrupted = e
    if interrupted is not None:
        raise interrupted


class Stopped(Exception):
    """Raised in an item of in_turns whose caller stopped reading: what it computes would never be read."""


def in_turns(fn, n_items, shared):
    """Yields fn(i, turns) for i = 0 .. n_items - 1, in order, the items side by side as in side_by_side, where
    turns[j] is shared[j] as item i appends to it, once: its append() waits until item i - 1's has been made (item
    0's never waits). A caller that stops reading waits for the appends in progress only.

    Why: a prompt's parts go through the blocks side by side, one part per core. Part i's attention in block j
    reads the keys and values of the parts before it, so block j's cache must take the parts in prompt order,
    and that is all part i has to wait for: it can run block j while part i - 1 is still in it, once part i - 1
    has appended. (Waiting for part i - 1 to leave the block, the second core lagged a whole block behind.)"""
    appended = [0] * len(shared)  # appended[j]: the items before this number are done with shared[j]
    changed = threading.Condition()

    class Stop(threading.Event):  # set when the caller stops reading; wakes the items waiting for a turn
        def set(self):
            super().set()
            with changed:
                changed.notify_all()
    stopped = Stop()

    class Turn:
        def __init__(self, i, j):
            self.i, self.j, self.taken = i, j, False

        def wait(self):
            with changed:
                changed.wait_for(lambda: appended[self.j] == self.i or stopped.is_set())
            if stopped.is_set():
                raise Stopped()

        def done(self):
            self.taken = True
            with changed:
                appended[self.j] = self.i + 1
                changed.notify_all()

        def append(self, *args):
            self.wait()
            try:
                return shared[self.j].append(*args)
            finally:
                self.done()

    def run(i):
        turns = [Turn(i, j) for j in range(len(shared))]
        try:
            return fn(i, turns)
        finally:  # an item that failed or stopped passes its turns in order, so the ones after it do not wait for ever
            for turn in turns:
                if not turn.taken:
                    try:
                        turn.wait()
                    except Stopped:
                        break
                    turn.done()
    return side_by_side(run, range(n_items), stop=stopped)
