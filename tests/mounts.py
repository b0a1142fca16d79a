"""Real file systems that fail the ways disks do: a full one (a small tmpfs) and a read-only one (a bind mount).
Mounting needs root (or CAP_SYS_ADMIN); without it the test is skipped and says why."""
import contextlib
import os
import subprocess

import pytest


def run_mount(*args):
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount here: {result.stderr.strip()}")


@contextlib.contextmanager
def small_disk(path, size):
    """An empty tmpfs of `size` ("4m") at path."""
    os.makedirs(path, exist_ok=True)
    run_mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def read_only(source, path):
    """The folder source, seen read-only at path."""
    os.makedirs(path, exist_ok=True)
    run_mount("--bind", str(source), str(path))
    try:
        run_mount("-o", "remount,ro,bind", str(path))
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
