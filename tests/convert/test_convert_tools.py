"""`meshforge convert grow` (G_stack) and `convert inspect`."""

from __future__ import annotations

import pytest
import torch

from meshforge.cli import main as cli_main
from meshforge.config import load_config
from meshforge.convert.dcp_reader import CheckpointReader
from meshforge.convert.grow import grow_checkpoint
from meshforge.convert.safetensors_io import ConvertError
from meshforge.pretrain.checkpoint import find_checkpoint
from meshforge.pretrain.trainer import Trainer

QUIET = {"train.eval_interval": 0, "train.sample_prompt": "", "checkpoint.interval": 0}


@pytest.fixture(scope="module")
def small_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("grow") / "small"
    Trainer(
        load_config(
            "tiny-test", {"data.path": str(tiny_data), "train.output_dir": str(out), "train.steps": 12, **QUIET}
        )
    ).run()
    return out


def test_grow_stacks_the_trained_layers_and_trains(small_run, tiny_data, tmp_path):
    grow_checkpoint(small_run, tmp_path / "grown", 2, log=lambda *_: None)
    src, grown = CheckpointReader(find_checkpoint(small_run)), CheckpointReader(tmp_path / "grown")
    assert grown.config.model.n_layers == 2 * src.config.model.n_layers == 4
    assert grown.step == 0 and len(grown.entries) == 2 * len(src.entries) - 3  # embedding, norm, output once
    for name in grown.entries:
        parts = name.split(".")
        if parts[0] == "layers":
            parts[1] = str(int(parts[1]) % 2)  # grown layer j is source layer j mod L
        assert torch.equal(grown.get(name), src.get(".".join(parts))), name

    over = {"data.path": str(tiny_data), "train.steps": 4, **QUIET}
    cfg = load_config(str(tmp_path / "grown" / "model.toml"), {**over, "train.output_dir": str(tmp_path / "a")})
    trainer = Trainer(cfg)
    trainer._setup()  # the model the run starts from is the grown checkpoint
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, grown.get(name)), name
    trainer.metrics.close()
    assert (
        cli_main(["generate", "--checkpoint", str(tmp_path / "grown"), "--prompt", "ROMEO:", "--max-new-tokens", "4"])
        == 0
    )  # an init dir is a checkpoint to `meshforge generate` too
    result = Trainer(
        load_config(str(tmp_path / "grown" / "model.toml"), {**over, "train.output_dir": str(tmp_path / "b")})
    ).run()
    assert result.final_step == 4 and result.losses[-1] < result.losses[0]


def test_grow_refuses_bad_input(small_run, tmp_path):
    with pytest.raises(ConvertError, match="at least 2"):
        grow_checkpoint(small_run, tmp_path / "g", 1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(ConvertError, match="not an empty directory"):
        grow_checkpoint(small_run, tmp_path / "busy", 2)
    assert not (tmp_path / "g").exists()


def test_inspect_checkpoint_and_hf_dir(small_run, tmp_path, capsys):
    assert cli_main(["convert", "inspect", str(small_run)]) == 0
    out = capsys.readouterr().out
    assert "step:         12" in out and "qk-norm" in out and "exports to:   Qwen3ForCausalLM" in out
    reader = CheckpointReader(find_checkpoint(small_run))
    total = sum(torch.Size(reader.shape(k)).numel() for k in reader.entries if k != "output.weight")
    assert f"parameters:   {total:,}" in out and "single process" in out
    assert (
        cli_main(
            ["convert", "export", "--checkpoint", str(small_run), "--output", str(tmp_path / "hf"), "--dtype", "bf16"]
        )
        == 0
    )
    capsys.readouterr()
    assert cli_main(["convert", "inspect", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "Qwen3ForCausalLM" in out and f"parameters:   {total:,}" in out and "BF16 (100%)" in out
    assert "(step 12, written with 1 rank(s) (single process))" in out


def test_an_init_dir_can_be_moved(small_run, tiny_data, tmp_path):
    """model.toml names the init dir and its tokenizer relative to itself: moved elsewhere, it still trains."""
    import shutil

    grow_checkpoint(small_run, tmp_path / "grown", 2, log=lambda *_: None)
    text = (tmp_path / "grown" / "model.toml").read_text()
    assert str(tmp_path) not in text
    assert 'tokenizer = "./tokenizer.model"' in text and 'init_from = "."' in text
    moved = tmp_path / "elsewhere" / "init"
    moved.parent.mkdir()
    shutil.move(tmp_path / "grown", moved)
    over = {"data.path": str(tiny_data), "train.steps": 2, "train.output_dir": str(tmp_path / "run"), **QUIET}
    cfg = load_config(str(moved / "model.toml"), over)
    assert cfg.checkpoint.init_from == str(moved) and cfg.data.tokenizer == str(moved / "tokenizer.model")
    assert Trainer(cfg).run().final_step == 2
