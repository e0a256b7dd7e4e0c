"""Blending several datasets with fixed proportions, in one deterministic global order.

**The order.** With normalised weights ``w_k``, source ``k``'s ``j``-th sample gets the ideal
position ``t = (j + 0.5) / w_k``; the blended order sorts all samples by ``t`` (ties go to
the source listed first). After any ``n`` samples every source has had ``w_k * n`` of them
within about one sample (the same guarantee as Megatron's greedy error-minimising
assignment), the order depends on the weights alone (never on world size, rank or the data),
and a longer order starts with the shorter one. Blended sample ``m`` is sample ``j`` of
source ``k``, i.e. ``source[k][j]`` (a :class:`TokenDataset`, whose own epochs and shuffling
apply), so sources of different sizes simply run through different numbers of epochs.

**The cache.** The order is built with numpy (one stable argsort) for a power-of-two horizon
and cached in ``cache_dir`` as ``.npy`` files (memory-mapped when read). One process builds
it under an ``fcntl`` lock; the others wait and load it. Reading past the horizon builds the
next power of two.

**Changing the blend on resume.** The loader's state holds, next to ``consumed_samples``,
the blend history: ``segments``, each ``{"start": position, "sources": [...], "weights":
[...], "offsets": {source: samples consumed before start}}``. On ``load_state_dict`` the
history up to the resume point ``c`` is restored; if the configured weights (or sources)
differ from the last segment's, a new segment starts at ``c`` whose offsets are the number of
samples each source had given up to ``c``. So the new proportions apply from exactly the
resume point, each source continues with its next unseen sample (nothing repeated, nothing
skipped), a new source starts at its sample 0, and a dropped source simply stops. Resuming
again without a change continues bit-for-bit, because the history travels in the checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meshforge.data_pipeline.errors import DataError

_MIN_HORIZON = 1 << 16
_ORDER_VERSION = 1


def parse_blend(spec: str) -> list[tuple[float, str]]:
    """``"0.7:data/web,0.3:data/books"`` -> ``[(0.7, "data/web"), (0.3, "data/books")]``, weights summing to 1."""
    items = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        weight, sep, path = part.partition(":")
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not sep or not path or not math.isfinite(w) or w < 0:
            raise DataError(
                f'data.blend item {part!r} is not WEIGHT:PATH with a weight >= 0, e.g. "0.7:data/web,0.3:data/books"'
            )
        items.append((w, path.strip()))
    if not items:
        raise DataError(f'data.blend {spec!r} names no datasets: use "WEIGHT:PATH,WEIGHT:PATH"')
    paths = [p for _, p in items]
    if len(set(paths)) != len(paths):
        raise DataError(f"data.blend {spec!r} names a dataset twice: merge its weights into one item")
    total = sum(w for w, _ in items)
    if total <= 0:
        raise DataError(f"data.blend {spec!r} has no positive weight")
    return [(w / total, p) for w, p in items]


def blend_order(weights, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, sample index within source) of the first ``n`` blended samples."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w) or np.any(w <= 0):
        raise DataError(f"blend weights must be positive, got {list(w)}")
    if abs(w.sum() - 1.0) > 1e-9:  # normalised weights are used bit-for-bit as given
        w = w / w.sum()
    K = len(w)
    times, src, idx = [], [], []
    for k in range(K):
        m = int(math.ceil((n + K) * w[k])) + 1  # every sample ranked < n has t < n + K
        j = np.arange(m, dtype=np.int64)
        times.append(_times(j, w[k]))
        src.append(np.full(m, k, dtype=np.int16))
        idx.append(j)
    order = np.argsort(np.concatenate(times), kind="stable")[:n]
    return np.concatenate(src)[order], np.concatenate(idx)[order]


def _times(j: np.ndarray, w: float) -> np.ndarray:
    return (j + 0.5) / w


def _count_before(w: float, t: float, inclusive: bool) -> int:
    """How many samples of a source of weight ``w`` have time < ``t`` (<= with ``inclusive``)."""
    j = max(0, int(math.floor(t * w - 0.5)) - 2)
    while True:
        tj = float(_times(np.int64(j), w))
        if tj < t or (inclusive and tj == t):
            j += 1
        else:
            return j


def _normalise(weights) -> list[float]:
    w = np.asarray(weights, dtype=np.float64)
    return [float(x) for x in w / w.sum()]


class _OrderCache:
    """Blend orders per weight vector, grown by powers of two, cached on disk when a dir is given."""

    def __init__(self, cache_dir: str | Path | None):
        self.dir = Path(cache_dir) if cache_dir else None
        self._mem: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(weights: list[float]) -> str:
        blob = json.dumps({"v": _ORDER_VERSION, "weights": [repr(w) for w in weights]})
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def get(self, weights: list[float], needed: int) -> tuple[np.ndarray, np.ndarray]:
        key = self.key(weights)
        with self._lock:
            have = self._mem.get(key)
            if have is not None and len(have[0]) >= needed:
                return have
            n = max(_MIN_HORIZON, 1 << max(0, int(needed - 1).bit_length()))
            built = self._load_or_build(key, weights, n)
            self._mem[key] = built
            return built

    def _paths(self, key: str, n: int) -> tuple[Path, Path]:
        return self.dir / f"blend-{key}-{n}.src.npy", self.dir / f"blend-{key}-{n}.idx.npy"

    def _find(self, key: str, n: int):
        best = None
        for p in self.dir.glob(f"blend-{key}-*.src.npy"):
            size = int(p.name.split("-")[2].split(".")[0])
            if size >= n and (best is None or size < best):
                best = size
        if best is None:
            return None
        sp, ip = self._paths(key, best)
        return np.load(sp, mmap_mode="r"), np.load(ip, mmap_mode="r")

    def _load_or_build(self, key: str, weights: list[float], n: int):
        if self.dir is None:
            return blend_order(weights, n)
        found = self._find(key, n) if self.dir.is_dir() else None
        if found is not None:
            return found
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"blend-{key}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                found = self._find(key, n)  # another process may have built it meanwhile
                if found is not None:
                    return found
                src, idx = blend_order(weights, n)
                sp, ip = self._paths(key, n)
                for path, arr in ((ip, idx), (sp, src)):  # .src last: its presence marks both complete
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                    with open(tmp, "wb") as f:
                        np.save(f, arr)
                    os.replace(tmp, path)
                return np.load(sp, mmap_mode="r"), np.load(ip, mmap_mode="r")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass
class _Segment:
    start: int
    sources: list[str]
    weights: list[float]
    offsets: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "start": self.start,
            "sources": list(self.sources),
            "weights": list(self.weights),
            "offsets": {k: int(v) for k, v in self.offsets.items()},
        }

    @staticmethod
    def from_dict(d: dict) -> "_Segment":
        return _Segment(
            int(d["start"]),
            list(d["sources"]),
            [float(w) for w in d["weights"]],
            {k: int(v) for k, v in d.get("offsets", {}).items()},
        )


class BlendedDataset:
    """Samples of several datasets interleaved by weight (see the module notes).

    ``sources`` maps a name (the data path) to a dataset (any ``ds[j]`` for ``j >= 0``, e.g.
    a :class:`TokenDataset`); ``weights`` maps the same names to weights (normalised here;
    weight 0 leaves a source out). Sample ``i`` is defined for every ``i >= 0``.
    """

    def __init__(self, sources: dict, weights: dict[str, float], cache_dir: str | Path | None = None):
        if set(weights) - set(sources):
            raise DataError(f"blend weights name datasets that were not given: {sorted(set(weights) - set(sources))}")
        used = [n for n in weights if weights[n] > 0]
        if not used:
            raise DataError("a blend needs at least one dataset with a positive weight")
        self.sources = dict(sources)
        self._cache = _OrderCache(cache_dir)
        self.segments = [_Segment(0, used, _normalise([weights[n] for n in used]))]
        self._configured = (list(self.segments[0].sources), list(self.segments[0].weights))

    @property
    def return_segments(self) -> bool:
        return any(getattr(ds, "return_segments", False) for ds in self.sources.values())

    def __len__(self) -> int:
        """Nominal length: the samples of one epoch of every source (sample ``i`` exists for any ``i``)."""
        return sum(len(ds) for ds in self.sources.values())

    def prepare(self, num_samples: int) -> None:
        """Build (or load) the cached order for the first ``num_samples`` samples now."""
        seg = self.segments[-1]
        self._cache.get(seg.weights, max(1, num_samples - seg.start))

    def _segment(self, i: int) -> _Segment:
        for seg in reversed(self.segments):
            if seg.start <= i:
                return seg
        raise DataError(f"blend position {i} precedes the blend history")  # unreachable: segment 0 starts at 0

    def locate(self, i: int) -> tuple[str, int]:
        """(source name, sample index within that source) of blended sample ``i``."""
        i = int(i)
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        seg = self._segment(i)
        m = i - seg.start
        src, idx = self._cache.get(seg.weights, m + 1)
        name = seg.sources[int(src[m])]
        return name, seg.offsets.get(name, 0) + int(idx[m])

    def __getitem__(self, i: int):
        name, j = self.locate(i)
        ds = self.sources.get(name)
        if ds is None:
            raise DataError(f"blend sample {i} comes from {name!r}, which is not part of the current blend")
        return ds[j]

    def consumed_per_source(self, c: int) -> dict[str, int]:
        """Samples each source has given in blended positions ``[0, c)``."""
        seg = self._segment(c) if c > 0 else self.segments[0]
        m = c - seg.start
        counts = dict(seg.offsets)
        for name in seg.sources:
            counts.setdefault(name, 0)
        if m <= 0:
            return counts
        src, idx = self._cache.get(seg.weights, m + 1)
        k_m, t_m = int(src[m]), _times(np.int64(idx[m]), seg.weights[int(src[m])])
        for k, (name, w) in enumerate(zip(seg.sources, seg.weights)):
            # samples of source k ranked before position m: time < t_m, or time == t_m from an earlier source
            counts[name] += _count_before(w, float(t_m), inclusive=k < k_m)
        return counts

    def state_dict(self, consumed: int) -> dict:
        """The blend history up to ``consumed`` (JSON-able), for the loader's checkpoint state."""
        kept = [s.to_dict() for s in self.segments if s.start <= consumed]
        return {"segments": kept, "consumed_per_source": self.consumed_per_source(consumed)}

    def load_state_dict(self, consumed: int, state: dict | None) -> None:
        """Restore the history up to ``consumed``; start a segment there if the configured blend differs."""
        sources, weights = self._configured
        if not state or not state.get("segments"):
            self.segments = [_Segment(0, sources, weights)]
            return
        history = [_Segment.from_dict(d) for d in state["segments"]]
        history = [s for s in history if s.start <= consumed] or history[:1]
        self.segments = history
        last = history[-1]
        if last.sources != sources or last.weights != weights:
            offsets = self.consumed_per_source(consumed)
            if last.start == consumed:  # a change at the very point the last segment began replaces it
                self.segments = history[:-1]
                offsets = dict(last.offsets)
            self.segments.append(_Segment(consumed, sources, weights, offsets))
