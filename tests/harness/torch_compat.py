"""Marks for test cases that need a feature this torch may lack (the GPU machine runs torch 2.11)."""

from __future__ import annotations

import pytest

from meshforge.parallel.pipeline import stage_takes_mesh

PP_TP = pytest.mark.skipif(
    not stage_takes_mesh(),
    reason="pp x tp passes DTensor activations between stages: this "
    "torch's PipelineStage takes no get_mesh (check_job refuses the layout: tests/parallel/test_parallel_pp.py)",
)


def pp_tp(*values, slow: bool = False) -> pytest.param:
    """A parametrized case with pp x tp: skipped where this torch's pipelining cannot pass DTensors."""
    return pytest.param(*values, marks=[PP_TP, pytest.mark.slow] if slow else PP_TP)
