"""Context parallel with MoE decoders and expert parallel, against one process.

- The ep mesh (pure arithmetic over rank grids, no process group): for every way an ep group
  can sit in ``dp_shard x cp`` (all of cp and part of dp_shard, exactly cp, part of cp), the
  flattened ``dp_shard``, ``cp`` and ``dp_shard_cp`` are the plain mesh's groups, an ep group
  is ep consecutive ranks inside one ``dp_shard_cp`` group, and ep x expert_dp_shard tiles it.
- Config: capacity routing with cp and an ep that does not fit the cp groups fail before any
  process group, with the numbers.
- Training parity (real ranks, gloo): per-step losses, final weights and every router metric
  of every step (aux and z losses, dropped fraction, per-layer load) equal one process:
  cp2 x ep2 (4 ranks; the ep group is the cp group, experts FSDP-sharded over the other two)
  by default over 6 steps. Slow, over 10: cp2 x ep2, cp2 alone (the balance loss counts the
  whole sequence's assignments), cp4 x ep2 (ep inside cp), cp2 x ep4 all-to-all (ep over cp
  and dp_shard), cp2 x pp2. The routing-bias update is on, so a wrong (per-rank) expert
  load would steer the routing away from the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from meshforge.config import ConfigError, load_config
from meshforge.parallel.expert_parallel import EXPERT_DP, ep_mesh_layout
from meshforge.parallel.job_checks import check_job
from meshforge.parallel.mesh import MESH_DIMS, Degrees, resolve_degrees
from meshforge.pretrain.metrics import read_metrics
from parallel_harness import TP_ATOL, assert_parity, train_layout

MOE_ARGS = ("--model.moe_experts", "4", "--model.moe_top_k", "2", "--model.moe_bias_update_rate", "0.01")


def _groups(shape: tuple[int, ...], names: tuple[str, ...], dims: tuple[str, ...]) -> set[tuple[int, ...]]:
    """The rank groups of the (flattened) ``dims`` of a row-major mesh of ``shape``."""
    grid = torch.arange(math.prod(shape)).reshape(shape)
    idx = [names.index(n) for n in dims]
    rest = [i for i in range(len(shape)) if i not in idx]
    rows = grid.permute(*rest, *idx).reshape(-1, math.prod(shape[i] for i in idx))
    return {tuple(r.tolist()) for r in rows}


@pytest.mark.parametrize("dp_shard, cp, ep", [(4, 1, 2), (2, 2, 4), (2, 2, 2), (1, 4, 2), (2, 4, 2), (1, 2, 2)])
def test_ep_mesh_puts_ep_inside_dp_shard_x_cp(dp_shard, cp, ep):
    d = Degrees(pp=2, dp_replicate=2, dp_shard=dp_shard, cp=cp, tp=2, ep=ep)
    plain = tuple(getattr(d, n) for n in MESH_DIMS)
    shape, names, flat = ep_mesh_layout(d)
    assert math.prod(shape) == d.world_size

    def of(name):
        return _groups(shape, names, flat[name]) if name in flat else _groups(shape, names, (name,))

    for name, dims in (("dp_shard", ("dp_shard",)), ("cp", ("cp",)), ("dp_shard_cp", ("dp_shard", "cp"))):
        if name == "dp_shard_cp" and cp == 1:
            continue
        assert of(name) == _groups(plain, MESH_DIMS, dims), name
    outer = _groups(plain, MESH_DIMS, ("dp_shard", "cp"))
    for group in of("ep"):
        assert len(group) == ep and group == tuple(range(group[0], group[0] + ep * d.tp, d.tp))
        assert any(set(group) <= set(o) for o in outer)
    for o in outer:  # ep x expert_dp_shard tile each dp_shard x cp group
        eps, dps = ([g for g in of(name) if set(g) <= set(o)] for name in ("ep", EXPERT_DP))
        assert sorted(r for g in eps for r in g) == sorted(r for g in dps for r in g) == sorted(o)
        assert all(len(set(e) & set(x)) == 1 for e in eps for x in dps)


def _check(world: int, **overrides):
    cfg = load_config("tiny-test", {k.replace("__", "."): v for k, v in overrides.items()})
    check_job(cfg, resolve_degrees(cfg.parallel, world))


def test_cp_moe_config_is_checked_before_any_process_group():
    _check(4, parallel__cp=2, parallel__ep=2, model__moe_experts=4)
    _check(4, parallel__cp=4, parallel__ep=2, model__moe_experts=4)
    _check(8, parallel__cp=2, parallel__ep=4, model__moe_experts=4, train__micro_batch_size=0)
    with pytest.raises(ConfigError, match=r"parallel.cp = 2 with capacity routing \(model.moe_capacity_factor = 1.0\)"):
        _check(2, parallel__cp=2, model__moe_experts=4, model__moe_capacity_factor=1.0)
    with pytest.raises(
        ConfigError,
        match=r"parallel.ep = 4 with parallel.cp = 3: an ep group is the innermost ranks "
        r"of dp_shard x cp = 4 x 3",
    ):
        _check(12, parallel__cp=3, parallel__ep=4, model__moe_experts=4, data__seq_len=36)
    with pytest.raises(ConfigError, match=r"parallel.ep = 4 must divide dp_shard\*cp = 1\*2 = 2"):
        _check(2, parallel__cp=2, parallel__ep=4, model__moe_experts=4)


SHORT = ("--train.steps", "6")
"""The default test's run: 6 steps (4 ranks on the 2 CI cores); the slow ones run the usual 10."""


@pytest.fixture(scope="module")
def moe_ref(tiny_data, tmp_path_factory):
    return train_layout(tiny_data, tmp_path_factory.mktemp("cp_moe_ref") / "ref", 1, *MOE_ARGS)


@pytest.fixture(scope="module")
def short_moe_ref(tiny_data, tmp_path_factory):
    return train_layout(tiny_data, tmp_path_factory.mktemp("cp_moe_ref6") / "ref", 1, *MOE_ARGS, *SHORT)


def _moe_metrics(out) -> dict[tuple[int, str], float]:
    return {(r["step"], k): v for r in read_metrics(out) for k, v in r.items() if k.startswith("moe_")}


def _assert_moe_parity(ref, got, min_steps: int = 10) -> None:
    assert_parity(ref, got, atol=TP_ATOL, min_steps=min_steps)  # cp sums weight gradients over part of the tokens first
    want, have = _moe_metrics(ref.output_dir), _moe_metrics(got.output_dir)
    assert want.keys() == have.keys() and any(k.startswith("moe_load_cv/layers.3") for _, k in want)
    for key, value in want.items():
        assert have[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_cp2_x_ep2_moe_matches_single_process(tiny_data, short_moe_ref, tmp_path):
    got = train_layout(
        tiny_data, tmp_path / "cp2-x-ep2", 4, *MOE_ARGS, *SHORT, "--parallel.cp", "2", "--parallel.ep", "2"
    )
    _assert_moe_parity(short_moe_ref, got, min_steps=6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, world, overrides",
    [
        ("cp2-x-ep2", 4, ("--parallel.cp", "2", "--parallel.ep", "2")),  # the default test's layout over 10 steps
        ("cp2-moe", 2, ("--parallel.cp", "2")),
        ("cp4-x-ep2", 4, ("--parallel.cp", "4", "--parallel.ep", "2")),  # the ep group is half a cp group
        ("cp2-x-ep4", 4, ("--parallel.cp", "2", "--parallel.ep", "4", "--parallel.cp_method", "alltoall")),
        ("cp2-x-pp2-moe", 4, ("--parallel.cp", "2", "--parallel.pp", "2")),
    ],
)
def test_cp_moe_layouts_match_single_process(name, world, overrides, tiny_data, moe_ref, tmp_path):
    got = train_layout(tiny_data, tmp_path / name, world, *MOE_ARGS, *overrides)
    _assert_moe_parity(moe_ref, got)
