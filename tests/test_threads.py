"""The BLAS thread count of decode steps: the decision logic (threads.choose), never timings of this machine; and
work side by side on threads of its own (threads.side_by_side, threads.in_turns): order, errors, stopping."""
import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

import gpt2
import threads
from tests.conftest import ROOT
from threads import choose


def run(step_seconds, n_steps, choices=(2, 1), busy=lambda step: False):
    """The counts choose picks over n_steps when a step at count c takes step_seconds(step)[c] (a fake clock) and
    the default's threads are starved on the steps where busy(step)."""
    timings, last_run, picked = collections.defaultdict(lambda: collections.deque(maxlen=threads.KEEP)), {}, []
    starved = False
    for step in range(n_steps):
        count = choose(step, timings, last_run, list(choices), starved)
        timings[count].append(step_seconds(step)[count])
        last_run[count] = step
        if count == choices[0]:
            starved = busy(step)
        picked.append(count)
    return picked


def test_quiet_machine_runs_the_default_and_never_tries_one_thread():
    assert run(lambda step: {2: 0.030, 1: 0.040}, 300) == [2] * 300


def test_a_starved_default_tries_one_thread_next():
    assert run(lambda step: {2: 0.300, 1: 0.100}, 3, busy=lambda step: True) == [2, 1, 1]


def test_starved_but_faster_default_keeps_running_and_retries_one_thread_within_the_budget():
    picked = run(lambda step: {2: 0.030, 1: 0.040}, 300, busy=lambda step: True)  # two threads 1.33x faster
    trials = picked[2:].count(1)
    assert picked[:2] == [2, 1] and 1 <= trials and trials * (0.040 / 0.030 - 1) <= 300 * threads.TRIAL_BUDGET * 1.5


def test_a_slow_first_step_on_one_thread_does_not_send_the_choice_back_to_two():
    """After a change to one thread the thread just stopped still spins, so the first steps are slow: one thread
    is judged on its best of three, and the choice stays there (judged on the first two, it went back to two
    threads for the rest of a call)."""
    def seconds(step):  # steps 1 and 2 are the first on one thread (step 0, the default's, is starved)
        return {2: 0.300, 1: 0.500 if step in (1, 2) else 0.100}
    picked = run(seconds, 60, busy=lambda step: True)
    assert picked[:4] == [2, 1, 1, 1] and picked[4:].count(1) >= 55


def test_busy_machine_moves_to_one_thread_and_retries_the_default_within_the_budget():
    picked = run(lambda step: {2: 0.300, 1: 0.100}, 500, busy=lambda step: True)  # two threads 3x slower
    trials = picked[2:].count(2)
    assert 1 <= trials and trials * (3 - 1) <= 500 * threads.TRIAL_BUDGET * 1.5  # the retries' cost, in steps


def test_follows_the_machine_when_it_gets_busy_and_quiet_again():
    def busy(step):
        return 100 <= step < 600

    def seconds(step):
        return {2: 0.300, 1: 0.100} if busy(step) else {2: 0.030, 1: 0.040}
    picked = run(seconds, 1000, busy=busy)
    assert picked[:100] == [2] * 100  # quiet: two threads
    assert picked[400:600].count(1) > 190  # busy: one, found within a few steps of the change
    assert picked[600 + threads.MAX_INTERVAL + 10:].count(2) > 180  # quiet again: back to two, after one retry


def run_thread_choice(monkeypatch, busy, n_steps=200):
    """The counts a real ThreadChoice picks on a fake clock, quiet (2 threads 30 ms a step, 1 thread 40 ms) or,
    where busy(step), beside a process holding a core (300 ms and 100 ms, the default's threads starved)."""
    clock = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(threads, "time", types.SimpleNamespace(perf_counter=lambda: clock["wall"],
                                                               process_time=lambda: clock["cpu"]))
    picked = []
    monkeypatch.setattr(threads, "limit", lambda count: picked.append(count) or contextlib.nullcontext())
    choice = threads.ThreadChoice(choices=[2, 1])
    for step in range(n_steps):
        with choice.step():
            count = picked[-1]
            seconds = ({2: 0.300, 1: 0.100} if busy(step) else {2: 0.030, 1: 0.040})[count]
            clock["wall"] += seconds
            clock["cpu"] += seconds * (1 if busy(step) else count)  # beside the other process, one core of ours
    return picked


def test_a_default_starved_after_quiet_steps_is_judged_on_its_starved_step_alone(monkeypatch):
    """The quiet steps' fast timings say nothing of a machine that just got busy; kept among the default's last
    KEEP, they sent the choice back to the starved default for KEEP - 1 more slow steps after one thread's trial
    (decode beside a CPU hog at 76% to 89% of one thread over 40 tokens, bench.py). Judged on one starved step,
    the default is tried once more after MIN_INTERVAL steps, then rarely."""
    picked = run_thread_choice(monkeypatch, busy=lambda step: step >= 100)
    assert picked[:100] == [2] * 100
    retry = 100 + threads.MIN_INTERVAL
    assert picked[100:] == [2] + [1] * (retry - 101) + [2] + [1] * (199 - retry)  # 3x slower: next try far off


def test_a_load_spike_of_a_few_steps_does_not_hold_one_thread_for_long(monkeypatch):
    picked = run_thread_choice(monkeypatch, busy=lambda step: 100 <= step < 104)
    retry = 100 + threads.MIN_INTERVAL
    assert picked[:retry] == [2] * 101 + [1] * (retry - 101)
    assert picked[retry:retry + 30] == [2] * 30  # quiet again: two threads, found on the first retry (before
    # this retry, one starved step made one thread look 3x faster, and it ran until MAX_INTERVAL)


def test_one_choice_is_all_there_is():
    assert run(lambda step: {None: 0.01}, 5, choices=(None,), busy=lambda step: True) == [None] * 5


def test_decode_steps_restore_the_default_count_after_each_step(tiny_model):
    from utils import load_encoder_hparams_and_params
    _, hparams, params = load_encoder_hparams_and_params(tiny_model.name, tiny_model.models_dir)
    controller = threads.blas_controller()
    before = [lib.num_threads for lib in controller.lib_controllers]
    out = gpt2.generate([464, 3139], params, hparams["n_head"], 6)
    assert [lib.num_threads for lib in controller.lib_controllers] == before
    assert out == gpt2.generate([464, 3139], params, hparams["n_head"], 6)
    assert threads.thread_choices()[0] == max(before) and 1 in threads.thread_choices()


def test_a_limit_to_the_count_blas_runs_already_leaves_blas_alone(monkeypatch):
    controller = threads.blas_controller()
    current = max(lib.num_threads for lib in controller.lib_controllers)
    calls = []
    monkeypatch.setattr(type(controller), "limit",
                        lambda self, limits: calls.append(limits) or contextlib.nullcontext())
    with threads.limit(current), threads.limit(None):  # every decode step on the default count asks for this
        pass
    assert calls == []
    with threads.limit(current + 1):
        pass
    assert calls == [current + 1]


def test_a_default_of_one_thread_leaves_nothing_to_choose():
    """OPENBLAS_NUM_THREADS=1 (or any limit already set) is the user's choice: one count, never two."""
    with threads.blas_controller().limit(limits=1):
        assert threads.thread_choices() == [1]
        choice = threads.ThreadChoice()
        for _ in range(3):
            with choice.step():
                pass
        assert list(choice.timings) == [1]


def test_a_count_found_slow_is_tried_again_once_its_measurement_is_old():
    """One thread chosen while another process held a core, then the machine quiet: after MAX_AGE seconds the
    default runs again at once, however few steps have passed (kept per step count alone, stop 27's bench found
    a long-lived process on one thread at 59% of two threads' speed), and wins back on its new timing."""
    picked = run(lambda step: {2: 0.300, 1: 0.100}, 30, busy=lambda step: True)
    assert picked[-10:] == [1] * 10  # settled on one thread, the default's next trial far off
    timings, last_run = {2: [0.300], 1: [0.100] * 3}, {2: 0, 1: 29}
    assert choose(30, timings, last_run, [2, 1], starved=True) == 1
    assert choose(30, timings, last_run, [2, 1], starved=True, stale=[2]) == 2
    timings[2].append(0.030)  # quiet now
    assert choose(31, timings, last_run, [2, 1], starved=False) == 2


def test_a_thread_choice_sees_which_counts_are_stale(monkeypatch):
    choice = threads.ThreadChoice(choices=[2, 1])
    choice.timings.update({2: collections.deque([0.300]), 1: collections.deque([0.100] * 3)})
    choice.last_run.update({2: 0, 1: 10})
    choice.steps, choice.starved = 11, True
    ran = []
    monkeypatch.setattr(threads, "limit", lambda count: ran.append(count) or contextlib.nullcontext())
    now = threads.time.perf_counter()
    choice.last_run_at.update({2: now, 1: now})
    with choice.step():
        pass
    choice.last_run_at[2] = now - threads.MAX_AGE
    with choice.step():
        pass
    assert ran == [1, 2]


def test_side_by_side_yields_in_order_what_finished_out_of_order(monkeypatch):
    """Item 0 finishes only after item 1 has run: that needs two threads at once, and the results still come
    in the items' order."""
    monkeypatch.setattr(threads, "CORES", 2)
    second_ran = threading.Event()

    def fn(item):
        if item == 0:
            assert second_ran.wait(timeout=30), "item 1 never ran beside item 0"
        if item == 1:
            second_ran.set()
        return item * 10
    assert list(threads.side_by_side(fn, range(5))) == [0, 10, 20, 30, 40]


def test_side_by_side_runs_blas_on_one_thread_per_item_and_restores_the_default():
    controller = threads.blas_controller()
    before = [lib.num_threads for lib in controller.lib_controllers]
    if max(before) == 1:
        pytest.skip("BLAS runs on one thread already (OPENBLAS_NUM_THREADS=1 or one core)")
    seen = list(threads.side_by_side(lambda item: [lib.num_threads for lib in controller.lib_controllers], range(3)))
    assert seen == [[1] * len(before)] * 3
    assert [lib.num_threads for lib in controller.lib_controllers] == before


def failing_at(bad):
    """An identity function that raises on the item `bad`."""
    def fn(item):
        if item == bad:
            raise ValueError(f"item {bad} failed")
        return item
    return fn


def test_side_by_side_raises_an_items_error_in_its_turn(monkeypatch):
    monkeypatch.setattr(threads, "CORES", 2)
    results = threads.side_by_side(failing_at(2), range(6))
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(ValueError, match="item 2 failed"):
        next(results)


def side_by_side_threads():
    return [t for t in threading.enumerate() if t.name == "side_by_side"]


def test_a_caller_that_stops_reading_waits_for_the_items_in_flight_and_takes_no_more(monkeypatch):
    """close() (what an error or Ctrl-C in the caller does) returns once the items in flight are done, with no
    side_by_side thread left (none is inside BLAS when the program goes on or exits), and none took another."""
    monkeypatch.setattr(threads, "CORES", 2)
    started, finished = [], []

    def fn(item):
        started.append(item)
        if item:
            time.sleep(0.2)
        finished.append(item)
        return item
    results = threads.side_by_side(fn, range(100))
    assert next(results) == 0  # meanwhile the two threads have taken items 1 and 2, or are about to
    results.close()
    assert not side_by_side_threads()
    assert 0 in started and set(started) <= {0, 1, 2} and sorted(finished) == sorted(started)
    assert max(lib.num_threads for lib in threads.blas_controller().lib_controllers) == threads.thread_choices()[0]


def test_a_second_ctrl_c_while_the_caller_waits_for_the_items_in_flight_still_waits_for_them(monkeypatch):
    """Ctrl-C twice: the first stops the caller reading (close()), the second lands while close() waits for the
    item in flight. close() still returns only once that item is done, no thread left (a program exiting with one
    inside BLAS crashed in OpenBLAS's exit handler), and then raises the second Ctrl-C."""
    monkeypatch.setattr(threads, "CORES", 2)
    stop, main, finished = threading.Event(), threading.main_thread().ident, []

    def fn(item):
        if item:  # still running when the caller stops reading
            assert stop.wait(timeout=60)
            signal.pthread_kill(main, signal.SIGINT)  # the second Ctrl-C, into the caller's wait
            time.sleep(0.3)
        finished.append(item)
        return item
    def deadline(*_):  # not a KeyboardInterrupt, which the wait holds back: a wait that never ends fails the test
        raise TimeoutError("close() still waiting after 60 s")
    previous = signal.signal(signal.SIGALRM, deadline)
    signal.alarm(60)
    try:
        results = threads.side_by_side(fn, range(2), stop=stop)
        assert next(results) == 0
        with pytest.raises(KeyboardInterrupt):
            results.close()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert sorted(finished) == [0, 1] and not side_by_side_threads()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_cores_are_those_the_process_may_run_on():
    """Under taskset (or a container's cpuset) to one CPU, work is not shared out over cores it cannot use."""
    program = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); import threads; print(threads.CORES)"
    run = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert run.stdout.split() == ["1"], run.stderr
    assert threads.CORES == len(os.sched_getaffinity(0))


def test_ctrl_c_ends_the_program_cleanly_after_the_items_in_flight():
    """A real SIGINT while items run: the program ends with KeyboardInterrupt, neither hanging nor crashing (a
    program exiting while a thread is still inside OpenBLAS can do either in OpenBLAS's exit handler)."""
    program = ("import os, signal, threading, time, threads\n"
               "threading.Timer(1, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C in a second\n"
               "list(threads.side_by_side(lambda item: time.sleep(0.5), range(100)))\n")
    run = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert run.returncode == -signal.SIGINT and run.stderr.rstrip().endswith("KeyboardInterrupt"), run.stderr


def within(seconds, fn):
    """fn() on a thread of its own, failing the test if it has not returned in time (a turn that never comes
    would otherwise hang the test run); fn's own exception is raised here."""
    outcome = []

    def run():
        try:
            outcome.append((fn(), None))
        except BaseException as e:  # raised below, in the test's thread
            outcome.append((None, e))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert outcome, f"still waiting after {seconds} s: an item waits for a turn that never comes"
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


class Appended(list):
    """Stands in for a block's KV cache: it records who appended, in what order."""

    def append(self, item):
        super().append(item)
        return item


def test_ctrl_c_ends_the_program_cleanly_while_items_wait_for_their_turns():
    """A real SIGINT while item 0 runs and item 1 waits for its turn: the program ends with KeyboardInterrupt
    within the deadline (item 1's wait is woken; item 0 stops at its next turn)."""
    program = ("import os, signal, threading, time, threads\n"
               "class Shared:\n"
               "    def append(self, item): time.sleep(0.2)\n"
               "threading.Timer(1, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C in a second\n"
               "list(threads.in_turns(lambda i, turns: [turn.append(i) for turn in turns], 4, [Shared()] * 200))\n")
    run = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert run.returncode == -signal.SIGINT and run.stderr.rstrip().endswith("KeyboardInterrupt"), run.stderr


def test_in_turns_an_item_appends_only_after_the_one_before_and_waits_for_nothing_else(monkeypatch):
    """Each shared object takes the items in order; and item 1 appends to the first while item 0, done with it,
    has not yet appended to the second (waiting for item 0 to be done with more would hang here)."""
    monkeypatch.setattr(threads, "CORES", 2)
    shared, second_appended = [Appended(), Appended(), Appended()], threading.Event()

    def fn(i, turns):
        for j, turn in enumerate(turns):
            assert turn.append(i) == shared[j][i], f"item {i} appended to {j} out of turn"
            if (i, j) == (1, 0):
                second_appended.set()
            if (i, j) == (0, 0):
                assert second_appended.wait(timeout=30), "item 1 did not append while item 0 was between turns"
        return i
    assert within(60, lambda: list(threads.in_turns(fn, 5, shared))) == [0, 1, 2, 3, 4]
    assert shared == [[0, 1, 2, 3, 4]] * 3


def test_in_turns_an_items_error_is_raised_and_the_items_after_it_keep_their_turns(monkeypatch):
    """Item 1 fails before its first append: item 2 goes on (while item 0 still runs), but never appends before
    item 0 has, and nothing is left waiting."""
    monkeypatch.setattr(threads, "CORES", 3)
    shared, third_went_on = [Appended(), Appended()], threading.Event()

    def fn(i, turns):
        if i == 1:
            raise ValueError("item 1 failed")
        for j, turn in enumerate(turns):
            turn.append(i)
            if (i, j) == (2, 0):
                third_went_on.set()
            if (i, j) == (0, 0):
                assert third_went_on.wait(timeout=30), "item 2 waited on the failed item 1"
                time.sleep(0.1)  # item 2 would append to shared[1] now, were item 1's turns given up at once
        return i
    results = threads.in_turns(fn, 3, shared)
    assert within(60, lambda: next(results)) == 0
    with pytest.raises(ValueError, match="item 1 failed"):
        within(60, lambda: next(results))
    within(60, results.close)
    assert not side_by_side_threads()  # none left waiting on item 1
    assert shared[0] == [0, 2] and shared[1] in ([0], [0, 2])  # item 2 may have stopped before its second turn


def test_in_turns_a_caller_that_stops_reading_stops_the_items_in_flight_at_their_next_turn(monkeypatch):
    """Item 0 fails at once and the caller stops: item 1 stops at its next turn without taking it, and item 2,
    already waiting for item 1's turn, is woken to stop too (it would wait for ever)."""
    monkeypatch.setattr(threads, "CORES", 3)
    shared = [Appended() for _ in range(100)]

    def fn(i, turns):
        if i == 0:
            raise ValueError("item 0 failed")
        for turn in turns:
            if i == 1:
                time.sleep(0.2)  # item 2 is waiting for this turn when the caller stops
            turn.append(i)
        return i
    with pytest.raises(ValueError, match="item 0 failed"):
        within(60, lambda: next(threads.in_turns(fn, 3, shared)))
    assert not side_by_side_threads()
    assert sum(map(len, shared)) <= 2  # of 200: they stopped (a turn each only if the caller took 0.2 s to stop)
