"""Tokenizers: one interface (:class:`Tokenizer`), two backends (sentencepiece, Hugging Face
``tokenizer.json``), chosen by what a path holds (:func:`load_tokenizer`); training of either."""

from meshforge.tokenizers.interface import TOKENIZER_FILES, Tokenizer, TokenizerError
from meshforge.tokenizers.load import load_tokenizer, tokenizer_file
from meshforge.tokenizers.sentencepiece_tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    PRESETS,
    UNK_ID,
    SentencePieceTokenizer,
    train_tokenizer,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "PRESETS",
    "TOKENIZER_FILES",
    "UNK_ID",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
    "tokenizer_file",
    "train_tokenizer",
]
