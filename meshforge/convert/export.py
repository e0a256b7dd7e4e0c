"""``meshforge convert export --to hf``: a checkpoint of any layout -> a Hugging Face model directory.

Order of work, so that bad input fails before anything is written and a failure leaves
nothing behind:

1. the checkpoint (complete, config readable), the output dir (absent or empty);
2. the HF class that represents the model exactly (else an error naming the feature), every
   tensor it needs present in the checkpoint, the routing biases zero, the tokenizer's vocab;
3. everything is written into ``.<name>.tmp-<pid>`` next to the output, which is renamed
   to the output at the end (removed on any failure).

Weights stream: the shards are planned from the checkpoint's metadata (names, shapes), each
shard's header is written first, then one checkpoint tensor at a time is read
(``dcp.load`` of that tensor only), cast and appended. Peak memory is about the largest
tensor twice (read + cast), whatever the model size or the layout that saved it.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from .dcp_reader import CheckpointReader, resolve_checkpoint
from .families import converter
from .hf_tokenizer import check_vocab, token_ids, tokenizer_of, write_tokenizer
from .safetensors_io import ConvertError, PlannedTensor, ShardWriter, plan_shards, shard_names, write_index

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SHARD_MB = 4096


def check_output_dir(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConvertError(f"output {output} exists and is not an empty directory; choose a new path")


@contextmanager
def staged_output(output: Path):
    """A temporary directory beside ``output``, renamed to it on success and removed on failure."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        check_output_dir(output)  # again: someone may have written there meanwhile
        if output.exists():
            output.rmdir()
        os.rename(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export_hf(
    checkpoint: str | Path,
    output: str | Path,
    step: int | None = None,
    dtype: str = "fp32",
    max_shard_mb: int = DEFAULT_SHARD_MB,
    log=print,
) -> Path:
    """Write the HF model directory ``output`` from ``checkpoint``; returns ``output``."""
    output = Path(output)
    if dtype not in EXPORT_DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    check_output_dir(output)
    path = resolve_checkpoint(checkpoint, step)
    reader = CheckpointReader(path)
    m = reader.config.model
    tok = tokenizer_of(reader.path)
    family = converter(m)  # the family's HF converter; refuses what it cannot represent
    imported = reader.meta.get("hf_token_ids")  # an init dir's, from the HF config it came from
    config, mapping, keep = family.export_plan(m, token_ids(tok, imported), dtype, reader)
    config.dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    missing = sorted({ours for _, ours, _ in mapping if ours not in reader.entries})
    if missing:
        raise ConvertError(
            f"checkpoint {reader.path} lacks {len(missing)} weight(s) its config needs, e.g. {missing[0]}"
        )
    if tok is not None:
        check_vocab(tok, m.vocab_size)
    target = EXPORT_DTYPES[dtype]
    planned = [
        PlannedTensor(
            hf,
            reader.shape(ours)[1:] if e is not None else reader.shape(ours),
            target if reader.dtype(ours).is_floating_point and ours not in keep else reader.dtype(ours),
        )
        for hf, ours, e in mapping
    ]
    shards = plan_shards(planned, max_shard_mb * 2**20)
    names = shard_names(len(shards))
    by_hf = {hf: (ours, e) for hf, ours, e in mapping}
    with staged_output(output) as tmp:
        config.save_pretrained(str(tmp))
        _generation_config(config, tmp)
        cached: tuple[str, torch.Tensor] | None = None
        for shard, fname in zip(shards, names):
            writer = ShardWriter(tmp / fname, shard)
            for t in shard:
                ours, e = by_hf[t.name]
                if cached is None or cached[0] != ours:
                    cached = None  # drop the previous tensor before reading the next
                    cached = (ours, reader.get(ours))
                value = cached[1] if e is None else cached[1][e]
                writer.write(t.name, value.to(t.dtype))
            writer.close()
            log(f"wrote {fname} ({len(shard)} tensors)")
        cached = None
        write_index(tmp, shards, names)
        if tok is not None:
            write_tokenizer(tok, tmp, seq2seq=family.SEQ2SEQ)
        else:
            log(f"note: checkpoint {reader.path} has no tokenizer; the export has no tokenizer")
        (tmp / "meshforge_export.json").write_text(
            json.dumps(
                {"checkpoint": str(reader.path), "step": reader.step, "layout": reader.layout(), "dtype": dtype},
                indent=1,
            )
        )
    log(f"exported {reader.path} (step {reader.step}, {reader.layout()}) as {config.architectures[0]} to {output}")
    return output


def _generation_config(config, directory: Path) -> None:
    from transformers import GenerationConfig

    gen = GenerationConfig.from_model_config(config)
    gen.save_pretrained(str(directory))
