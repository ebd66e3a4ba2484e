"""The linear half of a Llama model on one device: everything gpu-server computes.

The same engine runs inside gpu-server (behind ZeroMQ) and inside tee-client for the
in-process backends; tsqp.methods maps each wire method onto one of its calls. Every call
checks its inputs against the model before it allocates.
"""

import functools
from collections.abc import Iterable
from contextlib import contextmanager

import torch

from protocol.errors import BadRequest, BadShape, TooLarge, UnknownModule
from protocol.messages import MODULES
from protocol.wire import DTYPE_NAMES, PROTOCOL_VERSION
from tsqp.checkpoint import Checkpoint, Linear
from tsqp.ring import RingSpec, fixed_weight, ring_linear
from tsqp.spec import init_reply

# A Matmul's result may outweigh its operands by at most this much: Q·Kᵀ of S tokens with head
# size D gives S/(2D) (64 at S = 8192, D = 64); a hostile [N, 0] @ [0, N] would give infinity.
MATMUL_MAX_GROWTH = 256


class Engine:
    def __init__(self, ckpt: Checkpoint, max_result_bytes: int = 2**31):
        self.ckpt = ckpt
        self.layers = ckpt.layers
        self.embed = ckpt.embed
        self.lm_head_weight = ckpt.lm_head.weight
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.max_result_bytes = max_result_bytes
        self.itemsize = self.embed.element_size()
        # every linear module and RMSNorm weight by name, looked up once: a decode step makes 60 calls
        self.linears = {(i, name): layer.linears.get(name) for i, layer in enumerate(self.layers) for name in MODULES}
        self.attention_norms = [layer.input_norm for layer in self.layers]
        self.ffn_norms = [layer.post_attention_norm for layer in self.layers]
        self.final_norm = ckpt.norm
        self.fixed_weights: dict = {}  # (layer, name) or "lm_head" -> tsqp.ring.FixedWeight, for the otp mode
        self.allocate = None  # (shape, dtype) -> Tensor | None: where results go instead of fresh memory (`results_in`)

    def store_for_matvec(self) -> None:
        """gpu-server's layout of its weights (store_for_matvec, below): this process owns its copy of the model."""
        store_for_matvec([m.weight for m in self.linears.values() if m is not None] + [self.lm_head_weight])

    # ---- what the model is -------------------------------------------------------------------

    @functools.cached_property
    def init_reply(self) -> tuple[dict, list[torch.Tensor]]:
        """The Init answer (tsqp.spec), made once: its tokenizer files take a moment to write."""
        return init_reply(self.ckpt)

    def describe(self) -> dict:
        return {
            "model": self.ckpt.name,
            "fingerprint": self.ckpt.fingerprint,
            "protocol": PROTOCOL_VERSION,
            "device": str(self.device),
            "dtype": DTYPE_NAMES[self.dtype],
        }

    # ---- where results go ---------------------------------------------------------------------

    @contextmanager
    def results_in(self, allocate):
        """Within: results are written where `allocate(shape, dtype)` says (gpu-server: the reply area of
        a client's shared-memory region, on the CPU), or to fresh memory when it returns None."""
        self.allocate = allocate if self.device.type == "cpu" else None
        try:
            yield
        finally:
            self.allocate = None

    def new(self, shape: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """An uninitialised result tensor, computed into with `out=` (the same kernels as without)."""
        dtype = dtype or self.dtype
        out = self.allocate(shape, dtype) if self.allocate is not None else None
        return out if out is not None else torch.empty(shape, dtype=dtype, device=self.device)

    # ---- the linear ops ---------------------------------------------------------------------

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise BadShape(f"Embedding takes int64 or int32 token ids, got {ids.dtype}")
        vocab, hidden = self.embed.shape
        self.check_result(ids.numel() * hidden)
        ids = ids.to(self.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise BadShape(f"token ids must lie in [0, {vocab})")
        out = self.new([*ids.shape, hidden])
        torch.index_select(self.embed, 0, ids.reshape(-1), out=out.view(-1, hidden))  # what F.embedding does
        return out

    def linear(self, layer: int, names: list[str], x: torch.Tensor, bias: bool = True) -> list[torch.Tensor]:
        modules = [self.module(layer, name) for name in names]
        for name, m in zip(names, modules, strict=True):
            self.check_activation(x, m.in_features, f"layer {layer} {name}")
        self.check_result(x.numel() // max(x.shape[-1], 1) * sum(m.out_features for m in modules))
        x = x.to(self.device)
        return [self.affine(x, m.weight, m.bias if bias else None) for m in modules]

    def residual(self, layer: int, out: str, names: list[str], a: torch.Tensor, x: torch.Tensor) -> list:
        """h = x + a·W_outᵀ (+ bias), then (h ⊙ w)·Wᵀ for each next module, w the RMSNorm weight between them:
        [h, *products]. RMSNorm's other half, the scale 1/rms(h) per row, is not linear: the trusted side applies
        it to the products (a row scale commutes with a matmul), so a plain forward takes two calls per layer."""
        m_out = self.module(layer, out)
        self.check_activation(a, m_out.in_features, f"layer {layer} {out}")
        self.check_activation(x, m_out.out_features, f"layer {layer} residual")
        if a.shape[:-1] != x.shape[:-1]:
            raise BadShape(f"Residual: {list(a.shape)} and the residual {list(x.shape)} have different rows")
        norm, nexts = self.next_modules(layer, out, names)
        self.check_result(x.numel() // max(x.shape[-1], 1) * (x.shape[-1] + sum(w.shape[0] for w in nexts)))
        h = self.affine(a.to(self.device), m_out.weight, m_out.bias)
        h += x.to(self.device)
        u = h * norm
        return [h, *[self.affine(u, w, None) for w in nexts]]

    def next_modules(self, layer: int, out: str, names: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The RMSNorm weight after `out` and the weights of the modules it feeds (none may have a bias)."""
        n_layers = len(self.layers)
        if out == "o_proj":
            allowed, norm = ("gate_proj", "up_proj"), self.ffn_norms[layer]
            modules = [self.module(layer, n) for n in names if n in allowed]
        elif layer + 1 < n_layers:
            allowed, norm = ("q_proj", "k_proj", "v_proj"), self.attention_norms[layer + 1]
            modules = [self.module(layer + 1, n) for n in names if n in allowed]
        else:
            allowed, norm = ("lm_head",), self.final_norm
            modules = [self.ckpt.lm_head] if names == ["lm_head"] else []
        if len(modules) != len(names):
            raise UnknownModule(f"after layer {layer} {out} come {', '.join(allowed)}, not {', '.join(names)}")
        if any(m.bias is not None for m in modules):
            raise BadRequest(f"Residual: {', '.join(names)} after layer {layer} {out} have biases; use Linear")
        return norm, [m.weight for m in modules]

    def affine(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear(x, weight, bias) into `new` memory: x flattened to rows, one addmm (or mm), as F.linear does."""
        out = self.new([*x.shape[:-1], weight.shape[0]])
        rows, flat = x.reshape(-1, x.shape[-1]), out.view(-1, weight.shape[0])
        if bias is None:
            torch.mm(rows, weight.t(), out=flat)
        else:
            torch.addmm(bias, rows, weight.t(), out=flat)
        return out

    def linear_ring(self, layer: int, names: list[str], u: torch.Tensor, spec: RingSpec) -> list[torch.Tensor]:
        """u·Wqᵀ mod 2^k per module, exactly (the otp privacy mode; tsqp.ring): no bias, int64 out."""
        modules = [self.module(layer, name) for name in names]
        for name, m in zip(names, modules, strict=True):
            self.check_ring_input(u, m.in_features, f"layer {layer} {name}")
        self.check_result(u.numel() // max(u.shape[-1], 1) * sum(m.out_features for m in modules), itemsize=8)
        return [self.ring_product(u, (layer, name), m.weight, spec) for name, m in zip(names, modules, strict=True)]

    def lm_head_ring(self, u: torch.Tensor, spec: RingSpec) -> torch.Tensor:
        vocab, hidden = self.lm_head_weight.shape
        self.check_ring_input(u, hidden, "LMHead")
        self.check_result(u.numel() // max(hidden, 1) * vocab, itemsize=8)
        return self.ring_product(u, "lm_head", self.lm_head_weight, spec)

    def ring_product(self, u: torch.Tensor, key, weight: torch.Tensor, spec: RingSpec) -> torch.Tensor:
        if key not in self.fixed_weights:  # quantized once per module, on first use
            self.fixed_weights[key] = fixed_weight(weight)
        fw = self.fixed_weights[key]
        try:
            spec.check(fw)
        except ValueError as e:
            raise BadRequest(f"{key}: {e}") from None
        return ring_linear(u, fw, spec)

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
        if rows * cols > MATMUL_MAX_GROWTH * (a.numel() + b.numel()) / max(batch.numel(), 1):
            raise TooLarge(
                f"Matmul result {rows}x{cols} per batch is over {MATMUL_MAX_GROWTH}x its operands "
                f"({list(a.shape)} @ {list(b.shape)}); nothing in a Llama forward needs that"
            )
        a, b = a.to(self.device), b.to(self.device)
        return torch.matmul(a, b.transpose(-1, -2) if transpose_b else b, out=self.new([*batch, rows, cols]))

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        vocab, hidden = self.lm_head_weight.shape
        self.check_activation(x, hidden, "LMHead")
        self.check_result(x.numel() // max(hidden, 1) * vocab)
        return self.affine(x.to(self.device), self.lm_head_weight, None)

    def synchronize(self) -> None:
        """Wait for the device, so a timer stopped now measures the work (CUDA runs async)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- checks -----------------------------------------------------------------------------

    def module(self, layer: int, name: str) -> Linear:
        if not 0 <= layer < len(self.layers):
            raise UnknownModule(f"layer {layer} out of range: the model has {len(self.layers)} layers")
        module = self.linears.get((layer, name))
        if module is None:
            raise UnknownModule(f"layer {layer} has no linear module {name!r}")
        return module

    def check_activation(self, x: torch.Tensor, features: int, what: str) -> None:
        if x.dtype != self.dtype:
            raise BadShape(f"{what} takes {self.dtype} activations, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != features:
            raise BadShape(f"{what} takes [..., {features}] activations, got {list(x.shape)}")

    def check_ring_input(self, u: torch.Tensor, features: int, what: str) -> None:
        if u.dtype != torch.int64:
            raise BadShape(f"{what} takes int64 ring elements, got {u.dtype}")
        if u.dim() < 1 or u.shape[-1] != features:
            raise BadShape(f"{what} takes [..., {features}] ring elements, got {list(u.shape)}")

    def check_result(self, numel: int, itemsize: int | None = None) -> None:
        mib, cap = numel * (itemsize or self.itemsize) / 2**20, self.max_result_bytes / 2**20
        if mib > cap:
            raise TooLarge(
                f"a result of {mib:.0f} MiB is over the server's cap of {cap:.0f} MiB (gpu-server --max-result-mb); "
                "a shorter --length or a smaller --batch-size needs less"
            )


def store_for_matvec(weights: Iterable[torch.Tensor]) -> None:
    """Float32 on the CPU: each linear weight with at least as many outputs as inputs (q_proj, o_proj, gate_proj,
    up_proj, the LMHead) stored column-major, in place (the tensor object keeps its identity, so a tied embedding
    table follows), its values unchanged.

    x·Wᵀ then runs as a plain (non-transposed) matrix-vector product over W's columns. On the 2-core EPYC host that
    reads W at ~20 GB/s where MKL's transposed product over a row-major W reads ~11 GB/s: about 2x faster for a
    decode step's single row (the LMHead 11 → 5.7 ms, a 576x576 weight 0.23 → 0.11 ms), and as fast for a
    prefill's GEMM. Narrower weights (k_proj, v_proj, down_proj) run faster row-major, and float16 and bfloat16
    run slower column-major (10-50x for float16): those stay as they are. A tied embedding table shares the
    LMHead's layout; looking rows up in it stays cheap (1.7 ms for 512 rows)."""
    for w in weights:
        if w.device.type != "cpu" or w.dtype != torch.float32:
            continue
        if w.shape[0] >= w.shape[1] and w.is_contiguous():
            w.data = w.data.t().contiguous().t()
