"""The objective settings of a job: UL2's denoiser mixture and mode tokens.

Parsed from ``data.ul2_denoisers`` and ``data.ul2_mode_tokens``; which objective ``data.objective = auto``
trains is the family's (:func:`meshforge.models.resolve_objective`); the objectives themselves are built
in :mod:`meshforge.pretrain.objectives`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sections import ConfigError

ENCODER_DECODER_OBJECTIVES = ("span_corruption", "prefix_lm", "ul2")
"""Objectives whose samples are [encoder inputs | decoder targets]."""
UL2_KINDS = {"R": "regular span corruption", "X": "extreme span corruption", "S": "sequential (prefix LM)"}
"""UL2 denoiser kinds (paradigms), in the order of data.ul2_mode_tokens."""


@dataclass(frozen=True)
class Denoiser:
    """One entry of data.ul2_denoisers: span corruption (R/X) with its mean span and density, or S (prefix LM)."""

    kind: str
    mean_span: float = 0.0
    density: float = 0.0
    weight: float = 1.0

    def __str__(self) -> str:
        spec = self.kind if self.kind == "S" else f"{self.kind}:{self.mean_span:g}:{self.density:g}"
        return f"{spec}={self.weight:g}"


def parse_denoisers(text: str) -> list[Denoiser]:
    """``"R:3:0.15=0.4,X:32:0.5=0.2,S=0.2"`` -> denoisers; ConfigError naming data.ul2_denoisers on bad input."""
    key = "data.ul2_denoisers"
    form = "KIND:MEAN_SPAN:DENSITY=WEIGHT for R/X, S=WEIGHT for the prefix LM, comma separated"
    out: list[Denoiser] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            raise ConfigError(f"{key} = {text!r} has an empty entry; expected {form}")
        spec, _, weight_text = entry.partition("=")
        parts = [p.strip() for p in spec.split(":")]
        kind = parts[0]
        if kind not in UL2_KINDS:
            raise ConfigError(
                f"{key}: {entry!r} has kind {kind!r}; kinds are "
                + ", ".join(f"{k} ({v})" for k, v in UL2_KINDS.items())
            )
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
            nums = [float(p) for p in parts[1:]]
        except ValueError:
            raise ConfigError(f"{key}: {entry!r} is not {form}") from None
        if not (weight > 0 and weight < float("inf")):
            raise ConfigError(f"{key}: {entry!r} has weight {weight_text.strip()}; weights must be positive")
        if kind == "S":
            if nums:
                raise ConfigError(
                    f"{key}: {entry!r}: the S denoiser takes no numbers (write S=WEIGHT); its split "
                    "bounds are data.prefix_lm_min and data.prefix_lm_max"
                )
            d = Denoiser("S", weight=weight)
        else:
            if len(nums) != 2:
                raise ConfigError(f"{key}: {entry!r} needs a mean span and a density, e.g. {kind}:3:0.15=1")
            mean_span, density = nums
            if mean_span < 1.0 or not 0.0 < density < 1.0:
                raise ConfigError(
                    f"{key}: {entry!r} needs mean span >= 1 and density in (0, 1), got {mean_span:g} and {density:g}"
                )
            d = Denoiser(kind, mean_span, density, weight)
        if any((o.kind, o.mean_span, o.density) == (d.kind, d.mean_span, d.density) for o in out):
            raise ConfigError(
                f"{key}: denoiser {spec.strip()!r} is listed twice; give it one entry with the summed weight"
            )
        out.append(d)
    return out


def mode_token_pieces(text: str) -> tuple[str, str, str]:
    """The (R, X, S) pieces named by data.ul2_mode_tokens (``reserved`` or three comma-separated pieces)."""
    if text.strip() == "reserved":
        return ("<reserved_0>", "<reserved_1>", "<reserved_2>")
    pieces = tuple(p.strip() for p in text.split(","))
    if len(pieces) != 3 or not all(pieces) or len(set(pieces)) != 3:
        raise ConfigError(
            f"data.ul2_mode_tokens = {text!r} must be 'reserved' or three distinct comma-separated "
            "tokenizer pieces for R, X and S (e.g. '[NLU],[NLG],[S2S]'), or empty for none"
        )
    return pieces  # type: ignore[return-value]
