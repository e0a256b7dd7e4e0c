"""T5-style encoder-decoder.

    e_0 = E[src];   e_l = e_{l-1} + SelfAttn(N(e_{l-1}), bias_enc);  e_l += FFN(N(e_l))
    enc = N(e_L)
    d_0 = E[tgt_in]; d_l = d_{l-1} + CausalSelfAttn(N(d_{l-1}), bias_dec)
                    d_l += CrossAttn(N(d_l), enc);  d_l += FFN(N(d_l))
    logits = W_out N(d_L)      (tied: E^T, with T5's d_model^-1/2 scaling of N(d_L))

N is RMSNorm (T5's LayerNorm has no mean and no bias). FFN is gated (T5 v1.1: gated-GELU).
Positions: T5 relative position bias -- one learned scalar per (bucket, head), buckets of
log-spaced distances, bidirectional in the encoder and causal in the decoder, computed once
per stack and added to every layer's attention logits -- or RoPE as an option. Cross
attention has no position term. ``attn_scale = 1`` reproduces T5 (no 1/sqrt(d) scaling).

Blocks are ``ModuleDict``s keyed by layer index (as in the decoder) so a pipeline split
keeps checkpoint names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import FeedForward, RMSNorm, apply_rope, init_linear, output_std, rope_tables
from .moe import MoE


def relative_position_bucket(
    relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each (key - query) offset: exact for small distances, log-spaced up to max_distance."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_bucket = (
        max_exact
        + (
            torch.log(distance.float().clamp(min=1) / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """bias[h, i, j] = w[bucket(j - i), h]: a table of one scalar per (bucket, head)."""

    def __init__(self, n_heads: int, num_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.empty(num_buckets, n_heads))

    def buckets(self, q_len: int, k_len: int) -> torch.Tensor:
        """[q, k] bucket id of each (query i, key j) pair."""
        device = self.weight.device
        relative = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]
        return relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """Bucket ids [q, k] -> bias [1, H, q, k]."""
        return self.weight[buckets].permute(2, 0, 1)[None]


class Attention(nn.Module):
    """Multi-head attention over ``context`` (itself for self-attention) with an additive bias."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, scale: float, head_dim: int = 0):
        super().__init__()
        self.head_dim = head_dim or dim // n_heads
        self.scale = scale or None  # None: SDPA's 1/sqrt(head_dim)
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        bias: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        bsz, q_len, _ = x.shape
        k_len = context.shape[1]
        q = self.wq(x).view(bsz, q_len, -1, self.head_dim)
        k = self.wk(context).view(bsz, k_len, -1, self.head_dim)
        v = self.wv(context).view(bsz, k_len, -1, self.head_dim)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos[:q_len], sin[:q_len]), apply_rope(k, cos[:k_len], sin[:k_len])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if bias is None else bias.to(q.dtype),
            scale=self.scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, q_len, -1))


def _ffn(cfg: ModelConfig, layer_id: int) -> nn.Module:
    return MoE(cfg) if cfg.is_moe_layer(layer_id) else FeedForward(cfg.dim, cfg.hidden_dim, cfg.ffn_activation)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.attn_scale, cfg.head_size)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = _ffn(cfg, layer_id)

    def forward(self, x, bias, rope=None):
        h = self.attention_norm(x)
        x = x + self.attention(h, h, bias, rope)
        return x + self.feed_forward(self.ffn_norm(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.self_attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attention = Attention(cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.attn_scale, cfg.head_size)
        self.cross_attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.cross_attention = Attention(cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.attn_scale, cfg.head_size)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = _ffn(cfg, layer_id)

    def forward(self, x, enc, self_bias, cross_bias, rope=None):
        h = self.self_attention_norm(x)
        x = x + self.self_attention(h, h, self_bias, rope)
        x = x + self.cross_attention(self.cross_attention_norm(x), enc, cross_bias)
        return x + self.feed_forward(self.ffn_norm(x))


class Stack(nn.Module):
    """The encoder or the decoder: blocks, the position term, a final norm."""

    def __init__(self, cfg: ModelConfig, n_layers: int, block: type, causal: bool):
        super().__init__()
        self.causal = causal
        self.layers = nn.ModuleDict({str(i): block(cfg, i) for i in range(n_layers)})
        self.rel_bias = (
            RelativePositionBias(cfg.n_heads, cfg.rel_pos_buckets, cfg.rel_pos_max_distance, bidirectional=not causal)
            if cfg.position_encoding == "relative"
            else None
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def position_bias(self, length: int) -> torch.Tensor | None:
        """Relative position bias [1, H, T, T] of self-attention; None with RoPE."""
        return self.rel_bias(self.rel_bias.buckets(length, length)) if self.rel_bias is not None else None

    def mask_bias(self, length: int, key_padding: torch.Tensor | None, device) -> torch.Tensor | None:
        """Additive mask [B or 1, 1, T, T] of self-attention (-inf: causal future, padded keys); None if none."""
        mask = None
        if self.causal:
            mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        if key_padding is not None:
            pad = key_padding[:, None, None, :]
            mask = pad if mask is None else mask & pad
        if mask is None:
            return None
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))

    def self_bias(self, length: int, key_padding: torch.Tensor | None, device) -> torch.Tensor | None:
        """Additive bias [B or 1, H or 1, T, T]: relative positions, causal mask, padded keys."""
        return add_biases(self.position_bias(length), self.mask_bias(length, key_padding, device))


def add_biases(position: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """position + mask, where either may be absent."""
    if position is None or mask is None:
        return mask if position is None else position
    return position + mask


def padding_bias(key_padding: torch.Tensor | None) -> torch.Tensor | None:
    """Additive bias [B, 1, 1, S] of cross-attention: -inf at padded encoder positions."""
    if key_padding is None:
        return None
    return torch.zeros(key_padding.shape, device=key_padding.device).masked_fill(~key_padding, float("-inf"))[
        :, None, None, :
    ]


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.encoder = Stack(cfg, cfg.n_layers, EncoderBlock, causal=False)
        self.decoder = Stack(cfg, cfg.n_decoder_layers or cfg.n_layers, DecoderBlock, causal=True)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def _rope(self):
        return (self.rope_cos, self.rope_sin) if self.cfg.position_encoding == "rope" else None

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src [B, S] token ids (src_mask [B, S] True for real tokens) -> encoder states [B, S, dim]."""
        x = self.tok_embeddings(src)
        bias = self.encoder.self_bias(src.shape[1], src_mask, src.device)
        return self.encoder.norm(self.encoder_layers(x, bias))

    def decode(self, enc: torch.Tensor, tgt_in: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states + decoder input ids [B, T] -> logits [B, T, V]."""
        x = self.tok_embeddings(tgt_in)
        self_bias = self.decoder.self_bias(tgt_in.shape[1], None, tgt_in.device)
        return self.logits(self.decoder_layers(x, enc, self_bias, padding_bias(src_mask)))

    def encoder_layers(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """e_l for each encoder block (of this module: a pipeline stage holds some)."""
        for block in self.encoder.layers.values():
            x = block(x, bias, self._rope())
        return x

    def decoder_layers(
        self, x: torch.Tensor, enc: torch.Tensor, self_bias: torch.Tensor | None, cross_bias: torch.Tensor | None
    ) -> torch.Tensor:
        """d_l for each decoder block (of this module: a pipeline stage holds some)."""
        for block in self.decoder.layers.values():
            x = block(x, enc, self_bias, cross_bias, self._rope())
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """W_out N(d_L), with T5's d_model^-1/2 scaling when the output is the tied embedding."""
        x = self.decoder.norm(x)
        if self.cfg.tie_embeddings:
            x = x * self.cfg.dim**-0.5
        return self.output(x)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(src, src_mask), tgt_in, src_mask)

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.cfg
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=cfg.init_std)
        n_total = len(self.encoder.layers) + len(self.decoder.layers)
        out_std = output_std(cfg.init_std, n_total)
        for stack in (self.encoder, self.decoder):
            stack.norm.reset_parameters()
            if stack.rel_bias is not None:
                nn.init.normal_(stack.rel_bias.weight, mean=0.0, std=cfg.init_std)
            for block in stack.layers.values():
                for m in block.modules():
                    if isinstance(m, RMSNorm):
                        m.reset_parameters()
                    elif isinstance(m, Attention):
                        for lin in (m.wq, m.wk, m.wv):
                            init_linear(lin, cfg.init_std)
                        init_linear(m.wo, out_std)
                    elif isinstance(m, MoE):
                        m.init_weights(cfg.init_std, out_std)
                    elif isinstance(m, FeedForward):
                        init_linear(m.w1, cfg.init_std)
                        init_linear(m.w3, cfg.init_std)
                        init_linear(m.w2, out_std)
        if not cfg.tie_embeddings:
            init_linear(self.output, cfg.dim**-0.5)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embeddings else n
