"""The one tokenizer interface every backend implements, and what is shared between them.

A tokenizer is one or a few files (:meth:`Tokenizer.files`) that travel together into data
dirs, checkpoints and init dirs (:meth:`Tokenizer.save`). Special tokens come from the
tokenizer itself (and, for Hugging Face tokenizers, its config files), never from fixed
ids: an absent token is ``None`` (Qwen has no BOS, a Llama-2 sentencepiece model no pad).

``add_bos`` is the tokenizer's own convention for the start of a text (sentencepiece
models of meshforge: no; a Hugging Face tokenizer: whether its ``encode`` with special tokens
puts BOS first, or its ``add_bos_token``). Documents end with EOS when the tokenizer has one.
``meshforge data prepare --bos/--no-bos --eos/--no-eos`` overrides either.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

from meshforge.errors import MeshforgeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
"""Every file name a tokenizer copy may hold (a data dir, a checkpoint, an init dir)."""


class TokenizerError(MeshforgeError, ValueError):
    """A tokenizer that cannot be trained or loaded (bad input, settings or model file)."""


class Tokenizer:
    """What meshforge asks of a tokenizer; subclasses fill in the backend."""

    kind: str = ""
    """``sentencepiece`` or ``hf`` (a Hugging Face ``tokenizer.json``)."""
    main_file: str = ""
    """The main file's name in a copy (:meth:`save`): ``tokenizer.model`` or ``tokenizer.json``."""
    path: Path
    """The main file (``.model`` or ``tokenizer.json``)."""
    fingerprint: str
    """sha256 of the main file: data prepared with one tokenizer is refused with another."""
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool = False

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS is added."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS), on ``num_threads`` of the library's threads."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def piece_to_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def files(self) -> dict[str, Path]:
        """The files a copy of this tokenizer needs, by the name they get in the copy: the main file, and
        the HF config files beside it (special tokens, an HF directory's ``add_bos_token``)."""
        out = {self.main_file: self.path}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (self.path.parent / name).is_file():
                out[name] = self.path.parent / name
        return out

    def save(self, directory: str | Path) -> Path:
        """Copy :meth:`files` into ``directory`` (each atomically); returns the copy's main file."""
        directory = Path(directory)
        for name, src in self.files().items():
            tmp = directory / f".{name}.{os.getpid()}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, directory / name)
        return directory / self.main_file

    def describe(self) -> dict:
        """The manifest's record of this tokenizer (special ids and the document convention)."""
        return {
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "add_bos": self.add_bos,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, vocab_size={self.vocab_size})"
