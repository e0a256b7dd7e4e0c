"""The README as a user reads it: code fences close, every `meshforge ...` command in a fence
parses (the CLI's own parser, plus its `--section.key value` overrides checked against the
config tree, without running anything), and relative links and backticked repository paths
point at files that exist. New sections are checked the same way, whatever they hold."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from meshforge.cli import build_parser, cmd_plan, cmd_train
from meshforge.config import ConfigError, JobConfig, parse_cli_overrides
from meshforge.config import _set as set_config_key
from meshforge.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
FENCE = re.compile(r"^\s*(```|~~~)")


def fenced_blocks(text: str) -> tuple[list[tuple[int, str, list[str]]], list[str]]:
    """([(first line number, info string, lines)], problems): fences must pair up, and a block
    holding a markdown heading is a fence someone forgot to close."""
    blocks, problems, current = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            if current is None:
                current = (number, line.strip().lstrip("`~").strip(), [])
            else:
                if line.strip().strip("`~"):
                    problems.append(f"line {number}: a closing fence with an info string ({line.strip()!r})")
                blocks.append(current)
                current = None
        elif current is not None:
            if re.match(r"#{1,6} \S", line) and current[1] in ("", "text", "markdown"):
                problems.append(f"line {number}: heading inside the code block opened at line {current[0]}")
            if re.match(r"## \S", line) and current[1] in ("bash", "sh", "shell", "console"):
                problems.append(f"line {number}: section heading inside the code block opened at line {current[0]}")
            current[2].append(line)
    if current is not None:
        problems.append(f"line {current[0]}: code fence never closed")
    return blocks, problems


def shell_commands(lines: list[str]) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, split at && ; |."""
    joined, out = "\n".join(lines).replace("\\\n", " "), []
    for line in joined.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        command: list[str] = []
        for tok in tokens + ["&&"]:
            if tok in ("&&", "||", ";", "|"):
                if command:
                    out.append(command)
                command = []
            else:
                command.append(tok)
    return out


def meshforge_argv(command: list[str]) -> list[str] | None:
    """The arguments after ``meshforge`` (``meshforge X``, ``python -m meshforge X``, ``torchrun ... -m meshforge X``)."""
    for i, tok in enumerate(command):
        if tok == "meshforge" and (i == 0 or command[i - 1] == "-m"):
            args = command[i + 1 :]
            # README notation: [optional] flags and "..." for "and the rest"
            return [a.strip("[]") for a in args if a not in ("...", "[...]")]
    return None


def check_command(argv: list[str]) -> str | None:
    """None if ``meshforge argv`` parses (no side effects), else why not."""
    parser = build_parser()
    inner = None
    if argv[:1] == ["launch"] and "--" in argv:
        cut = argv.index("--")
        argv, inner = argv[:cut], argv[cut + 1 :]
    try:
        args, rest = parser.parse_known_args(argv)
    except UsageError as e:
        return f"the CLI's parser refused it: {e}"
    if rest and args.func not in (cmd_train, cmd_plan):
        return f"unrecognized arguments {rest}"
    if rest:
        try:
            cfg = JobConfig()
            for key, value in parse_cli_overrides(rest):
                set_config_key(cfg, key, value, from_cli=True)
        except ConfigError as e:
            return f"bad override: {e}"
    return check_command(inner) if inner else None


def readme_problems(text: str) -> list[str]:
    blocks, problems = fenced_blocks(text)
    for start, info, lines in blocks:
        if info not in ("", "bash", "sh", "shell", "console"):
            continue
        for command in shell_commands(lines):
            argv = meshforge_argv(command)
            if argv is None or not argv:
                continue
            why = check_command(argv)
            if why:
                problems.append(f"block at line {start}: `meshforge {' '.join(argv)}`: {why}")
    return problems


def link_problems(text: str, base: Path) -> list[str]:
    """Relative markdown links, and backticked paths into the repository's own folders, that do not exist."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:|#", target):
            continue
        if not (base / target.split("#")[0]).exists():
            problems.append(f"link to {target}")
    for path in re.findall(r"`((?:meshforge|bench|docs|scripts|configs|tests|\.ci)/[A-Za-z0-9_./-]*)", text):
        path = path.split(":")[0]
        if "*" not in path and not (base / path).exists():
            problems.append(f"path {path}")
    return problems


def test_the_readme_fences_close_and_its_commands_parse():
    assert readme_problems(README.read_text()) == []


def test_the_readme_links_and_paths_exist():
    assert link_problems(README.read_text(), REPO) == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("```bash\nmeshforge train\n", "never closed"),
        ("```bash\nmeshforge train --config small\n## GPU check\n\n```bash\nls\n```\n", "section heading inside"),
        ("```bash\nmeshforge train --train.stepz 10\n```\n", "unknown config key 'train.stepz'"),
        ("```bash\nmeshforge train --train.steps ten\n```\n", "expected int"),
        ("```bash\nmeshforge generate --prompt hi\n```\n", "parser refused"),
        ("```bash\nmeshforge scaling fit d --approach 4\n```\n", "parser refused"),
        ("```bash\nmeshforge convert export --checkpoint a --output b --bogus\n```\n", "unrecognized"),
        ("```bash\nmeshforge launch --gpus-per-node 8 -- train --modle.dim 3\n```\n", "unknown config key"),
        ("```bash\ntorchrun --nproc-per-node 2 -m meshforge train --parallel.tpp 2\n```\n", "unknown config key"),
    ],
)
def test_the_checker_finds_each_kind_of_mistake(text, expected):
    problems = readme_problems(text)
    assert problems and expected in problems[0], problems


def test_the_checker_passes_good_commands_and_sees_missing_files(tmp_path):
    good = (
        "```bash\n# a comment\nmeshforge train --config small --train.steps 10 \\\n    --optim.lr 3e-3 && echo ok\n"
        "meshforge scaling fit sweeps/iso --approach all [--json]\nmeshforge plan --config small --gpus 8 "
        "--parallel.tp 2 | head\n```\n"
    )
    assert readme_problems(good) == []
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "here.md").write_text("x")
    text = "[ok](docs/here.md) [gone](docs/gone.md) [web](https://example.org) `docs/here.md` `bench/gone.py:f`"
    assert link_problems(text, tmp_path) == ["link to docs/gone.md", "path bench/gone.py"]
