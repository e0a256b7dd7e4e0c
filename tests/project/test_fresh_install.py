"""The README's quick start installs what it says, from a clean copy of the repository; and
`scripts/setup.sh` picks the torch build the README describes (with a stand-in for pip).

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

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
TEST_ONLY = {
    "deepspeed",
    "megatron-core",
    "transformers",
    "datasets",
    "triton",
    "torchao",
    "mpich",
    "mpi4py",
    "scipy",
    "matplotlib",
    "pytest",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _quick_start() -> str:
    text = README.read_text()
    start = text.index("## Quick start")
    return text[start : text.index("\n## ", start + 1)]


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


@pytest.mark.parametrize(
    "env, args, message",
    [
        ({"MESHFORGE_TORCH": "gpu"}, [], "MESHFORGE_TORCH must be auto, cpu, cuda, skip or a version"),
        ({}, ["--tests"], "usage: bash scripts/setup.sh [--test]"),
    ],
)
def test_setup_refuses_a_bad_choice_before_installing(env, args, message, tmp_path):
    fake_python = tmp_path / "python"  # a pip that would record any install
    fake_python.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    fake_python.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup.sh"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": str(fake_python), **env},
        timeout=60,
    )
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "calls").exists()


FAKE_PYTHON = r"""#!/bin/bash
# stands in for python: records each call; pip's dry-run report says which build the index offers
echo "$*" >> "$CALLS"
if [ "$1" = -m ] && [[ " $* " == *" --dry-run "* ]]; then
  args=("$@"); for i in "${!args[@]}"; do [ "${args[$i]}" = --report ] && out=${args[$((i+1))]}; done
  echo "{\"install\": [{\"metadata\": {\"requires_dist\": [$REQUIRES]}}]}" > "$out"; exit 0
fi
[ "$1" = - ] && exec "$REAL_PYTHON" "$@"
[ "$1" = -c ] && echo "2.13.0 (fake)"
exit 0
"""
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize(
    "gpu, offered, env, args, torch_install, dry_run",
    [
        (False, "cuda", {}, [], f"-m pip install -q {CPU_INDEX} torch==2.13.0", True),  # PyPI on Linux: CUDA build
        (False, "cpu", {}, [], "-m pip install -q torch==2.13.0", True),  # the index holds a +cpu wheel
        (False, "cuda", {"MESHFORGE_TORCH_INDEX": "registry"}, [], "-m pip install -q torch==2.13.0", False),
        (True, "cuda", {}, [], "-m pip install -q torch==2.13.0", False),  # a GPU: the index's CUDA build
        (False, "cuda", {"MESHFORGE_TORCH": "cuda"}, [], "-m pip install -q torch==2.13.0", False),
        (False, "cuda", {"MESHFORGE_TORCH": "2.11.0"}, [], f"-m pip install -q {CPU_INDEX} torch==2.11.0", True),
        (False, "cuda", {"MESHFORGE_TORCH": "skip"}, ["--test"], None, False),
    ],
)
def test_setup_chooses_the_torch_build(tmp_path, gpu, offered, env, args, torch_install, dry_run):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    calls = tmp_path / "calls"
    path = os.pathsep.join(
        [str(bin_dir)] + [p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "nvidia-smi").exists()]
    )
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESHFORGE_TORCH")},
        "PATH": path,
        "PYTHON": str(fake),
        "CALLS": str(calls),
        "REAL_PYTHON": sys.executable,
        "REQUIRES": '"filelock", "nvidia-cublas-cu12==12.9.1.4"' if offered == "cuda" else '"filelock", "sympy"',
        **env,
    }
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup.sh"), *args], capture_output=True, text=True, env=full, timeout=60
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = calls.read_text().splitlines()
    installs = [c for c in lines if c.startswith("-m pip install") and "--dry-run" not in c]
    assert any("--dry-run" in c for c in lines) == dry_run
    assert [c for c in installs if "torch==" in c] == ([torch_install] if torch_install else [])
    if args:
        assert installs[-2].endswith("-e .[test]") and "deepspeed" in installs[-1]
    else:
        assert installs[-1].endswith("-e .") and not any("[test]" in c or "deepspeed" in c for c in installs)


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
    script = (
        f"set -euo pipefail\n{venv_line}\n{line} {short}\n"
        f"python - > {tmp_path / 'inventory.json'} <<'EOF'\n{_INVENTORY}\nEOF\n"
    )
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
