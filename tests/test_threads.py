"""The BLAS thread count of decode steps: the decision logic (threads.choose), never timings of this machine."""
import collections

import gpt2
import threads
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


def test_a_default_of_one_thread_leaves_nothing_to_choose():
    """OPENBLAS_NUM_THREADS=1 (or any limit already set) is the user's choice: one count, never two."""
    with threads.blas_controller().limit(limits=1):
        assert threads.thread_choices() == [1]
        choice = threads.ThreadChoice()
        for _ in range(3):
            with choice.step():
                pass
        assert list(choice.timings) == [1]


def test_each_generate_call_chooses_afresh(tiny_model, monkeypatch):
    """What one call learned (perhaps beside a process that has since ended) is not carried into the next: every
    call's prefill and decode steps start from a new ThreadChoice, whose first step runs the default count. Kept
    for the process's life, a count found slower was retried only after up to 200 steps (stop 27's bench)."""
    from utils import load_encoder_hparams_and_params
    _, hparams, params = load_encoder_hparams_and_params(tiny_model.name, tiny_model.models_dir)
    seen = []  # (the choice, its step number, the count it picked) at each step
    real_step = threads.ThreadChoice.step

    def step(self, work=1):
        seen.append((self, self.steps, threads.choose(self.steps, self.timings, self.last_run, self.choices,
                                                      self.starved)))
        return real_step(self, work)
    monkeypatch.setattr(threads.ThreadChoice, "step", step)
    for _ in range(2):
        gpt2.generate([464, 3139], params, hparams["n_head"], 6)
    choices = list(dict.fromkeys(choice for choice, _, _ in seen))
    assert len(choices) == 4  # prefill and decode, per call
    for choice in choices:
        steps = [(number, count) for c, number, count in seen if c is choice]
        assert steps[0] == (0, choice.choices[0])
