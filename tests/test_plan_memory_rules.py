"""Memory rules of meshforge plan that no dry run can check (DeepSpeed cannot be built on meta tensors)."""

from __future__ import annotations

from meshforge.config import load_config
from meshforge.plan.layouts import Layout, check_layout
from meshforge.plan.memory import DS_BUCKET, estimate_memory


def test_deepspeed_zero3_buffers_hold_the_largest_parameter_whole():
    """ZeRO-3 gathers a parameter whole when its module runs: a 131,072-wide FFN's 1.07e9-element weight needs
    that much gather buffer, more than the 5e8-element bucket (which ZeRO-1/2 keep)."""
    cfg = load_config("small", {"model.dim": 8192, "model.n_heads": 64, "model.ffn_dim": 131072,
                                "model.n_layers": 2, "train.global_batch_size": 8, "train.micro_batch_size": 1,
                                "parallel.dp_backend": "deepspeed"})
    largest = 8192 * 131072
    assert largest > DS_BUCKET
    z3, z2 = Layout(1, 1, 1, 8, zero="ds-zero3"), Layout(1, 1, 1, 8, zero="ds-zero2")
    m3 = estimate_memory(check_layout(cfg, z3), z3)
    m2 = estimate_memory(check_layout(cfg, z2), z2)
    assert m3["comm_buffers"] == 2 * (DS_BUCKET + largest)  # bf16: the bucket + the whole FFN weight
    assert m2["comm_buffers"] == 2 * 2 * DS_BUCKET
