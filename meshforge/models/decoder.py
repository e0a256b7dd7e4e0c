"""Llama-style decoder-only language model.

    h_0 = E[tokens]
    h_l = h_{l-1} + Attn(RMSNorm(h_{l-1}));  h_l = h_l + SwiGLU(RMSNorm(h_l))
          (model.norm_placement = post: h_{l-1} + RMSNorm(Attn(h_{l-1})), h_l + RMSNorm(SwiGLU(h_l)))
    logits = W_out RMSNorm(h_L) / m        (W_out = E when embeddings are tied; m = 1, or muP's
                                            width multiplier dim / mup_base_dim)

Blocks live in a ``ModuleDict`` keyed by their layer index, so a pipeline stage that
keeps layers 4..7 still names them ``layers.4`` .. ``layers.7`` and checkpoints line up.
``tok_embeddings``, ``norm`` and ``output`` may be set to ``None`` by a pipeline split;
the forward then starts from / stops at hidden states.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .layers import Attention, FeedForward, RMSNorm, document_mask, init_linear, output_std, rope_tables
from .moe import MoE
from .rope_scaling import rope_frequencies


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(
            cfg.dim,
            cfg.n_heads,
            cfg.kv_heads,
            cfg.qk_norm,
            cfg.norm_eps,
            head_dim=cfg.head_size,
            qkv_bias=cfg.qkv_bias,
            qk_norm_scope=cfg.qk_norm_scope,
        )
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = (
            MoE(cfg) if cfg.is_moe_layer(layer_id) else FeedForward(cfg.dim, cfg.hidden_dim, cfg.ffn_activation)
        )
        self.post_norm = cfg.norm_placement == "post"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        if self.post_norm:  # OLMo 2: the norms sit on the sublayers' outputs
            x = x + self.attention_norm(self.attention(x, cos, sin, mask=mask))
            return x + self.ffn_norm(self.feed_forward(x))
        x = x + self.attention(self.attention_norm(x), cos, sin, mask=mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): DecoderBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.rope_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.rope_dim), persistent=False)
        self.attention_mask = document_mask
        """How document ids become the ``mask`` the attention cores take (context parallel swaps both)."""

    def tie_weights(self) -> None:
        """Share the embedding with the output projection (again after ``to_empty``, which unties)."""
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def forward(
        self,
        tokens: torch.Tensor,
        segments: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """tokens [B, T] (or hidden states [B, T, dim] on a later pipeline stage) -> logits [B, T, V].

        ``segments`` [B, T] (document id per position) restricts attention to each token's
        own document; without it attention is plainly causal. ``positions`` [T]: the RoPE
        position of each token (default 0..T-1; a slice of a longer sequence passes its own).
        ``return_hidden``: stop at RMSNorm(h_L) [B, T, dim], for a loss that applies the output
        weight itself (``kernels.fused_loss``, with ``logit_scale``).
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if positions is None:
            seqlen = h.shape[1]
            cos, sin = self.rope_cos[:seqlen], self.rope_sin[:seqlen]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        window = {"window": self.cfg.sliding_window} if self.cfg.sliding_window else {}
        if segments is None and window:  # one document: the mask is the window alone
            segments = torch.zeros(h.shape[:2], dtype=torch.long, device=h.device)
        mask = None if segments is None else self.attention_mask(segments, use_flex=segments.is_cuda, **window)
        for block in self.layers.values():
            h = block(h, cos, sin) if mask is None else block(h, cos, sin, mask=mask)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None or return_hidden:
            return h
        logits = self.output(h)
        return logits / self.cfg.width_mult if self.cfg.mup_base_dim else logits

    @property
    def logit_scale(self) -> float:
        """m^-1 of the logits formula: 1, or 1 / width_mult under muP."""
        return 1.0 / self.cfg.width_mult if self.cfg.mup_base_dim else 1.0

    @torch.no_grad()
    def init_weights(self) -> None:
        """Explicit init (after ``to_empty`` from the meta device); uses torch's global RNG."""
        cfg = self.cfg
        inv_freq, scale = rope_frequencies(cfg)
        cos, sin = rope_tables(
            cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta, device=self.rope_cos.device, inv_freq=inv_freq, scale=scale
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=cfg.init_std)
        hidden_std = cfg.init_std / cfg.width_mult**0.5  # muP: matrices inside the blocks shrink with width
        out_std = output_std(hidden_std, cfg.n_layers)
        for block in self.layers.values():
            for module in block.modules():
                if isinstance(module, RMSNorm):
                    module.reset_parameters()
            attn, ffn = block.attention, block.feed_forward
            for lin in (attn.wq, attn.wk, attn.wv):
                init_linear(lin, hidden_std)
            init_linear(attn.wo, out_std)
            if isinstance(ffn, MoE):
                ffn.init_weights(hidden_std, out_std)
            else:
                init_linear(ffn.w1, hidden_std)
                init_linear(ffn.w3, hidden_std)
                init_linear(ffn.w2, out_std)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not cfg.tie_embeddings:
            init_linear(self.output, cfg.dim**-0.5)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.tok_embeddings is not None:
            n -= self.tok_embeddings.weight.numel()
        return n
