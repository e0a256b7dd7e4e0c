"""Model families are registered specs, not branches: nothing outside ``models/`` compares a family
name, and a family registered from here validates, is checked and trains with no change elsewhere."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from meshforge.config import ConfigError, load_config
from meshforge.models import MODEL_SPECS, check_config, family_spec, register
from meshforge.models.decoder import Decoder

PACKAGE = Path(__file__).resolve().parents[2] / "meshforge"
BRANCH = re.compile(r"""family\s*[!=]=|[!=]=\s*[\w.]*family\b|[!=]=\s*["'](?:decoder|encoder_decoder)["']""")


def test_no_family_comparison_outside_models():
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "models":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if BRANCH.search(line.split("#")[0]):
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}")
    assert not hits, "family branches outside meshforge/models/ (ask the family's spec instead):\n" + "\n".join(hits)


def test_the_scan_finds_a_branch():
    assert BRANCH.search('if cfg.model.family == "encoder_decoder":')
    assert BRANCH.search("if m.family != 'decoder' or x:")
    assert BRANCH.search('if "decoder" == m.family:')
    assert not BRANCH.search("spec = family_spec(m.family)")


class CountingDecoder(Decoder):
    """A decoder variant: the same math, and it counts its forwards."""

    forwards = 0

    def forward(self, *args, **kwargs):
        type(self).forwards += 1
        return super().forward(*args, **kwargs)


@pytest.fixture
def variant_family():
    """A family registered only by its spec (the decoder's, with its own builder, FLOPs and features)."""
    flops_calls = []

    def flops(model, cfg, lengths):
        flops_calls.append(lengths)
        return 1000.0

    spec = register(
        dataclasses.replace(
            MODEL_SPECS["decoder"],
            name="counting_decoder",
            build=CountingDecoder,
            flops_per_token=flops,
            supports_context_parallel=False,
            supports_mup=False,
        )
    )
    CountingDecoder.forwards = 0
    try:
        yield spec, flops_calls
    finally:
        del MODEL_SPECS[spec.name]


def test_unknown_family_names_the_registered_ones():
    with pytest.raises(ConfigError, match="model.family = 'nope' is not one of decoder, encoder_decoder"):
        check_config(load_config("tiny-test", {"model.family": "nope"}))
    with pytest.raises(ConfigError, match="is not one of decoder, encoder_decoder"):
        family_spec("nope")


def test_a_registered_family_is_validated_and_checked_by_its_spec(variant_family):
    from meshforge.parallel.job_checks import check_job
    from meshforge.parallel.mesh import resolve_degrees

    cfg = load_config("tiny-test", {"model.family": "counting_decoder"})
    assert cfg.model.family == "counting_decoder"
    with pytest.raises(ConfigError, match="muP is for dense decoders"):  # its spec says no muP
        check_config(load_config("tiny-test", {"model.family": "counting_decoder", "model.mup_base_dim": 16}))
    with pytest.raises(ConfigError, match="does not fit model.family = 'counting_decoder'"):
        check_config(load_config("tiny-test", {"model.family": "counting_decoder", "data.objective": "ul2"}))
    cfg = load_config("tiny-test", {"model.family": "counting_decoder", "parallel.cp": 2})
    with pytest.raises(ConfigError, match="covers the decoder family only, not model.family = 'counting_decoder'"):
        check_job(cfg, resolve_degrees(cfg.parallel, 2))


def test_a_registered_family_trains_through_its_spec(variant_family, tiny_data, tmp_path):
    from meshforge.pretrain.trainer import train

    spec, flops_calls = variant_family
    cfg = load_config(
        "tiny-test",
        {
            "model.family": spec.name,
            "data.path": str(tiny_data),
            "train.output_dir": str(tmp_path / "run"),
            "train.steps": 2,
            "train.eval_interval": 0,
            "checkpoint.interval": 0,
        },
    )
    result = train(cfg)
    assert result.final_step == 2
    assert CountingDecoder.forwards >= 2  # its own class ran the steps
    assert flops_calls == [(cfg.data.seq_len,)]  # its own FLOPs rule fed the MFU


def test_tp_plans_are_data_the_parallel_code_understands():
    from torch.distributed.tensor.parallel import ParallelStyle

    from meshforge.parallel.tensor_parallel import STYLE_NAMES, build_tp_plan

    for preset in ("tiny-test", "moe-small", "t5-small"):
        m = load_config(preset).model
        names = family_spec(m.family).tp_plan(m)
        assert names and all(isinstance(v, str) and v.partition(":")[0] in STYLE_NAMES for v in names.values())
        assert all(isinstance(s, ParallelStyle) for s in build_tp_plan(m, loss_parallel=True).values())
    t5 = load_config("t5-small").model
    with pytest.raises(ValueError, match="the encoder_decoder plan always uses sequence parallel"):
        build_tp_plan(t5, loss_parallel=False, sequence_parallel=False)


def test_an_unknown_tp_style_name_is_refused(variant_family):
    from meshforge.parallel.tensor_parallel import build_tp_plan

    spec, _ = variant_family
    register(dataclasses.replace(spec, tp_plan=lambda m: {"layers.*.attention.wq": "diagonal"}))
    m = load_config("tiny-test", {"model.family": spec.name}).model
    with pytest.raises(ValueError, match="TP plan style 'diagonal' is not one of embedding, colwise"):
        build_tp_plan(m, loss_parallel=False)
