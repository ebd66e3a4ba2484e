"""What the trusted side needs to run its half of a model, and the one place it is assembled.

`init_reply(ckpt)` is what gpu-server (or an in-process engine) sends in answer to `Init`:
config, norm weights, tokenizer files, end-of-sequence ids, fingerprint and dtype. `ModelSpec.from_init` rebuilds
it on the trusted side; `ModelSpec.from_checkpoint` builds the same from the client's own copy
of the model, for the privacy modes, where nothing the server says about the model is trusted.
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from protocol.errors import BadReply, CheckpointError, TSQPError, describe
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


def norm_weights(ckpt) -> dict[str, Tensor]:
    """Every RMSNorm weight of a tsqp.checkpoint.Checkpoint, by the name the trusted side uses."""
    norms = {}
    for i, layer in enumerate(ckpt.layers):
        norms[f"layers.{i}.input_layernorm"] = layer.input_norm
        norms[f"layers.{i}.post_attention_layernorm"] = layer.post_attention_norm
    norms["norm"] = ckpt.norm
    return norms


def init_reply(ckpt) -> tuple[dict, list[Tensor]]:
    """The Init result and tensors for a tsqp.checkpoint.Checkpoint."""
    norms = norm_weights(ckpt)
    result = {
        "protocol": PROTOCOL_VERSION,
        "model": ckpt.name,
        "fingerprint": ckpt.fingerprint,
        "dtype": DTYPE_NAMES[ckpt.dtype],
        "config": ckpt.config,
        "norms": list(norms),
        "tokenizer": ckpt.tokenizer_files(),
        "eos_token_ids": ckpt.eos_token_ids(),
    }
    return result, [w.detach().float() for w in norms.values()]


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
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in result["tokenizer"].items():
                (Path(tmp) / Path(name).name).write_bytes(data)
            tokenizer = load_tokenizer(tmp, "the server's tokenizer", BadReply)
        return cls(
            config=llama_config(result["config"], "the server's config", BadReply),
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
            config=llama_config(ckpt.config, f"the config of {ckpt.name}", CheckpointError),
            norms={n: w.detach().float().cpu() for n, w in norm_weights(ckpt).items()},
            tokenizer=load_tokenizer(ckpt.folder, f"the tokenizer of {ckpt.name}", CheckpointError),
            name=ckpt.name,
            fingerprint=ckpt.fingerprint,
            dtype=ckpt.dtype,
            eos_token_ids=ckpt.eos_token_ids(),
        )


def llama_config(config: dict, what: str = "the config", error: type[TSQPError] = CheckpointError):
    """A config.json's contents as transformers' LlamaConfig (its defaults, its reading of rope parameters); one that
    it cannot read is `error` (the server's: BadReply; the client's own copy's: CheckpointError), not a traceback."""
    from transformers import LlamaConfig

    try:
        return LlamaConfig.from_dict(config)
    except Exception as e:  # transformers validates with errors of its own (and huggingface_hub's)
        raise error(f"{what} is not a Llama config transformers can read ({describe(e)})") from None


def load_tokenizer(folder, what: str = "the tokenizer", error: type[TSQPError] = CheckpointError):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # a folder without (usable) tokenizer files
        raise error(f"{what} cannot be loaded ({describe(e)})") from None
