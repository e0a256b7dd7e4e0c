"""T5 span corruption, deterministic by global sample index.

From a window of raw tokens, about ``noise_density`` of them, in spans of mean length
``mean_noise_span``, are masked:

    raw      a b c d e f g h i j
    inputs   a b <X0> e f g <X1> j </s>        each masked span -> one sentinel
    targets  <X0> c d <X1> h i </s>            each sentinel followed by its span

The span layout uses ``np.random.default_rng([seed, index])``, so sample i is the same
whatever the world size or the order samples are read in. Inputs and targets are padded
to fixed encoder/decoder lengths; the raw window length is chosen (as T5 does) so that
the inputs exactly fit the encoder length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DataError


def corrupted_lengths(raw_len: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(inputs length, targets length) for a raw window, EOS included."""
    noise = int(round(raw_len * noise_density))
    noise = min(max(noise, 1), raw_len - 1)
    spans = max(1, int(round(noise / mean_span)))
    return raw_len - noise + spans + 1, noise + spans + 1


def raw_length_for(encoder_len: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """The longest raw window whose inputs fit ``encoder_len``; returns (raw length, targets length)."""
    raw = encoder_len
    while corrupted_lengths(raw + 1, noise_density, mean_span)[0] <= encoder_len:
        raw += 1
    while raw > 2 and corrupted_lengths(raw, noise_density, mean_span)[0] > encoder_len:
        raw -= 1
    return raw, corrupted_lengths(raw, noise_density, mean_span)[1]


def noise_mask(length: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask with round(length * density) noise tokens in interleaved random spans."""
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    n_spans = max(1, int(round(n_noise / mean_span)))
    n_spans = min(n_spans, n_noise, length - n_noise)

    def segment(total: int, parts: int) -> np.ndarray:
        """``parts`` positive lengths summing to ``total``, uniformly among compositions."""
        cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
        return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)

    noise_spans = segment(n_noise, n_spans)
    keep_spans = segment(length - n_noise, n_spans)
    lengths = np.stack([keep_spans, noise_spans], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], n_spans), lengths)


def corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) from tokens and a noise mask; both end with EOS."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    n_spans = int(starts.sum())
    if n_spans > len(sentinels):
        raise DataError(f"{n_spans} noise spans need more sentinel tokens than the tokenizer has ({len(sentinels)})")
    span_id = np.cumsum(starts) - 1
    keep_in = ~mask | starts
    inputs = np.where(starts, sentinels[span_id.clip(0)], tokens)[keep_in]
    targets = []
    for s in range(n_spans):
        targets.append([sentinels[s]])
        targets.append(tokens[(span_id == s) & mask])
    return (np.concatenate([inputs, [eos_id]]).astype(np.int64), np.concatenate(targets + [[eos_id]]).astype(np.int64))


@dataclass
class SpanCorruptionSpec:
    encoder_len: int
    decoder_len: int
    raw_len: int
    noise_density: float
    mean_span: float


def make_spec(encoder_len: int, decoder_len: int, noise_density: float, mean_span: float) -> SpanCorruptionSpec:
    raw, targets_len = raw_length_for(encoder_len, noise_density, mean_span)
    decoder_len = decoder_len or targets_len
    if decoder_len < targets_len:
        raise DataError(
            f"decoder length {decoder_len} is shorter than the {targets_len} target tokens span "
            f"corruption makes from encoder length {encoder_len}; raise data.decoder_seq_len"
        )
    return SpanCorruptionSpec(encoder_len, decoder_len, raw, noise_density, mean_span)


class SpanCorruptionDataset:
    """Sample i: [inputs padded to encoder_len | targets padded to decoder_len] as one int64 row.

    ``base`` is a dataset whose items are raw windows of ``spec.raw_len`` tokens (e.g. a
    TokenDataset with seq_len = raw_len - 1).
    """

    def __init__(self, base, spec: SpanCorruptionSpec, sentinels: list[int], eos_id: int, pad_id: int, seed: int):
        if not sentinels:
            raise DataError(
                "span corruption needs sentinel tokens (<extra_id_0>, ...) in the tokenizer: train it "
                "with `meshforge tokenizer train --preset t5` or add them as special tokens"
            )
        self.base, self.spec, self.seed = base, spec, seed
        self.sentinels = np.asarray(sentinels, dtype=np.int64)
        self.eos_id, self.pad_id = eos_id, pad_id

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str):
        """Everything else (a blend's resume state, ``prepare``) is the base dataset's."""
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, i: int) -> np.ndarray:
        raw = np.asarray(self.base[i], dtype=np.int64)[: self.spec.raw_len]
        rng = np.random.default_rng([self.seed, i])
        inputs, targets = corrupt(
            raw, noise_mask(len(raw), self.spec.noise_density, self.spec.mean_span, rng), self.sentinels, self.eos_id
        )
        row = np.full(self.spec.encoder_len + self.spec.decoder_len, self.pad_id, dtype=np.int64)
        row[: len(inputs)] = inputs
        row[self.spec.encoder_len : self.spec.encoder_len + len(targets)] = targets
        return row
