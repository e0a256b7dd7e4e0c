"""`meshforge scaling plan` says how long its runs take: each row's steps and time on a named
device (the planner's time model, or a measured rate) and the total in GPU-hours."""

from __future__ import annotations

import re

import pytest

from meshforge.cli import main as cli_main
from meshforge.scaling.estimate import Estimator, format_duration

PLAN = [
    "scaling",
    "plan",
    "--kind",
    "tokens",
    "--sizes",
    "2e5,8e5",
    "--tokens",
    "4e6,1.6e7",
    "--set",
    "model.dim=64",
    "--set",
    "model.n_heads=4",
    "--set",
    "model.ffn_multiple_of=16",
]
H100_BF16 = 989e12


def _plan(tmp_path, capsys, *extra: str) -> tuple[list[dict], str]:
    import json

    out = tmp_path / "sweep"
    assert cli_main([*PLAN, "--output", str(out), *extra]) == 0
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    return rows, capsys.readouterr().out


def _times(text: str) -> list[str]:
    return re.findall(r"steps=([\d,]+) ~(.+)$", text, re.M)


def test_each_row_gets_its_steps_and_a_time_and_the_plan_a_total(tmp_path, capsys):
    """On one H100 with no per-step cost and ``--efficiency 0.5``, a run's time is its FLOPs at 50% of the
    bf16 peak (one GPU: no communication); the total is the sum; a note says small steps make these lower
    bounds."""
    rows, text = _plan(tmp_path, capsys, "--gpu", "h100-80gb", "--efficiency", "0.5")
    est = Estimator("h100-80gb", 1, efficiency=0.5)
    seconds = [est.row(r).seconds for r in rows]
    for r, s in zip(rows, seconds):
        assert s == pytest.approx(r["flops"] / (0.5 * H100_BF16), rel=0.02)
    shown = _times(text)
    assert [int(s.replace(",", "")) for s, _ in shown] == [r["steps"] for r in rows]
    assert [t for _, t in shown] == [format_duration(s) for s in seconds]
    total = re.search(
        r"estimated: ([\d,]+) steps, (.+) one run after another, ([\d.,]+) GPU-hours, on 1 x H100-80GB", text
    )
    assert int(total.group(1).replace(",", "")) == sum(r["steps"] for r in rows)
    assert total.group(2) == format_duration(sum(seconds))
    assert "note: 4 of 4 runs model under 10 ms per step" in text


def test_default_efficiency_is_the_planners(tmp_path, capsys):
    """Without ``--efficiency`` a row's step is ``meshforge plan``'s for the same layout: compute priced op by op
    at the row's shapes, slower than a flat 0.5 for these small widths."""
    from meshforge.config import config_from_dict
    from meshforge.plan.devices import get_device
    from meshforge.plan.planner import layout_of_config
    from meshforge.plan.time_model import estimate_time

    rows, text = _plan(tmp_path, capsys, "--gpu", "h100-80gb")
    assert "with compute priced op by op at each run's shapes" in text
    for r in rows:
        cfg = config_from_dict(r["config"])
        planned = estimate_time(cfg, layout_of_config(cfg, 1), get_device("h100-80gb"), 1).step_s
        assert Estimator("h100-80gb", 1).row(r).model_step_s == pytest.approx(planned)
        assert planned > Estimator("h100-80gb", 1, efficiency=0.5).row(r).model_step_s


def test_a_measured_rate_gpus_and_per_step_cost(tmp_path, capsys):
    rows, text = _plan(tmp_path, capsys, "--tokens-per-s", "20000")
    assert [t for _, t in _times(text)] == [format_duration(r["D"] / 20000) for r in rows]
    assert "at a measured 20,000 tokens/s" in text and "note:" not in text
    one = [Estimator("h100-80gb", 1).row(r) for r in rows]
    eight = [Estimator("h100-80gb", 8).row(r) for r in rows]
    for a, b in zip(one, eight):  # 8 GPUs: the compute split 8 ways, FSDP's communication added
        assert b.gpu_hours == pytest.approx(b.seconds * 8 / 3600) and b.gpu_hours >= a.gpu_hours * 0.999
    slow = [Estimator("h100-80gb", 1, step_overhead_s=0.02).row(r) for r in rows]
    for r, a, s in zip(rows, one, slow):
        assert s.seconds == pytest.approx(a.seconds + 0.02 * r["steps"])
    cpu = Estimator("cpu", 1)  # the CPU's measured per-step cost is counted by default
    assert cpu.row(rows[0]).seconds == pytest.approx(rows[0]["steps"] * (cpu.row(rows[0]).model_step_s + 0.032))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--gpu", "h1000"], "unknown device 'h1000'"),
        (["--gpus", "0"], "--gpus (GPUs per run) must be at least 1"),
        (["--efficiency", "1.5"], "--efficiency must be in (0, 1]"),
        (["--tokens-per-s", "nan"], "--tokens-per-s must be a positive rate"),
        (["--step-overhead-ms", "-1"], "--step-overhead-ms must be 0 or more"),
        (
            ["--gpus", "3"],
            "--gpus 3: the estimate runs each row on 3 device(s) in the layout of its config, which "
            "refuses: train.global_batch_size (16) does not divide",
        ),
    ],
)
def test_bad_estimate_options_are_refused_before_writing(tmp_path, capsys, extra, message):
    out = tmp_path / "sweep"
    assert cli_main([*PLAN, "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshforge: error:") and message in err and "\n" not in err
    assert not out.exists()
