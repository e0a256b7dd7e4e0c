"""Hugging Face tokenizers (tokenizer.json) through meshforge: special tokens from the config files,
data preparation with either backend, large vocabularies, and a Llama-2 sentencepiece model's round trip."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from corpus_files import builtin_docs, write_jsonl  # noqa: E402
from meshforge.cli import main  # noqa: E402
from meshforge.data_pipeline import DataError, open_data_dir, open_shards, prepare_data  # noqa: E402
from meshforge.tokenizers import TokenizerError, load_tokenizer  # noqa: E402

TEXTS = [
    "Ünïcödé 日本語, emoji 🦜🚀",
    "   long   runs\n\n\n\t\t of whitespace",
    "digits 3.14159 and 1234567890.",
    "ROMEO: But soft, what light through yonder window breaks?",
]


def hf_dir_with(tmp_path, tokenizer_json, name="tok", config=None, files=None, post_bos=False):
    """A copy of the tokenizer.json in its own directory, with the given HF config files."""
    d = tmp_path / name
    d.mkdir()
    spec = json.loads(tokenizer_json.read_text())
    if post_bos:  # Llama 3's convention: the tokenizer itself puts BOS first
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {
                "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [0], "tokens": ["<|begin_of_text|>"]}
            },
        }
    (d / "tokenizer.json").write_text(json.dumps(spec))
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    for fname, body in (files or {}).items():
        (d / fname).write_text(json.dumps(body))
    return d


SPECIAL_CASES = {
    # name: (config, other files, post-processor BOS, (bos, eos, pad, add_bos))
    "qwen-like: no BOS": (
        {"bos_token": None, "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"},
        {},
        False,
        (None, 1, 2, False),
    ),
    "llama3-like: BOS by post-processor": (
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        {},
        True,
        (0, 1, None, True),
    ),
    "ids from generation_config": (
        None,
        {"generation_config.json": {"bos_token_id": 0, "eos_token_id": [1, 5]}, "config.json": {"pad_token_id": 2}},
        False,
        (0, 1, 2, False),
    ),
    "special_tokens_map + add_bos_token": (
        {"add_bos_token": True},
        {"special_tokens_map.json": {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|pad|>"}},
        False,
        (0, 2, None, True),
    ),
}


@pytest.mark.parametrize("case", list(SPECIAL_CASES))
def test_special_tokens_come_from_the_tokenizer_and_its_config(case, byte_bpe_tokenizer, tmp_path):
    config, files, post_bos, want = SPECIAL_CASES[case]
    d = hf_dir_with(tmp_path, byte_bpe_tokenizer, config=config, files=files, post_bos=post_bos)
    tok = load_tokenizer(d)
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == ("hf", *want)
    # the copy a data dir / checkpoint gets is self-contained: the same tokens without the model's config files
    copy = tmp_path / "copy"
    copy.mkdir()
    again = load_tokenizer(tok.save(copy).parent)
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos, again.fingerprint) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
        tok.add_bos,
        tok.fingerprint,
    )

    data = tmp_path / "data"
    prepare_data([str(write_jsonl(tmp_path / "in.jsonl", TEXTS))], str(d), str(data), progress=False)
    info = open_data_dir(data)
    docs = [np.asarray(s[i]).tolist() for s in open_shards(data, info.manifest) for i in range(len(s))]
    head = [tok.bos_id] if want[3] else []
    tail = [tok.eos_id] if tok.eos_id is not None else []
    assert docs == [head + tok.encode(t) + tail for t in TEXTS]
    assert info.manifest["tokenizer"]["kind"] == "hf" and info.manifest["add_bos"] is want[3]


def test_bos_override_on_a_tokenizer_without_bos_is_refused(byte_bpe_tokenizer, tmp_path):
    d = hf_dir_with(tmp_path, byte_bpe_tokenizer, config={"bos_token": None, "eos_token": "<|end_of_text|>"})
    with pytest.raises(DataError, match="has no BOS token"):
        prepare_data(
            [str(write_jsonl(tmp_path / "in.jsonl", TEXTS))],
            str(d),
            str(tmp_path / "data"),
            add_bos=True,
            progress=False,
        )
    assert not (tmp_path / "data").exists()


BAD_TOKENIZERS = {
    # name: (files written into the dir (None: the real tokenizer.json), path passed in the dir, message)
    "missing path": ({}, "nope.json", "does not exist"),
    "dir without a tokenizer": ({}, "", "holds neither tokenizer.json nor tokenizer.model"),
    "garbage tokenizer.json": ({"tokenizer.json": "{not json"}, "", "not a Hugging Face tokenizer.json"),
    "config token not in the vocabulary": (
        {"tokenizer.json": None, "tokenizer_config.json": '{"eos_token": "</s>"}'},
        "",
        "not in the vocabulary",
    ),
    "broken tokenizer_config.json": ({"tokenizer.json": None, "tokenizer_config.json": "{"}, "", "not valid JSON"),
    "garbage .model": ({"x.model": "garbage"}, "x.model", "is not a sentencepiece model"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENIZERS))
def test_bad_tokenizer_is_one_line_before_anything_is_written(case, byte_bpe_tokenizer, tmp_path, capsys):
    files, name, message = BAD_TOKENIZERS[case]
    d = tmp_path / "t"
    d.mkdir()
    for fname, text in files.items():
        (d / fname).write_text(byte_bpe_tokenizer.read_text() if text is None else text)
    path = d / name if name else d
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(path)
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS)
    assert (
        main(["data", "prepare", "--input", str(src), "--tokenizer", str(path), "--output", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meshforge: error:") and message in err[0]
    assert not (tmp_path / "o").exists()


def test_hf_prepare_identical_for_any_worker_count_and_mismatch_refused(byte_bpe_tokenizer, other_tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", builtin_docs(40, skip=300))
    m1 = prepare_data(
        [str(src)], str(byte_bpe_tokenizer), str(tmp_path / "w1"), workers=1, docs_per_shard=16, progress=False
    )
    m2 = prepare_data(
        [str(src)], str(byte_bpe_tokenizer.parent), str(tmp_path / "w2"), workers=2, docs_per_shard=16, progress=False
    )
    assert [s["bin_sha256"] for s in m1["shards"]] == [s["bin_sha256"] for s in m2["shards"]]
    assert len(m1["shards"]) == 3 and m1["tokenizer"]["fingerprint"] == load_tokenizer(byte_bpe_tokenizer).fingerprint
    assert open_data_dir(tmp_path / "w1", str(byte_bpe_tokenizer.parent)).vocab_size == 512
    with pytest.raises(DataError, match="does not match the data manifest"):
        open_data_dir(tmp_path / "w1", str(other_tokenizer))


def test_vocabulary_beyond_uint16_writes_int32_and_trains(tmp_path):
    """A 152k-token vocabulary (Qwen's size): int32 shards, ids above 65,535 intact through the loader and a step."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from meshforge.config import load_config
    from meshforge.pretrain.trainer import Trainer

    words = [f"w{i}" for i in range(152_000)]
    tok = Tokenizer(
        models.WordLevel({"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}, unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    d = tmp_path / "big"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "unk_token": "<unk>"}))
    rng = np.random.default_rng(0)
    texts = [" ".join(words[j] for j in rng.integers(65_000, 152_000, 60)) for _ in range(40)]
    m = prepare_data([str(write_jsonl(tmp_path / "in.jsonl", texts))], str(d), str(tmp_path / "data"), progress=False)
    assert m["dtype"] == "int32" and m["tokenizer"]["vocab_size"] == 152_002
    assert max(s["max_token_id"] for s in m["shards"]) > 65_535
    info = open_data_dir(tmp_path / "data")
    first = np.asarray(open_shards(tmp_path / "data", m)[0][0])
    assert first.tolist() == load_tokenizer(d).encode(texts[0]) + [1]

    cfg = load_config(
        "tiny-test",
        {
            "data.path": str(tmp_path / "data"),
            "train.output_dir": str(tmp_path / "run"),
            "model.vocab_size": 0,
            "model.dim": 16,
            "model.n_layers": 1,
            "train.steps": 1,
            "train.global_batch_size": 2,
            "train.micro_batch_size": 2,
            "train.eval_interval": 0,
            "checkpoint.interval": 0,
            "train.sample_tokens": 0,
            "data.valid_fraction": 0.0,
        },
    )
    trainer = Trainer(cfg)
    batch = trainer.data.train_loader.next_batch()
    assert batch.max() > 65_535 and info.vocab_size == 152_002
    assert trainer.run().final_step == 1


def llama2_style_sentencepiece(path):
    """A sentencepiece BPE model with Llama 2's id scheme: unk 0, bos 1, eos 2, no pad (-1), dummy prefix."""
    import sentencepiece as spm

    lines = [line for t in builtin_docs(60) for line in t.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        pad_id=-1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def test_llama2_sentencepiece_without_pad_imports_and_exports(tmp_path):
    from meshforge.convert.export import export_hf
    from meshforge.convert.import_ import import_hf

    src = tmp_path / "hf"
    src.mkdir()
    llama2_style_sentencepiece(src / "tokenizer.model")
    cfg = transformers.LlamaConfig(
        vocab_size=600,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(src))
    import_hf(src, tmp_path / "init", log=lambda *_: None)
    export_hf(tmp_path / "init", tmp_path / "out", log=lambda *_: None)
    ours = load_tokenizer(src / "tokenizer.model")
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, None)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for text in TEXTS + [" leading space", ""]:
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text), text
        assert hf.decode(ours.encode(text)) == ours.decode(ours.encode(text)) == text
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config.get("pad_token_id")) == (1, 2, None)
    shutil.rmtree(tmp_path / "init")


def test_byte_bpe_cli_trains_a_tokenizer_transformers_loads(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", builtin_docs(60))
    args = ["tokenizer", "train", "--input", str(src), "--vocab-size", "400", "--model-type", "byte-bpe"]
    assert main(args) == 2 and "pass --output DIR" in capsys.readouterr().err
    assert main(args + ["--output", str(tmp_path / "a"), "--special-tokens", "<|im_start|>"]) == 0
    assert main(args + ["--output", str(tmp_path / "b"), "--special-tokens", "<|im_start|>"]) == 0
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    tok = load_tokenizer(tmp_path / "a")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    for text in TEXTS:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids and tok.decode(ids) == text
        assert tok.unk_id is None
    assert tok.piece_to_id("<|im_start|>") == 3 and (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)


def tiktoken_file_of(tokenizer_json, path):
    """The byte-level BPE as a tiktoken file: its learned tokens in merge order (ids from 3: the specials)."""
    from meshforge.tokenizers.tiktoken_file import _byte_chars

    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    byte_of = {c: b for b, c in _byte_chars().items()}
    lines = [
        f"{base64.b64encode(bytes(byte_of[c] for c in tok)).decode()} {i - 3}"
        for tok, i in sorted(vocab.items(), key=lambda kv: kv[1])
        if i >= 3
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("llama3", [False, True], ids=["plain", "llama3-specials"])
def test_tiktoken_file_encodes_like_its_bpe_and_exports(llama3, byte_bpe_tokenizer, tmp_path, monkeypatch):
    from meshforge.convert.hf_tokenizer import write_tokenizer
    from meshforge.tokenizers import tiktoken_file

    path = tiktoken_file_of(byte_bpe_tokenizer, tmp_path / "tokenizer.model")
    if llama3:  # Meta's file has 128,000 ranks; this one's count stands in for it
        monkeypatch.setattr(tiktoken_file, "LLAMA3_RANKS", 509)
    tok, bpe = load_tokenizer(path), load_tokenizer(byte_bpe_tokenizer)
    assert tok.kind == "tiktoken" and tok.vocab_size == 509 + (256 if llama3 else 0)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == ((509, 510, True) if llama3 else (None, None, False))
    for text in TEXTS + builtin_docs(10):
        assert tok.encode(text) == [i - 3 for i in bpe.encode(text)]
        assert tok.decode(tok.encode(text)) == text
    assert tok.piece_to_id("<|eot_id|>") == (509 + 9 if llama3 else None)

    data = tmp_path / "data"
    m = prepare_data([str(write_jsonl(tmp_path / "in.jsonl", TEXTS))], str(path), str(data), progress=False)
    docs = [np.asarray(s[i]).tolist() for s in open_shards(data, m) for i in range(len(s))]
    assert docs == [([509] if llama3 else []) + tok.encode(t) + ([510] if llama3 else []) for t in TEXTS]
    assert m["tokenizer"]["kind"] == "tiktoken" and (data / "tokenizer.model").read_bytes() == path.read_bytes()

    out = tmp_path / "hf"
    out.mkdir()
    write_tokenizer(tok, out)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert [hf.encode(t, add_special_tokens=False) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert (hf.bos_token_id, hf.eos_token_id) == ((509, 510) if llama3 else (None, None))
    assert hf.encode("a")[:1] == ([509] if llama3 else tok.encode("a"))


def test_export_without_tokenizer_keeps_the_source_special_ids(tmp_path):
    from meshforge.convert.export import export_hf
    from meshforge.convert.import_ import import_hf

    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=5,
        eos_token_id=7,
        pad_token_id=None,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "hf"))
    import_hf(tmp_path / "hf", tmp_path / "init", log=lambda *_: None)
    export_hf(tmp_path / "init", tmp_path / "out", log=lambda *_: None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config.get("pad_token_id")) == (5, 7, None)
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_encoder_decoder_objective_needs_pad_and_eos(byte_bpe_tokenizer, tmp_path):
    from meshforge.config import load_config
    from meshforge.pretrain.objectives import build_objective

    d = hf_dir_with(tmp_path, byte_bpe_tokenizer, config={"eos_token": "<|end_of_text|>", "pad_token": None})
    with pytest.raises(DataError, match="has no pad token"):
        build_objective(load_config("t5-small"), load_tokenizer(d))
