"""The linear half of a Llama model on one device: everything gpu-server computes.

The same engine runs inside gpu-server (behind ZeroMQ) and inside tee-client for the
in-process backends. Every method checks its inputs against the model before it allocates.
"""

import functools
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_server.checkpoint import Checkpoint
from protocol.errors import BadShape, TooLarge, UnknownModule
from protocol.wire import DTYPE_NAMES, PROTOCOL_VERSION

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class Engine:
    def __init__(self, ckpt: Checkpoint, max_result_bytes: int = 2**31):
        self.ckpt = ckpt
        self.model = ckpt.model
        self.layers = ckpt.model.model.layers
        self.embed = ckpt.model.model.embed_tokens.weight
        self.lm_head_weight = ckpt.model.lm_head.weight
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.max_result_bytes = max_result_bytes
        self.itemsize = self.embed.element_size()

    # ---- Init: what the trusted side needs to run its half -------------------------------

    def init(self) -> tuple[dict, list[torch.Tensor]]:
        names, norms = [], []
        for i, layer in enumerate(self.layers):
            names += [f"layers.{i}.input_layernorm", f"layers.{i}.post_attention_layernorm"]
            norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        names.append("norm")
        norms.append(self.model.model.norm.weight)
        result = {
            "protocol": PROTOCOL_VERSION,
            "model": self.ckpt.name,
            "fingerprint": self.ckpt.fingerprint,
            "dtype": DTYPE_NAMES[self.dtype],
            "config": json.loads(self.model.config.to_json_string(use_diff=False)),
            "norms": names,
            "tokenizer": self.tokenizer_files,
        }
        return result, [w.detach().float() for w in norms]

    @functools.cached_property
    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer as its saved files, made once: Init sends them to the trusted side."""
        with tempfile.TemporaryDirectory() as tmp:
            self.ckpt.tokenizer.save_pretrained(tmp)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}

    # ---- the linear ops ---------------------------------------------------------------------

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise BadShape(f"Embedding takes int64 or int32 token ids, got {ids.dtype}")
        vocab = self.embed.shape[0]
        self.check_result(ids.numel() * self.embed.shape[1])
        ids = ids.to(self.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise BadShape(f"token ids must lie in [0, {vocab})")
        return F.embedding(ids, self.embed)

    def linear(self, layer: int, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
        modules = [self.module(layer, name) for name in names]
        for name, m in zip(names, modules, strict=True):
            self.check_activation(x, m.in_features, f"layer {layer} {name}")
        self.check_result(x.numel() // max(x.shape[-1], 1) * sum(m.out_features for m in modules))
        x = x.to(self.device)
        return [F.linear(x, m.weight, m.bias) for m in modules]

    def matmul(self, a: torch.Tensor, b: torch.Tensor, transpose_b: bool = False) -> torch.Tensor:
        for t in (a, b):
            if t.dtype != self.dtype or t.dim() < 2:
                raise BadShape(f"Matmul takes {self.dtype} tensors of at least 2 dims, got {t.dtype}{list(t.shape)}")
        rows, inner = a.shape[-2:]
        b_inner, cols = (b.shape[-1], b.shape[-2]) if transpose_b else b.shape[-2:]
        if inner != b_inner:
            raise BadShape(
                f"Matmul inner dimensions differ: {list(a.shape)} @ {list(b.shape)}, transpose_b={transpose_b}"
            )
        try:
            batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except RuntimeError:
            raise BadShape(f"Matmul batch dimensions do not broadcast: {list(a.shape)} @ {list(b.shape)}") from None
        # torch materializes broadcast operands: count them with the result
        self.check_result(batch.numel() * (rows * inner + inner * cols + rows * cols))
        a, b = a.to(self.device), b.to(self.device)
        return a @ (b.transpose(-1, -2) if transpose_b else b)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        vocab, hidden = self.lm_head_weight.shape
        self.check_activation(x, hidden, "LMHead")
        self.check_result(x.numel() // max(hidden, 1) * vocab)
        return F.linear(x.to(self.device), self.lm_head_weight)

    def synchronize(self) -> None:
        """Wait for the device, so a timer stopped now measures the work (CUDA runs async)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- checks -----------------------------------------------------------------------------

    def module(self, layer: int, name: str) -> torch.nn.Linear:
        if not 0 <= layer < len(self.layers):
            raise UnknownModule(f"layer {layer} out of range: the model has {len(self.layers)} layers")
        block = self.layers[layer].self_attn if name in ATTENTION else self.layers[layer].mlp
        module = getattr(block, name, None)
        if not isinstance(module, torch.nn.Linear):
            raise UnknownModule(f"layer {layer} has no linear module {name!r}")
        return module

    def check_activation(self, x: torch.Tensor, features: int, what: str) -> None:
        if x.dtype != self.dtype:
            raise BadShape(f"{what} takes {self.dtype} activations, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != features:
            raise BadShape(f"{what} takes [..., {features}] activations, got {list(x.shape)}")

    def check_result(self, numel: int) -> None:
        mib, cap = numel * self.itemsize / 2**20, self.max_result_bytes / 2**20
        if mib > cap:
            raise TooLarge(f"result of {mib:.0f} MiB is over the cap of {cap:.0f} MiB")
