"""Text generation from a trained decoder: greedy or top-k sampling.

No KV cache: each new token reruns the (last ``max_seq_len`` tokens of the) sequence,
which is plenty for samples from small models and keeps the model code plain.

A model's vocabulary may be larger than its tokenizer's (padded to a multiple of 64, say):
the ids beyond the tokenizer (``vocab_limit``) are never picked.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ..tokenizers import Tokenizer


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    max_seq_len: int,
    top_k: int = 0,
    temperature: float = 0.0,
    eos_id: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    vocab_limit: int | None = None,
) -> list[int]:
    """Extend ``prompt_ids``; ``temperature == 0`` (or ``top_k == 1``) is greedy; ids >= ``vocab_limit`` never come out."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-max_seq_len:]], device=device)
        logits = model(context)[0, -1].float().cpu()
        next_id = _pick(logits, top_k, temperature, gen, vocab_limit)
        ids.append(next_id)
        if eos_id is not None and next_id == eos_id:
            break
    model.train(was_training)
    return ids


@torch.no_grad()
def generate_seq2seq_ids(
    model: nn.Module,
    src_ids: list[int],
    max_new_tokens: int,
    start_id: int,
    top_k: int = 0,
    temperature: float = 0.0,
    eos_id: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    vocab_limit: int | None = None,
) -> list[int]:
    """Encoder-decoder: encode ``src_ids`` once, then decode from ``start_id``; returns the decoded ids."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    enc = model.encode(torch.tensor([src_ids], device=device))
    out = [start_id]
    for _ in range(max_new_tokens):
        logits = model.decode(enc, torch.tensor([out], device=device))[0, -1].float().cpu()
        next_id = _pick(logits, top_k, temperature, gen, vocab_limit)
        out.append(next_id)
        if eos_id is not None and next_id == eos_id:
            break
    model.train(was_training)
    return out[1:]


def _pick(
    logits: torch.Tensor, top_k: int, temperature: float, gen: torch.Generator, vocab_limit: int | None = None
) -> int:
    if vocab_limit is not None and vocab_limit < logits.numel():  # padding rows of the embedding: not tokens
        logits = logits[:vocab_limit]
    if temperature <= 0 or top_k == 1:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


def generate_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    top_k: int = 0,
    temperature: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> str:
    """The prompt followed by the generated continuation, as text.

    For an encoder-decoder the prompt is a corrupted text with sentinels (``<extra_id_0>``
    ...) and the result is the decoder's output: each sentinel followed by its filling. A
    decoder's prompt starts with BOS when the tokenizer's convention puts BOS before documents.
    """
    return generate_from_ids(
        model, tokenizer, encode_prompt(tokenizer, prompt), max_new_tokens, top_k, temperature, seed, device
    )


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids (none: a UsageError)."""
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise UsageError("the prompt encodes to no tokens: give a non-empty --prompt")
    return prompt_ids


def generate_from_ids(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    max_new_tokens: int,
    top_k: int = 0,
    temperature: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> str:
    """:func:`generate_text` of a prompt already encoded (:func:`encode_prompt`)."""
    if hasattr(model, "encode"):
        out = generate_seq2seq_ids(
            model,
            prompt_ids + [tokenizer.eos_id],
            max_new_tokens,
            tokenizer.pad_id,
            top_k,
            temperature,
            tokenizer.eos_id,
            seed,
            device,
            vocab_limit=tokenizer.vocab_size,
        )
        return tokenizer.decode([i for i in out if i != tokenizer.eos_id])
    max_seq_len = model.cfg.max_seq_len
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []  # as the training documents began
    ids = generate_ids(
        model,
        bos + prompt_ids,
        max_new_tokens,
        max_seq_len,
        top_k,
        temperature,
        tokenizer.eos_id,
        seed,
        device,
        vocab_limit=tokenizer.vocab_size,
    )
    return tokenizer.decode(ids[len(bos) :])


def check_generate_args(max_new_tokens: int, top_k: int, temperature: float, device: str) -> None:
    """Refuse sampling settings that cannot work (one line each, before the checkpoint is read)."""
    import math

    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0: sample from all tokens), got {top_k}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UsageError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r} is not a device meshforge generates on: use cpu, cuda or cuda:N")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise UsageError(
            f"--device {device}: no CUDA GPU {dev.index or 0} here ({have} visible); use --device cpu"
            if have
            else f"--device {device}: there is no CUDA GPU here; use --device cpu"
        )


def generate_from_checkpoint(
    checkpoint: str,
    prompt: str,
    max_new_tokens: int = 64,
    top_k: int = 0,
    temperature: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
) -> str:
    """Load a checkpoint (or an output dir's newest) with its own config and tokenizer, and generate."""
    from ..config import config_from_dict
    from ..models import build_model
    from ..tokenizers import TOKENIZER_FILES, load_tokenizer
    from .checkpoint import CheckpointError, find_checkpoint, load_model_weights
    from .checkpoint_files import verify_checkpoint

    check_generate_args(max_new_tokens, top_k, temperature, device)
    path = find_checkpoint(checkpoint)
    meta = verify_checkpoint(path, "--checkpoint DIR")  # a damaged file: named, with the intact checkpoints
    if "config" not in meta:
        raise CheckpointError(f"checkpoint {path} has no config in meta.json")
    cfg = config_from_dict(meta["config"])
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"checkpoint {path} has no tokenizer (tokenizer.json or tokenizer.model)")
    tokenizer = load_tokenizer(path)
    model = build_model(cfg.model, device, init=False)
    prompt_ids = encode_prompt(tokenizer, prompt)
    n_prompt = len(prompt_ids)
    if not hasattr(model, "encode") and n_prompt + max_new_tokens > cfg.model.max_seq_len:  # a decoder's positions
        raise UsageError(
            f"--max-new-tokens {max_new_tokens} after a {n_prompt}-token prompt goes beyond the model's "
            f"max_seq_len ({cfg.model.max_seq_len}): ask for at most "
            f"{max(cfg.model.max_seq_len - n_prompt, 0)} new tokens (or a shorter prompt)"
        )
    # RoPE tables are buffers, not weights: fill them by a normal init, then load the weights.
    model.init_weights()
    load_model_weights(path, model)
    return generate_from_ids(model, tokenizer, prompt_ids, max_new_tokens, top_k, temperature, seed, device)
