"""Prefix LM and a UL2-style mixture of denoisers for encoder-decoders, deterministic by global sample index.

Three kinds of denoiser (the paradigms of UL2, Tay et al. 2022) turn a raw window into
(inputs, targets), both ending with EOS:

    R  regular span corruption (short spans, low density, e.g. mean span 3, density 0.15)
    X  extreme span corruption (long spans and/or high density, e.g. mean 32, density 0.5)
    S  sequential: a prefix LM. The window is cut at a split point p,
           raw      a b c d e f g h
           inputs   a b c </s>             (the first p tokens)
           targets  d e f g h </s>         (the continuation)

R and X use :mod:`span_corruption` unchanged. ``prefix_lm`` is the mixture of the S-denoiser
alone. With mode tokens on, the denoiser's paradigm token ([R], [X] or [S], whatever
pieces the config names) is put in front of the inputs.

Determinism: sample ``i`` draws its denoiser from ``default_rng([seed, i, CHOICE_STREAM])``
and its span layout or split point from ``default_rng([seed, i])`` (the stream plain span
corruption uses), so the sample depends on the global index and seed only, never on the
world size, the rank or the order samples are read in.

Fixed lengths: the encoder length is ``data.seq_len`` for every denoiser. Each denoiser reads
as many raw tokens as fill the encoder (T5's rule for span corruption; for S, the longest
prefix fills it), so one sample reads one window of the longest raw length any denoiser
needs, and a denoiser that needs fewer tokens uses the window's first ones (the rest of
that window is not trained on). The decoder length is the longest target any configured
denoiser can make (a high-density X-denoiser makes targets about as long as the encoder);
shorter targets and inputs are padded, and padding is masked out of attention and the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import Denoiser
from .errors import DataError
from .span_corruption import corrupt, corrupted_lengths, noise_mask, raw_length_for

CHOICE_STREAM = 0x554C32
"""Third word of the seed of the rng that picks a sample's denoiser (kept apart from its layout rng)."""
KIND_INDEX = {"R": 0, "X": 1, "S": 2}
"""Position of each kind's piece in the mode tokens (R, X, S)."""


@dataclass(frozen=True)
class DenoiserPlan:
    """One denoiser with the lengths it works at."""

    kind: str
    mean_span: float
    density: float
    weight: float
    raw_len: int
    """Raw tokens it reads (the first ones of the sample's window)."""
    max_targets: int
    """Longest targets it makes, EOS included."""
    max_spans: int = 0
    """R/X: noise spans per sample (sentinels needed)."""
    split_lo: int = 0
    """S: shortest prefix, in tokens."""
    split_hi: int = 0
    """S: longest prefix, in tokens."""

    def __str__(self) -> str:
        name = "S" if self.kind == "S" else f"{self.kind}:{self.mean_span:g}:{self.density:g}"
        return f"{name}={self.weight:g}"


@dataclass(frozen=True)
class Ul2Spec:
    encoder_len: int
    decoder_len: int
    denoisers: tuple[DenoiserPlan, ...]
    mode_tokens: bool
    """A paradigm token is prepended to every sample's inputs."""

    @property
    def raw_len(self) -> int:
        """Tokens of the raw window each sample reads: the most any denoiser needs."""
        return max(d.raw_len for d in self.denoisers)

    @property
    def probabilities(self) -> np.ndarray:
        w = np.asarray([d.weight for d in self.denoisers], dtype=np.float64)
        return w / w.sum()


def span_plan(d: Denoiser, budget: int) -> DenoiserPlan:
    """R/X denoiser whose inputs (EOS included) fill ``budget`` encoder tokens."""
    raw, targets = raw_length_for(budget, d.density, d.mean_span)
    if raw < 2 or corrupted_lengths(raw, d.density, d.mean_span)[0] > budget:
        raise DataError(f"denoiser {d}: {budget} encoder tokens are too few for span corruption; raise data.seq_len")
    noise = min(max(int(round(raw * d.density)), 1), raw - 1)
    spans = max(1, int(round(noise / d.mean_span)))
    return DenoiserPlan(d.kind, d.mean_span, d.density, d.weight, raw, targets, max_spans=spans)


def prefix_lm_plan(budget: int, lo_frac: float, hi_frac: float, weight: float = 1.0) -> DenoiserPlan:
    """S-denoiser whose longest prefix (EOS included) fills ``budget`` encoder tokens.

    The window is the longest ``L`` with ``hi_frac * L < budget``, so the longest prefix
    ``floor(hi_frac * L)`` is ``budget - 1`` tokens (plus EOS); the prefix length is drawn
    from ``[ceil(lo_frac * L), floor(hi_frac * L)]`` (both at least 1 and at most L - 1; when
    rounding empties the range, as it can for lo_frac == hi_frac, it is ``floor(hi_frac * L)``).
    """
    window = max(1, int(math.ceil(budget / hi_frac)) - 1)
    while hi_frac * (window + 1) < budget:
        window += 1
    while window > 1 and hi_frac * window >= budget:
        window -= 1
    hi = min(int(math.floor(hi_frac * window)), window - 1)
    if budget < 2 or hi < 1:
        raise DataError(
            f"the prefix LM with data.prefix_lm_max = {hi_frac:g} makes no split of a window that fills "
            f"{budget} encoder tokens; raise data.seq_len or lower data.prefix_lm_max"
        )
    lo = min(max(1, int(math.ceil(lo_frac * window))), hi)
    return DenoiserPlan("S", 0.0, 0.0, weight, window, window - lo + 1, split_lo=lo, split_hi=hi)


def make_ul2_spec(
    encoder_len: int,
    decoder_len: int,
    denoisers: list[Denoiser],
    prefix_min: float,
    prefix_max: float,
    mode_tokens: bool = False,
) -> Ul2Spec:
    """Lengths of every denoiser; ``decoder_len`` 0 means the longest target any of them makes."""
    if not denoisers:
        raise DataError("a denoiser mixture needs at least one denoiser (data.ul2_denoisers)")
    budget = encoder_len - (1 if mode_tokens else 0)
    plans = tuple(
        prefix_lm_plan(budget, prefix_min, prefix_max, d.weight) if d.kind == "S" else span_plan(d, budget)
        for d in denoisers
    )
    need = max(p.max_targets for p in plans)
    if decoder_len and decoder_len < need:
        longest = max(plans, key=lambda p: p.max_targets)
        raise DataError(
            f"decoder length {decoder_len} is shorter than the {need} target tokens denoiser {longest} "
            f"makes from encoder length {encoder_len}; raise data.decoder_seq_len to at least {need} "
            "(or set it to 0 to derive it)"
        )
    return Ul2Spec(encoder_len, decoder_len or need, plans, mode_tokens)


def prefix_split(tokens: np.ndarray, split: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) = (tokens[:split] + EOS, tokens[split:] + EOS)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return (
        np.concatenate([tokens[:split], [eos_id]]).astype(np.int64),
        np.concatenate([tokens[split:], [eos_id]]).astype(np.int64),
    )


class Ul2Dataset:
    """Sample i: [inputs padded to encoder_len | targets padded to decoder_len], by a denoiser drawn for i.

    ``base`` is a dataset whose items are raw windows of at least ``spec.raw_len`` tokens
    (e.g. a TokenDataset with seq_len = raw_len - 1). ``mode_ids`` are the (R, X, S) token ids
    to prepend when ``spec.mode_tokens`` is on.
    """

    def __init__(
        self,
        base,
        spec: Ul2Spec,
        sentinels: list[int],
        eos_id: int,
        pad_id: int,
        seed: int,
        mode_ids: tuple[int, int, int] | None = None,
    ):
        if spec.mode_tokens and (mode_ids is None or len(mode_ids) != 3):
            raise DataError("UL2 mode tokens are on but no (R, X, S) token ids were given")
        spans = max((p.max_spans for p in spec.denoisers), default=0)
        if spans > len(sentinels):
            raise DataError(
                f"the span-corruption denoisers make up to {spans} noise spans per sample but the "
                f"tokenizer has {len(sentinels)} sentinel tokens (<extra_id_0>, ...): train it with "
                "`meshforge tokenizer train --preset t5` or use fewer spans (longer mean span)"
            )
        self.base, self.spec, self.seed = base, spec, seed
        self.sentinels = np.asarray(sentinels, dtype=np.int64)
        self.eos_id, self.pad_id = eos_id, pad_id
        self.mode_ids = tuple(mode_ids) if spec.mode_tokens else None
        self._cumulative = np.cumsum(spec.probabilities)

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str):
        """Everything else (a blend's resume state, ``prepare``) is the base dataset's."""
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def denoiser_index(self, i: int) -> int:
        """Which of ``spec.denoisers`` makes sample ``i``."""
        if len(self.spec.denoisers) == 1:
            return 0
        u = np.random.default_rng([self.seed, i, CHOICE_STREAM]).random()
        return min(int(np.searchsorted(self._cumulative, u, side="right")), len(self.spec.denoisers) - 1)

    def sample(self, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(denoiser index, inputs, targets) of sample ``i``, unpadded; both end with EOS."""
        k = self.denoiser_index(i)
        plan = self.spec.denoisers[k]
        raw = np.asarray(self.base[i], dtype=np.int64)
        if len(raw) < plan.raw_len:
            raise DataError(f"raw window of sample {i} has {len(raw)} tokens; denoiser {plan} needs {plan.raw_len}")
        raw = raw[: plan.raw_len]
        rng = np.random.default_rng([self.seed, i])
        if plan.kind == "S":
            inputs, targets = prefix_split(raw, int(rng.integers(plan.split_lo, plan.split_hi + 1)), self.eos_id)
        else:
            mask = noise_mask(len(raw), plan.density, plan.mean_span, rng)
            inputs, targets = corrupt(raw, mask, self.sentinels, self.eos_id)
        if self.mode_ids is not None:
            inputs = np.concatenate([[self.mode_ids[KIND_INDEX[plan.kind]]], inputs]).astype(np.int64)
        return k, inputs, targets

    def __getitem__(self, i: int) -> np.ndarray:
        _, inputs, targets = self.sample(i)
        enc, dec = self.spec.encoder_len, self.spec.decoder_len
        row = np.full(enc + dec, self.pad_id, dtype=np.int64)
        row[: len(inputs)] = inputs
        row[enc : enc + len(targets)] = targets
        return row
