"""A Llama forward (as transformers' LlamaForCausalLM) whose linear steps go through `ops`.

This file is the trusted side: RMSNorm, RoPE, the causal + padding mask, attention, SiLU·up,
the residual adds and the grouped-query head bookkeeping run here, in float32. Everything
that touches a weight matrix is delegated to an `Ops` object: remote over ZeroMQ, or
in-process (tee_client.ops). No zmq here. Attention runs here as one fused kernel per layer;
`Llama(..., attention="server")` (plain mode only) sends a prefill's two attention matmuls,
Q·Kᵀ and P·V, to the ops instead, and keeps the masked softmax between them here.

Generation (`prefill` then `decode`, one token per row per step) keeps a `KVCache` here, in
the TEE: the server stays stateless and a decode step's attention (one query row against the
cached keys: O(context) work) runs here too, so what crosses per step is the same few rows
of activations whatever the context, and no key or value ever leaves the TEE after a prefill.

Where the ops allow it (plain mode, no q/k/v/gate/up biases) a forward, prefill or decode step,
takes two calls per layer instead of four (`run_fused`): the server adds the residual and applies
the RMSNorm weight, the linear parts (`Ops.residual`), and this side scales each product by
1/rms. The same bytes cross; half the round trips. --verify checks such a reply in float32 only,
so a float16 or bfloat16 model's prefill takes the four calls, verified or not (its logits the
same either way), and so does its decode when verified.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tee_client.ops import Ops
from tee_client.settings import Attention
from tee_client.stats import tee_op
from tsqp.spec import ModelSpec, head_dim


QKV = ("q_proj", "k_proj", "v_proj")


class KVCache:
    """Every layer's keys (after RoPE) and values, float32, (B, Hkv, 1, max_len, D) each, in the TEE.

    Row b's tokens sit at positions 0..lengths[b]-1. A prefill's padding lies past them: never
    attended (the decode mask stops at each row's own position) and overwritten as the row grows.
    """

    def __init__(self, n_layers: int, bsz: int, n_kv_heads: int, max_len: int, head_dim: int):
        shape = (bsz, n_kv_heads, 1, max_len, head_dim)
        self.k = [torch.zeros(shape) for _ in range(n_layers)]
        self.v = [torch.zeros(shape) for _ in range(n_layers)]
        self.lengths = torch.zeros(bsz, dtype=torch.int64)

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, Hkv, 1, S, D) at positions input_pos: (S,) the same for every row, or (B, S) each row's
        own; the cached K, V up to the furthest of them."""
        if input_pos.dim() == 1:  # one copy along the sequence for the whole batch
            self.k[layer].index_copy_(3, input_pos, k)
            self.v[layer].index_copy_(3, input_pos, v)
        else:
            rows = torch.arange(k.shape[0])[:, None].expand_as(input_pos)
            self.k[layer][rows, :, :, input_pos] = k.permute(0, 3, 1, 2, 4)  # (B, S, Hkv, 1, D) as indexed
            self.v[layer][rows, :, :, input_pos] = v.permute(0, 3, 1, 2, 4)
        end = int(input_pos.max()) + 1
        return self.k[layer][..., :end, :], self.v[layer][..., :end, :]

    def keep(self, rows: Tensor) -> None:
        """Keep only these rows (B',) of the batch, in this order: finished sequences stop costing anything."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.lengths = self.lengths[rows]


@dataclass
class Pass:
    """What one forward's tokens share: RoPE tables at their positions (cos, sin for k, and q's, which carry the
    softmax scale, stacked: (4, B, S, 1, 1, D/2)), the additive mask over the keys they see, and, when generating,
    the cache and their positions."""

    rope: Tensor
    mask: Tensor | None  # None: every token sees every key, or, with causal, the mask is left to the fused kernel
    causal: bool = False  # the mask is exactly causal (nothing padded)
    cache: KVCache | None = None
    input_pos: Tensor | None = None  # (S,) shared by every row, or (B, S): see KVCache.update
    decoding: bool = False  # a decode step: one new token per row against the cache


class Llama:
    def __init__(self, spec: ModelSpec, ops: Ops, attention: Attention = "tee"):
        if attention not in ("tee", "server"):
            raise ValueError(f"attention runs in the 'tee' or on the 'server', not {attention!r}")
        c = spec.config
        self.ops, self.config = ops, c
        self.server_attention = attention == "server"  # a prefill's Q·Kᵀ and P·V through ops.matmul
        self.n_layers = c.num_hidden_layers
        self.n_heads, self.n_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = head_dim(c)
        self.scale = self.head_dim**-0.5
        self.eps = c.rms_norm_eps
        self.attention_norms = [spec.norms[f"layers.{i}.input_layernorm"] for i in range(self.n_layers)]
        self.ffn_norms = [spec.norms[f"layers.{i}.post_attention_layernorm"] for i in range(self.n_layers)]
        self.final_norm = spec.norms["norm"]
        # two calls per layer (Ops.residual) where nothing needs each matmul on its own (see the module's docstring)
        biased = getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False)
        fusable, checkable = ops.fuses_residuals and not biased, spec.dtype == torch.float32
        self.fused_prefill = fusable and checkable
        self.fused_decode = fusable and (checkable or ops.verifier is None)
        # a decode step's last Residual carries the LMHead, unless --verify checks the logits (in blocks, on their own)
        self.logits_in_residual = ops.verifier is None

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, attention_mask: Tensor, logits: str = "all") -> Tensor:
        """Logits, float32, for right-padded ids at positions 0..S-1: (B, S, vocab) at every position,
        or with logits="last" (B, 1, vocab) at each row's last real token only: LMHead gets nothing else."""
        bsz, seqlen = input_ids.shape
        positions = torch.arange(seqlen).expand(bsz, seqlen)
        # as transformers' batched forward: every row's rope for a sequence of S tokens (dynamic NTK cares)
        step = Pass(self.rope(positions, torch.full((bsz,), seqlen)), *self.prefill_mask(attention_mask))
        return self.run(input_ids, attention_mask, step, logits)

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor, cache: KVCache) -> Tensor:
        """The first step of generation: the forward above, filling `cache`; logits (B, vocab) at each last token."""
        bsz, seqlen = input_ids.shape
        positions = torch.arange(seqlen).expand(bsz, seqlen)
        cache.lengths = attention_mask.sum(dim=1)
        # each row's rope as if it were alone: for a sequence of its own length
        rope = self.rope(positions, cache.lengths)
        step = Pass(rope, *self.prefill_mask(attention_mask), cache, positions[0])
        return self.run(input_ids, attention_mask, step, "last")[:, 0]

    @torch.inference_mode()
    def decode(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """One generation step: tokens (B,) go at each row's next position; logits (B, vocab) for the token after."""
        pos = cache.lengths[:, None]  # (B, 1)
        mask = decode_mask(cache.lengths)  # None: all rows at one position, so nothing to hide
        input_pos = pos if mask is not None else pos[0]
        step = Pass(self.rope(pos, cache.lengths + 1), mask, cache=cache, input_pos=input_pos, decoding=True)
        logits = self.run(tokens[:, None], None, step, "all")
        cache.lengths = cache.lengths + 1
        return logits[:, 0]

    def run(self, input_ids: Tensor, attention_mask: Tensor | None, step: Pass, logits: str) -> Tensor:
        if self.fused_decode if step.decoding else self.fused_prefill:
            return self.run_fused(input_ids, attention_mask, step, logits)
        x = self.ops.embedding(input_ids)
        for layer in range(self.n_layers):
            x = self.block(layer, x, step)
        return self.head(x, attention_mask, logits)

    def run_fused(self, input_ids: Tensor, attention_mask: Tensor | None, step: Pass, logits: str) -> Tensor:
        """`run` in two calls per layer: each Residual call returns the new residual stream and the next modules'
        products of it, which still owe its 1/rms (the server applied the weight): q, k and v take it in their
        rotation (`rms_fold`), gate and up in the SiLU, the logits on their own. A decode step's last one carries
        the LMHead (unless --verify checks the logits: in blocks, on an LMHead call of their own); a prefill ends as
        `run` does, so that its logits are the same whether verified or not."""
        every = step.decoding and self.logits_in_residual
        # each reply borrowed (read where it crossed, Ops.call) but one whose tensors outlive the next call: x when
        # attention's products go to the server in between, h when the last layer's down_proj goes alone
        x_borrowed = step.decoding or not self.server_attention
        x = self.ops.embedding(input_ids)
        qkv, scale = self.ops.linear(0, QKV, rms_norm(x, self.attention_norms[0], self.eps), normed=True), None
        for layer in range(self.n_layers):
            nexts = QKV if layer + 1 < self.n_layers else ("lm_head",) if every else ()
            h, gate, up = self.ops.residual(
                layer, "o_proj", ("gate_proj", "up_proj"), self.attend(layer, *qkv, step, scale), x, bool(nexts)
            )
            gated = silu_mul(gate, up, inverse_rms(h, self.eps), self.ops.request_buffer(gate.shape))
            if not nexts:  # the LMHead on its own, as in `run`
                x = residual(h, self.ops.linear(layer, ("down_proj",), gated)[0])
                return self.head(x, attention_mask, logits)
            x, *qkv = self.ops.residual(layer, "down_proj", nexts, gated, h, x_borrowed)
            scale = inverse_rms(x, self.eps)  # what q, k, v (or the logits) still owe: taken in the next attend
        return rms_scale(qkv[0], scale)  # the logits

    def head(self, x: Tensor, attention_mask: Tensor | None, logits: str) -> Tensor:
        """The LMHead over the final RMSNorm: at every position, or (logits="last") at each row's last real one."""
        if logits == "last":
            x = x[torch.arange(x.shape[0]), last_positions(attention_mask)].unsqueeze(1)
        return self.ops.lm_head(rms_norm(x, self.final_norm, self.eps), normed=True)

    def block(self, layer: int, x: Tensor, step: Pass) -> Tensor:
        h = residual(x, self.attention(layer, rms_norm(x, self.attention_norms[layer], self.eps), step))
        return residual(h, self.feed_forward(layer, rms_norm(h, self.ffn_norms[layer], self.eps)))

    def attention(self, layer: int, x: Tensor, step: Pass) -> Tensor:
        """x: the output of this layer's input RMSNorm (`normed` tells the ops so: --verify bounds its rows)."""
        # QKV
        q, k, v = self.ops.linear(layer, QKV, x, normed=True)
        return self.ops.linear(layer, ("o_proj",), self.attend(layer, q, k, v, step))[0]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, step: Pass, scale: Tensor | None = None) -> Tensor:
        """Attention of q (B, S, H·D) over k, v (B, S, Hkv·D) and layer's cached context: (B, S, H·D) for o_proj.
        `scale` (B, S, 1): the RMSNorm's 1/rms per row that q, k and v still owe (two calls per layer), or None."""
        bsz, seqlen, _ = q.shape
        rope = step.rope
        if scale is not None:
            rope, v = rms_fold(rope, v, scale)
        q = q.view(bsz, seqlen, self.n_kv_heads, self.n_rep, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, 1, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, 1, self.head_dim)
        # RoPE (q's tables carry the softmax scale)
        cos, sin, cos_q, sin_q = rope
        q, k = apply_rope(q, cos_q, sin_q), apply_rope(k, cos, sin)
        # grouped-query attention: each kv head serves n_rep query heads, never copied (on the
        # server, broadcast: K and V cross the wire once per kv head)
        q, k, v = (t.permute(0, 2, 3, 1, 4) for t in (q, k, v))  # (B, Hkv, rep, S, D)
        if step.cache is not None:
            k, v = step.cache.update(layer, step.input_pos, k, v)  # (B, Hkv, 1, context, D)
        if step.decoding:
            out = decode_attention(q, k, v, step.mask)
        elif self.server_attention:
            scores = self.ops.matmul(q, k, transpose_b=True)  # (B, Hkv, rep, S, context)
            probs = masked_softmax(scores, 1.0, step.mask)  # scaled already, through q
            out = self.ops.matmul(probs, v)  # (B, Hkv, rep, S, D)
        else:
            out = prefill_attention(q, k, v, step.mask, step.causal)
        return out.permute(0, 3, 1, 2, 4).reshape(bsz, seqlen, self.n_heads * self.head_dim)

    def feed_forward(self, layer: int, x: Tensor) -> Tensor:
        """x: the output of this layer's post-attention RMSNorm."""
        gate, up = self.ops.linear(layer, ("gate_proj", "up_proj"), x, normed=True)
        return self.ops.linear(layer, ("down_proj",), silu_mul(gate, up))[0]

    def rope(self, positions: Tensor, seqlens: Tensor) -> Tensor:
        cos, sin = rope_tables(self.config, positions, seqlens)
        # the softmax scale goes into the queries' rotation (D numbers per position), not into the S x S scores
        return torch.stack((cos, sin, cos * self.scale, sin * self.scale))

    def prefill_mask(self, attention_mask: Tensor) -> tuple[Tensor | None, bool]:
        """A prefill's additive mask and whether it is exactly causal (nothing padded); no mask at all when it is
        and attention runs here: the fused kernel's causal path needs none."""
        causal = bool(attention_mask.all())
        return (None if causal and not self.server_attention else additive_mask(attention_mask)), causal

    def new_cache(self, bsz: int, max_len: int) -> KVCache:
        return KVCache(self.n_layers, bsz, self.n_kv_heads, max_len, self.head_dim)


def last_positions(attention_mask: Tensor) -> Tensor:
    """Each row's last real position (B,): rows are right-padded, their real tokens at 0..n-1."""
    return attention_mask.sum(dim=1) - 1


# ---- the trusted side's non-linear steps ---------------------------------------------------


def one_over_rms(x: Tensor, eps: float) -> Tensor:
    """(mean(x²) + eps)^-½ per row, (…, 1): from x's norm, one pass that writes nothing (x.pow(2) is a copy of x)."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()


@tee_op("rmsnorm")
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return (x * one_over_rms(x, eps)).mul_(weight)


@tee_op("rmsnorm")
def inverse_rms(x: Tensor, eps: float) -> Tensor:
    """RMSNorm's non-linear half, owed after the matmul by each product of (x ⊙ weight): 1/rms(x) per row, (…, 1)."""
    return one_over_rms(x, eps)


@tee_op("rmsnorm")
def rms_scale(product: Tensor, scale: Tensor) -> Tensor:
    return product * scale


@tee_op("rmsnorm")
def rms_fold(rope: Tensor, v: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """1/rms per row (B, S, 1), owed by q, k and v: folded into the rotary tables (4, B, S, 1, 1, D/2), which RoPE
    multiplies q and k by anyway (D/2 numbers a row instead of H·D), and applied to v."""
    return rope * scale[..., None, None], v * scale


@tee_op("rope")
def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (…, D) rotated as transformers' rotate_half does, its halves x1, x2 by the tables' (…, D/2) angles: x1·cos −
    x2·sin, x2·cos + x1·sin, written straight into one new tensor (no rotated copy, no concatenation)."""
    half = x.shape[-1] // 2
    out = torch.empty(x.shape, dtype=torch.result_type(x, cos))
    x1, x2, out1, out2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)
    return out


@tee_op("softmax")
def masked_softmax(scores: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """Consumes `scores`: scaled, masked (unless mask is None) and normalised in place (no S x S buffer of its
    own), float32."""
    if scale != 1.0:
        scores.mul_(scale)
    if mask is not None:
        scores.add_(mask)
    return torch.softmax(scores, dim=-1, out=scores)


@tee_op("silu")
def silu_mul(gate: Tensor, up: Tensor, scale: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """SiLU(gate)·up; with `scale` (…, 1), the RMSNorm's 1/rms per row that both still owe, SiLU(gate·scale)·up·scale,
    into `out` when given (the next request's place in shared memory: Ops.request_buffer). In one tensor, each step
    in place."""
    if scale is None:
        return F.silu(gate).mul_(up)
    return F.silu(torch.mul(gate, scale, out=out), inplace=True).mul_(up).mul_(scale)


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


@tee_op("mask")
def decode_mask(positions: Tensor) -> Tensor | None:
    """For one new token per row at positions (B,): 0 on the keys 0..position, float32 min past it, (B, 1, 1, 1, L);
    None when every row is at the same position (each sees every key)."""
    first = int(positions[0])
    if bool((positions == first).all()):
        return None
    keys = torch.arange(int(positions.max()) + 1)
    visible = keys[None, :] <= positions[:, None]
    mask = torch.zeros(visible.shape, dtype=torch.float32).masked_fill(~visible, torch.finfo(torch.float32).min)
    return mask[:, None, None, None]


@tee_op("attention")
def prefill_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """softmax(q·kᵀ + mask)·v over a prefill's tokens, in the TEE: q (B, Hkv, rep, S, D), scaled already (through
    its rotary tables), k, v (B, Hkv, 1, S, D) (a prefill's keys are its own tokens), mask (B, 1, 1, S, S), or
    None when `causal`; (B, Hkv, rep, S, D).

    torch's fused attention, as transformers' own forward: no S x S scores of its own, and with `causal` (nothing
    padded) the masked half is never computed. Its query heads are the rep heads of each kv head, in order."""
    bsz, n_kv, rep, seqlen, d = q.shape
    q, k, v = q.reshape(bsz, n_kv * rep, seqlen, d), k.squeeze(2), v.squeeze(2)
    if causal:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask[:, 0], scale=1.0, enable_gqa=True)
    return out.view(bsz, n_kv, rep, seqlen, d)


@tee_op("attention")
def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q·kᵀ + mask)·v for a decode step, in the TEE: q (B, Hkv, rep, 1, D), scaled already (through its
    rotary tables), against the cache's k, v (B, Hkv, 1, L, D), mask (B, 1, 1, 1, L) or None; (B, Hkv, rep, 1, D).

    torch's fused attention, the rep query heads that share a kv head as its rows: one kernel per step and layer
    instead of a product, a softmax and a product (as transformers' own decode does)."""
    bsz, n_kv, rep, _, d = q.shape
    mask = None if mask is None else mask[:, 0]  # (B, 1, 1, L): every head and row of a sequence alike
    out = F.scaled_dot_product_attention(q.reshape(bsz, n_kv, rep, d), k.squeeze(2), v.squeeze(2), mask, scale=1.0)
    return out.view(bsz, n_kv, rep, 1, d)


@tee_op("rope_tables")
def rope_tables(config, positions: Tensor, seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin (B, S, 1, 1, D/2) at positions (B, S), row b's frequencies those of a sequence of seqlens[b] tokens
    (only dynamic NTK depends on the length), for every rope type transformers knows."""
    tables = {int(n): rope_frequencies(config, int(n)) for n in seqlens.unique()}
    inv_freq = torch.stack([tables[int(n)][0] for n in seqlens])  # (B, D/2)
    scaling = torch.tensor([float(tables[int(n)][1]) for n in seqlens])[:, None, None, None, None]
    freqs = positions[..., None].float() * inv_freq[:, None, :]  # (B, S, D/2)
    angles = freqs[:, :, None, None, :]  # transformers' tables are these twice over, cat((freqs, freqs))
    return angles.cos() * scaling, angles.sin() * scaling


def rope_frequencies(config, seqlen: int) -> tuple[Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = config.rope_parameters
    if params["rope_type"] == "default":
        dim = head_dim(config)
        return 1.0 / params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), 1.0
    # dynamic NTK rescales only once the sequence outgrows max_position_embeddings
    grown = params["rope_type"] == "dynamic" and seqlen > config.max_position_embeddings
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, **({"seq_len": seqlen} if grown else {}))
