"""A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library) behind meshforge's interface.

Special tokens are read, first found wins, from ``tokenizer_config.json``, then
``special_tokens_map.json`` (token strings, looked up in the vocabulary), then the ids of
``generation_config.json`` and ``config.json`` beside the tokenizer (a list of EOS ids gives
its first). A token named nowhere is ``None``. ``add_bos`` is ``add_bos_token`` of the
config, else whether the tokenizer's own ``encode`` with special tokens starts with BOS.

:meth:`HFTokenizer.save` writes ``tokenizer.json`` and a ``tokenizer_config.json`` holding the
resolved special tokens, so a copy needs neither the model's config nor its generation config.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from meshforge.tokenizers.interface import Tokenizer, TokenizerError

ROLES = ("bos", "eos", "pad", "unk")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path} is not valid JSON ({exc}): fix or remove it") from None
    return data if isinstance(data, dict) else {}


def _token_string(value) -> str | None:
    if isinstance(value, dict):  # an AddedToken written out
        value = value.get("content")
    return value if isinstance(value, str) else None


def _first_id(value) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` and the special tokens of the config files beside it."""

    kind = "hf"
    main_file = "tokenizer.json"

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise TokenizerError(
                f'{path} is a Hugging Face tokenizer: install the `tokenizers` package (pip install -e ".[hf]")'
            ) from None
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer {self.path} does not exist: pass a tokenizer.json or an HF directory")
        data = self.path.read_bytes()
        try:
            self._tok = RustTokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # the Rust side raises a plain Exception on bad JSON or an unknown model
            raise TokenizerError(
                f"{self.path} is not a Hugging Face tokenizer.json ({str(exc)[:200]}): "
                "pass the tokenizer.json the model was trained with"
            ) from None
        self.fingerprint = hashlib.sha256(data).hexdigest()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError(f"{self.path} has an empty vocabulary: pass a trained tokenizer.json")
        self._size = max(vocab.values()) + 1
        here = self.path.parent
        self.config = _read_json(here / "tokenizer_config.json")
        self._ids = self._special_ids(here)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (self._ids[r] for r in ROLES)
        self.add_bos = self._bos_convention()

    def _special_ids(self, here: Path) -> dict[str, int | None]:
        specials = _read_json(here / "special_tokens_map.json")
        model_ids = [_read_json(here / "generation_config.json"), _read_json(here / "config.json")]
        out: dict[str, int | None] = {}
        for role in ROLES:
            found = None
            for source in (self.config, specials):
                if f"{role}_token" in source:
                    text = _token_string(source[f"{role}_token"])
                    found = None if text is None else self._tok.token_to_id(text)
                    if text is not None and found is None:
                        raise TokenizerError(
                            f"{role}_token {text!r} of {here} is not in the vocabulary of "
                            f"{self.path.name}: the config files belong to another tokenizer"
                        )
                    break
            else:
                for source in model_ids:
                    if (i := _first_id(source.get(f"{role}_token_id"))) is not None:
                        found = i if i < self._size else None
                        break
            if found is None and role == "unk":
                unk = getattr(self._tok.model, "unk_token", None)
                found = self._tok.token_to_id(unk) if isinstance(unk, str) else None
            out[role] = found
        return out

    def _bos_convention(self) -> bool:
        if isinstance(self.config.get("add_bos_token"), bool):
            return self.config["add_bos_token"] and self.bos_id is not None
        if self.bos_id is None:
            return False
        ids = self._tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_id

    @property
    def vocab_size(self) -> int:
        return self._size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # tokenizers reads TOKENIZERS_PARALLELISM at every batch call: one thread unless asked for more
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if num_threads > 1 else "false"
        try:
            return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]
        finally:
            if before is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or ""

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def special_tokens(self) -> dict[str, str | None]:
        """``{"bos_token": "<s>", ...}``: the resolved special tokens as strings (None where absent)."""
        return {f"{r}_token": None if self._ids[r] is None else self.id_to_piece(self._ids[r]) for r in ROLES}

    def save(self, directory: str | Path) -> Path:
        """``tokenizer.json`` (+ ``special_tokens_map.json``) and a self-contained ``tokenizer_config.json``."""
        directory = Path(directory)
        super().save(directory)
        config = dict(self.config)
        config.update({k: v for k, v in self.special_tokens().items() if k not in config and v is not None})
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        tmp = directory / f".tokenizer_config.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, directory / "tokenizer_config.json")
        return directory / "tokenizer.json"
