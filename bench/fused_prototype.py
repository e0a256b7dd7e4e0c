"""A prototype of fused projections for ``bench_peers.py --fused-prototype`` (issue #33, item 3).

Not meshforge code: it patches ``Decoder.init_weights`` in the process that runs it so that, once
the weights are initialised as usual, each block's ``wq``/``wk``/``wv`` become one ``wqkv`` linear
(their rows concatenated) and ``w1``/``w3`` one ``w13`` linear, and the blocks' forwards run one
matmul each and split its output. The weights are the same numbers as the unfused model's, so the
two sides' losses match; only the step time differs: what fusing would buy on the whole step.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    out = nn.Linear(
        parts[0].in_features,
        sum(p.out_features for p in parts),
        bias=False,
        device=parts[0].weight.device,
        dtype=parts[0].weight.dtype,
    )
    with torch.no_grad():
        out.weight.copy_(torch.cat([p.weight for p in parts]))
    return out


def _attention_forward(self, x, cos, sin, mask=None):
    bsz, seqlen, _ = x.shape
    q, k, v = self.wqkv(x).split(self.rows, dim=-1)
    q, k, v = (t.view(bsz, seqlen, -1, self.head_dim) for t in (q, k, v))
    q, k = self.rope(q, k, cos, sin)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = self.core(q, k, v, mask)
    return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


def _ffn_forward(self, x):
    a, b = self.w13(x).chunk(2, dim=-1)
    return self.w2(self.gate(a, b))


def install() -> None:
    """Make every Decoder built from now on in this process use fused projections."""
    from meshforge.models.decoder import Decoder

    plain_init = Decoder.init_weights

    def init_weights(self):
        plain_init(self)
        for block in self.layers.values():
            attn, ffn = block.attention, block.feed_forward
            assert attn.q_norm is None and attn.wq.bias is None and self.rope_cos.shape[-1] == attn.head_dim, (
                "prototype: plain Llama only"
            )
            attn.rows = (attn.wq.out_features, attn.wk.out_features, attn.wv.out_features)
            attn.wqkv = _fused_linear([attn.wq, attn.wk, attn.wv])
            del attn.wq, attn.wk, attn.wv
            attn.forward = types.MethodType(_attention_forward, attn)
            ffn.w13 = _fused_linear([ffn.w1, ffn.w3])
            del ffn.w1, ffn.w3
            ffn.forward = types.MethodType(_ffn_forward, ffn)

    Decoder.init_weights = init_weights
