"""The privacy modes: what crosses to the GPU host is masked, the rest never leaves the TEE.

    plain   ids and activations cross as they are (no wrapper); with --attention server also
            Q, K, V, the attention scores and probabilities, and P·V
    otp     one-time pads in the ring Z_2^k (tee_client.masking, tsqp.ring): the server sees
            uniform ring elements, independent of the prompt; exact products, pads used once
    mix     fresh invertible mixing of blocks of tokens per call (heuristic, GELO-style); a call
            with fewer rows than a block (a decode step, or the last rows LMHead gets, unless the
            batch is large) has too few tokens to mix (one row would only be scaled), so it goes
            through otp's pads instead

In both modes the embedding lookup runs here, on the client's own copy of the model, as does
attention (always in the TEE: tee_client.model), and every weight matmul (q/k/v/o, gate/up/down,
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

    fuses_residuals = False  # each weight matmul is masked (and unmasked) on its own

    def __init__(self, inner: Ops, ckpt, mode: str, mix_block: int = 16):
        if mode not in ("otp", "mix"):
            raise ValueError(f"unknown privacy mode {mode!r}")
        self.inner, self.ckpt, self.mode = inner, ckpt, mode
        self.own = Engine(ckpt)  # the client's own copy: embedding table, biases, and the weights behind the pads
        self.rng = Csprng()
        self.mixer = Mixer(self.rng, block=mix_block)
        self.otp = self.make_otp() if mode == "otp" else None  # mix makes it when a forward is too small to mix
        self.book: PadBook | None = None  # the next forward's pads (in mix: for the calls too small to mix)

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

    def prepare(self, rows: int, head_rows: int | None = None) -> None:
        """Draw the pads (and their products R·Wqᵀ) for one forward of `rows` tokens, `head_rows` of them through
        LMHead (default: all); each is used once. mix draws pads only for the calls too small to mix (fewer rows
        than a block: a decode step, the last rows LMHead gets); the others draw their matrices per call."""
        self.inner.prepare(rows, head_rows)  # the inner ops' own offline phase (--verify's draws)
        head_rows = rows if head_rows is None else head_rows
        body = self.mode == "otp" or rows < self.mixer.block
        head = self.mode == "otp" or head_rows < self.mixer.block
        plan = [
            ((layer, tuple(names)), rows, [(layer, name) for name in names])
            for layer in range(len(self.own.layers))
            for names in BLOCK_CALLS
            if body
        ]
        plan += [(("lm_head",), head_rows, ["lm_head"])] if head else []
        if plan and self.otp is None:
            self.otp = self.make_otp()
        self.book = PadBook(self.otp, plan) if plan else None

    # ---- the model's linear steps ----------------------------------------------------------------

    def embedding(self, input_ids: Tensor) -> Tensor:
        return lookup(self.own, input_ids)

    def matmul(self, a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
        raise ValueError("a privacy mode keeps attention in the TEE: its products never go to the server")

    def linear(self, layer: int, names, x: Tensor, normed: bool = False) -> list[Tensor]:
        # what crosses is masked: no longer the RMSNorm's rows, so `normed` stays here
        modules = [self.own.module(layer, name) for name in names]
        if self.mixing((layer, tuple(names))):
            ys = self.mixed("Linear", {"layer": layer, "names": list(names), "bias": False}, x)
        else:
            args, weights = {"layer": layer, "names": list(names)}, [(layer, name) for name in names]
            ys = self.padded("LinearRing", args, (layer, tuple(names)), x, weights)
        return [y if m.bias is None else y + m.bias.float() for y, m in zip(ys, modules, strict=True)]

    def lm_head(self, x: Tensor, normed: bool = False) -> Tensor:
        if self.mixing(("lm_head",)):
            return self.mixed("LMHead", {}, x)[0]
        return self.padded("LMHeadRing", {}, ("lm_head",), x, ["lm_head"])[0]

    # ---- masking ---------------------------------------------------------------------------------

    def mixing(self, key) -> bool:
        """Whether this call is mixed: mix mode, and prepare() drew no pad for it."""
        return self.mode == "mix" and (self.book is None or key not in self.book)

    def mixed(self, method: str, args: dict, x: Tensor) -> list[Tensor]:
        with crypto_timer("mask"):
            sent, key = self.mixer.mix(x)
        ys = self.inner.call(method, args, [sent])
        with crypto_timer("unmask"):
            return self.mixer.unmix_all(ys, key)  # one mix, one tensor sent, one product per module

    def padded(self, method: str, args: dict, key, x: Tensor, weights: list) -> list[Tensor]:
        if self.book is None:
            raise RuntimeError("no pads drawn for this forward: call prepare(rows) before each forward")
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


@contextmanager
def crypto_timer(step: str):
    """Time a mask or unmask step into the recording Stats (timing.mask_ms, timing.unmask_ms)."""
    t0 = time.perf_counter_ns()
    yield
    if (stats := current()) is not None:
        stats.crypto_ns[step] += time.perf_counter_ns() - t0
