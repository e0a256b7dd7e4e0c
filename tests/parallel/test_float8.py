"""float8 training through torchao (``train.float8``): which layers are converted, the TP plan it
selects, and the refusal where float8 matmuls cannot run; slow: FSDP2 and TP2 layouts of a
converted model on 2 gloo ranks (float8 all-gather weights, precomputed scales, float8 TP styles).
No float8 matmul runs here (CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meshforge.config import ConfigError, load_config
from meshforge.models import build_model
from meshforge.parallel.float8 import apply_float8, check_float8, float8_skip_reason
from parallel_harness import REPO, start_ranks


@pytest.fixture
def Float8Linear():
    """torchao's float8 linear class (the conversion tests need torchao; the refusals do not)."""
    return pytest.importorskip("torchao.float8.float8_linear").Float8Linear


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _block_projections(names) -> list[str]:
    return [n for n in names if n.rsplit(".", 1)[-1] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_small_preset_converts_block_linears_only(recipe, Float8Linear):
    cfg = load_config("small", {"model.vocab_size": 2048, "model.tie_embeddings": False})
    model = build_model(cfg.model, "meta", init=False)
    before = _linears(model)
    apply_float8(model, recipe)
    after = _linears(model)
    assert after.keys() == before.keys()
    converted = sorted(n for n, m in after.items() if isinstance(m, Float8Linear))
    assert converted == sorted(_block_projections(after)) and len(converted) == 7 * cfg.model.n_layers
    assert type(model.output) is nn.Linear  # the output layer stays in high precision
    assert type(model.tok_embeddings) is nn.Embedding
    cast = model.layers["0"].attention.wq.config.cast_config_input.scaling_granularity.value
    assert cast == ("axiswise" if recipe == "rowwise" else "tensorwise")


def test_moe_preset_keeps_router_and_experts_in_high_precision(Float8Linear):
    # 16 experts: the router's dims are multiples of 16, so only its name keeps it out
    cfg = load_config("moe-small", {"model.moe_experts": 16})
    model = build_model(cfg.model, "meta", init=False)
    apply_float8(model, "tensorwise")
    linears = _linears(model)
    routers = [n for n in linears if n.endswith("router")]
    assert routers and all(type(linears[n]) is nn.Linear for n in routers)
    assert float8_skip_reason(routers[0], linears[routers[0]]) == "an MoE router"
    moe_layers = [b for b in model.layers.values() if hasattr(b.feed_forward, "experts")]
    assert moe_layers
    for block in moe_layers:  # grouped expert weights are parameters, not linear layers: untouched
        assert not any(isinstance(m, Float8Linear) for m in block.feed_forward.experts.modules())
    assert all(
        isinstance(linears[n], Float8Linear) for n in linears if n.rsplit(".", 1)[-1] in ("wq", "wk", "wv", "wo")
    )


def test_dims_not_multiple_of_16_stay_high_precision(Float8Linear):
    lin = nn.Linear(24, 64)
    assert float8_skip_reason("layers.0.attention.wq", lin) == "dims 24 -> 64 are not multiples of 16"
    assert float8_skip_reason("layers.0.attention.wq", nn.Linear(32, 64)) is None
    assert float8_skip_reason("output", nn.Linear(32, 64)) == "the output layer"
    assert float8_skip_reason("tok_embeddings", nn.Embedding(64, 32)) == "not an nn.Linear"
    cfg = load_config("tiny-test", {"model.vocab_size": 96, "model.dim": 24, "model.n_heads": 2, "model.n_kv_heads": 1})
    model = apply_float8(build_model(cfg.model), "tensorwise")
    assert not any(isinstance(m, Float8Linear) for m in model.modules())


def test_fsdp_float8_all_gather_is_tensorwise_only(Float8Linear):
    cfg = load_config("tiny-test", {"model.vocab_size": 96})
    model = apply_float8(build_model(cfg.model), "tensorwise", fsdp_float8_all_gather=True)
    assert model.layers["0"].feed_forward.w1.config.enable_fsdp_float8_all_gather
    with pytest.raises(ValueError, match="tensorwise"):
        apply_float8(build_model(cfg.model), "rowwise", fsdp_float8_all_gather=True)


def test_parallelize_applies_float8_and_float8_tp_plan(Float8Linear):
    from meshforge.parallel import parallelize
    from meshforge.parallel.mesh import Degrees
    from meshforge.parallel.tensor_parallel import build_tp_plan

    cfg = load_config("tiny-test", {"model.vocab_size": 96, "train.float8": "tensorwise"})
    one = Degrees(pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=1, ep=1)
    model = parallelize(build_model(cfg.model), None, one, cfg)
    assert isinstance(model.layers["0"].attention.wq, Float8Linear) and type(model.output) is nn.Linear
    plan = build_tp_plan(cfg.model, loss_parallel=True, float8=True)
    float8_styles = {k: type(v).__name__ for k, v in plan.items() if "Float8" in type(v).__name__}
    assert set(float8_styles) == {
        f"layers.*.{p}"
        for p in (
            "attention",
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "feed_forward",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        )
    }
    assert type(plan["output"]).__name__ == "ColwiseParallel"
    assert type(plan["tok_embeddings"]).__name__ == "RowwiseParallel"
    assert not any("Float8" in type(v).__name__ for v in build_tp_plan(cfg.model, loss_parallel=True).values())


def test_float8_refused_on_cpu_and_older_gpus(monkeypatch):
    cfg = load_config("tiny-test", {"train.float8": "tensorwise"})
    with pytest.raises(ConfigError, match=r"train.float8 = 'tensorwise' needs a CUDA GPU .* runs on cpu"):
        check_float8(cfg, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match=r"NVIDIA A100 has 8.0"):
        check_float8(cfg, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_float8(cfg, torch.device("cuda"))  # Hopper: accepted
    cfg.parallel.dp_backend = "deepspeed"
    with pytest.raises(ConfigError, match=r"not supported with parallel.dp_backend = 'deepspeed'"):
        check_float8(cfg, torch.device("cuda"))
    cfg.train.float8 = "off"
    check_float8(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="is not one of off, tensorwise, rowwise"):
        load_config("tiny-test", {"train.float8": "e4m3"})


def test_train_refuses_float8_on_cpu_before_writing(tiny_data, tmp_path):
    from meshforge.pretrain.trainer import Trainer

    out = tmp_path / "run"
    cfg = load_config(
        "tiny-test",
        {"data.path": str(tiny_data), "train.output_dir": str(out), "train.device": "cpu", "train.float8": "rowwise"},
    )
    with pytest.raises(ConfigError, match="train.float8 = 'rowwise' needs a CUDA GPU"):
        Trainer(cfg)
    assert not out.exists()


@pytest.mark.slow
def test_float8_fsdp2_and_tp2_layouts(tmp_path, Float8Linear):
    import json

    out = tmp_path / "report.json"
    procs = start_ranks(2, [str(out)], script=[str(REPO / "tests" / "harness" / "float8_layout_check.py")])
    errs = [p.communicate(timeout=300)[1].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)
    report = json.loads(out.read_text())
    fsdp = report["fsdp2"]
    converted = [n for n, r in fsdp.items() if r["type"] == "Float8Linear"]
    assert len(converted) == 14  # 2 layers x (wq, wk, wv, wo, w1, w2, w3)
    for name, r in fsdp.items():
        if r["type"] == "Float8Linear":  # all-gathered in float8, scale = e4m3 max / global amax (one all-reduce)
            assert r["local"] == "WeightWithDynamicFloat8CastTensor" and r["scale_err"] < 1e-6, (name, r)
        else:
            assert r["local"] == "Tensor" and r["scale_err"] is None, (name, r)
    assert fsdp["output"]["type"] == "Linear"
    tp = report["tp2"]
    for layer in ("0", "1"):
        for proj, placement in (
            ("attention.wq", "S(0)"),
            ("attention.wo", "S(1)"),
            ("feed_forward.w1", "S(0)"),
            ("feed_forward.w2", "S(1)"),
        ):
            r = tp[f"layers.{layer}.{proj}"]
            assert r["type"] == "Float8Linear" and r["placements"] == [placement], (proj, r)
    assert "PrepareFloat8ModuleInput" in tp["layers.0.attention"]["input_hooks"]
    assert "PrepareFloat8ModuleInput" in tp["layers.0.feed_forward"]["input_hooks"]
    assert "Float8RowwiseParallel" in tp["layers.0.feed_forward.w2"]["input_hooks"]
    assert tp["output"]["type"] == "Linear" and tp["output"]["local_rows"] * 2 == tp["output"]["rows"]
