"""Sentencepiece training and loading with real models."""

from __future__ import annotations

import pytest

from meshforge.tokenizers import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TokenizerError, load_tokenizer, train_tokenizer

UNUSUAL = (
    "Ünïcödé  spaces\ttab\nnew line — “quotes” ﬁ ligature, 日本語, 한국어, emoji 🦜🚀, math 𝔘 ∮, zero\u200bwidth, é"
)


def test_bpe_fixed_ids_and_vocab(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    assert tok.vocab_size == 400
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    ids = tok.encode("To be, or not to be")
    assert ids and tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.path == tiny_tokenizer.resolve()
    assert len(tok.fingerprint) == 64


def test_byte_fallback_roundtrip_unusual_unicode(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    ids = tok.encode(UNUSUAL)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == UNUSUAL
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)


def test_unigram_trains_and_roundtrips(tmp_path, small_corpus):
    path = train_tokenizer([small_corpus], tmp_path / "uni", vocab_size=400, model_type="unigram")
    tok = load_tokenizer(path)
    assert tok.vocab_size == 400
    assert tok.decode(tok.encode(UNUSUAL)) == UNUSUAL


def _max_digits_per_piece(tok, text):
    return max(sum(c.isdigit() for c in tok.id_to_piece(i)) for i in tok.encode(text))


def test_digit_splitting(tmp_path, small_corpus, tiny_tokenizer, jsonl_writer):
    numbers = ["2024 1999 2024 31415 2024 1999 " * 4 for _ in range(200)]
    src = jsonl_writer(tmp_path / "nums.jsonl", numbers)
    split = load_tokenizer(train_tokenizer([src, small_corpus], tmp_path / "split", vocab_size=350))
    joined = load_tokenizer(
        train_tokenizer([src, small_corpus], tmp_path / "joined", vocab_size=350, split_digits=False)
    )
    assert _max_digits_per_piece(split, "2024 31415") == 1
    assert _max_digits_per_piece(joined, "2024 31415") > 1
    assert _max_digits_per_piece(load_tokenizer(tiny_tokenizer), "In the year 1537") == 1


def test_special_and_reserved_tokens(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    assert [tok.piece_to_id(p) for p in ("<|sep|>", "<reserved_0>", "<reserved_1>")] == [4, 5, 6]
    ids = tok.encode("good night<|sep|>sweet prince")
    assert ids.count(4) == 1


def test_retrain_gives_same_fingerprint(tmp_path, small_corpus, tiny_tokenizer):
    again = train_tokenizer(
        [small_corpus], tmp_path / "again", vocab_size=400, special_tokens=["<|sep|>"], n_reserved=2
    )
    assert load_tokenizer(again).fingerprint == load_tokenizer(tiny_tokenizer).fingerprint
    other = train_tokenizer(
        [small_corpus], tmp_path / "other", vocab_size=410, special_tokens=["<|sep|>"], n_reserved=2
    )
    assert load_tokenizer(other).fingerprint != load_tokenizer(tiny_tokenizer).fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.model", "other.model"]  # no temp files left


def test_txt_and_gz_inputs_with_text_field(tmp_path, corpus_docs, jsonl_writer):
    docs = corpus_docs(10)
    (tmp_path / "a.txt").write_text(docs[0])
    gz = jsonl_writer(tmp_path / "b.jsonl.gz", docs[1:], field="body")
    tok = load_tokenizer(train_tokenizer([tmp_path / "a.txt", gz], tmp_path / "m", vocab_size=350, text_field="body"))
    assert tok.vocab_size == 350


def test_errors(tmp_path, small_corpus):
    with pytest.raises(TokenizerError, match="does not exist"):
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "m", vocab_size=400)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n")
    with pytest.raises(TokenizerError, match="hold no text"):
        train_tokenizer([empty], tmp_path / "m", vocab_size=400)
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer([small_corpus], tmp_path / "m", vocab_size=200)
    with pytest.raises(TokenizerError, match="smaller vocab_size"):
        train_tokenizer([small_corpus], tmp_path / "m", vocab_size=60000)
    with pytest.raises(TokenizerError, match="model_type"):
        train_tokenizer([small_corpus], tmp_path / "m", vocab_size=400, model_type="wordpiece")
    assert not (tmp_path / "m.model").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        load_tokenizer(bad)


def test_llama_preset_keeps_whitespace_and_splits_digits(tmp_path, small_corpus):
    from meshforge.cli import main

    assert (
        main(
            [
                "tokenizer",
                "train",
                "--preset",
                "llama",
                "--input",
                str(small_corpus),
                "--model-prefix",
                str(tmp_path / "ll"),
                "--vocab-size",
                "400",
            ]
        )
        == 0
    )
    tok = load_tokenizer(tmp_path / "ll.model")
    text = "  two  leading spaces,\ttabs\t and 12345 digits  \n\n"
    assert tok.decode(tok.encode(text)) == text
    assert _max_digits_per_piece(tok, "12345 67890") == 1
    assert tok.decode(tok.encode(UNUSUAL)) == UNUSUAL  # byte fallback
    assert tok.fingerprint == load_tokenizer(train_tokenizer([small_corpus], tmp_path / "plain", 400)).fingerprint


def test_t5_preset_has_100_sentinels(tmp_path, small_corpus):
    path = train_tokenizer([small_corpus], tmp_path / "t5", vocab_size=500, preset="t5", special_tokens=["<|sep|>"])
    tok = load_tokenizer(path)
    assert [tok.piece_to_id(f"<extra_id_{i}>") for i in (0, 1, 99)] == [4, 5, 103]
    assert tok.piece_to_id("<|sep|>") == 104
    assert tok.encode("a<extra_id_7>b").count(11) == 1
    assert tok.decode(tok.encode(UNUSUAL)) == UNUSUAL
    import sentencepiece.sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    assert proto.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM and not proto.trainer_spec.split_digits
    with pytest.raises(TokenizerError, match="preset 'gpt' is unknown"):
        train_tokenizer([small_corpus], tmp_path / "x", vocab_size=500, preset="gpt")


def test_input_sentence_size_samples_reproducibly(tmp_path, small_corpus):
    from meshforge.tokenizers.sentencepiece_tokenizer import _sentences

    everything, seen = _sentences([small_corpus], "text")
    sample, seen2 = _sentences([small_corpus], "text", 150)
    assert seen == seen2 == len(everything) > 300
    assert (
        len(sample) == 150 and set(sample) <= set(everything) and sample == _sentences([small_corpus], "text", 150)[0]
    )
    assert sample != everything[:150]  # a sample from the whole corpus, shuffled
    assert _sentences([small_corpus], "text", 10**6)[0] == everything  # small corpus: all lines, in order
    a = train_tokenizer([small_corpus], tmp_path / "a", vocab_size=350, input_sentence_size=150)
    b = train_tokenizer([small_corpus], tmp_path / "b", vocab_size=350, input_sentence_size=150)
    full = train_tokenizer([small_corpus], tmp_path / "full", vocab_size=350)
    assert load_tokenizer(a).fingerprint == load_tokenizer(b).fingerprint != load_tokenizer(full).fingerprint


def test_bad_records_are_counted_as_data_prepare_counts_them(tmp_path, corpus_docs, jsonl_writer):
    """Tokenizer training reads with the data pipeline's readers: the same records are skipped and counted."""
    import gzip
    import json

    from meshforge.data_pipeline import prepare_data
    from meshforge.tokenizers.sentencepiece_tokenizer import iter_texts

    good = corpus_docs(12)
    src = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": t}) for t in good] + [
        "{not json",
        json.dumps({"body": "x"}),
        json.dumps({"text": 7}),
        json.dumps({"text": "  "}),
        json.dumps({"text": "\ud800 lone surrogate"}),
    ]
    src.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe not utf-8\n")
    skipped = dict.fromkeys(("empty", "invalid_utf8", "invalid_json", "missing_field", "non_string_field"), 0)
    assert list(iter_texts(src, "text", skipped)) == good
    assert skipped == {"empty": 1, "invalid_utf8": 2, "invalid_json": 1, "missing_field": 1, "non_string_field": 1}
    tok = train_tokenizer([src], tmp_path / "m", vocab_size=350)
    manifest = prepare_data([str(src)], str(tok), str(tmp_path / "data"), progress=False)
    assert manifest["skipped_records"] == skipped and manifest["num_documents"] == len(good)

    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("{not json\n" + json.dumps({"text": 3}) + "\n")
    with pytest.raises(
        TokenizerError, match=r"hold no text \(skipped records: .*'invalid_json': 1.*'non_string_field': 1"
    ):
        train_tokenizer([only_bad], tmp_path / "b", vocab_size=350)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress("\n".join(lines[:12]).encode() * 20)[:-40])
    with pytest.raises(TokenizerError, match="cannot be read to its end"):
        train_tokenizer([cut], tmp_path / "c", vocab_size=350)
    assert not (tmp_path / "b.model").exists() and not (tmp_path / "c.model").exists()
