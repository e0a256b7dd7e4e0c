"""``meshforge convert grow``: a deeper decoder initialised by stacking a trained one (G_stack).

"Stacking Your Transformers" (Du et al., 2024) grows a trained model of L layers into one of
g * L layers by repeating the whole trained stack g times -- layer j of the grown model is a
copy of layer j mod L -- keeping the embedding, final norm and output, and continues
pretraining from it. The output is an init directory like ``convert import`` writes (a
step-0 DCP checkpoint, meta.json, model.toml with ``checkpoint.init_from``); training from
it starts a fresh optimizer at step 0.

Only decoders: an MoE decoder's dense first layers (``model.moe_dense_layers``) would land in
the middle of the grown stack, which no config describes, so such a model is refused.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..config import validate
from ..models import check_config, family_spec
from .dcp_reader import CheckpointReader, resolve_checkpoint
from .export import check_output_dir
from .hf_tokenizer import tokenizer_of
from .import_ import write_init_checkpoint
from .safetensors_io import ConvertError

LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def grown_name(name: str, n_layers: int, copy: int) -> str:
    """The grown model's name of source weight ``name`` in stacked copy ``copy``."""
    m = LAYER.match(name)
    return name if m is None else f"layers.{int(m.group(1)) + copy * n_layers}.{m.group(2)}"


def grow_checkpoint(
    checkpoint: str | Path, output: str | Path, depth_factor: int, step: int | None = None, log=print
) -> Path:
    output = Path(output)
    check_output_dir(output)
    if depth_factor < 2:
        raise ConvertError(f"--depth-factor must be at least 2, got {depth_factor}")
    reader = CheckpointReader(resolve_checkpoint(checkpoint, step))
    m = reader.config.model
    if not family_spec(m.family).supports_grow:
        raise ConvertError(f"grow stacks decoder layers; model.family = {m.family!r} is not supported")
    if m.moe_experts and m.moe_dense_layers:
        raise ConvertError(
            f"grow cannot stack an MoE decoder with dense first layers (model.moe_dense_layers = "
            f"{m.moe_dense_layers}): they would sit in the middle of the grown stack"
        )
    source = reader.load(sorted(reader.entries))
    state = {}
    for copy in range(depth_factor):
        for name, tensor in source.items():
            if copy == 0 or LAYER.match(name):
                state[grown_name(name, m.n_layers, copy)] = tensor
    cfg = dataclasses.replace(reader.config, model=dataclasses.replace(m, n_layers=m.n_layers * depth_factor))
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, init_from=str(output.resolve()))
    tok = tokenizer_of(reader.path)
    if tok is not None:
        cfg.data = dataclasses.replace(cfg.data, tokenizer=str(output.resolve() / tok.main_file))
    validate(cfg)
    check_config(cfg)
    write_init_checkpoint(
        output,
        cfg,
        state,
        {"source": {"grown_from": str(reader.path), "step": reader.step, "depth_factor": depth_factor}},
        tok,
    )
    log(
        f"grew {reader.path} ({m.n_layers} layers, step {reader.step}) x{depth_factor} into {output} "
        f"({cfg.model.n_layers} layers); train from it with `meshforge train --config {output}/model.toml ...`"
    )
    return output
