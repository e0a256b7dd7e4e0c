"""`meshforge scaling run`: rows as `meshforge train` subprocesses, results appended per row, an
interrupted sweep resumed (finished rows skipped, a partial row resumed from its checkpoint), a
failed row recorded while the sweep goes on, and the SLURM job array written."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from meshforge.config import config_from_dict, load_config
from meshforge.pretrain.trainer import Trainer
from meshforge.scaling.plan import PlanSpec, write_plan
from meshforge.scaling.run import pending_rows, read_results, run_local, toml_text, write_slurm_array


def tiny_sweep(tmp_path: Path, data_dir: Path) -> Path:
    sweep = tmp_path / "sweep"
    spec = PlanSpec(
        "tokens",
        sweep,
        "tiny-test",
        {"data.path": str(data_dir), "train.eval_batches": 1},
        sizes=[2e4],
        tokens=[1536, 2560, 3584],
        min_steps=2,
    )
    rows, _ = write_plan(spec)
    assert [r["steps"] for r in rows] == [6, 10, 14]
    bad = json.loads(json.dumps(rows[0]))  # a row whose data is missing: it must fail, alone
    bad["id"] = "bad_data"
    bad["config"]["data"]["path"] = str(tmp_path / "no-such-data")
    bad["config"]["train"]["output_dir"] = str(sweep / "runs" / "bad_data")
    with (sweep / "sweep.jsonl").open("a") as f:
        f.write(json.dumps(bad) + "\n")
    return sweep


def test_job_toml_round_trips_the_config():
    import tomllib

    cfg = load_config("tiny-test", {"optim.lr": 1e-05, "train.sample_prompt": 'say "hi"\n'})
    from meshforge.config import config_to_dict

    assert config_from_dict(tomllib.loads(toml_text(config_to_dict(cfg)))) == cfg


def test_interrupted_sweep_resumes_skipping_finished_rows(tiny_data, tmp_path):
    sweep = tiny_sweep(tmp_path, tiny_data)
    rows = [json.loads(line) for line in (sweep / "sweep.jsonl").read_text().splitlines()]
    first = run_local(sweep, max_runs=1, log=lambda *_: None)  # then "interrupted"
    assert [r["id"] for r in first] == [rows[0]["id"]] and first[0]["status"] == "ok"
    done_metrics = (sweep / "runs" / rows[0]["id"] / "metrics.jsonl").read_text()
    # row 1 was cut off after 5 of its 10 steps: a checkpoint at step 5
    partial = config_from_dict(rows[1]["config"])
    partial.train.steps = 5
    Trainer(partial).run()

    results = run_local(sweep, log=lambda *_: None)
    assert [r["id"] for r in results] == [r["id"] for r in rows[1:]]  # the finished row is skipped
    assert (sweep / "runs" / rows[0]["id"] / "metrics.jsonl").read_text() == done_metrics
    log = (sweep / "runs" / rows[1]["id"] / "train.log").read_text()
    assert "resuming from" in log and "step_00000005" in log
    table = read_results(sweep / "results.csv")
    assert [table[r["id"]]["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert "no-such-data" in table["bad_data"]["error"] or "not" in table["bad_data"]["error"]
    for r in rows[:3]:
        got = table[r["id"]]
        assert int(got["N"]) == r["N"] and int(got["D"]) == r["D"] and float(got["flops"]) == r["flops"]
        assert 0 < float(got["loss"]) < float(got["init_loss"]) and float(got["tokens_per_s"]) > 0
        assert float(got["wall_s"]) > 0 and got["val_loss"] == got["loss"]
    assert len((sweep / "results.csv").read_text().splitlines()) == 1 + 4  # one row per run, header once
    steps = [line.split(",")[0] for line in (sweep / "curves.csv").read_text().splitlines()[1:]]
    assert steps.count(rows[2]["id"]) == 14 and steps.count(rows[1]["id"]) == 10
    assert [r["id"] for _, r in pending_rows(sweep, rows)] == ["bad_data"]  # the next run retries the failure only


def test_slurm_array_script_covers_the_pending_rows(tiny_data, tmp_path):
    sweep = tiny_sweep(tmp_path, tiny_data)
    opts = argparse.Namespace(
        nodes=1,
        gpus_per_node=2,
        cpu=True,
        partition="debug",
        time="01:00:00",
        account=None,
        job_name="ladder",
        cpus_per_task=4,
        sbatch_arg=[],
        parallel=2,
    )
    path, indices = write_slurm_array(sweep, opts)
    script = path.read_text()
    assert indices == [0, 1, 2, 3]
    assert "#SBATCH --array=0,1,2,3%2" in script and "#SBATCH --ntasks-per-node=2" in script
    assert f"scaling run {sweep.resolve()} --array-task" in script and "srun" in script
    assert "#SBATCH --partition=debug" in script and "scontrol requeue" in script
