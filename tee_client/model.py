"""A Llama forward (as transformers' LlamaForCausalLM) whose linear steps go through `ops`.

This file is the trusted side: RMSNorm, RoPE, the causal + padding mask, softmax, SiLU·up,
the residual adds and the grouped-query head bookkeeping run here, in float32. Everything
that touches a weight matrix, and the two attention matmuls Q·Kᵀ and P·V, is delegated to
an `Ops` object: remote over ZeroMQ, or in-process (tee_client.ops). No zmq in here.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from tee_client.ops import Ops
from tee_client.stats import tee_op
from tsqp.spec import ModelSpec, head_dim


class Llama:
    def __init__(self, spec: ModelSpec, ops: Ops):
        c = spec.config
        self.ops, self.config = ops, c
        self.n_layers = c.num_hidden_layers
        self.n_heads, self.n_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = head_dim(c)
        self.scale = self.head_dim**-0.5
        self.eps = c.rms_norm_eps
        self.attention_norms = [spec.norms[f"layers.{i}.input_layernorm"] for i in range(self.n_layers)]
        self.ffn_norms = [spec.norms[f"layers.{i}.post_attention_layernorm"] for i in range(self.n_layers)]
        self.final_norm = spec.norms["norm"]

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, attention_mask: Tensor, logits: str = "all") -> Tensor:
        """Logits, float32, for right-padded ids at positions 0..S-1: (B, S, vocab) at every position,
        or with logits="last" (B, 1, vocab) at each row's last real token only: LMHead gets nothing else."""
        bsz, seqlen = input_ids.shape
        cos, sin = rope_tables(self.config, seqlen)
        # the softmax scale goes into the queries' rotation (D numbers per position), not into the S x S scores
        rope = (cos, sin, cos * self.scale, sin * self.scale)
        mask = additive_mask(attention_mask)
        x = self.ops.embedding(input_ids)
        for layer in range(self.n_layers):
            x = self.block(layer, x, rope, mask)
        if logits == "last":
            x = x[torch.arange(bsz), last_positions(attention_mask)].unsqueeze(1)
        return self.ops.lm_head(rms_norm(x, self.final_norm, self.eps))

    def block(self, layer: int, x: Tensor, rope: tuple[Tensor, ...], mask: Tensor) -> Tensor:
        h = residual(x, self.attention(layer, rms_norm(x, self.attention_norms[layer], self.eps), rope, mask))
        return residual(h, self.feed_forward(layer, rms_norm(h, self.ffn_norms[layer], self.eps)))

    def attention(self, layer: int, x: Tensor, rope: tuple[Tensor, ...], mask: Tensor) -> Tensor:
        bsz, seqlen, _ = x.shape
        # QKV
        q, k, v = self.ops.linear(layer, ("q_proj", "k_proj", "v_proj"), x)
        q = q.view(bsz, seqlen, self.n_kv_heads, self.n_rep, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, 1, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, 1, self.head_dim)
        # RoPE (q's tables carry the softmax scale)
        cos, sin, cos_q, sin_q = rope
        q, k = apply_rope(q, cos_q, sin_q), apply_rope(k, cos, sin)
        # grouped-query attention: each kv head serves n_rep query heads, broadcast on the
        # GPU side instead of copied, so K and V cross the wire once per kv head
        q, k, v = (t.permute(0, 2, 3, 1, 4) for t in (q, k, v))  # (B, Hkv, rep, S, D)
        scores = self.ops.matmul(q, k, transpose_b=True)  # (B, Hkv, rep, S, S)
        probs = masked_softmax(scores, 1.0, mask)  # scaled already, through q
        out = self.ops.matmul(probs, v)  # (B, Hkv, rep, S, D)
        out = out.permute(0, 3, 1, 2, 4).reshape(bsz, seqlen, self.n_heads * self.head_dim)
        return self.ops.linear(layer, ("o_proj",), out)[0]

    def feed_forward(self, layer: int, x: Tensor) -> Tensor:
        gate, up = self.ops.linear(layer, ("gate_proj", "up_proj"), x)
        return self.ops.linear(layer, ("down_proj",), silu_mul(gate, up))[0]


def last_positions(attention_mask: Tensor) -> Tensor:
    """Each row's last real position (B,): rows are right-padded, their real tokens at 0..n-1."""
    return attention_mask.sum(dim=1) - 1


# ---- the trusted side's non-linear steps ---------------------------------------------------


@tee_op("rmsnorm")
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@tee_op("rope")
def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@tee_op("softmax")
def masked_softmax(scores: Tensor, scale: float, mask: Tensor) -> Tensor:
    """Consumes `scores`: scaled, masked and normalised in place (no S x S buffer of its own), float32."""
    if scale != 1.0:
        scores.mul_(scale)
    return torch.softmax(scores.add_(mask), dim=-1, out=scores)


@tee_op("silu")
def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


@tee_op("residual")
def residual(x: Tensor, y: Tensor) -> Tensor:
    return x + y


@tee_op("mask")
def additive_mask(attention_mask: Tensor) -> Tensor:
    """0 where query i may see key j (j <= i and j is not padding), float32 min elsewhere."""
    seqlen = attention_mask.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    visible = causal & attention_mask.bool()[:, None, :]  # (B, S, S)
    mask = torch.zeros(visible.shape, dtype=torch.float32).masked_fill(~visible, torch.finfo(torch.float32).min)
    return mask[:, None, None]  # (B, 1, 1, S, S)


@tee_op("rope_tables")
def rope_tables(config, seqlen: int) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (S, 1, 1, D) for positions 0..S-1, for every rope type transformers knows."""
    inv_freq, scaling = rope_frequencies(config, seqlen)
    freqs = torch.outer(torch.arange(seqlen, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    return emb.cos() * scaling, emb.sin() * scaling


def rope_frequencies(config, seqlen: int) -> tuple[Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = config.rope_parameters
    if params["rope_type"] == "default":
        dim = head_dim(config)
        return 1.0 / params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), 1.0
    # dynamic NTK rescales only once the sequence outgrows max_position_embeddings
    grown = params["rope_type"] == "dynamic" and seqlen > config.max_position_embeddings
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, **({"seq_len": seqlen} if grown else {}))
