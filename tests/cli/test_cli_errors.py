"""argparse's own errors (a bad value, a missing or unknown argument, an unknown subcommand) are, in every
subcommand, the one ``meshforge: error: ...`` line with exit status 2 of every other bad input: no usage
block, and the line names the argument and the subcommand's --help."""

from __future__ import annotations

import pytest

from meshforge.cli import main

CASES = [
    # (id, argv, fragments of the one line)
    (
        "negative number taken for an option",
        ["scaling", "plan", "--budgets", "-1e15", "--output", "x"],
        ["argument --budgets: expected one argument", "written --budgets=VALUE", "`meshforge scaling plan --help`"],
    ),
    (
        "invalid choice",
        ["scaling", "plan", "--kind", "zz", "--output", "x"],
        ["argument --kind: invalid choice: 'zz'", "`meshforge scaling plan --help`"],
    ),
    ("no subcommand", [], ["the following arguments are required: command", "`meshforge --help`"]),
    ("unknown subcommand", ["nosuch"], ["invalid choice: 'nosuch'", "`meshforge --help`"]),
    ("unknown nested subcommand", ["convert", "nosuch"], ["invalid choice: 'nosuch'", "`meshforge convert --help`"]),
    (
        "required option missing",
        ["generate", "--prompt", "x"],
        ["the following arguments are required: --checkpoint", "`meshforge generate --help`"],
    ),
    ("value missing", ["train", "--config"], ["argument --config: expected one argument", "`meshforge train --help`"]),
    (
        "not an int",
        ["data", "prepare", "--tokenizer", "t", "--output", "o", "--workers", "x"],
        ["argument --workers: invalid int value: 'x'", "`meshforge data prepare --help`"],
    ),
    (
        "positional missing",
        ["convert", "inspect"],
        ["the following arguments are required: path", "`meshforge convert inspect --help`"],
    ),
    (
        "unknown argument",
        ["generate", "--checkpoint", "c", "--prompt", "p", "--extra"],
        ["unrecognized arguments: --extra", "`meshforge generate --help`"],
    ),
    ("plan", ["plan", "--gpus", "many"], ["argument --gpus", "`meshforge plan --help`"]),
    ("launch", ["launch", "--nodes", "two"], ["argument --nodes", "`meshforge launch --help`"]),
    (
        "tokenizer train",
        ["tokenizer", "train", "--input", "a.txt"],
        ["required: --vocab-size", "`meshforge tokenizer train --help`"],
    ),
]


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parser_errors_are_one_line_with_exit_status_2(argv, fragments, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("meshforge: error: ") and err.count("\n") == 1, err
    assert "usage:" not in err and all(f in err for f in fragments), err


def test_help_still_exits_0_with_the_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["scaling", "plan", "--help"])
    assert e.value.code == 0 and "usage: meshforge scaling plan" in capsys.readouterr().out
