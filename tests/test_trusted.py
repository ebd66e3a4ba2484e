"""The trusted side's non-linear steps, in-process, against transformers' own functions."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    create_causal_mask,
    eager_attention_forward,
)

from checkpoints import BASE, VARIANTS
from tee_client.model import (
    Llama,
    additive_mask,
    apply_rope,
    masked_softmax,
    prefill_attention,
    rms_norm,
    rope_tables,
)
from tee_client.ops import LocalOps
from tsqp.checkpoint import load_checkpoint
from tsqp.engine import Engine


def config(variant: str) -> LlamaConfig:
    cfg = LlamaConfig(vocab_size=300, **{**BASE, **VARIANTS[variant]})
    cfg._attn_implementation = "eager"
    return cfg


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("seqlen", [7, 48])  # 48: past every variant's original context
def test_rope_tables_and_rotation_match_transformers(variant, seqlen):
    cfg = config(variant)
    cos, sin = rope_tables(cfg, torch.arange(seqlen)[None], torch.tensor([seqlen]))  # (1, S, 1, 1, D/2)
    cos, sin = cos[0], sin[0]  # (S, 1, 1, D/2)
    head_dim = 2 * cos.shape[-1]
    x = torch.randn(1, seqlen, 1, 1, head_dim)
    ref_cos, ref_sin = LlamaRotaryEmbedding(cfg)(x, torch.arange(seqlen)[None])  # (1, S, D): both halves alike
    torch.testing.assert_close(torch.cat((cos, cos), -1)[:, 0, 0], ref_cos[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat((sin, sin), -1)[:, 0, 0], ref_sin[0], rtol=1e-5, atol=1e-6)
    q = torch.randn(1, 2, seqlen, head_dim)  # transformers' layout: (B, H, S, D)
    ref_q, _ = apply_rotary_pos_emb(q, q, ref_cos, ref_sin)
    ours = apply_rope(q.permute(0, 2, 1, 3)[:, :, :, None], cos, sin)  # ours: (B, S, H, 1, D)
    torch.testing.assert_close(ours[:, :, :, 0].permute(0, 2, 1, 3), ref_q, rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_transformers():
    weight = torch.rand(64) + 0.5
    reference = LlamaRMSNorm(64, eps=1e-5)
    reference.weight.data.copy_(weight)
    x = torch.randn(3, 5, 64) * 7
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), reference(x), rtol=1e-6, atol=1e-6)


def test_padding_and_causal_mask_match_transformers():
    attention_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    reference = create_causal_mask(
        config=config("gqa"),
        inputs_embeds=torch.zeros(2, 5, 64),
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=torch.arange(5)[None].expand(2, -1),
    )
    assert torch.equal(additive_mask(attention_mask)[:, :, 0], reference)  # ours: (B, 1, 1, S, S)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("where", ["server", "tee"])
def test_attention_matches_transformers_eager_attention(where, padded):
    """Both placements of a prefill's attention: the masked softmax between two products (--attention server),
    and the fused kernel (tee; with nothing padded, its causal path)."""
    cfg = config("gqa")
    bsz, seqlen, n_kv, rep, dim = 2, 6, 2, 2, 16
    q, k, v = (
        torch.randn(bsz, n_kv, rep, seqlen, dim),
        torch.randn(bsz, n_kv, 1, seqlen, dim),
        torch.randn(bsz, n_kv, 1, seqlen, dim),
    )
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0] if padded else [1] * 6, [1] * 6])
    mask = additive_mask(attention_mask)
    if where == "server":
        ours = masked_softmax(q @ k.transpose(-1, -2), dim**-0.5, mask) @ v  # (B, Hkv, rep, S, D)
    else:  # nothing padded: the causal path, with no mask at all
        ours = prefill_attention(q * dim**-0.5, k, v, mask if padded else None, causal=not padded)

    class Module(torch.nn.Module):
        num_key_value_groups = rep
        training = False

    reference, _ = eager_attention_forward(
        Module(),
        q.reshape(bsz, n_kv * rep, seqlen, dim),
        k[:, :, 0],
        v[:, :, 0],
        mask[:, :, 0],
        scaling=dim**-0.5,
        config=cfg,
    )  # (B, S, H, D)
    torch.testing.assert_close(ours.reshape(bsz, n_kv * rep, seqlen, dim).transpose(1, 2), reference)


@pytest.mark.parametrize("attention", ["tee", "server"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_forward_with_either_attention_matches_transformers(variant, attention, checkpoints):
    """The whole forward in this process (tee-only ops), nothing padded (the fused kernel's causal path) and a
    padded batch (its mask), against transformers' own forward on the same checkpoint."""
    ckpt = load_checkpoint(checkpoints(variant), torch.float32, torch.device("cpu"))
    ops = LocalOps(Engine(ckpt))
    model = Llama(ops.init(), ops, attention)
    transformers_model = LlamaForCausalLM.from_pretrained(checkpoints(variant), dtype=torch.float32)
    ids = torch.arange(3, 43).reshape(2, 20)
    for mask in (torch.ones_like(ids), torch.tensor([[1] * 20, [1] * 13 + [0] * 7])):
        with torch.no_grad():
            reference = transformers_model(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(model.forward(ids, mask)[real], reference[real], atol=1e-4, rtol=0)
