"""Fault-handling building blocks: preemption flag, non-finite guard, spike detector."""

import math
import os
import signal

import pytest
import torch

from meshforge.pretrain.faults import NonFiniteGuard, PreemptionWatcher, SpikeDetector, TrainingDiverged


def test_preemption_watcher_catches_sigterm():
    w = PreemptionWatcher()
    try:
        assert not w.should_stop(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGTERM)
        assert w.received == signal.SIGTERM
        assert w.should_stop(torch.device("cpu"))
    finally:
        w.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_non_finite_guard_skips_then_raises():
    g = NonFiniteGuard(max_consecutive=3)
    assert g.check(1, 2.0, 1.0)
    assert not g.check(2, math.nan, 1.0)
    assert not g.check(3, 2.0, math.inf)
    assert g.check(4, 2.0, 1.0)  # a good step resets the count
    assert not g.check(5, math.nan, math.nan)
    assert not g.check(6, math.nan, math.nan)
    with pytest.raises(TrainingDiverged, match="3 consecutive steps with non-finite"):
        g.check(7, math.nan, 1.0)
    assert g.total_skipped == 5


def test_spike_detector():
    d = SpikeDetector(window=20, sigmas=4.0, min_history=5)
    flags = [d.update(3.0 + 0.01 * (i % 3)) for i in range(20)]
    assert not any(flags)
    assert d.update(5.0)
    assert not d.update(3.01)
