"""`--verify`: check every result the GPU host returns, with a fresh secret every call (Freivalds).

For a reply Y = X·Wᵀ the client draws a secret vector r, fresh from the CSPRNG for this one call
and never sent, and compares Y·r with X·(Wᵀ·r), computed from its own copy of the weights: the
cost is O(rows·(in + out)) against the product's O(rows·in·out). r is taken block by block: the
output columns are cut into blocks of BLOCK, and each block of each row is one check, so one
changed element is never drowned in the rounding noise of the whole row.

Floating point (Linear, LMHead, Matmul): r_j = ±(1 + U[0,1)), so |r_j| ≥ 1 and changing one
element of Y by δ moves its block's sum by at least |δ|. An honest server differs from the
exact product by rounding: the output rounded to its dtype (unit roundoff u: 2⁻²⁴ float32,
2⁻¹¹ float16, 2⁻⁸ bfloat16, independent per element, so the block sum errs by about
u·‖r∘y‖/√3) and float32 accumulation over the inner dimension n (about 2⁻²⁴·√n·‖x‖·‖r∘‖w‖‖;
our own float32 reference adds the same again). The tolerance is SIGMAS times the sum of those
standard deviations: loose enough that honest float32, float16 and bfloat16 servers pass, tight
enough that one element changed by a typical activation fails (bfloat16, BLOCK 32: about 0.2×
the row's RMS).

Ring (otp: LinearRing, LMHeadRing): the check is exact in Z_2^k. r_j is odd (a unit mod 2^k),
so any change of one element fails; changes that cancel inside one block pass with probability
about 2^-(RING_R_BITS-1) per block. Embedding rows (plain mode) are compared with the client's
own table, exactly.

A failed check raises IntegrityError naming the call and the size of the discrepancy; the
client stops at once and sends nothing further. A check cannot make a wrong server right.
"""

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from protocol.errors import ModelMismatch, TSQPError
from tee_client.masking import Csprng
from tee_client.stats import current
from tsqp.engine import Engine
from tsqp.ring import FLOAT_EXACT_BITS, FixedWeight, RingSpec, fixed_weight, ring_linear

BLOCK = 32  # output columns per check
SIGMAS = 8.0  # tolerance in standard deviations of honest rounding
RING_R_BITS = 8  # ring checks: r_j odd in [1, 2^8)
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
HALF = (torch.float16, torch.bfloat16)
ACCUMULATE = 2.0**-24  # products accumulate in float32 (CPU, and CUDA's GEMMs for every dtype here)


class IntegrityError(TSQPError):
    """A reply failed its check: the GPU host returned a wrong result."""


class Verifier:
    """Checks replies against the client's own copy of the model (`engine`, on the CPU)."""

    def __init__(self, engine: Engine, rng: Csprng | None = None):
        self.engine, self.rng = engine, rng or Csprng()
        self.fixed: dict = {}  # module key -> FixedWeight, for ring checks
        self.weights: dict = {}  # weight storage -> (float32 padded, row norms), for float checks
        self.checks = 0

    def expect(self, spec) -> None:
        """The server's model must be the client's own copy (weights, tokenizer, dtype)."""
        own = self.engine.ckpt
        if spec.fingerprint != own.fingerprint:
            raise ModelMismatch(
                f"the server holds {spec.name} (fingerprint {spec.fingerprint[:16]}), this client's own copy "
                f"is {own.name} (fingerprint {own.fingerprint[:16]}); --verify needs the same model and --dtype"
            )

    def timed_check(self, method: str, args: dict, sent: list[Tensor], received: list[Tensor]) -> None:
        """check(), timed into the recording Stats (timing.verify_ms, verify_checks)."""
        t0, before = time.perf_counter_ns(), self.checks
        self.check(method, args, sent, received)
        if (stats := current()) is not None:
            stats.crypto_ns["verify"] += time.perf_counter_ns() - t0
            stats.verify_checks += self.checks - before

    def check(self, method: str, args: dict, sent: list[Tensor], received: list[Tensor]) -> None:
        if method == "Embedding":
            self.embedding(sent[0], received[0])
        elif method == "Linear":
            for name, y in zip(args["names"], received, strict=True):
                m = self.engine.module(args["layer"], name)
                bias = m.bias if args.get("bias", True) else None
                self.linear(f"Linear layer {args['layer']} {name}", sent[0], y, m.weight, bias)
        elif method == "LMHead":
            self.linear("LMHead", sent[0], received[0], self.engine.lm_head_weight, None)
        elif method == "Matmul":
            self.matmul(sent[0], sent[1], args.get("transpose_b", False), received[0])
        elif method == "LMHeadRing":
            spec = RingSpec(args["ring_bits"], args["limb_bits"])
            self.ring("LMHeadRing", sent[0], received[0], "lm_head", self.engine.lm_head_weight, spec)
        elif method == "LinearRing":
            spec = RingSpec(args["ring_bits"], args["limb_bits"])
            for name, y in zip(args["names"], received, strict=True):
                key, w = (args["layer"], name), self.engine.module(args["layer"], name).weight
                self.ring(f"LinearRing layer {args['layer']} {name}", sent[0], y, key, w, spec)

    # ---- the checks ------------------------------------------------------------------------------

    def embedding(self, ids: Tensor, rows: Tensor) -> None:
        expected = F.embedding(ids.to(torch.int64), self.engine.embed).to(rows.dtype)
        self.checks += 1
        if not torch.equal(rows, expected):
            worst = (rows.double() - expected.double()).abs().max().item()
            raise IntegrityError(f"Embedding rows differ from this client's own table (by up to {worst:.3g})")

    def linear(self, what: str, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        """Y (T, m) against X (T, n)·Wᵀ + b, block by block, in float32: one pass over W and one over Y."""
        x_tn, y_tm = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
        w, w_norms = self.float_weight(weight)  # (m_pad, n), ‖w_j‖ (m_pad,)
        r = self.float_r(y_tm.shape[-1])  # (m_pad,)
        v = torch.bmm(r.view(-1, 1, BLOCK), w.view(-1, BLOCK, w.shape[1])).squeeze(1)  # (m/B, n): Wᵀr per block
        expected = x_tn @ v.T
        if bias is not None:
            expected += block_sums(bias.float(), r)
        bound = x_tn.norm(dim=1, keepdim=True) * block_sums(w_norms.square(), r.square()).sqrt()  # ≥ ‖r∘y‖
        self.compare(what, y_tm, r, expected, y.dtype, ACCUMULATE * math.sqrt(x_tn.shape[-1]) * bound, bound)

    def float_weight(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The weight in float32, padded to whole blocks, and its row norms: made once per module."""
        key = weight.data_ptr()
        if key not in self.weights:
            w = pad_rows(weight.detach().float(), -(-weight.shape[0] // BLOCK) * BLOCK)
            self.weights[key] = w, w.norm(dim=1)
        return self.weights[key]

    def matmul(self, a: Tensor, b: Tensor, transpose_b: bool, c: Tensor) -> None:
        """C (…, S, cols) against A·(B·r), block by block."""
        b = b.transpose(-1, -2) if transpose_b else b  # (…, inner, cols)
        r, b, dtype, c = self.float_r(c.shape[-1]), b.float(), c.dtype, c.float()
        expected = a.float() @ block_sums(b, r)  # (…, S, cols/B)
        col_norms = block_sums(b.square().sum(-2, keepdim=True), r.square()).sqrt()  # ‖r∘‖b_col‖‖ per block
        bound = a.float().norm(dim=-1, keepdim=True) * col_norms  # ≥ ‖r∘c‖ per block (Cauchy–Schwarz)
        self.compare("Matmul", c, r, expected, dtype, ACCUMULATE * math.sqrt(a.shape[-1]) * bound, bound)

    def ring(self, what: str, u: Tensor, y: Tensor, key, weight: Tensor, spec: RingSpec) -> None:
        """Exactly in Z_2^k: Y_u·r ≡ U·(Wqᵀ·r) per block, r odd (a unit), drawn for this call."""
        if key not in self.fixed:
            self.fixed[key] = fixed_weight(weight)
        wq = self.fixed[key].wq  # (m, n) float64 integers, |wq| < 2^19
        k, u_tn, y_tm = spec.ring_bits, u.reshape(-1, u.shape[-1]), y.reshape(-1, y.shape[-1])
        m = y_tm.shape[-1]
        r = pad_rows(self.rng.ring((m,), RING_R_BITS) | 1, -(-m // BLOCK) * BLOCK, value=0)  # odd; padding 0
        v = (pad_rows(wq, r.shape[0]) * r[:, None].double()).view(-1, BLOCK, wq.shape[1]).sum(1)  # exact: < 2^52
        expected = ring_product_wide(u_tn, v.long(), spec)
        got = ring_block_sums(y_tm, r, k)
        self.checks += got.numel()
        bad = got != expected
        if bad.any():
            gap = (got - expected) & ((1 << k) - 1)
            gap = torch.where(gap >= 1 << (k - 1), (1 << k) - gap, gap)[bad].max().item()  # |centred difference|
            raise IntegrityError(
                f"{what}: reply fails its check in Z_2^{k}, off by 2^{math.log2(gap):.1f} "
                f"({int(bad.sum())} of {bad.numel()} checks fail)"
            )

    # ---- helpers ---------------------------------------------------------------------------------

    def float_r(self, m: int) -> Tensor:
        """±(1 + U[0,1)) per column, zero on the padding up to whole blocks; float32."""
        sign = self.rng.ring((m,), 1) * 2 - 1
        r = (sign * (1 + self.rng.uniform((m,)))).float()
        return pad_rows(r, -(-m // BLOCK) * BLOCK)

    def compare(self, what: str, y: Tensor, r: Tensor, expected: Tensor, dtype, accumulate: Tensor, bound: Tensor):
        """Fail unless every block sum of y∘r is within SIGMAS standard deviations of honest rounding.

        accumulate: one side's float32 accumulation error (ours adds as much again); bound: an
        upper bound of ‖r∘y‖ from the inputs (Cauchy–Schwarz), which float32 outputs use for their
        own rounding, since it costs no pass over y; float16 and bfloat16 need the exact ‖r∘y‖.
        """
        got, spread = block_sums_and_norms(y, r) if dtype in HALF else (block_sums(y, r), bound)
        sigma = 2 * accumulate + UNIT_ROUNDOFF[dtype] / math.sqrt(3) * spread
        self.checks += got.numel()
        gap = (got - expected).abs()
        fails = ~(gap <= SIGMAS * sigma + 1e-30)  # NaN and inf fail too: a reply cannot hide behind them
        if fails.any():
            excess = torch.where(fails, (gap - SIGMAS * sigma).nan_to_num(nan=float("inf")), -float("inf"))
            worst = int(torch.argmax(excess.flatten()))
            raise IntegrityError(
                f"{what}: reply fails its check by {gap.flatten()[worst].item():.4g} "
                f"(tolerance {SIGMAS * sigma.flatten()[worst].item():.3g}; {int(fails.sum())} of "
                f"{got.numel()} checks fail)"
            )


def block_sums_and_norms(t: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Per block: Σ t_j·r_j (the check) and ‖t∘r‖ (how far honest rounding of t can move it)."""
    z = (pad_last(t, r.shape[0]) * r).unflatten(-1, (-1, BLOCK))
    return z.sum(-1), torch.linalg.vector_norm(z, dim=-1)


def block_sums(t: Tensor, r: Tensor) -> Tensor:
    """Σ_j t[..., j]·r_j over each block of BLOCK columns: (..., cols) -> (..., cols/BLOCK)."""
    return (pad_last(t, r.shape[0]) * r).unflatten(-1, (-1, BLOCK)).sum(-1)


def pad_rows(t: Tensor, rows: int, value: float = 0) -> Tensor:
    return F.pad(t, (0, 0) * (t.dim() - 1) + (0, rows - t.shape[0]), value=value) if rows > t.shape[0] else t


def pad_last(t: Tensor, cols: int) -> Tensor:
    return F.pad(t, (0, cols - t.shape[-1])) if cols > t.shape[-1] else t


def shift_mod(x: Tensor, s: int, k: int) -> Tensor:
    """x·2^s mod 2^k for x in [0, 2^k), without overflowing int64."""
    return ((x & ((1 << (k - s)) - 1)) << s) if s < k else torch.zeros_like(x)


def ring_block_sums(y_tm: Tensor, r: Tensor, k: int) -> Tensor:
    """Σ_block y_j·r_j mod 2^k, exact in int64: y split in two limbs so no product overflows."""
    mask, half = (1 << k) - 1, k // 2
    y = pad_last(y_tm & mask, r.shape[0])
    lo, hi = y & ((1 << half) - 1), y >> half  # < 2^31 each, times r < 2^8, BLOCK terms: < 2^44
    sums = [(limb * r).view(y.shape[0], -1, BLOCK).sum(-1) & mask for limb in (lo, hi)]
    return (sums[0] + shift_mod(sums[1], half, k)) & mask


def ring_product_wide(u_tn: Tensor, v: Tensor, spec: RingSpec) -> Tensor:
    """U·Vᵀ mod 2^k for integer V (rows, n) of any size: V's residues cut in base-2^c digits, each one
    ring_linear. c = 53 - limb_bits - bit_length(n), so every digit row sums to < 2^(c + bit_length(n))
    and ring_linear's exactness bound (limb_bits + l1_bits ≤ 53) holds by construction."""
    k, mask = spec.ring_bits, (1 << spec.ring_bits) - 1
    digit = FLOAT_EXACT_BITS - spec.limb_bits - u_tn.shape[-1].bit_length()
    total = torch.zeros(u_tn.shape[0], v.shape[0], dtype=torch.int64)
    for shift in range(0, k, digit):
        part = (((v & mask) >> shift) & ((1 << digit) - 1)).double()
        fw = FixedWeight(part, torch.zeros(part.shape[0], dtype=torch.int64), digit + u_tn.shape[-1].bit_length())
        total = (total + shift_mod(ring_linear(u_tn, fw, spec), shift, k)) & mask
    return total
