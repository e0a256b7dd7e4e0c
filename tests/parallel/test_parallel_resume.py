"""Checkpoints move between layouts, and a mis-sized mesh fails before any process group."""

import shutil

import pytest

from meshforge.cli import main as cli_main
from parallel_harness import PARITY_ARGS, assert_parity, read_result, run_ranks


def _train(data, out, world, *extra):
    run_ranks(world, ["train", *PARITY_ARGS, "--data.path", str(data), "--train.output_dir", str(out), *extra])


def test_fsdp2_checkpoint_resumes_in_one_process(tiny_data, single_process_ref, tmp_path):
    out = tmp_path / "run"
    _train(tiny_data, out, 2, "--checkpoint.interval", "5")
    shutil.rmtree(out / "checkpoints" / "step_00000010")
    _train(tiny_data, out, 1, "--checkpoint.interval", "5")  # resumes at step 5 with dp = 1
    assert_parity(single_process_ref, read_result(out))


def test_single_process_checkpoint_resumes_on_hsdp(tiny_data, single_process_ref, tmp_path):
    out = tmp_path / "run"
    _train(tiny_data, out, 1, "--checkpoint.interval", "5")
    shutil.rmtree(out / "checkpoints" / "step_00000010")
    _train(tiny_data, out, 4, "--checkpoint.interval", "5", "--parallel.dp_replicate", "2")
    assert_parity(single_process_ref, read_result(out))


@pytest.mark.parametrize(
    "world, args, message",
    [
        (3, ["--parallel.dp_shard", "2"], "= 2 but the world size is 3"),
        (6, ["--parallel.tp", "4"], "world size 6 does not divide by pp*dp_replicate*cp*tp = 1*1*1*4 = 4"),
    ],
)
def test_mis_sized_mesh_fails_before_process_groups(world, args, message, tiny_data, tmp_path, monkeypatch, capsys):
    # World size 3 or 6 with nobody else running: creating a process group would hang, so
    # returning at all proves the check came first.
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    code = cli_main(
        ["train", "--config", "tiny-test", "--data.path", str(tiny_data), "--train.output_dir", str(out), *args]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
