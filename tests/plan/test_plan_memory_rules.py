"""Memory rules of meshforge plan that no dry run can check (DeepSpeed cannot be built on meta tensors)."""

from __future__ import annotations

import dataclasses

import pytest

from meshforge.config import load_config
from meshforge.plan.layouts import Layout, check_layout
from meshforge.plan.memory import DS_BUCKET, estimate_memory


def test_deepspeed_zero3_buffers_hold_the_largest_parameter_whole():
    """ZeRO-3 gathers a parameter whole when its module runs: a 131,072-wide FFN's 1.07e9-element weight needs
    that much gather buffer, more than the 5e8-element bucket (which ZeRO-1/2 keep)."""
    cfg = load_config(
        "small",
        {
            "model.dim": 8192,
            "model.n_heads": 64,
            "model.ffn_dim": 131072,
            "model.n_layers": 2,
            "train.global_batch_size": 8,
            "train.micro_batch_size": 1,
            "parallel.dp_backend": "deepspeed",
        },
    )
    largest = 8192 * 131072
    assert largest > DS_BUCKET
    z3, z2 = Layout(1, 1, 1, 8, zero="ds-zero3"), Layout(1, 1, 1, 8, zero="ds-zero2")
    m3 = estimate_memory(check_layout(cfg, z3), z3)
    m2 = estimate_memory(check_layout(cfg, z2), z2)
    assert m3["comm_buffers"] == 2 * (DS_BUCKET + largest)  # bf16: the bucket + the whole FFN weight
    assert m2["comm_buffers"] == 2 * 2 * DS_BUCKET


def test_compute_efficiency_follows_the_gemm_shapes():
    """Without --efficiency, a device with a GEMM curve computes at its efficiency for the layout's shapes:
    narrower tensor-parallel GEMMs and fewer tokens per microbatch are slower per FLOP; --efficiency stays a
    flat override; a device without a curve (the CPU) keeps the flat default."""
    from meshforge.plan.compute import efficiency_curves, gemm_efficiency, shape_efficiency
    from meshforge.plan.devices import get_device
    from meshforge.plan.time_model import DEFAULT_EFFICIENCY, estimate_time

    points = efficiency_curves()["b200"]["gemm"]
    assert gemm_efficiency(points, 1.0) == points[0][1] and gemm_efficiency(points, 1e15) == points[-1][1]
    mid = gemm_efficiency(points, (points[0][0] * points[1][0]) ** 0.5)
    assert mid == pytest.approx((points[0][1] + points[1][1]) / 2)
    cfg = load_config("llama-1b", {"train.global_batch_size": 64})
    wide, narrow = Layout(1, 1, 1, 8), Layout(8, 1, 1, 1)
    assert shape_efficiency(cfg, wide, 1, "h100-80gb") > shape_efficiency(cfg, narrow, 1, "h100-80gb")
    assert shape_efficiency(cfg, wide, 4, "h100-80gb") > shape_efficiency(cfg, wide, 1, "h100-80gb")
    assert shape_efficiency(cfg, wide, 1, "cpu") is None
    h100 = dataclasses.replace(get_device("h100-80gb"), hbm_bytes_per_s=0.0)  # no bandwidth: no roofline
    by_shape = estimate_time(check_layout(cfg, wide), wide, h100, 8)
    flat = estimate_time(check_layout(cfg, wide), wide, h100, 8, efficiency=0.5)
    factor = shape_efficiency(cfg, wide, 1, "h100-80gb")
    assert 0 < factor < 1 and by_shape.compute_s == pytest.approx(flat.compute_s / factor)
    cpu_cfg = load_config("small", {"train.device": "cpu"})
    lay = Layout(1, 1, 1, 2)
    cpu = get_device("cpu")
    assert estimate_time(cpu_cfg, lay, cpu, 2).compute_s == pytest.approx(
        estimate_time(cpu_cfg, lay, cpu, 2, efficiency=DEFAULT_EFFICIENCY).compute_s
    )
