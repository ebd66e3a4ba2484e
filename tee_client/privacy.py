"""The privacy modes: what crosses to the GPU host is masked, the rest never leaves the TEE.

    plain   ids, activations and attention scores cross as they are (no wrapper)
    otp     one-time pads in the ring Z_2^k (tee_client.masking, tsqp.ring): the server sees
            uniform ring elements, independent of the prompt; exact products, pads used once
    mix     fresh invertible mixing of blocks of tokens per call (heuristic, GELO-style)

In both modes the embedding lookup and the attention matmuls (Q·Kᵀ, softmax, P·V) run here,
on the client's own copy of the model, and every weight matmul (q/k/v/o, gate/up/down,
lm_head) goes to the server masked. The client's copy also gives the config, norms and
tokenizer: nothing the server says about the model is trusted, and a server whose fingerprint
differs from the client's own is refused before anything is sent.
"""

import time
from contextlib import contextmanager

from torch import Tensor

from protocol.errors import ModelMismatch
from tee_client.masking import Csprng, Mixer, Otp, PadBook
from tee_client.ops import Ops
from tee_client.stats import current, tee_op
from tsqp.engine import Engine
from tsqp.ring import fixed_weight, model_ring
from tsqp.spec import ModelSpec

MODES = ("plain", "otp", "mix")
BLOCK_CALLS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


class PrivateOps(Ops):
    """Wraps the ops of any backend (`inner`): masks what it sends, unmasks what comes back."""

    def __init__(self, inner: Ops, ckpt, mode: str, mix_block: int = 16):
        if mode not in ("otp", "mix"):
            raise ValueError(f"unknown privacy mode {mode!r}")
        self.inner, self.ckpt, self.mode = inner, ckpt, mode
        self.own = Engine(ckpt)  # the client's own copy: embedding table, biases, and the weights behind the pads
        self.rng = Csprng()
        self.mixer = Mixer(self.rng, block=mix_block)
        self.otp = self.make_otp() if mode == "otp" else None
        self.book: PadBook | None = None

    def make_otp(self) -> Otp:
        n_layers = len(self.own.layers)
        weights = {
            (layer, name): fixed_weight(self.own.module(layer, name).weight)
            for layer in range(n_layers)
            for names in BLOCK_CALLS
            for name in names
        }
        weights["lm_head"] = fixed_weight(self.own.lm_head_weight)
        return Otp(weights, model_ring(weights.values()), self.rng)

    def close(self) -> None:
        self.inner.close()

    def init(self) -> ModelSpec:
        server = self.inner.init()  # the server's word on its model: checked, never used
        if server.fingerprint != self.ckpt.fingerprint:
            raise ModelMismatch(
                f"the server holds {server.name} (fingerprint {server.fingerprint[:16]}, {server.dtype}), this "
                f"client's own copy is {self.ckpt.name} (fingerprint {self.ckpt.fingerprint[:16]}); privacy modes "
                "need the same model and --dtype on both sides"
            )
        return ModelSpec.from_checkpoint(self.ckpt)

    # ---- offline: before the prompt is known -------------------------------------------------

    def prepare(self, rows: int) -> None:
        """Draw the pads (and their products R·Wqᵀ) for one forward of `rows` tokens; each is used once."""
        if self.otp is None:
            return
        plan = [
            ((layer, tuple(names)), rows, [(layer, name) for name in names])
            for layer in range(len(self.own.layers))
            for names in BLOCK_CALLS
        ]
        self.book = PadBook(self.otp, [*plan, (("lm_head",), rows, ["lm_head"])])

    # ---- the model's linear steps ----------------------------------------------------------------

    def embedding(self, input_ids: Tensor) -> Tensor:
        return lookup(self.own, input_ids)

    def matmul(self, a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
        return attention_matmul(a, b, transpose_b)

    def linear(self, layer: int, names, x: Tensor) -> list[Tensor]:
        modules = [self.own.module(layer, name) for name in names]
        if self.mode == "mix":
            ys = self.mixed("Linear", {"layer": layer, "names": list(names), "bias": False}, x)
        else:
            args, weights = {"layer": layer, "names": list(names)}, [(layer, name) for name in names]
            ys = self.padded("LinearRing", args, (layer, tuple(names)), x, weights)
        return [y if m.bias is None else y + m.bias.float() for y, m in zip(ys, modules, strict=True)]

    def lm_head(self, x: Tensor) -> Tensor:
        if self.mode == "mix":
            return self.mixed("LMHead", {}, x)[0]
        return self.padded("LMHeadRing", {}, ("lm_head",), x, ["lm_head"])[0]

    # ---- masking ---------------------------------------------------------------------------------

    def mixed(self, method: str, args: dict, x: Tensor) -> list[Tensor]:
        with crypto_timer("mask"):
            sent, key = self.mixer.mix(x)
        ys = self.inner.call(method, args, [sent])
        with crypto_timer("unmask"):
            return self.mixer.unmix_all(ys, key)  # one mix, one tensor sent, one product per module

    def padded(self, method: str, args: dict, key, x: Tensor, weights: list) -> list[Tensor]:
        spec = self.otp.spec
        with crypto_timer("mask"):
            pad = self.book.take(key)  # raises if this forward already used it: a pad serves once
            u, x_exp = self.otp.mask(x, pad)
        ys = self.inner.call(method, {**args, "ring_bits": spec.ring_bits, "limb_bits": spec.limb_bits}, [u])
        with crypto_timer("unmask"):
            return [self.otp.unmask(y, pad, w, x_exp) for y, w in zip(ys, weights, strict=True)]


@tee_op("embedding")
def lookup(engine: Engine, input_ids: Tensor) -> Tensor:
    return engine.embedding(input_ids).float()


@tee_op("attention")
def attention_matmul(a: Tensor, b: Tensor, transpose_b: bool) -> Tensor:
    return a @ (b.transpose(-1, -2) if transpose_b else b)


@contextmanager
def crypto_timer(step: str):
    """Time a mask or unmask step into the recording Stats (timing.mask_ms, timing.unmask_ms)."""
    t0 = time.perf_counter_ns()
    yield
    if (stats := current()) is not None:
        stats.crypto_ns[step] += time.perf_counter_ns() - t0
