"""The README's quick start installs what it says, from a clean copy of the repository.

The slow test (CI runs it as its own step, `.ci/run`) copies the tracked files into a new
directory, runs the README's venv line and quick-start line there -- `meshforge train` cut to
a few steps -- and compares the new venv's packages with the README's list: meshforge, the
packages the README names (which must be pyproject's dependencies) and their own
dependencies, nothing else; without a GPU, torch's CPU build. Only pip's configured index is
used (``MESHFORGE_TORCH_INDEX=registry`` unless the environment sets it otherwise).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TEST_ONLY = {"deepspeed", "megatron-core", "transformers", "datasets", "triton", "torchao", "mpich", "mpi4py",
             "scipy", "matplotlib", "pytest"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _quick_start() -> str:
    text = README.read_text()
    start = text.index("## Quick start")
    return text[start:text.index("\n## ", start + 1)]


def readme_install_lines() -> tuple[str, str]:
    """(the venv line, the quick-start command line) as the README gives them."""
    section = _quick_start()
    venv = re.search(r"\(`(python3 -m venv [^`]+)`\)", section).group(1)
    fence = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    return venv, fence


def readme_packages() -> set[str]:
    """The packages the README says the quick start installs (besides meshforge and their dependencies)."""
    section = _quick_start()
    m = re.search(r"the packages training needs:\s*(.+?)\s+and their own dependencies", section, re.S)
    assert m, "the README's quick start must say which packages it installs ('the packages training needs: ...')"
    return {_norm(n) for n in re.findall(r"`([A-Za-z0-9_.-]+)`", m.group(1))}


def core_dependencies() -> set[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_norm(re.match(r"[A-Za-z0-9_.-]+", d).group(0)) for d in deps}


def test_readme_names_exactly_the_core_dependencies():
    assert readme_packages() == core_dependencies()
    assert not core_dependencies() & TEST_ONLY


def test_readme_install_lines_are_the_script():
    venv, line = readme_install_lines()
    assert venv.startswith("python3 -m venv .venv")
    assert line == "bash scripts/setup.sh && meshforge train"


@pytest.mark.parametrize("env, args, message", [
    ({"MESHFORGE_TORCH": "gpu"}, [], "MESHFORGE_TORCH must be auto, cpu, cuda, skip or a version"),
    ({}, ["--tests"], "usage: bash scripts/setup.sh [--test]"),
])
def test_setup_refuses_a_bad_choice_before_installing(env, args, message, tmp_path):
    fake_python = tmp_path / "python"  # a pip that would record any install
    fake_python.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n")
    fake_python.chmod(0o755)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(fake_python), **env}, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "calls").exists()


# run inside the new venv: its distributions, and the closure of meshforge's requirements
_INVENTORY = r"""
import importlib.metadata as md, json, re
from pip._vendor.packaging.requirements import Requirement
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
dists = {norm(d.metadata["Name"]): d for d in md.distributions()}
def requires(name):
    out = set()
    for r in dists[name].requires or []:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.add(norm(req.name))
    return out
closure, todo = set(), ["meshforge"]
while todo:
    name = todo.pop()
    if name not in closure:
        closure.add(name)
        todo += sorted(requires(name) & dists.keys())
import torch
print(json.dumps({"installed": sorted(dists), "closure": sorted(closure), "direct": sorted(requires("meshforge")),
                  "torch": torch.__version__, "cuda": torch.version.cuda}))
"""


def _gpu_present() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and "GPU" in subprocess.run([smi, "-L"], capture_output=True, text=True).stdout


@pytest.mark.slow
def test_fresh_clone_quick_start_installs_what_the_readme_says(tmp_path):
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / rel)
    venv_line, line = readme_install_lines()
    short = "--train.steps 2 --train.eval_interval 0 --checkpoint.interval 2 --optim.warmup_steps 1"
    script = (f"set -euo pipefail\n{venv_line}\n{line} {short}\n"
              f"python - > {tmp_path / 'inventory.json'} <<'EOF'\n{_INVENTORY}\nEOF\n")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(sys.prefix))
    env.setdefault("MESHFORGE_TORCH_INDEX", "registry")
    env["MESHFORGE_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (clone / "runs" / "small" / "checkpoints" / "step_00000002" / "meta.json").exists()
    inv = json.loads((tmp_path / "inventory.json").read_text())
    assert set(inv["direct"]) == readme_packages()
    extra = set(inv["installed"]) - set(inv["closure"]) - {"pip", "setuptools", "wheel"}
    assert not extra, f"installed beyond meshforge and the README's packages: {sorted(extra)}"
    assert not set(inv["installed"]) & TEST_ONLY
    if not _gpu_present():
        assert inv["cuda"] is None, f"no GPU here, yet torch {inv['torch']} is a CUDA build"
        assert not [n for n in inv["installed"] if n.startswith("nvidia-")]
