"""Tokenizers: sentencepiece training and loading behind one small interface."""

from meshforge.tokenizers.sentencepiece_tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    PRESETS,
    UNK_ID,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "PRESETS",
    "UNK_ID",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
    "train_tokenizer",
]
