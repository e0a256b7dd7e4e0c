"""Training objectives: what a sample is and how a batch becomes a loss.

- ``lm``: next-token prediction for decoders. A sample is seq_len+1 tokens; inputs are
  the first seq_len, targets the last seq_len.
- ``span_corruption``: T5 for encoder-decoders. A sample is [inputs | targets] padded
  to the encoder and decoder lengths; the decoder reads the targets shifted right behind
  a start token (PAD, as in T5), padding is masked out of attention and the loss.
- ``prefix_lm`` and ``ul2``: encoder-decoder samples of the same [inputs | targets] form,
  made by a mixture of denoisers (``data_pipeline/ul2.py``): the prefix LM is the
  S-denoiser alone; UL2 mixes R/X span corruption and S, optionally with mode tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Denoiser, JobConfig, mode_token_pieces, parse_denoisers
from ..data_pipeline.errors import DataError
from ..data_pipeline.span_corruption import SpanCorruptionDataset, SpanCorruptionSpec, make_spec
from ..data_pipeline.ul2 import Ul2Dataset, Ul2Spec, make_ul2_spec
from ..models import resolve_objective
from ..models.losses import IGNORE_INDEX
from ..tokenizers import Tokenizer

SENTINEL_PIECE = "<extra_id_{}>"


@dataclass
class LMObjective:
    seq_len: int
    document_mask: bool = False
    """Samples carry document ids and attention stays inside each document."""

    @property
    def window(self) -> int:
        """The ``seq_len`` of the raw TokenDataset under this objective."""
        return self.seq_len

    def wrap(self, dataset):
        return dataset

    def model_inputs(self, batch):
        """(positional model args, targets) of one (micro-)batch from the loader."""
        if isinstance(batch, (tuple, list)):  # (tokens, document ids)
            tokens, segments = batch
            return (tokens[:, :-1], segments[:, :-1]), tokens[:, 1:]
        return (batch[:, :-1],), batch[:, 1:]

    def tokens_per_sample(self) -> int:
        return self.seq_len


@dataclass
class SpanCorruptionObjective:
    spec: SpanCorruptionSpec
    sentinels: list[int]
    eos_id: int
    pad_id: int

    seed: int = 0

    @property
    def window(self) -> int:
        return self.spec.raw_len - 1

    def wrap(self, dataset):
        """Corrupt each raw window of ``dataset`` (a TokenDataset or a blend of them)."""
        return SpanCorruptionDataset(dataset, self.spec, self.sentinels, self.eos_id, self.pad_id, self.seed)

    def model_inputs(self, batch: torch.Tensor):
        return encoder_decoder_inputs(batch, self.spec.encoder_len, self.pad_id)

    def tokens_per_sample(self) -> int:
        return self.spec.encoder_len + self.spec.decoder_len


def encoder_decoder_inputs(batch: torch.Tensor, encoder_len: int, pad_id: int):
    """[inputs | targets] rows -> ((src, decoder inputs, src mask), targets with padding ignored)."""
    src, tgt = batch[:, :encoder_len], batch[:, encoder_len:]
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], pad_id), tgt[:, :-1]], dim=1)
    targets = tgt.masked_fill(tgt == pad_id, IGNORE_INDEX)
    return (src, tgt_in, src != pad_id), targets


@dataclass
class Ul2Objective:
    """``prefix_lm`` (the S-denoiser alone) or ``ul2`` (a weighted mixture of R/X/S denoisers)."""

    spec: Ul2Spec
    sentinels: list[int]
    eos_id: int
    pad_id: int
    seed: int = 0
    mode_ids: tuple[int, int, int] | None = None
    """(R, X, S) paradigm token ids prepended to the inputs, or None."""

    @property
    def window(self) -> int:
        return self.spec.raw_len - 1

    def wrap(self, dataset):
        return Ul2Dataset(dataset, self.spec, self.sentinels, self.eos_id, self.pad_id, self.seed, self.mode_ids)

    def model_inputs(self, batch: torch.Tensor):
        return encoder_decoder_inputs(batch, self.spec.encoder_len, self.pad_id)

    def tokens_per_sample(self) -> int:
        return self.spec.encoder_len + self.spec.decoder_len


def sentinel_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ... as far as the tokenizer has them."""
    ids = []
    while True:
        i = special_piece_id(tokenizer, SENTINEL_PIECE.format(len(ids)))
        if i is None:
            return ids
        ids.append(i)


def special_piece_id(tokenizer: Tokenizer, piece: str) -> int | None:
    """The id of ``piece`` if the tokenizer holds it as one token (not UNK), else None."""
    i = tokenizer.piece_to_id(piece)
    if i is None or i < 0 or i == tokenizer.unk_id or tokenizer.id_to_piece(i) != piece:
        return None
    return i


def mode_token_ids(tokenizer: Tokenizer, setting: str) -> tuple[int, int, int]:
    """Ids of the (R, X, S) paradigm tokens named by data.ul2_mode_tokens; DataError if the tokenizer lacks one."""
    pieces = mode_token_pieces(setting)
    ids = []
    for kind, piece in zip("RXS", pieces):
        i = special_piece_id(tokenizer, piece)
        if i is None:
            add = (
                "`meshforge tokenizer train ... --reserved 3`"
                if setting.strip() == "reserved"
                else f"`meshforge tokenizer train ... --special-tokens {' '.join(pieces)}`"
            )
            raise DataError(
                f"data.ul2_mode_tokens: tokenizer {tokenizer.path} has no single token {piece!r} for the "
                f"{kind} mode; train one with {add}, or set data.ul2_mode_tokens = '' to train without "
                "mode tokens"
            )
        if i in (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id):
            raise DataError(f"data.ul2_mode_tokens: {piece!r} is a control token (pad/eos/bos/unk); name other pieces")
        ids.append(i)
    return tuple(ids)  # type: ignore[return-value]


def _check_positions(cfg: JobConfig, encoder_len: int, decoder_len: int) -> None:
    if max(decoder_len, encoder_len) > cfg.model.max_seq_len and cfg.model.position_encoding == "rope":
        raise DataError(
            f"encoder/decoder lengths {encoder_len}/{decoder_len} exceed model.max_seq_len {cfg.model.max_seq_len}"
        )


def build_ul2_objective(cfg: JobConfig, tokenizer: Tokenizer) -> Ul2Objective:
    d = cfg.data
    ul2 = resolve_objective(cfg) == "ul2"
    denoisers = parse_denoisers(d.ul2_denoisers) if ul2 else [Denoiser("S")]
    mode = ul2 and bool(d.ul2_mode_tokens)
    spec = make_ul2_spec(d.seq_len, d.decoder_seq_len, denoisers, d.prefix_lm_min, d.prefix_lm_max, mode)
    sentinels = sentinel_ids(tokenizer) if any(p.kind != "S" for p in spec.denoisers) else []
    if any(p.kind != "S" for p in spec.denoisers) and not sentinels:
        raise DataError(
            f"tokenizer {tokenizer.path} has no sentinel pieces <extra_id_0>, ...: the R/X denoisers of "
            "data.ul2_denoisers need them (train it with `meshforge tokenizer train --preset t5`, or "
            "use only S)"
        )
    mode_ids = mode_token_ids(tokenizer, d.ul2_mode_tokens) if mode else None
    if mode_ids is not None and set(mode_ids) & set(sentinels):
        raise DataError(
            f"data.ul2_mode_tokens {d.ul2_mode_tokens!r} names sentinel tokens (<extra_id_i>); use pieces of their own"
        )
    _check_positions(cfg, spec.encoder_len, spec.decoder_len)
    return Ul2Objective(spec, sentinels, tokenizer.eos_id, tokenizer.pad_id, cfg.train.seed, mode_ids)


def build_objective(cfg: JobConfig, tokenizer: Tokenizer):
    objective = resolve_objective(cfg)
    if objective == "lm":
        return LMObjective(cfg.data.seq_len, cfg.data.document_mask)
    missing = [role for role in ("eos", "pad") if getattr(tokenizer, f"{role}_id") is None]
    if missing:
        raise DataError(
            f"tokenizer {tokenizer.path} has no {' or '.join(missing)} token: the {objective} objective "
            "ends and pads its samples with them; name them in its tokenizer_config.json"
        )
    if objective in ("prefix_lm", "ul2"):
        return build_ul2_objective(cfg, tokenizer)
    spec = make_spec(cfg.data.seq_len, cfg.data.decoder_seq_len, cfg.data.noise_density, cfg.data.mean_noise_span)
    sentinels = sentinel_ids(tokenizer)
    if not sentinels:
        raise DataError(
            f"tokenizer {tokenizer.path} has no sentinel pieces <extra_id_0>, ...: span corruption needs "
            "them (train it with `meshforge tokenizer train --preset t5`)"
        )
    _check_positions(cfg, spec.encoder_len, spec.decoder_len)
    return SpanCorruptionObjective(spec, sentinels, tokenizer.eos_id, tokenizer.pad_id, cfg.train.seed)
