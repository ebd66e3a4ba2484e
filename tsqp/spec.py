"""What the trusted side needs to run its half of a model, and the one place it is assembled.

`init_reply(ckpt)` is what gpu-server (or an in-process engine) sends in answer to `Init`:
config, norm weights, tokenizer files, end-of-sequence ids, fingerprint and dtype. `ModelSpec.from_init` rebuilds
it on the trusted side; `ModelSpec.from_checkpoint` builds the same from the client's own copy
of the model, for the privacy modes, where nothing the server says about the model is trusted.
"""

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from protocol.wire import DTYPE_NAMES, PROTOCOL_VERSION, TORCH_DTYPES


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def out_features(config, name: str) -> int:
    """The output width of a linear module (or "lm_head") of a Llama with this config."""
    if name in ("q_proj", "k_proj", "v_proj"):
        heads = config.num_attention_heads if name == "q_proj" else config.num_key_value_heads
        return heads * head_dim(config)
    if name in ("gate_proj", "up_proj"):
        return config.intermediate_size
    return config.vocab_size if name == "lm_head" else config.hidden_size  # o_proj, down_proj


def norm_weights(model) -> dict[str, Tensor]:
    """Every RMSNorm weight of a transformers LlamaForCausalLM, by the name the trusted side uses."""
    norms = {}
    for i, layer in enumerate(model.model.layers):
        norms[f"layers.{i}.input_layernorm"] = layer.input_layernorm.weight
        norms[f"layers.{i}.post_attention_layernorm"] = layer.post_attention_layernorm.weight
    norms["norm"] = model.model.norm.weight
    return norms


def eos_token_ids(model) -> list[int]:
    """The ids that end a generated sequence, as transformers' generate reads them: the generation config's,
    else the model config's (an int, a list, or none)."""
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]


def init_reply(ckpt) -> tuple[dict, list[Tensor]]:
    """The Init result and tensors for a tsqp.checkpoint.Checkpoint."""
    norms = norm_weights(ckpt.model)
    result = {
        "protocol": PROTOCOL_VERSION,
        "model": ckpt.name,
        "fingerprint": ckpt.fingerprint,
        "dtype": DTYPE_NAMES[ckpt.model.dtype],
        "config": json.loads(ckpt.model.config.to_json_string(use_diff=False)),
        "norms": list(norms),
        "tokenizer": tokenizer_files(ckpt.tokenizer),
        "eos_token_ids": eos_token_ids(ckpt.model),
    }
    return result, [w.detach().float() for w in norms.values()]


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The tokenizer as its saved files."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


@dataclass
class ModelSpec:
    """What the trusted side needs: config, norm weights (float32), tokenizer, identity, dtype."""

    config: object  # transformers.LlamaConfig
    norms: dict[str, Tensor]
    tokenizer: object
    name: str
    fingerprint: str
    dtype: torch.dtype  # the server's weights, and the wire's floating dtype
    eos_token_ids: list[int]  # generation stops a row at any of these

    @classmethod
    def from_init(cls, result: dict, tensors: list[Tensor]) -> "ModelSpec":
        from transformers import AutoTokenizer, LlamaConfig

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in result["tokenizer"].items():
                (Path(tmp) / Path(name).name).write_bytes(data)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
        return cls(
            config=LlamaConfig.from_dict(result["config"]),
            norms={n: t.float().clone() for n, t in zip(result["norms"], tensors, strict=True)},
            tokenizer=tokenizer,
            name=result["model"],
            fingerprint=result["fingerprint"],
            dtype=TORCH_DTYPES[result["dtype"]],
            eos_token_ids=[int(i) for i in result.get("eos_token_ids", [])],
        )

    @classmethod
    def from_checkpoint(cls, ckpt) -> "ModelSpec":
        return cls(
            config=ckpt.model.config,
            norms={n: w.detach().float().cpu() for n, w in norm_weights(ckpt.model).items()},
            tokenizer=ckpt.tokenizer,
            name=ckpt.name,
            fingerprint=ckpt.fingerprint,
            dtype=ckpt.model.dtype,
            eos_token_ids=eos_token_ids(ckpt.model),
        )
