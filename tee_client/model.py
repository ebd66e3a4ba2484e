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
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits (B, S, vocab), float32, for right-padded ids at positions 0..S-1."""
        bsz, seqlen = input_ids.shape
        rope = rope_tables(self.config, seqlen)
        mask = additive_mask(attention_mask)
        x = self.ops.embedding(input_ids)
        for layer in range(self.n_layers):
            x = self.block(layer, x, rope, mask)
        return self.ops.lm_head(rms_norm(x, self.final_norm, self.eps))

    def block(self, layer: int, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        h = residual(x, self.attention(layer, rms_norm(x, self.attention_norms[layer], self.eps), rope, mask))
        return residual(h, self.feed_forward(layer, rms_norm(h, self.ffn_norms[layer], self.eps)))

    def attention(self, layer: int, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        bsz, seqlen, _ = x.shape
        # QKV
        q, k, v = self.ops.linear(layer, ("q_proj", "k_proj", "v_proj"), x)
        q = q.view(bsz, seqlen, self.n_kv_heads, self.n_rep, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, 1, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, 1, self.head_dim)
        # RoPE
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # grouped-query attention: each kv head serves n_rep query heads, broadcast on the
        # GPU side instead of copied, so K and V cross the wire once per kv head
        q, k, v = (t.permute(0, 2, 3, 1, 4) for t in (q, k, v))  # (B, Hkv, rep, S, D)
        scores = self.ops.matmul(q, k, transpose_b=True)  # (B, Hkv, rep, S, S)
        probs = masked_softmax(scores, self.scale, mask)
        out = self.ops.matmul(probs, v)  # (B, Hkv, rep, S, D)
        out = out.permute(0, 3, 1, 2, 4).reshape(bsz, seqlen, self.n_heads * self.head_dim)
        return self.ops.linear(layer, ("o_proj",), out)[0]

    def feed_forward(self, layer: int, x: Tensor) -> Tensor:
        gate, up = self.ops.linear(layer, ("gate_proj", "up_proj"), x)
        return self.ops.linear(layer, ("down_proj",), silu_mul(gate, up))[0]


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
    """Consumes `scores` (scaled and masked in place: two fewer S x S buffers per layer)."""
    return torch.softmax(scores.mul_(scale).add_(mask), dim=-1, dtype=torch.float32)


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
