"""Several processes on one models folder at once, as real processes against the loopback mirror: one downloads
or converts while the others wait for it and then use its result."""
import os
import subprocess
import sys
import threading
import time

import pytest
from filelock import FileLock

import gpt2
import utils
from tests.conftest import ROOT
from tests.loopback import serve_release

WAITING = "waiting for another process to finish"
TIMEOUT = 600  # seconds: generous, for a loaded 2-core machine; nothing here is timed


class Run:
    """`python gpt2.py Hello --n_tokens_to_generate 3` in its own process, its stderr watched line by line."""

    def __init__(self, models_dir, model_size, url="http://127.0.0.1:9"):
        code = "import utils; utils.RETRY_DELAY = 0; import gpt2; gpt2.cli()"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, "Hello", "--n_tokens_to_generate", "3", "--model_size", model_size,
             "--models_dir", str(models_dir)], cwd=ROOT, env={**os.environ, "GPT2_MODELS_URL": url},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr, self.waiting = [], threading.Event()
        self.reader = threading.Thread(target=self.read_stderr, daemon=True)
        self.reader.start()

    def read_stderr(self):
        for line in self.process.stderr:
            self.stderr.append(line)
            if WAITING in line:
                self.waiting.set()

    def wait_until_waiting(self):
        """True once the process says it waits for the lock; False if it ended first."""
        while not self.waiting.wait(timeout=0.2):
            if self.process.poll() is not None:
                self.reader.join()
                return self.waiting.is_set()
        return True

    def finish(self):
        stdout = self.process.stdout.read()
        self.process.wait(timeout=TIMEOUT)
        self.reader.join()
        return self.process.returncode, stdout, "".join(self.stderr)


@pytest.fixture(scope="module")
def expected_stdout(tiny_model):
    """What a lone run prints."""
    return gpt2.main("Hello", n_tokens_to_generate=3, model_size="tiny", models_dir=tiny_model.models_dir) + "\n"


@pytest.fixture
def server(tiny_model):
    srv = serve_release(tiny_model.path)
    srv.chunk_delay = 0.005  # about 1 s for the 13 MB data file: transfers overlap with the other processes
    yield srv
    srv.resume.set()
    srv.shutdown()


def run_three_at_once(model_dir, model_size, url="http://127.0.0.1:9"):
    """Three CLI runs started while this test holds the model's lock, released only once all three wait for it:
    they then surely run at the same time, however loaded the machine."""
    os.makedirs(os.path.dirname(model_dir), exist_ok=True)
    with FileLock(utils.lock_path(model_dir)):
        runs = [Run(os.path.dirname(model_dir), model_size, url) for _ in range(3)]
        waited = [run.wait_until_waiting() for run in runs]
    results = [run.finish() for run in runs]
    assert waited == [True] * 3, results
    return results


def leftovers(folder):
    return [name for _, dirs, files in os.walk(folder) for name in dirs + files
            if name.endswith(".part") or ".tmp" in name]


def test_three_first_runs_at_once_download_each_file_once(tmp_path, server, expected_stdout):
    model_dir = tmp_path / "models" / "124M"
    for code, stdout, stderr in run_three_at_once(model_dir, "124M", server.url):
        assert code == 0 and "Traceback" not in stderr, stderr
        assert stdout == expected_stdout
    assert sorted(server.names_requested()) == sorted(utils.RELEASE_FILES)  # each file once
    assert not leftovers(tmp_path)
    assert sorted(os.listdir(model_dir)) == sorted([*utils.RELEASE_FILES, utils.CONVERTED])  # no lock inside


def test_three_first_warm_starts_at_once_convert_once(tmp_path, tiny_model, expected_stdout):
    model_dir = tmp_path / "models" / "tiny"
    os.makedirs(model_dir)
    for name in utils.RELEASE_FILES:
        os.link(os.path.join(tiny_model.path, name), model_dir / name)  # downloaded, never converted
    for code, stdout, stderr in run_three_at_once(model_dir, "tiny"):
        assert code == 0 and "Traceback" not in stderr, stderr
        assert stdout == expected_stdout
    assert not leftovers(tmp_path)
    assert os.path.isfile(model_dir / utils.CONVERTED / "manifest.json")


def test_download_killed_midway_then_a_normal_run_succeeds(tmp_path, server, expected_stdout):
    server.faults = {utils.DATA: ["pause"]}  # half the data file, then the server waits
    killed = Run(tmp_path, "124M", server.url)
    assert server.paused.wait(timeout=TIMEOUT), killed.finish()
    partial = tmp_path / "124M" / (utils.DATA + ".part")
    while not (partial.exists() and partial.stat().st_size >= 1 << 20):  # the client wrote the first MiB
        assert killed.process.poll() is None, killed.finish()
        time.sleep(0.1)
    killed.process.kill()  # SIGKILL: no cleanup of any kind, its lock still "held" as it dies
    killed.finish()
    server.resume.set()
    code, stdout, stderr = Run(tmp_path, "124M", server.url).finish()
    assert code == 0 and stdout == expected_stdout, stderr
    assert WAITING not in stderr  # the dead process's lock did not block
    data_requests = [rng for name, rng in server.requests if name == utils.DATA]
    assert len(data_requests) == 2 and data_requests[1] is not None  # resumed where the killed one stopped
    assert not leftovers(tmp_path)


HOLD = """
import sys, utils
with utils.exclusive(sys.argv[1]):
    print("holding", flush=True)
    sys.stdin.read()
"""


def test_exclusive_refuses_a_folder_another_process_writes(tmp_path, tiny_model):
    run1 = str(tmp_path / "run1")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run1], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(utils.UsageError, match=f"^another process is writing {run1}$"):
            with utils.exclusive(run1):
                pass
    finally:
        holder.kill()  # dies holding it
        holder.wait(timeout=TIMEOUT)
    with utils.exclusive(run1):  # the OS released the dead process's lock
        os.makedirs(run1)
        for name in utils.RELEASE_FILES:
            os.link(os.path.join(tiny_model.path, name), os.path.join(run1, name))
    assert sorted(os.listdir(tmp_path)) == [".run1.writer.lock", "run1"]
    assert utils.local_models(str(tmp_path)) == ["run1"]  # the lock file is no model, and not inside one
