"""muP as a model option: width-dependent init, per-group Adam LRs and the logit multiplier."""

from __future__ import annotations

import pytest
import torch

from meshforge.config import ConfigError, load_config
from meshforge.models import build_model, check_config
from meshforge.pretrain.optim import build_optimizer, build_scheduler


def mup_cfg(dim: int, base: int):
    return load_config(
        "tiny-test",
        {
            "model.dim": dim,
            "model.n_heads": dim // 16,
            "model.n_kv_heads": 0,
            "model.mup_base_dim": base,
            "model.init_std": 0.02,
        },
    )


def test_mup_init_scales_hidden_matrices_by_one_over_sqrt_width_multiplier():
    torch.manual_seed(0)
    model = build_model(mup_cfg(128, 32).model)  # m = 4
    block = model.layers["0"]
    for w in (block.attention.wq.weight, block.attention.wk.weight, block.feed_forward.w1.weight):
        assert w.std().item() == pytest.approx(0.02 / 2, rel=0.06)  # trunc normal at 3 std: ~1.3% below
    assert block.attention.wo.weight.std().item() == pytest.approx(0.01 / (2 * 2) ** 0.5, rel=0.06)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.03)  # unchanged
    torch.manual_seed(0)
    plain = build_model(load_config("tiny-test", {"model.dim": 128, "model.n_heads": 8, "model.n_kv_heads": 0}).model)
    assert plain.layers["0"].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.06)


def test_mup_logits_are_divided_by_the_width_multiplier():
    torch.manual_seed(0)
    mup = build_model(mup_cfg(128, 32).model)  # m = 4
    same = build_model(mup_cfg(128, 128).model)  # m = 1: the same function without the multiplier
    same.load_state_dict(mup.state_dict())
    tokens = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(mup(tokens) * 4, same(tokens), rtol=1e-5, atol=1e-5)


def test_mup_gives_block_matrices_lr_over_m_and_keeps_the_rest():
    cfg = mup_cfg(128, 32)  # m = 4
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim, "cpu", 1.0 / cfg.model.width_mult)
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    base = sched.get_last_lr()[0] / (1 / cfg.optim.warmup_steps) if cfg.optim.warmup_steps else cfg.optim.lr
    assert base == pytest.approx(cfg.optim.lr)
    for name, p in model.named_parameters():
        hidden = name.startswith("layers.") and p.dim() >= 2
        want = cfg.optim.lr / 4 if hidden else cfg.optim.lr
        assert lr_of[id(p)] / lr_of[id(model.tok_embeddings.weight)] == pytest.approx(want / cfg.optim.lr), name
    sched.step()  # the schedule scales every group by the same factor
    ratios = {round(g["lr"] / g["initial_lr"], 12) for g in opt.param_groups}
    assert len(ratios) == 1
    plain = build_optimizer(model, cfg.optim, "cpu")  # without muP: the usual groups (checkpoints unchanged)
    assert len(plain.param_groups) == 2 and all("initial_lr" not in g for g in plain.param_groups)


def test_mup_is_refused_where_it_is_not_defined():
    with pytest.raises(ConfigError, match="mup_base_dim"):
        check_config(load_config("tiny-test", {"model.mup_base_dim": -1}))
    with pytest.raises(ConfigError, match="dense decoders"):
        check_config(load_config("t5-small", {"model.mup_base_dim": 64}))
