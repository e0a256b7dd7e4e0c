"""The same trained model, checkpointed under different layouts, exports to byte-identical safetensors.

A single-process run trains a few steps. Each layout then starts a run from that checkpoint
(``checkpoint.init_from``: weights only, fresh optimizer, step 0) with a learning rate of 1e-30
(0 is refused), far below half an fp32 ulp of any weight, so its one step leaves the weights
bit-identical, and checkpoints them sharded its own way.
Exporting that checkpoint (one CPU process, no process group) must give the same files as
exporting the single-process one -- which also proves ``init_from`` loads under the layout.
"""

from __future__ import annotations

import pytest

from meshforge.convert.export import export_hf
from meshforge.pretrain.checkpoint import find_checkpoint
from parallel_harness import PARITY_ARGS, run_ranks

DENSE = ("--model.tie_embeddings", "false")  # untied: pipeline parallel puts embedding and output on different stages
MOE = ("--model.moe_experts", "4", "--model.moe_top_k", "2", "--model.qk_norm", "false")


def _train(data, out, world, *extra):
    run_ranks(world, ["train", *PARITY_ARGS, "--data.path", str(data), "--train.output_dir", str(out), *extra])
    return find_checkpoint(out)


def _export_bytes(ckpt, out) -> bytes:
    export_hf(ckpt, out, max_shard_mb=1 << 20, log=lambda *_: None)
    return (out / "model.safetensors").read_bytes()


def _reexport_under(layout_world, layout_args, ref_ckpt, data, tmp_path, *model_args) -> bytes:
    ckpt = _train(
        data,
        tmp_path / "layout",
        layout_world,
        *model_args,
        "--train.steps",
        "1",
        "--optim.lr",
        "1e-30",
        "--checkpoint.init_from",
        str(ref_ckpt),
        *layout_args,
    )
    return _export_bytes(ckpt, tmp_path / "layout_hf")


@pytest.fixture(scope="module")
def dense_ref(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_ref")
    ckpt = _train(tiny_data, root / "run", 1, *DENSE, "--train.steps", "3")
    return ckpt, _export_bytes(ckpt, root / "hf")  # root/hf: ckpt.parent.parent.parent / "hf"


@pytest.fixture(scope="module")
def moe_ref(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_moe_ref")
    ckpt = _train(tiny_data, root / "run", 1, *MOE, "--train.steps", "3")
    return ckpt, _export_bytes(ckpt, root / "hf")


def test_fsdp2_run_from_imported_init_exports_identically(dense_ref, tiny_data, tmp_path):
    """export -> import -> a 2-rank FSDP2 run from the imported init -> export: the same bytes; and
    the run started from the trained weights (its first loss is the trained model's, step 0, fresh optimizer)."""
    from meshforge.convert.import_ import import_hf
    from meshforge.pretrain.metrics import read_metrics

    ref_ckpt, ref_bytes = dense_ref
    import_hf(ref_ckpt.parent.parent.parent / "hf", tmp_path / "init", log=lambda *_: None)
    got = _reexport_under(2, ("--parallel.dp_shard", "2"), tmp_path / "init", tiny_data, tmp_path, *DENSE)
    assert got == ref_bytes
    ref_losses = [r["loss"] for r in read_metrics(ref_ckpt.parent.parent) if "loss" in r]
    init_losses = [r for r in read_metrics(tmp_path / "layout") if "loss" in r]
    assert init_losses[0]["step"] == 1 and len(init_losses) == 1
    assert init_losses[0]["loss"] < ref_losses[0] - 0.05  # the same first batch, on trained weights


def test_init_from_that_does_not_fit_is_refused(dense_ref):
    import torch

    from meshforge.config import load_config
    from meshforge.models import MODEL_SPECS
    from meshforge.pretrain.checkpoint import CheckpointError, check_init

    cfg = load_config("tiny-test", {"model.tie_embeddings": False, "model.dim": 96})
    with torch.device("meta"):
        model = MODEL_SPECS["decoder"].build(cfg.model)
    with pytest.raises(CheckpointError, match="does not fit model config"):
        check_init(dense_ref[0], model)
    with pytest.raises(CheckpointError, match="not a directory"):
        check_init(dense_ref[0] / "nope", model)


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, layout",
    [
        (4, ("--parallel.tp", "2", "--parallel.dp_shard", "2")),
        (2, ("--parallel.pp", "2")),
        (2, ("--parallel.dp_backend", "deepspeed", "--parallel.zero_stage", "3")),
    ],
    ids=["tp2xdp2", "pp2", "zero3"],
)
def test_layout_checkpoint_exports_identically(world, layout, dense_ref, tiny_data, tmp_path):
    ref_ckpt, ref_bytes = dense_ref
    assert _reexport_under(world, layout, ref_ckpt, tiny_data, tmp_path, *DENSE) == ref_bytes


@pytest.mark.slow
def test_ep2_moe_checkpoint_exports_identically(moe_ref, tiny_data, tmp_path):
    ref_ckpt, ref_bytes = moe_ref
    assert _reexport_under(2, ("--parallel.ep", "2"), ref_ckpt, tiny_data, tmp_path, *MOE) == ref_bytes
