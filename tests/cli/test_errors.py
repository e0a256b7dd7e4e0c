"""Bad input and a failing environment end in one line naming what to do, before anything is
written: config values, the device, the launcher's variables, a read-only output dir, a full
disk during a checkpoint, a damaged checkpoint (resume and generate), token ids beyond the
model's vocabulary, and options of the data-parallel backend a job does not use."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from meshforge.cli import main as cli_main
from meshforge.config import ConfigError, load_config
from meshforge.data_pipeline.errors import DataError
from meshforge.errors import LaunchError, MeshforgeError, OutputError, UsageError
from meshforge.launch.setup import SetupError
from meshforge.pretrain.checkpoint import CheckpointError, list_checkpoints, read_meta
from meshforge.pretrain.faults import CollectiveError, TrainingDiverged
from meshforge.pretrain.run_lock import OutputDirBusy
from meshforge.tokenizers import TokenizerError

QUICK = ("--train.steps", "4", "--train.eval_interval", "0", "--train.sample_prompt", "", "--checkpoint.interval", "2")


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", "tiny-test", "--data.path", str(data), "--train.output_dir", str(out), *extra]


def fails(capsys, argv: list[str], *fragments: str, status: int = 2) -> str:
    assert cli_main(argv) == status
    err = capsys.readouterr().err
    assert err.startswith("meshforge: error: ") and err.count("\n") == 1, f"expected one line: {err!r}"
    for f in fragments:
        assert f in err, err
    return err


def tree_digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_every_project_error_has_the_one_base_class():
    for cls in (
        ConfigError,
        DataError,
        CheckpointError,
        TokenizerError,
        TrainingDiverged,
        CollectiveError,
        LaunchError,
        OutputError,
        SetupError,
        UsageError,
        OutputDirBusy,
    ):
        assert issubclass(cls, MeshforgeError), cls
    assert CollectiveError.exit_status == 1 and ConfigError.exit_status == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (("--optim.lr", "-0.001"), "optim.lr must be a positive number, got -0.001"),
        (("--optim.lr", "nan"), "optim.lr must be a finite number, got nan"),
        (("--optim.lr", "0"), "optim.lr must be a positive number, got 0.0 (0 would never change the weights)"),
        (("--optim.grad_clip", "inf"), "optim.grad_clip must be a finite number"),
        (("--parallel.zero_stage", "3"), "parallel.zero_stage = 3 is a setting of parallel.dp_backend = 'deepspeed'"),
        (
            ("--parallel.offload_optimizer", "cpu"),
            "parallel.offload_optimizer = 'cpu' is a setting of parallel.dp_backend",
        ),
        (
            ("--parallel.nvme_path", "/tmp"),
            "parallel.nvme_path = '/tmp' is a setting of parallel.dp_backend = 'deepspeed'",
        ),
        (
            ("--parallel.dp_backend", "deepspeed", "--parallel.param_dtype", "bf16"),
            "parallel.param_dtype = 'bf16' is a setting of parallel.dp_backend = 'fsdp2'",
        ),
        (("--model.vocab_size", "-1"), "model.vocab_size must be >= 0"),
        (("--model.vocab_multiple_of", "0"), "model.vocab_multiple_of must be positive"),
    ],
)
def test_bad_settings_are_one_line_before_anything_is_written(args, message, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    fails(capsys, train_args(tiny_data, out, *args), message)
    assert not out.exists()


def test_each_backend_accepts_its_own_options_and_the_defaults():
    load_config(
        "tiny-test", {"parallel.dp_backend": "deepspeed", "parallel.zero_stage": 3, "parallel.offload_optimizer": "cpu"}
    )
    load_config(
        "tiny-test",
        {
            "parallel.fsdp_cpu_offload": True,
            "parallel.fsdp_reshard_after_forward": False,
            "parallel.param_dtype": "fp32",
        },
    )
    load_config("tiny-test", {"parallel.dp_backend": "deepspeed"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    fails(capsys, train_args(tiny_data, out, "--train.device", "cuda"), "train.device = 'cuda'", "no CUDA device")
    assert not out.exists()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MESHFORGE_LAUNCHER": "pbs"}, "MESHFORGE_LAUNCHER='pbs': expected one of torchrun, slurm, mpi, none"),
        ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
        ({"RANK": "3", "WORLD_SIZE": "2"}, "rank 3 is outside world size 2"),
    ],
)
def test_bad_launcher_environment(env, message, tiny_data, tmp_path, capsys, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    fails(capsys, train_args(tiny_data, out), message)
    assert not out.exists()


def test_read_only_output_dir(tiny_data, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: let the file system refuse as it would for a user
        real_open = os.open

        def refusing_open(path, flags, *a, **k):
            if str(path).startswith(str(parent)) and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(os, "open", refusing_open)
    fails(
        capsys,
        train_args(tiny_data, parent / "run"),
        f"the output dir {parent / 'run'} (to be created in {parent}) cannot be written: permission denied (EACCES)",
        "choose a train.output_dir this user can write to",
    )
    assert list(parent.iterdir()) == []


def test_full_disk_during_a_checkpoint_says_so_and_keeps_the_last_one(tiny_data, tmp_path, capsys, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    real = fs._write_item

    def write_item(transforms, stream, *a, **k):
        if "step_00000004" in str(getattr(stream, "name", "")):
            raise OSError(errno.ENOSPC, "No space left on device", stream.name)
        return real(transforms, stream, *a, **k)

    monkeypatch.setattr(fs, "_write_item", write_item)
    out = tmp_path / "run"
    err = fails(
        capsys,
        train_args(tiny_data, out, *QUICK),
        "writing checkpoint step_00000004",
        "no space left on the device (ENOSPC)",
        "free space there",
        "the newest complete checkpoint, step_00000002, is intact",
    )
    assert "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]  # the partial write is gone


@pytest.fixture(scope="module")
def two_checkpoints(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpts") / "run"
    assert cli_main(train_args(tiny_data, out, *QUICK)) == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002", "step_00000004"]
    return out


def _damaged_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    newest = dst / "checkpoints" / "step_00000004"
    if how == "truncated":
        victim = sorted(newest.glob("*.distcp"))[0]
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
    else:  # garbage of the same size
        victim = newest / ".metadata"
        victim.write_bytes(os.urandom(victim.stat().st_size))
    return victim


@pytest.mark.parametrize("how, says", [("truncated", "(truncated)"), ("garbage", "does not match the sha256")])
def test_damaged_newest_checkpoint_fails_naming_the_file_and_the_way_out(
    how, says, tiny_data, two_checkpoints, tmp_path, capsys
):
    out = tmp_path / "run"
    victim = _damaged_copy(two_checkpoints, out, how)
    before = tree_digest(out)
    older = out / "checkpoints" / "step_00000002"
    fails(
        capsys,
        train_args(tiny_data, out, *QUICK),
        f"checkpoint {victim.parent} is damaged: {victim}",
        says,
        f"intact: step_00000002: use one with --checkpoint.resume_from {older}",
    )
    assert tree_digest(out) == before  # nothing touched
    fails(
        capsys,
        ["generate", "--checkpoint", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "2"],
        f"{victim}",
        says,
        f"--checkpoint {older}",
    )
    assert cli_main(["generate", "--checkpoint", str(older), "--prompt", "ROMEO:", "--max-new-tokens", "2"]) == 0
    if how == "truncated":  # the way out works: resume from the older one; the damaged step is written anew
        capsys.readouterr()
        assert cli_main(train_args(tiny_data, out, *QUICK, "--checkpoint.resume_from", str(older))) == 0
        assert "resuming from" in capsys.readouterr().out
        newest = out / "checkpoints" / "step_00000004"
        assert (
            read_meta(newest)["step"] == 4 and victim.stat().st_size == read_meta(newest)["files"][victim.name]["bytes"]
        )


def test_unreadable_checkpoint_file_without_a_record_is_one_line(two_checkpoints, tmp_path, capsys):
    """A checkpoint from before meta.json recorded its files: garbage is caught when it is read."""
    out = tmp_path / "run"
    victim = _damaged_copy(two_checkpoints, out, "garbage")
    meta_file = victim.parent / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["files"]
    meta_file.write_text(json.dumps(meta))
    fails(
        capsys,
        ["generate", "--checkpoint", str(out), "--prompt", "ROMEO:"],
        f"checkpoint {victim.parent} cannot be read",
        "intact: step_00000002",
    )


def _shard_with_large_id(data: Path, value: int) -> None:
    bin_file = sorted(data.glob("*.bin"))[0]
    tokens = np.memmap(bin_file, dtype=np.uint16, mode="r+")
    tokens[5] = value
    tokens.flush()


def test_prepare_records_the_largest_token_id(tiny_data):
    from meshforge.data_pipeline.indexed import IndexedShard

    manifest = json.loads((tiny_data / "manifest.json").read_text())
    for s in manifest["shards"]:
        assert s["max_token_id"] == IndexedShard(tiny_data / s["prefix"]).max_token_id() > 100


@pytest.mark.parametrize("layout", ["megatron", "old-manifest"])
def test_token_ids_beyond_the_model_vocabulary_fail_before_any_output(layout, tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    extra = []
    if layout == "megatron":  # bare .bin/.idx pairs: every shard is scanned
        (data / "manifest.json").unlink()
        extra = ["--data.tokenizer", str(data / "tokenizer.model")]
    else:  # a manifest written before it recorded the largest id: scanned too
        manifest = json.loads((data / "manifest.json").read_text())
        for s in manifest["shards"]:
            del s["max_token_id"]
        (data / "manifest.json").write_text(json.dumps(manifest))
    _shard_with_large_id(data, 700)
    out = tmp_path / "run"
    fails(
        capsys,
        train_args(data, out, *QUICK, *extra),
        "holds token id 700, beyond the model's vocabulary (model.vocab_size = 512",
    )
    assert not out.exists()


def test_an_internal_error_keeps_its_traceback_under_a_line_naming_the_rank(tiny_data, tmp_path, capsys, monkeypatch):
    import meshforge.pretrain.trainer as trainer

    def broken(cfg, memory_plan=None):
        raise KeyError("a bug")

    monkeypatch.setattr(trainer, "train", broken)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KeyError, match="a bug"):
        cli_main(train_args(tiny_data, tmp_path / "run"))
    assert (
        capsys.readouterr().err
        == "meshforge: internal error on rank 1 of 2 (a bug in meshforge; its traceback follows)\n"
    )


def test_deepspeed_cpu_adam_says_it_may_compile_before_it_starts(capsys, monkeypatch):
    pytest.importorskip("deepspeed")
    import deepspeed

    from meshforge.parallel import deepspeed_engine as ds

    order = []
    monkeypatch.setattr(ds, "_prepare_runtime", lambda device: None)
    monkeypatch.setattr(ds, "_offload_optimizer", lambda opt: order.append(capsys.readouterr().out) or opt)
    monkeypatch.setattr(deepspeed, "initialize", lambda **k: (k["model"], None, None, None))
    model = torch.nn.Linear(2, 2)
    cfg = load_config("tiny-test", {"parallel.dp_backend": "deepspeed", "parallel.offload_optimizer": "cpu"})
    ds.build_deepspeed_engine(model, torch.optim.AdamW(model.parameters()), cfg, 1, torch.device("cpu"))
    assert len(order) == 1 and "compiles it, which takes about 2 minutes" in order[0]


def test_a_run_written_before_a_model_field_existed_still_resumes(two_checkpoints, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    for ckpt in list_checkpoints(out / "checkpoints"):
        meta = json.loads((ckpt / "meta.json").read_text())
        del meta["identity"]["model.vocab_multiple_of"]  # as written before the field was added
        (ckpt / "meta.json").write_text(json.dumps(meta))
    assert cli_main(train_args(tiny_data, out, *QUICK[:1], "6", *QUICK[2:])) == 0
    assert "resuming from" in capsys.readouterr().out
