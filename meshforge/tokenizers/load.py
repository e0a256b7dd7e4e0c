"""``load_tokenizer``: the backend is chosen by what the path holds.

- a directory: its ``tokenizer.json`` (Hugging Face ``tokenizers``) if it has one, else its
  ``tokenizer.model`` (sentencepiece) -- an HF model dir, a data dir, a checkpoint, an init dir;
- a ``.json`` file: a Hugging Face ``tokenizer.json`` (special tokens from the config files
  beside it);
- any other file: a sentencepiece model, or a tiktoken BPE file (``<base64> <rank>`` lines:
  Meta's original Llama 3 ``tokenizer.model``).

A sentencepiece model with a ``tokenizer_config.json`` beside it takes ``add_bos_token`` from
it (Llama-2 directories set it).
"""

from __future__ import annotations

import json
from pathlib import Path

from meshforge.tokenizers.interface import Tokenizer, TokenizerError
from meshforge.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
from meshforge.tokenizers.tiktoken_file import looks_like_tiktoken


def tokenizer_file(path: str | Path) -> Path:
    """The main file of the tokenizer at ``path`` (a file, or a directory holding one)."""
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                return p / name
        raise TokenizerError(
            f"{p} holds neither tokenizer.json nor tokenizer.model: pass a tokenizer file or an HF "
            "directory holding one"
        )
    if not p.is_file():
        raise TokenizerError(
            f"tokenizer {p} does not exist: pass a sentencepiece .model, a tokenizer.json, or an HF "
            "directory holding one"
        )
    return p


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer at ``path``; :class:`TokenizerError` (one line) if missing or not a tokenizer."""
    main = tokenizer_file(path)
    if main.suffix == ".json":
        from meshforge.tokenizers.hf_json import HFTokenizer

        return HFTokenizer(main)
    with main.open("rb") as f:
        head = f.read(512)
    if looks_like_tiktoken(head):
        from meshforge.tokenizers.tiktoken_file import TiktokenTokenizer

        return TiktokenTokenizer(main)
    tok = SentencePieceTokenizer(main)
    config = main.parent / "tokenizer_config.json"
    if config.is_file():
        try:
            add = json.loads(config.read_text()).get("add_bos_token")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            add = None
        tok.add_bos = add is True and tok.bos_id is not None
    return tok
