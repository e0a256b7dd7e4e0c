"""Prefix LM and the UL2 mixture of denoisers: exact reconstruction, split bounds, mixture
proportions, determinism by global index whatever the world size, config checks, and one
short `meshforge train` of a T5 with data.objective = ul2 whose validation loss falls."""

from __future__ import annotations

import math

import numpy as np
import pytest

from meshforge.cli import main as cli_main
from meshforge.config import ConfigError, Denoiser, load_config, parse_denoisers
from meshforge.data_pipeline.errors import DataError
from meshforge.data_pipeline.loader import DistributedLoader
from meshforge.data_pipeline.span_corruption import corrupted_lengths
from meshforge.data_pipeline.ul2 import KIND_INDEX, Ul2Dataset, make_ul2_spec
from meshforge.models import check_config

SENTINELS = list(range(1000, 900, -1))  # <extra_id_0> = 1000, <extra_id_1> = 999, ...
MODE = (1100, 1101, 1102)  # [R], [X], [S]
EOS, PAD = 3, 0
MIXTURE = [
    Denoiser("R", 3, 0.15, 0.5),
    Denoiser("X", 32, 0.5, 0.2),
    Denoiser("X", 8, 0.5, 0.1),
    Denoiser("S", weight=0.2),
]


class _Windows:
    """Raw windows: sample i is a fixed random token sequence of i (no PAD, EOS or sentinels)."""

    def __init__(self, raw_len: int, n: int = 100_000):
        self.raw_len, self.n = raw_len, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.random.default_rng([99, i]).integers(4, 900, size=self.raw_len)


def _dataset(spec, seed=5, mode_ids=None):
    return Ul2Dataset(_Windows(spec.raw_len), spec, SENTINELS, EOS, PAD, seed, mode_ids)


def reconstruct(inputs, targets) -> list[int]:
    """Put each sentinel's span from the targets back into the inputs (both end with EOS)."""
    spans, cur = {}, None
    for t in targets[:-1]:
        if t in SENTINELS:
            cur = int(t)
            spans[cur] = []
        else:
            spans[cur].append(int(t))
    out = []
    for t in inputs[:-1]:
        out.extend(spans[int(t)] if t in SENTINELS else [int(t)])
    return out


def _unpad(row, spec):
    """(inputs, targets) of a padded row, cut after their EOS."""
    enc, dec = row[: spec.encoder_len], row[spec.encoder_len :]
    assert len(dec) == spec.decoder_len
    n_in, n_tgt = np.flatnonzero(enc == EOS)[0] + 1, np.flatnonzero(dec == EOS)[0] + 1
    assert (enc[n_in:] == PAD).all() and (dec[n_tgt:] == PAD).all()
    return enc[:n_in], dec[:n_tgt]


# --------------------------------------------------------------------------- prefix LM


@pytest.mark.parametrize("encoder_len, lo, hi", [(64, 0.25, 0.75), (32, 0.1, 0.9), (128, 0.5, 0.5), (17, 0.3, 0.6)])
def test_prefix_lm_reconstructs_and_splits_within_bounds(encoder_len, lo, hi):
    spec = make_ul2_spec(encoder_len, 0, [Denoiser("S")], lo, hi)
    (plan,) = spec.denoisers
    window = spec.raw_len
    assert plan.raw_len == window
    # the bounds: fractions of the window, the longest prefix (plus EOS) fills the encoder
    assert plan.split_hi == math.floor(hi * window) and plan.split_hi + 1 == encoder_len
    assert hi * (window + 1) >= encoder_len  # no longer window has its longest prefix fit
    assert plan.split_lo == min(max(1, math.ceil(lo * window)), plan.split_hi)
    assert spec.decoder_len == window - plan.split_lo + 1
    ds = _dataset(spec)
    splits = []
    for i in range(400):
        k, inputs, targets = ds.sample(i)
        raw = ds.base[i]
        assert k == 0 and inputs[-1] == EOS and targets[-1] == EOS
        assert inputs[:-1].tolist() + targets[:-1].tolist() == raw.tolist()  # exact, nothing lost or added
        splits.append(len(inputs) - 1)
        assert np.array_equal(_unpad(ds[i], spec)[0], inputs)
    assert plan.split_lo <= min(splits) and max(splits) <= plan.split_hi
    if plan.split_hi > plan.split_lo:  # the whole range is drawn, not one point
        assert min(splits) == plan.split_lo and max(splits) == plan.split_hi
        assert abs(np.mean(splits) - (plan.split_lo + plan.split_hi) / 2) < 0.1 * (plan.split_hi - plan.split_lo) + 1
    # deterministic by index and seed
    again = _dataset(spec)
    assert [len(again.sample(i)[1]) - 1 for i in reversed(range(400))] == splits[::-1]
    if plan.split_hi > plan.split_lo:
        other = _dataset(spec, seed=6)
        assert [len(other.sample(i)[1]) - 1 for i in range(400)] != splits


def test_prefix_lm_rows_fit_fixed_lengths_and_decoder_can_be_longer():
    spec = make_ul2_spec(48, 80, [Denoiser("S")], 0.25, 0.75)
    assert (spec.encoder_len, spec.decoder_len) == (48, 80)
    ds = _dataset(spec)
    for i in range(50):
        row = ds[i]
        assert row.shape == (128,) and row.dtype == np.int64
        inputs, targets = _unpad(row, spec)
        assert inputs[:-1].tolist() + targets[:-1].tolist() == ds.base[i].tolist()
    with pytest.raises(DataError, match="raise data.decoder_seq_len to at least"):
        make_ul2_spec(48, 20, [Denoiser("S")], 0.25, 0.75)
    with pytest.raises(DataError, match="raise data.seq_len"):
        make_ul2_spec(1, 0, [Denoiser("S")], 0.25, 0.75)


# --------------------------------------------------------------------------- UL2 mixture


def test_mixture_proportions_follow_the_weights():
    spec = make_ul2_spec(64, 0, MIXTURE, 0.25, 0.75)
    ds = _dataset(spec)
    n = 20_000
    counts = np.bincount([ds.denoiser_index(i) for i in range(n)], minlength=len(MIXTURE))
    want = np.array([d.weight for d in MIXTURE]) / sum(d.weight for d in MIXTURE)
    assert np.abs(counts / n - want).max() < 0.015, (counts / n, want)
    # unnormalised weights give the same mixture
    scaled = make_ul2_spec(64, 0, [Denoiser(d.kind, d.mean_span, d.density, d.weight * 7) for d in MIXTURE], 0.25, 0.75)
    assert [_dataset(scaled).denoiser_index(i) for i in range(500)] == [ds.denoiser_index(i) for i in range(500)]


@pytest.mark.parametrize("mode", [False, True])
def test_every_denoiser_reconstructs_the_window_exactly(mode):
    spec = make_ul2_spec(64, 0, MIXTURE, 0.25, 0.75, mode_tokens=mode)
    ds = _dataset(spec, mode_ids=MODE if mode else None)
    noise = {k: [] for k in range(len(MIXTURE))}
    for i in range(1200):
        k, inputs, targets = ds.sample(i)
        plan = spec.denoisers[k]
        raw = ds.base[i][: plan.raw_len].tolist()
        assert np.array_equal(_unpad(ds[i], spec)[0], inputs)
        assert len(inputs) <= spec.encoder_len and len(targets) <= spec.decoder_len
        if mode:
            assert inputs[0] == MODE[KIND_INDEX[plan.kind]]
            inputs = inputs[1:]
        assert inputs[-1] == EOS and targets[-1] == EOS
        if plan.kind == "S":
            assert inputs[:-1].tolist() + targets[:-1].tolist() == raw
            assert plan.split_lo <= len(inputs) - 1 <= plan.split_hi
        else:
            assert targets[0] == SENTINELS[0]
            assert reconstruct(inputs, targets) == raw
            # the raw length is T5's rule for the encoder less the mode token
            assert len(inputs) == corrupted_lengths(plan.raw_len, plan.density, plan.mean_span)[0]
            assert spec.encoder_len - 2 <= len(inputs) + mode <= spec.encoder_len
            noise[k].append(np.isin(targets, SENTINELS, invert=True).sum() - 1)
    for k, plan in enumerate(spec.denoisers):
        if plan.kind != "S":
            assert noise[k], f"denoiser {plan} never drawn"
            assert abs(np.mean(noise[k]) / plan.raw_len - plan.density) < 0.02
    # the decoder length is the longest target of any denoiser: the 0.5-density X-denoisers'
    assert spec.decoder_len == max(p.max_targets for p in spec.denoisers)
    assert spec.raw_len == max(p.raw_len for p in spec.denoisers)


def test_samples_depend_on_global_index_only_not_world_size():
    spec = make_ul2_spec(64, 0, MIXTURE, 0.25, 0.75, mode_tokens=True)
    global_batch, steps = 16, 3

    def global_order(dp: int) -> np.ndarray:
        """The rows every rank of a dp-way run reads, rank slices put back together step by step."""
        loaders = [DistributedLoader(_dataset(spec, mode_ids=MODE), global_batch, r, dp, prefetch=0) for r in range(dp)]
        return np.concatenate([loader.next_batch().numpy() for _ in range(steps) for loader in loaders])

    got = {dp: global_order(dp) for dp in (1, 2, 4, 8)}
    for dp in (2, 4, 8):
        assert np.array_equal(got[dp], got[1])
    # and reading in any order, twice, with a fresh dataset gives the same rows
    ds = _dataset(spec, mode_ids=MODE)
    for i in reversed(range(global_batch * steps)):
        assert np.array_equal(ds[i], got[1][i])
        assert np.array_equal(ds[i], ds[i])
    # a different seed is a different sample stream
    other = _dataset(spec, seed=6, mode_ids=MODE)
    assert not all(np.array_equal(other[i], got[1][i]) for i in range(16))


def test_too_few_sentinels_fail_up_front():
    spec = make_ul2_spec(64, 0, [Denoiser("R", 3, 0.15)], 0.25, 0.75)
    with pytest.raises(DataError, match="sentinel"):
        Ul2Dataset(_Windows(spec.raw_len), spec, SENTINELS[:2], EOS, PAD, 0)
    with pytest.raises(DataError, match="mode tokens"):
        Ul2Dataset(_Windows(spec.raw_len), make_ul2_spec(64, 0, MIXTURE, 0.25, 0.75, True), SENTINELS, EOS, PAD, 0)


# --------------------------------------------------------------------------- config


def test_denoiser_spec_parses():
    assert parse_denoisers("R:3:0.15=0.4, X:32:0.5=0.2,S=0.2") == [
        Denoiser("R", 3.0, 0.15, 0.4),
        Denoiser("X", 32.0, 0.5, 0.2),
        Denoiser("S", weight=0.2),
    ]
    assert parse_denoisers("S") == [Denoiser("S")]
    assert [str(d) for d in parse_denoisers("R:3:0.15,S=2")] == ["R:3:0.15=1", "S=2"]
    assert parse_denoisers(load_config().data.ul2_denoisers)  # the default is valid


@pytest.mark.parametrize(
    "text, match",
    [
        ("R:3:0.15=0", "weights must be positive"),
        ("R:3:0.15=-1", "weights must be positive"),
        ("R:3:0.15=nan", "weights must be positive"),
        ("R:3:0.15=x", "is not KIND"),
        ("Q:3:0.15", "kinds are R"),
        ("R:3", "needs a mean span and a density"),
        ("R:3:1.5", "density in"),
        ("X:0.5:0.5", "mean span >= 1"),
        ("S:0.5", "takes no numbers"),
        ("R:3:0.15,,S", "empty entry"),
        ("", "empty entry"),
        ("S=1,S=2", "listed twice"),
    ],
)
def test_bad_denoiser_specs_are_rejected(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_denoisers(text)
    with pytest.raises(ConfigError, match="data.ul2_denoisers"):
        load_config("t5-small", {"data.objective": "ul2", "data.ul2_denoisers": text})


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"data.objective": "ul2"}, "does not fit model.family = 'decoder'"),
        ({"data.objective": "prefix_lm"}, "does not fit model.family = 'decoder'"),
        (
            {
                "model.family": "encoder_decoder",
                "data.objective": "ul2",
                "data.prefix_lm_min": 0.8,
                "data.prefix_lm_max": 0.5,
            },
            "0 < min <= max < 1",
        ),
        (
            {"model.family": "encoder_decoder", "data.objective": "prefix_lm", "data.prefix_lm_max": 1.0},
            "0 < min <= max < 1",
        ),
        (
            {"model.family": "encoder_decoder", "data.objective": "prefix_lm", "data.prefix_lm_min": 0.0},
            "0 < min <= max < 1",
        ),
        (
            {
                "model.family": "encoder_decoder",
                "data.objective": "span_corruption",
                "data.ul2_mode_tokens": "reserved",
            },
            "is for data.objective = 'ul2'",
        ),
        (
            {"model.family": "encoder_decoder", "data.objective": "ul2", "data.ul2_mode_tokens": "[NLU],[NLG]"},
            "three distinct",
        ),
        (
            {"model.family": "encoder_decoder", "data.objective": "ul2", "data.ul2_mode_tokens": "[R],[R],[S]"},
            "three distinct",
        ),
        ({"model.family": "encoder_decoder", "data.objective": "ul2", "data.document_mask": True}, "document_mask"),
        ({"model.family": "encoder_decoder", "data.objective": "objective_x"}, "is not one of"),
    ],
)
def test_bad_configs_fail_up_front(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_config(load_config(None, overrides))


def test_good_configs_load():
    for objective in ("prefix_lm", "ul2"):
        cfg = load_config("t5-small", {"data.objective": objective})
        assert cfg.data.objective == objective
    cfg = load_config(
        "t5-small",
        [
            "--data.objective",
            "ul2",
            "--data.ul2_mode_tokens",
            "[NLU], [NLG], [S2S]",
            "--data.ul2_denoisers=R:3:0.15=2,S=1",
        ],
    )
    assert cfg.data.ul2_denoisers == "R:3:0.15=2,S=1"


def test_objectives_against_a_real_tokenizer(tiny_tokenizer, ul2_tokenizer):
    """Mode tokens and sentinels are looked up in the sentencepiece model; missing ones are clear errors."""
    from meshforge.pretrain.objectives import build_objective
    from meshforge.tokenizers import load_tokenizer

    plain = load_tokenizer(tiny_tokenizer)  # <|sep|>, <reserved_0>, <reserved_1>; no sentinels
    t5 = load_tokenizer(ul2_tokenizer)  # 100 sentinels, <reserved_0..2>
    base = {"model.family": "encoder_decoder", "model.vocab_size": 512, "data.seq_len": 32}

    def build(tok, **over):
        return build_objective(load_config(None, {**base, **over}), tok)

    with pytest.raises(DataError, match="no single token '<reserved_2>'.*--reserved 3"):
        build(plain, **{"data.objective": "ul2", "data.ul2_denoisers": "S", "data.ul2_mode_tokens": "reserved"})
    with pytest.raises(DataError, match=r"no single token '\[NLU\]'.*--special-tokens"):
        build(t5, **{"data.objective": "ul2", "data.ul2_mode_tokens": "[NLU],[NLG],[S2S]"})
    with pytest.raises(DataError, match="sentinel pieces"):
        build(plain, **{"data.objective": "ul2", "data.ul2_denoisers": "R:3:0.15,S"})
    with pytest.raises(DataError, match="names sentinel tokens"):
        build(t5, **{"data.objective": "ul2", "data.ul2_mode_tokens": "<extra_id_0>,<reserved_1>,<reserved_2>"})
    with pytest.raises(DataError, match="control token"):
        build(t5, **{"data.objective": "ul2", "data.ul2_mode_tokens": "</s>,<reserved_1>,<reserved_2>"})
    with pytest.raises(DataError, match="exceed model.max_seq_len"):
        build(t5, **{"data.objective": "ul2", "model.max_seq_len": 32, "data.decoder_seq_len": 40})

    # the prefix LM needs no sentinels; S-only UL2 with reserved mode tokens works on any tokenizer that has them
    obj = build(plain, **{"data.objective": "prefix_lm"})
    assert obj.sentinels == [] and obj.mode_ids is None and obj.spec.encoder_len == 32
    obj = build(
        plain,
        **{
            "data.objective": "ul2",
            "data.ul2_denoisers": "S",
            "data.ul2_mode_tokens": "<|sep|>,<reserved_0>,<reserved_1>",
        },
    )
    assert obj.mode_ids == tuple(plain.piece_to_id(p) for p in ("<|sep|>", "<reserved_0>", "<reserved_1>"))
    obj = build(t5, **{"data.objective": "ul2", "data.ul2_mode_tokens": "reserved"})
    assert obj.mode_ids == tuple(t5.piece_to_id(f"<reserved_{i}>") for i in range(3))
    assert len(obj.sentinels) == 100 and obj.window == obj.spec.raw_len - 1
    assert obj.spec.decoder_len == max(p.max_targets for p in obj.spec.denoisers)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ul2_tokenizer(tmp_path_factory):
    """A 512-piece T5-preset tokenizer (100 sentinels) with <reserved_0..2> for the UL2 mode tokens."""
    from corpus_files import _corpus_slice
    from meshforge.tokenizers import train_tokenizer

    root = tmp_path_factory.mktemp("ul2_tok")
    return train_tokenizer([_corpus_slice(root / "corpus.jsonl", 0, 150)], root / "tok", 512, preset="t5", n_reserved=3)


@pytest.fixture(scope="module")
def ul2_data(ul2_tokenizer, tmp_path_factory):
    """150 Shakespeare documents prepared with :func:`ul2_tokenizer`."""
    from corpus_files import _corpus_slice
    from meshforge.data_pipeline.prepare import prepare_data

    root = tmp_path_factory.mktemp("ul2_data")
    corpus = _corpus_slice(root / "corpus.jsonl", 0, 150)
    prepare_data([str(corpus)], str(ul2_tokenizer), str(root / "data"), progress=False)
    return root / "data"


def test_meshforge_train_ul2_learns(ul2_data, tmp_path):
    """`meshforge train` on a 2+2-layer T5 with the UL2 mixture and mode tokens: validation loss falls."""
    from meshforge.pretrain.metrics import read_metrics
    from test_encoder_decoder_train import T5_ARGS

    out = tmp_path / "run"
    rc = cli_main(
        [
            "train",
            *T5_ARGS,
            "--data.path",
            str(ul2_data),
            "--train.output_dir",
            str(out),
            "--data.objective",
            "ul2",
            "--data.ul2_mode_tokens",
            "reserved",
            "--train.steps",
            "24",
            "--train.eval_interval",
            "24",
            "--train.eval_batches",
            "2",
            "--train.micro_batch_size",
            "4",
            "--logging.tensorboard",
            "false",
        ]
    )
    assert rc == 0
    records = read_metrics(out)
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    assert val[24] < val[0] - 1.0, val
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 1.0, losses


def test_train_fails_before_writing_without_mode_tokens(tiny_data, tmp_path):
    """A tokenizer without the named mode tokens stops the run before the output dir exists."""
    from test_encoder_decoder_train import T5_ARGS

    out = tmp_path / "run"
    rc = cli_main(
        [
            "train",
            *T5_ARGS,
            "--data.path",
            str(tiny_data),
            "--train.output_dir",
            str(out),
            "--data.objective",
            "ul2",
            "--data.ul2_denoisers",
            "S",
            "--data.ul2_mode_tokens",
            "[R],[X],[S]",
        ]
    )
    assert rc == 2 and not out.exists()
