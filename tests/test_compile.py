"""Per-block torch.compile gives the eager losses (CPU inductor)."""

import pytest
import torch

from meshforge.config import load_config
from meshforge.parallel.compile import compile_enabled
from meshforge.pretrain.trainer import Trainer


def test_compile_setting():
    assert compile_enabled("auto", "cuda") and not compile_enabled("auto", "cpu")
    assert compile_enabled("on", "cpu") and not compile_enabled("off", "cuda")


@pytest.mark.slow
def test_compiled_blocks_match_eager(tiny_data, tmp_path):
    def losses(setting: str) -> list[float]:
        cfg = load_config("tiny-test", {"data.path": str(tiny_data), "train.output_dir": str(tmp_path / setting),
                                        "train.steps": 4, "train.eval_interval": 0, "train.sample_prompt": "",
                                        "parallel.compile": setting})
        return Trainer(cfg).run().losses

    eager, compiled = losses("off"), losses("on")
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=0)
