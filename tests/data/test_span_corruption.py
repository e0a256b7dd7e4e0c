"""T5 span corruption: statistics, exact reconstruction, determinism by index."""

import numpy as np
import pytest

from meshforge.data_pipeline.errors import DataError
from meshforge.data_pipeline.span_corruption import (
    SpanCorruptionDataset,
    corrupt,
    corrupted_lengths,
    make_spec,
    noise_mask,
    raw_length_for,
)

SENTINELS = list(range(1000, 900, -1))  # <extra_id_0> = 1000, <extra_id_1> = 999, ...
EOS, PAD = 3, 0


def reconstruct(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    """Put each sentinel's span from the targets back into the inputs."""
    spans, cur = {}, None
    for t in targets[:-1]:
        if t in SENTINELS:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(int(t))
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t in SENTINELS else [int(t)])
    return out


def test_noise_statistics_over_many_samples():
    rng = np.random.default_rng(0)
    fractions, span_lengths = [], []
    for _ in range(500):
        m = noise_mask(568, 0.15, 3.0, rng)  # the raw length T5 corrupts into 512 inputs
        fractions.append(m.mean())
        starts = np.flatnonzero(m & ~np.concatenate([[False], m[:-1]]))
        ends = np.flatnonzero(m & ~np.concatenate([m[1:], [False]]))
        span_lengths.extend(ends - starts + 1)
    assert abs(np.mean(fractions) - 0.15) < 0.01
    assert abs(np.mean(span_lengths) - 3.0) < 0.1


def test_inputs_and_targets_reconstruct_the_text_exactly():
    rng = np.random.default_rng(1)
    for length in (10, 57, 114, 500):
        tokens = rng.integers(4, 900, size=length)
        m = noise_mask(length, 0.15, 3.0, rng)
        inputs, targets = corrupt(tokens, m, np.asarray(SENTINELS), EOS)
        assert inputs[-1] == EOS and targets[-1] == EOS
        assert reconstruct(inputs, targets) == tokens.tolist()
        assert (len(inputs), len(targets)) == corrupted_lengths(length, 0.15, 3.0)


def test_raw_length_fits_encoder_exactly():
    raw, tgt = raw_length_for(512, 0.15, 3.0)
    assert corrupted_lengths(raw, 0.15, 3.0)[0] <= 512 < corrupted_lengths(raw + 1, 0.15, 3.0)[0]
    assert (raw, tgt) == (568, 114)  # the lengths T5 uses for 512-token inputs
    with pytest.raises(DataError, match="raise data.decoder_seq_len"):
        make_spec(512, 64, 0.15, 3.0)


class _Windows:
    def __init__(self, raw_len):
        self.raw_len = raw_len

    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return np.random.default_rng(i).integers(4, 900, size=self.raw_len)


def test_dataset_is_deterministic_by_index_and_padded():
    spec = make_spec(64, 0, 0.15, 3.0)
    ds = SpanCorruptionDataset(_Windows(spec.raw_len), spec, SENTINELS, EOS, PAD, seed=5)
    a = [ds[i] for i in (7, 3, 7)]
    assert np.array_equal(a[0], a[2]) and not np.array_equal(a[0], a[1])
    other_seed = SpanCorruptionDataset(_Windows(spec.raw_len), spec, SENTINELS, EOS, PAD, seed=6)
    assert not np.array_equal(other_seed[7], a[0])
    row = a[0]
    assert row.shape == (spec.encoder_len + spec.decoder_len,)
    inputs = row[: spec.encoder_len]
    targets = row[spec.encoder_len :]
    targets = targets[: np.flatnonzero(targets == EOS)[0] + 1]
    inputs = inputs[: np.flatnonzero(inputs == EOS)[0] + 1]
    assert reconstruct(inputs, targets) == _Windows(spec.raw_len)[7].tolist()
    with pytest.raises(DataError, match="needs sentinel tokens"):
        SpanCorruptionDataset(_Windows(spec.raw_len), spec, [], EOS, PAD, seed=5)
