"""Training objectives: what a sample is and how a batch becomes a loss.

- ``lm``: next-token prediction for decoders. A sample is seq_len+1 tokens; inputs are
  the first seq_len, targets the last seq_len.
- ``span_corruption``: T5 for encoder-decoders. A sample is [inputs | targets] padded
  to the encoder and decoder lengths; the decoder reads the targets shifted right behind
  a start token (PAD, as in T5), padding is masked out of attention and the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import JobConfig, resolve_objective
from ..data_pipeline.errors import DataError
from ..data_pipeline.span_corruption import SpanCorruptionDataset, SpanCorruptionSpec, make_spec
from ..tokenizers import Tokenizer
from ..models.losses import IGNORE_INDEX

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
        enc_len = self.spec.encoder_len
        src, tgt = batch[:, :enc_len], batch[:, enc_len:]
        tgt_in = torch.cat([torch.full_like(tgt[:, :1], self.pad_id), tgt[:, :-1]], dim=1)
        targets = tgt.masked_fill(tgt == self.pad_id, IGNORE_INDEX)
        return (src, tgt_in, src != self.pad_id), targets

    def tokens_per_sample(self) -> int:
        return self.spec.encoder_len + self.spec.decoder_len


def sentinel_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ... as far as the tokenizer has them."""
    ids = []
    while True:
        piece = SENTINEL_PIECE.format(len(ids))
        i = tokenizer.piece_to_id(piece)
        if i is None or i < 0 or i == tokenizer.unk_id or tokenizer.id_to_piece(i) != piece:
            return ids
        ids.append(i)


def build_objective(cfg: JobConfig, tokenizer: Tokenizer):
    if resolve_objective(cfg) == "lm":
        return LMObjective(cfg.data.seq_len, cfg.data.document_mask)
    spec = make_spec(cfg.data.seq_len, cfg.data.decoder_seq_len, cfg.data.noise_density, cfg.data.mean_noise_span)
    sentinels = sentinel_ids(tokenizer)
    if not sentinels:
        raise DataError(f"tokenizer {tokenizer.path} has no sentinel pieces <extra_id_0>, ...: span corruption needs "
                        "them (train it with `meshforge tokenizer train --preset t5`)")
    if max(spec.decoder_len, spec.encoder_len) > cfg.model.max_seq_len and cfg.model.position_encoding == "rope":
        raise DataError(f"encoder/decoder lengths {spec.encoder_len}/{spec.decoder_len} exceed model.max_seq_len "
                        f"{cfg.model.max_seq_len}")
    return SpanCorruptionObjective(spec, sentinels, tokenizer.eos_id, tokenizer.pad_id, cfg.train.seed)
