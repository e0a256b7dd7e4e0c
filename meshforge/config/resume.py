"""What each setting does when a run resumes with a value other than its checkpoint's: the policy table.

A checkpoint supplies the run's *state* (weights, optimizer moments, step, loader position,
RNG); the config supplies every *setting*. A changed setting is, per key:

- ``refused``: it would make a different run (model shape, data and sample order, seed, global
  batch, the data-parallel backend whose optimizer state the checkpoint holds); the resume
  stops before anything is written, naming the difference;
- ``applies``: it takes effect from the first resumed step, and the run prints a line saying so
  (the LR and its schedule, the optimizer's betas / eps / weight decay, steps, intervals, layout,
  logging, ...);
- ``ignored``: it only matters for a fresh start (``checkpoint.init_from``); the run says so
  and ``config.json`` records it empty;
- ``quiet``: where the run is and how it is found, which may differ without a word.

``meshforge train --help-config`` shows each key's policy; :mod:`meshforge.pretrain.resume_policy`
enforces it. Imports nothing.
"""

from __future__ import annotations

REFUSED_SECTIONS = ("model",)
"""Every key of these sections is refused (the model's shape and numerics)."""

REFUSED = {
    "data.path": "the training data",
    "data.tokenizer": "the token ids",
    "data.seq_len": "the samples",
    "data.valid_fraction": "the train/validation split",
    "data.objective": "the samples",
    "data.noise_density": "the samples",
    "data.mean_noise_span": "the samples",
    "data.decoder_seq_len": "the samples",
    "data.prefix_lm_min": "the samples",
    "data.prefix_lm_max": "the samples",
    "data.ul2_denoisers": "the samples",
    "data.ul2_mode_tokens": "the samples",
    "data.document_mask": "what each token attends to",
    "data.builtin_vocab_size": "the tokenizer",
    "data.blend": "the sample order",
    "train.seed": "the sample order and the initial weights",
    "train.global_batch_size": "the sample order per step",
    "parallel.dp_backend": "the optimizer state's format",
}
"""Key -> what changing it would change (said in the refusal)."""

IGNORED = {"checkpoint.init_from": "a resumed run takes its weights from the checkpoint"}
QUIET = {
    "train.output_dir",
    "checkpoint.resume",
    "checkpoint.resume_from",
    "train.progress",
    "parallel.ft_replica_group",
    "parallel.ft_lighthouse",
}

APPLIES_NOTES = {
    "train.steps": "the LR schedule is stretched or cut to the new length",
    "optim.lr": "the LR schedule is recomputed with it",
    "optim.schedule": "the LR from the next step on follows it at the current step",
    "parallel.zero_stage": "only under parallel.dp_backend = 'fsdp2', where it is unused; a DeepSpeed checkpoint "
    "needs its own stage and world size",
}


def resume_policy(key: str) -> str:
    """``refused``, ``applies``, ``ignored`` or ``quiet`` for a dotted key."""
    if key.split(".")[0] in REFUSED_SECTIONS or key in REFUSED:
        return "refused"
    if key in IGNORED:
        return "ignored"
    if key in QUIET:
        return "quiet"
    return "applies"


def resume_help(key: str) -> str:
    """The one-line policy ``--help-config`` prints under a key."""
    policy = resume_policy(key)
    if policy == "refused":
        what = REFUSED.get(key, "the model")
        return f"on resume: a change is refused (it changes {what})"
    if policy == "ignored":
        return f"on resume: ignored ({IGNORED[key]})"
    if policy == "quiet":
        return "on resume: may differ (where the run is / how it is found)"
    note = APPLIES_NOTES.get(key)
    return "on resume: a change takes effect from the next step, with a line saying so" + (f"; {note}" if note else "")
