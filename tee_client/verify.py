"""`--verify`: check every result the GPU host returns, with a fresh secret every call (Freivalds).

For a reply Y = X·Wᵀ the client draws a secret vector r, fresh from the CSPRNG for this one call
and never sent, and compares Y·r with X·(Wᵀ·r), computed from its own copy of the weights: the
cost is O(rows·(in + out)) against the product's O(rows·in·out). A float32 call is one check per
row across all its modules (one r over their concatenated outputs: Σ_m Y_m·r_m against
X·Σ_m W_mᵀ·r_m, one product of X with one vector: `Rows`); wider rows (the logits: equal blocks
of at most BLOCK_FLOAT32 = 2048 columns), float16 and bfloat16 replies and the ring (blocks of
BLOCK = 32, where the coarser rounding would otherwise drown one element) are cut into blocks per
module, each block of each row one check.

Offline (`prepare`, called before each forward, like the otp pads; its time is `offline_ms`): for
every call the last forward made, a fresh r per weight and the call's Wᵀ·r are drawn and kept for
the coming forward, so the read of every weight that Wᵀ·r costs happens before the prompt is
known; so are the random values the attention Matmul checks will take. Each serves exactly one
call: `take` removes a draw, the Matmul values are handed out once from a cursor; a call with
nothing drawn for it (the first forward, a second call to the same weights in one forward, more
Matmul values than drawn) draws afresh on the spot, and `prepare` drops whatever the last forward
left unused. r never leaves this object; the server answers before anything about it exists outside.

Floating point (Linear, LMHead, Matmul): r_j = ±(1 + U[0,1)), so |r_j| ≥ 1. An honest server
differs from the exact product by rounding: the output rounded to its dtype (unit roundoff u:
2⁻²⁴ float32, 2⁻¹¹ float16, 2⁻⁸ bfloat16, independent per element, so the block sum errs by about
u·‖r∘y‖/√3) and float32 accumulation over the inner dimension n (about 2⁻²⁴·√n·‖x‖·‖r∘‖w‖‖; our own
float32 reference adds the same again). The tolerance is SIGMAS times the sum of those standard
deviations, τ = SIGMAS·(2·2⁻²⁴·√n·‖x‖·‖r∘‖w‖‖ + u/√3·‖r∘y‖), where float32 replies take the bound
‖r∘y‖ ≤ ‖x‖·‖r∘‖w‖‖ (Cauchy–Schwarz; a bias adds ‖r∘b‖), which costs no pass over y, and float16
and bfloat16 need the exact ‖r∘y‖; a call's modules add their variances (the root of the sum of
their squared spreads). Where x is an RMSNorm's output (the model says so: q/k/v, gate/up, lm_head),
x_i = g ⊙ ĥ_i with ‖ĥ_i‖ ≤ √n, and ‖x_i‖·‖r∘‖w‖‖ gives way to √n·‖r∘‖g⊙w‖‖, the same Cauchy–Schwarz
bound of Σ|x_ik·w_jk| split the other way, with g folded into the weights offline: no pass over x.
One element changed by δ moves its row's (or block's) sum by |δ·r_j| ≥ |δ|, so it fails whenever
|δ| > τ: on SmolLM2 at 512 tokens τ is 0.02–0.09 times the changed module's row RMS (float32,
median per module; 0.03–0.29 at the 99th percentile, at most 0.55) and about 0.2 times it
(bfloat16, blocks of 32). Several changed elements in one check pass only if their sum against r
lands within ±τ: with δ the largest change, that happens with probability at most τ/δ (given the
other entries, r_j's density is at most 1/2 and the window has width 2τ/δ), independently in each
check. Every quantity is float32.

Residual (plain mode's two calls per layer, float32): h = x + a·W_outᵀ is checked as one more product,
[a, x]·[W_out, I]ᵀ, and the products that follow, of h ⊙ g, against h as the reply holds it, ‖h_i‖
standing for the RMSNorm bound √n: two checks per row, each with its own r and tolerance
(Verifier.residual_terms derives them).

Ring (otp: LinearRing, LMHeadRing): the check is exact in Z_2^k, in blocks of 32. r_j is odd and
uniform below 2^RING_R_BITS = 2^8 (a unit mod 2^k), so a block with one wrong element always fails.
A block with several passes with probability at most 2^-(min(8, k − t) − 1), t the smallest 2-adic
valuation among its errors: 2⁻⁷ unless every error is a multiple of 2^(k−7), at least 1/64 of the
largest product the ring holds (two errors of exactly 2^(k−1) in one block always cancel: Z_2^k has
zero divisors). Wqᵀ·r per block is an exact integer below 2^32;
U·(Wqᵀ·r) mod 2^k is one float64 GEMM of U's two limbs against its signed digits, every partial sum
below 2^53 (exact). Embedding rows (plain mode) are compared with the client's own table, exactly.

A failed check raises IntegrityError naming the call and the size of the discrepancy; the
client stops at once and sends nothing further. A check cannot make a wrong server right.
"""

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from protocol.errors import ModelMismatch, TSQPError
from tee_client.masking import Csprng
from tee_client.stats import current
from tsqp.engine import Engine
from tsqp.methods import matmul_shape
from tsqp.ring import FLOAT_EXACT_BITS, RingSpec, fixed_weight

BLOCK = 32  # output columns per check: float16 and bfloat16 replies, the ring
BLOCK_FLOAT32 = 2048  # float32 replies: whole rows up to this width (their rounding is 2^16 times finer)
SIGMAS = 8.0  # tolerance in standard deviations of honest rounding
RING_R_BITS = 8  # ring checks: r_j odd in [1, 2^8)
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
HALF = (torch.float16, torch.bfloat16)
ACCUMULATE = 2.0**-24  # products accumulate in float32 (CPU, and CUDA's GEMMs for every dtype here)
UNIFORM_BITS = 53  # signed_uniform: U[0,1) from 53 random bits, the sign from one more
INF = float("inf")
TINY = 1e-30  # added to a per-row tolerance, so that an all-zero row and sum pass (0/0 would not)
RMS_SLACK = 1 + 2.0**-8  # an RMSNorm's output row, divided by its weight, has norm ≤ √n (float32 rounding: ≤ this more)
CHECKED_WHOLE = ("Embedding", "Matmul", "LinearRing", "LMHeadRing")  # checked once the reply is in, all at once


class IntegrityError(TSQPError):
    """A reply failed its check: the GPU host returned a wrong result."""


@dataclass
class Draw:
    """One call's secrets: r per weight of the call, and the call's Wᵀ·r per block, stacked. Used once, then dropped."""

    rs: list[Tensor]  # per weight (m_pad,): float32 ±(1 + U[0,1)), or int64 odd; 0 on the padding
    blocks: list[int]  # per weight: columns per check
    widths: list[int]  # per weight: m, its output width
    v: Tensor  # (Σ m_pad/block, n): Σ_{j in block} r_j·w_j, float32, or int64 (ring: exact, |v| < 2^32)
    spread: Tensor | None = None  # float: (Σ m_pad/block,) ‖r∘‖w‖‖ per block, so ‖r∘(x·Wᵀ)‖ ≤ ‖x‖·spread
    bias_sums: Tensor | None = None  # float, weights with a bias: (Σ m_pad/block,) Σ_{j in block} r_j·b_j
    bias_norms: Tensor | None = None  # and ‖r∘b‖ per block
    normed_spread: Tensor | None = None  # float: (Σ m_pad/block,) ‖r∘‖g⊙w‖‖, g the RMSNorm weight in front (or None)
    digits: tuple | None = None  # ring: (limb bits h, ring_digits(v, h)), made once h is known
    rows: "Rows | None" = None  # float32 replies of whole rows: the call's check combined (Verifier.rows_check)


@dataclass
class Rows:
    """A float32 call's check in whole rows, its modules combined: row i passes when |Σ_m y_m,i·r_m − x_i·v − β| ≤
    slope·‖x_i‖ + slack, or ≤ normed + slack when x_i is an RMSNorm's output (no pass over x for its norm)."""

    minus_v: Tensor  # (n,) −Σ_m W_mᵀ·r_m: the row sums start from −x·v, each reply's products are added to it
    bias_sum: float  # β = Σ_m r_m·b_m over the biases the server adds
    slope: float  # tolerance per unit of ‖x_i‖: c·‖(spread_m)_m‖, c the float32 rounding's SIGMAS deviations
    normed: float | None  # tolerance for RMSNorm rows (‖x_i ⊘ g‖ ≤ √n): c·√n·‖(normed_spread_m)_m‖; None: no norm
    slack: float  # what the biases add: c·‖(‖r_m∘b_m‖)_m‖
    # a Residual call's two checks (Verifier.residual):
    gated: Tensor | None = None  # modules after an RMSNorm, fed h ⊙ g: −g ⊙ Σ_m W_mᵀ·r_m, against the reply's h
    per_norm: float | None = None  # and their tolerance per unit of ‖h_i‖ (the server's rounding of h ⊙ g included)
    residual: tuple[float, float, float] | None = None  # h = x + a·Wᵀ (+ b): tolerance per ‖a_i‖, ‖x_i‖, ‖h_i‖


class Verifier:
    """Checks replies against the client's own copy of the model (`engine`, on the CPU)."""

    def __init__(self, engine: Engine, rng: Csprng | None = None):
        self.engine, self.rng = engine, rng or Csprng()
        self.fixed: dict = {}  # module key -> Wq (m_pad, n) float64, for ring checks
        self.weights: dict = {}  # module key -> (float32 W padded to whole blocks, squared row norms)
        self.ready: dict = {}  # (kind, module keys of a call) -> Draw for the coming forward; take() removes it
        self.wanted: set = set()  # (kind, module keys) checked since the last prepare(): what the next one draws
        self.plan: set = set()  # what the last prepare() drew for
        self.pool = torch.empty(0)  # ±(1 + U[0,1)) drawn ahead for the Matmul checks; each value serves once
        self.pool_used = 0  # values the Matmul checks took since the last prepare(): what the next one draws
        self.pool_size = 0
        self.limb_bits: int | None = None  # the otp ring's limb width, once a ring reply was seen
        self.threads = torch.get_num_threads()  # what the checks' few compute-bound products may use
        self.checks = 0
        self.kept_norms: tuple | None = None  # (h, its version, ‖h_i‖) of the last Residual check passed: row_norms

    def expect(self, spec) -> None:
        """The server's model must be the client's own copy (weights, tokenizer, dtype)."""
        own = self.engine.ckpt
        if spec.fingerprint != own.fingerprint:
            raise ModelMismatch(
                f"the server holds {spec.name} (fingerprint {spec.fingerprint[:16]}), this client's own copy "
                f"is {own.name} (fingerprint {own.fingerprint[:16]}); --verify needs the same model and --dtype"
            )

    # ---- offline: before the prompt is known -----------------------------------------------------

    def prepare(self) -> None:
        """Draw, for the coming forward, a fresh r and its Wᵀ·r for every call the last forward made, and as
        many random values for the Matmul checks as it took.

        What the last forward left unused is dropped, never used again. A draw serves any number of rows."""
        plan = self.wanted or self.plan  # no call since the last prepare(): the same plan again
        self.plan, self.wanted, self.ready = plan, set(), {}
        for kind, keys in sorted(plan, key=str):
            self.ready[kind, keys] = self.draw(kind, keys)
        self.pool_size = self.pool_used or self.pool_size
        self.pool, self.pool_used = self.signed_uniform(self.pool_size), 0

    def take(self, kind: str, keys: tuple) -> Draw:
        """This call's draw: the one prepared for it (removed, so it serves once) or a fresh one."""
        self.wanted.add((kind, keys))
        prepared = self.ready.pop((kind, keys), None)
        return prepared if prepared is not None else self.draw(kind, keys)

    def draw(self, kind: str, keys: tuple) -> Draw:
        parts = [self.float_draw(key) if kind == "float" else self.ring_draw(key) for key in keys]
        rs, vs = [p[0] for p in parts], [p[1] for p in parts]
        blocks = [self.block(key) if kind == "float" else BLOCK for key in keys]
        widths = [self.weight(key).shape[0] for key in keys]
        draw = Draw(rs, blocks, widths, torch.cat(vs) if len(vs) > 1 else vs[0])
        if kind == "ring" and self.limb_bits is not None:
            draw.digits = self.limb_bits, ring_digits(draw.v, self.limb_bits)
        if kind == "float":
            draw.spread = torch.cat([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]
        biases = [self.bias(key) for key in keys] if kind == "float" else [None]
        if any(b is not None for b in biases):
            sums, norms = [], []
            for b, r, block in zip(biases, rs, blocks, strict=True):
                zero = r.new_zeros(r.shape[0] // block)
                s, n = block_dot_and_norms(b.float(), r, block) if b is not None else (zero, zero)
                sums.append(s), norms.append(n)
            draw.bias_sums, draw.bias_norms = torch.cat(sums), torch.cat(norms)
        if kind == "float":
            normed = [p[3] for p in parts]
            draw.normed_spread = torch.cat(normed) if all(n is not None for n in normed) else None
            whole = all(self.weight(key).dtype == torch.float32 for key in keys) and blocks == widths
            draw.rows = self.rows(draw) if whole else None
            if draw.rows is not None:
                self.residual_terms(draw, keys)
        return draw

    def rows(self, draw: Draw) -> Rows:
        """A float32 call's secrets combined into one check per row: every module's r at once (one product of x
        against Σ_m W_mᵀ·r_m instead of one per module), its tolerance's constants scaled now rather than per call.
        Every module's reply shifts the sum by |δ·r_j| ≥ |δ| for one element changed by δ; the tolerance is the
        modules' together (their rounding adds up: a root sum of squares)."""
        c = self.tolerance(1.0, draw.v.shape[1], torch.float32)
        slack = c * float(draw.bias_norms.norm()) if draw.bias_norms is not None else 0.0
        normed = None
        if draw.normed_spread is not None:
            normed = c * math.sqrt(draw.v.shape[1]) * RMS_SLACK * float(draw.normed_spread.norm())
        bias_sum = float(draw.bias_sums.sum()) if draw.bias_sums is not None else 0.0
        return Rows(-draw.v.sum(0), bias_sum, c * float(draw.spread.norm()), normed, slack)

    def residual_terms(self, draw: Draw, keys: tuple) -> None:
        """What a Residual call's two checks need beyond a Linear call's (Verifier.residual), made with the draw.

        Modules after an RMSNorm take u = h ⊙ g from the server: Σ_m u·W_mᵀ·r_m = h·(g ⊙ v), v = Σ_m W_mᵀ·r_m, and
        ‖u_i ⊘ g‖ = ‖h_i‖ stands for the normed bound √n; the server's rounding of each u_k (at most 2⁻²⁴·|u_k|,
        independent) moves the sum by 2⁻²⁴/√3·‖u_i∘v‖ ≤ 2⁻²⁴/√3·‖h_i‖·max|g ⊙ v| (one standard deviation), and
        ours of h·(g ⊙ v) rounds g ⊙ v as much again.

        One module, its output plus the residual, h = x + a·Wᵀ, is checked with one r as h·r − a·(Wᵀ·r) − x·r, each
        term bounded as a Linear check bounds its own (SIGMAS deviations; a float32 sum of k terms errs by
        2⁻²⁴·√k times a bound of its partial sums, Cauchy–Schwarz): the server's product over n and ours of
        a·(Wᵀr), 2·2⁻²⁴·√n·‖a_i‖·‖r∘‖w‖‖, and its rounding to float32, 2⁻²⁴/√3·‖a_i‖·‖r∘‖w‖‖; ours of x·r and of
        h·r over the width m, 2⁻²⁴·√m·‖r‖ times ‖x_i‖ and ‖h_i‖; the server's rounding of h = x + y, at most
        2⁻²⁴/√3·‖r∘h_i‖ ≤ 2⁻²⁴/√3·2·‖h_i‖ (|r_j| < 2). x only adds, once: it takes no part in the product's sum."""
        rows, inner = draw.rows, draw.v.shape[1]
        if draw.normed_spread is not None:
            rows.gated = rows.minus_v * self.norm_before(keys[0]).float()
            c = self.tolerance(1.0, inner, torch.float32)
            rows.per_norm = c * float(draw.normed_spread.norm())
            rows.per_norm += 2 * SIGMAS * ACCUMULATE / math.sqrt(3) * float(rows.gated.abs().max())
        if len(keys) == 1:
            spread, width = float(draw.spread.norm()), draw.widths[0]
            sums = SIGMAS * ACCUMULATE * math.sqrt(width) * float(draw.rs[0].norm())  # ours of x·r, of h·r
            per_a = self.tolerance(1.0, inner, torch.float32) * spread
            rows.residual = per_a, sums, sums + SIGMAS * ACCUMULATE / math.sqrt(3) * 2

    def float_draw(self, key) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """r for one weight, Wᵀ·r per block, ‖r∘‖w‖‖ per block, and ‖r∘‖g⊙w‖‖ (g the RMSNorm weight in front)."""
        w, norms_sq, normed_sq = self.float_weight(key)  # (m_pad, n), (m_pad,), (m_pad,) or None
        block = self.block(key)
        r = pad_rows(self.signed_uniform(self.weight(key).shape[0]), w.shape[0])
        v = torch.bmm(r.view(-1, 1, block), w.view(-1, block, w.shape[1])).squeeze(1)
        spread = lambda sq: (sq * r.square()).view(-1, block).sum(-1).sqrt()  # noqa: E731
        return r, v, spread(norms_sq), spread(normed_sq) if normed_sq is not None else None

    def ring_draw(self, key) -> tuple[Tensor, Tensor]:
        """r for one weight (odd, uniform below 2^RING_R_BITS) and Wqᵀ·r per block, exactly."""
        wq = self.fixed_weight(key)  # (m_pad, n) float64 integers, |wq| < 2^19
        r = pad_rows(self.rng.ring((self.weight(key).shape[0],), RING_R_BITS) | 1, wq.shape[0])  # odd; padding 0
        # exact: every partial sum is an integer below BLOCK·2^RING_R_BITS·2^19 = 2^32
        v = torch.bmm(r.double().view(-1, 1, BLOCK), wq.view(-1, BLOCK, wq.shape[1])).squeeze(1)
        return r, v.long()

    def signed_uniform(self, m: int) -> Tensor:
        """m values ±(1 + U[0,1)), float32, from the CSPRNG: 53 random bits for U, one more for the sign."""
        words = self.rng.ring((m,), UNIFORM_BITS + 1)
        sign = (words >> UNIFORM_BITS) * 2 - 1
        return (sign * (1 + (words & ((1 << UNIFORM_BITS) - 1)).double() * 2.0**-UNIFORM_BITS)).float()

    def matmul_r(self, m: int, block: int) -> Tensor:
        """A Matmul check's r: the next m values of the pool drawn in prepare() (never handed out twice), or fresh
        ones if the pool is spent; zero on the padding up to whole blocks."""
        at, self.pool_used = self.pool_used, self.pool_used + m
        r = self.pool[at : at + m] if at + m <= self.pool.shape[0] else self.signed_uniform(m)
        return pad_rows(r, -(-m // block) * block)

    # ---- online: one check per reply -------------------------------------------------------------

    def timed_begin(
        self, method: str, args: dict, sent: list[Tensor], normed: bool = False
    ) -> Callable[[list[Tensor]], None]:
        """begin(), and the function it returns, each timed into the recording Stats (timing.verify_ms,
        verify_checks)."""
        finish = self.timed(self.begin, method, args, sent, normed)
        return lambda received: self.timed(finish, received)

    def timed(self, step: Callable, *args):
        """step(*args) on one thread: nearly every step of a check is a pass over memory, and waking the other
        (passive) OpenMP thread for each one cost more than it gave (about a fifth of the checks' time here)."""
        t0, before = time.perf_counter_ns(), self.checks
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out = step(*args)
        finally:
            torch.set_num_threads(self.threads)
        if (stats := current()) is not None:
            stats.crypto_ns["verify"] += time.perf_counter_ns() - t0
            stats.verify_checks += self.checks - before
        return out

    def check(self, method: str, args: dict, sent: list[Tensor], received: list[Tensor], normed: bool = False) -> None:
        """One call's check, both halves at once (a reply checked on its own, as the tests do)."""
        self.begin(method, args, sent, normed)(received)

    def begin(
        self, method: str, args: dict, sent: list[Tensor], normed: bool = False
    ) -> Callable[[list[Tensor]], None]:
        """A call's check in two halves: what needs only the request runs now (tee_client.ops calls this before
        sending it: its inputs are still in cache); the function returned checks the reply. `normed`: the input's
        rows are the RMSNorm output in front of the modules called (Linear's q/k/v or gate/up, LMHead)."""
        if method == "Linear":
            layer, names = args["layer"], args["names"]
            labels = [f"Linear layer {layer} {name}" for name in names]
            return self.linear(labels, tuple((layer, n) for n in names), sent[0], args.get("bias", True), normed)
        if method == "LMHead":
            return self.linear(["LMHead"], ("lm_head",), sent[0], False, normed)
        if method == "Residual":
            return self.residual(args["layer"], args["out"], args["names"], *sent)
        if method not in CHECKED_WHOLE:  # a reply no check covers must not pass as checked: nor be asked for
            raise IntegrityError(f"{method}: --verify has no check for this reply")
        return lambda received: self.after_reply(method, args, sent, received)

    def after_reply(self, method: str, args: dict, sent: list[Tensor], received: list[Tensor]) -> None:
        """The checks that need the reply before any of their work (CHECKED_WHOLE)."""
        if method == "Embedding":
            self.embedding(sent[0], received[0])
        elif method == "Matmul":
            self.matmul(sent[0], sent[1], args.get("transpose_b", False), received[0])
        elif method == "LMHeadRing":
            spec = RingSpec(args["ring_bits"], args["limb_bits"])
            self.ring(["LMHeadRing"], ("lm_head",), sent[0], received, spec)
        elif method == "LinearRing":
            spec = RingSpec(args["ring_bits"], args["limb_bits"])
            layer, names = args["layer"], args["names"]
            labels = [f"LinearRing layer {layer} {name}" for name in names]
            self.ring(labels, tuple((layer, n) for n in names), sent[0], received, spec)
        else:
            raise IntegrityError(f"{method}: --verify has no check for this reply")

    def embedding(self, ids: Tensor, rows: Tensor) -> None:
        expected = F.embedding(ids.to(torch.int64), self.engine.embed).to(rows.dtype)
        self.checks += 1
        if rows.shape != expected.shape:
            raise IntegrityError(f"Embedding: reply of shape {tuple(rows.shape)} for ids of shape {tuple(ids.shape)}")
        if not torch.equal(rows, expected):
            worst = (rows.double() - expected.double()).abs().max().item()
            raise IntegrityError(f"Embedding rows differ from this client's own table (by up to {worst:.3g})")

    def linear(
        self, labels: list[str], keys: tuple, x: Tensor, bias: bool, normed: bool = False
    ) -> Callable[[list[Tensor]], None]:
        """Each Y_i (T, m_i) against X (T, n)·W_iᵀ + b_i, block by block, in float32: one product of the call's
        stacked W_iᵀ·r_i against X, now; one pass over each Y_i, in the function returned. `normed`: X's rows are
        the output of the RMSNorm in front of these modules (rows_check)."""
        x_tn = x.reshape(-1, x.shape[-1])
        x_tn = x_tn if x.dtype == torch.float32 else x_tn.float()
        (tokens, inner), draw = x_tn.shape, self.take("float", keys)
        biased = bias and draw.bias_sums is not None
        if x.dtype == torch.float32 and draw.rows is not None:  # the reply's dtype is x's
            return self.rows_check(labels, draw, x_tn, biased, normed, x.shape[:-1])
        expected = draw.v @ x_tn.T  # (Σ m_i/block, T): every block's sum, a row per block
        bound = torch.outer(draw.spread, torch.linalg.vector_norm(x_tn, dim=1))  # ≥ ‖r∘(x·Wᵀ)‖ per block
        if biased:
            expected += draw.bias_sums[:, None]
            bound += draw.bias_norms[:, None]  # ‖r∘y‖ ≤ ‖r∘(x·Wᵀ)‖ + ‖r∘b‖ per block

        def check(ys: list[Tensor]) -> None:
            rows = fitting(labels, draw.widths, tokens, ys)
            self.compare(labels, rows, draw.rs, draw.blocks, expected.T, bound.T, inner, ys[0].dtype)

        return check

    def rows_check(self, labels, draw: Draw, x_tn: Tensor, biased: bool, normed: bool, lead: torch.Size):
        """The check of a float32 call in whole rows, its modules combined (Rows): before the send, the row sums
        start as −x·v (one matrix-vector product) and the tolerance is known (per row from ‖x_i‖, or, for an
        RMSNorm's output, one number: no pass over x); after the reply, one matrix-vector product per module added
        in place, and one comparison. As few tensor operations as the algebra allows: in place, between the TEE's
        own steps and after a wait, each costs ~10 µs, more than most of these bytes."""
        rows = draw.rows
        if normed and rows.normed is None:
            raise ValueError(f"{labels[0]}: no RMSNorm in front of this module, so its input cannot be normed")
        sums = torch.mv(x_tn, rows.minus_v)  # (T,)
        if biased:
            sums -= rows.bias_sum
        slack = rows.slack if biased else 0.0
        if normed:  # ‖x_i ⊘ g‖ ≤ √n: RMSNorm's output (g folded into the spread, offline); one number
            tolerance = rows.normed + slack
        else:  # per row; passes when |sum_i| / tolerance_i ≤ 1 (TINY: a zero row's sum must be 0 exactly)
            tolerance = torch.linalg.vector_norm(x_tn, dim=1).mul_(rows.slope).add_(slack + TINY)
            finite_or_fail(tolerance, labels[0])
        shapes = [(*lead, w) for w in draw.widths]

        def check(ys: list[Tensor]) -> None:
            if [y.shape for y in ys] == shapes:  # as asked (tee_client.ops has held the reply to it)
                ys = [y.view(-1, y.shape[-1]) for y in ys]
            else:  # a reply of other leading dims, or one that fails here
                ys = fitting(labels, draw.widths, sums.shape[0], ys)
            for y, r in zip(ys, draw.rs, strict=True):
                sums.addmv_(y, r)
            self.checks += sums.shape[0]
            if normed:
                passed = torch.linalg.vector_norm(sums, INF).item() <= tolerance
            else:
                passed = torch.linalg.vector_norm(sums.div_(tolerance), INF).item() <= 1
            if not passed:  # NaN and inf fail too: their norm is no number ≤ anything
                self.failed_rows(labels, draw, x_tn, ys, biased, normed)

        return check

    def residual(self, layer: int, out: str, names: list[str], a: Tensor, x: Tensor) -> Callable[[list[Tensor]], None]:
        """Residual (tsqp.engine.Engine.residual): h = x + a·W_outᵀ (+ b), then P_m = (h ⊙ g)·W_mᵀ for the modules
        that follow, g the RMSNorm weight between them; float32 only. Two checks per row, each with its own r drawn
        for this call and its own tolerance (residual_terms): h against [a, x]·[W_out, I]ᵀ (the residual as a
        module of its own, the identity, r), and the products against h as the reply holds it (r_m). Kept apart:
        added into one sum, the first's tolerance, which bounds a product over a's width, would widen the
        products' several times over. Before the send: −a·(W_outᵀr) − x·r and the first tolerance's part from
        ‖a_i‖ and ‖x_i‖ (kept from the last check when x is the h it passed: `row_norms`); after the reply: h·r,
        h·(g ⊙ v) and ‖h_i‖, Σ_m P_m·r_m, the two comparisons."""
        label = f"Residual layer {layer}"
        after = layer + 1 if out == "down_proj" else layer
        nexts = tuple(name if name == "lm_head" else (after, name) for name in names)
        first, second = self.take("float", ((layer, out),)), self.take("float", nexts)
        one, many = first.rows, second.rows
        if a.dtype != torch.float32 or one is None or many is None or many.gated is None:
            raise IntegrityError(f"{label}: --verify checks a Residual reply in float32 only")
        a_tn, x_tn = a.reshape(-1, a.shape[-1]), x.reshape(-1, x.shape[-1])
        r, (per_a, per_x, per_h) = first.rs[0], one.residual
        sums, a_norms = torch.mv(a_tn, one.minus_v), torch.linalg.vector_norm(a_tn, dim=1)  # a's second pass: cached
        sums.addmv_(x_tn, r, alpha=-1)
        if one.bias_sum:
            sums.sub_(one.bias_sum)
        tolerance = a_norms.mul_(per_a).add_(self.row_norms(x_tn), alpha=per_x).add_(one.slack + TINY)
        labels = [f"{label} {name}" for name in names]

        def check(ys: list[Tensor]) -> None:
            h, *products = fitting([f"{label} {out} (h)", *labels], [x_tn.shape[1], *second.widths], sums.shape[0], ys)
            h_norms = torch.linalg.vector_norm(h, dim=1)
            alone, bound = torch.addmv(sums, h, r), tolerance.add(h_norms, alpha=per_h)
            self.checks += 2 * sums.shape[0]
            finite_or_fail(bound, f"{label} {out}")  # h's norms bound the products' tolerance too
            ratio = alone / bound
            if not torch.linalg.vector_norm(ratio, INF).item() <= 1:  # NaN and inf fail too
                ratio = ratio.abs().nan_to_num(nan=INF)
                worst = int(torch.argmax(ratio))
                raise IntegrityError(
                    f"{label} {out}: the residual stream h fails its check by {alone[worst].abs().item():.4g} "
                    f"(tolerance {bound[worst].item():.3g}, row {worst}; {int((ratio > 1).sum())} of "
                    f"{alone.numel()} checks fail)"
                )
            got = torch.mv(h, many.gated)  # h is in cache: this pass costs little
            for y, r_m in zip(products, second.rs, strict=True):
                got.addmv_(y, r_m)
            if not torch.linalg.vector_norm(got / (h_norms * many.per_norm + TINY), INF).item() <= 1:
                u = h * self.norm_before(nexts[0]).float()  # what the server multiplied, exactly
                self.failed_rows(labels, second, u, products, False, False)
            self.kept_norms = (h, h._version, h_norms) if not h.is_inference() else None

        return check

    def row_norms(self, x_tn: Tensor) -> Tensor:
        """‖x_i‖ per row. A Residual call's x is the h the call before returned (the residual stream goes back as
        it came), whose norms that call's check computed and kept: those, while x is still that tensor, unchanged
        (same memory, shape and strides, and no write since: torch's version counter); otherwise one pass."""
        if self.kept_norms is not None:
            h, version, norms = self.kept_norms
            same = x_tn.data_ptr() == h.data_ptr() and x_tn.shape == h.shape and x_tn.stride() == h.stride()
            if same and not x_tn.is_inference() and x_tn._version == version:
                return norms
        return torch.linalg.vector_norm(x_tn, dim=1)

    def failed_rows(self, labels, draw: Draw, x_tn: Tensor, ys: list[Tensor], biased: bool, normed: bool) -> None:
        """A combined rows check failed: name the module whose own check misses by the most (failed()), or, if no
        module fails alone (errors spread over several), the call."""
        c = self.tolerance(1.0, x_tn.shape[1], torch.float32)
        got = torch.stack([y @ r for y, r in zip(ys, draw.rs, strict=True)], dim=-1)  # (T, modules)
        expected = x_tn @ draw.v.T
        if normed:  # the same bounds as rows_check, module by module
            tolerance = c * math.sqrt(x_tn.shape[1]) * RMS_SLACK * draw.normed_spread.expand(x_tn.shape[0], -1)
        else:
            tolerance = c * torch.outer(x_tn.norm(dim=1), draw.spread)
        if biased:
            expected += draw.bias_sums
            tolerance += c * draw.bias_norms
        if not bool(((got - expected).abs() <= tolerance).all()):
            self.failed(labels, draw.rs, draw.blocks, got, expected, tolerance)
        rows = draw.rows  # no module fails alone: the call's combined sum, against its own tolerance
        gap = (got - expected).sum(-1).abs()
        combined = rows.normed if normed else x_tn.norm(dim=1) * rows.slope
        combined = torch.as_tensor(combined).expand_as(gap) + (rows.slack if biased else 0.0)
        worst = int(torch.argmax((gap - combined).nan_to_num(nan=float("inf"))))
        what = labels[0].rsplit(" ", 1)[0] + " " + "/".join(label.rsplit(" ", 1)[-1] for label in labels)
        raise IntegrityError(
            f"{what}: replies fail their combined check by {gap[worst].item():.4g} (tolerance "
            f"{combined[worst].item():.3g}, row {worst}); no module fails on its own"
        )

    @staticmethod
    def tolerance(bound: Tensor, inner: int, dtype, spread: Tensor | None = None) -> Tensor:
        """SIGMAS standard deviations of honest rounding, per block: the server's float32 accumulation over `inner`
        terms and ours, 2·ACCUMULATE·√inner·bound, plus the output's rounding, u/√3·‖r∘y‖, where `spread` is the
        exact ‖r∘y‖ (float16, bfloat16) or, when None (float32), `bound` stands for it."""
        accumulate, rounding = SIGMAS * 2 * ACCUMULATE * math.sqrt(inner), SIGMAS * UNIT_ROUNDOFF[dtype] / math.sqrt(3)
        if spread is None:
            return (accumulate + rounding) * bound
        return accumulate * bound + rounding * spread

    def matmul(self, a: Tensor, b: Tensor, transpose_b: bool, c: Tensor) -> None:
        """C (…, S, cols) against A·(B·r), block by block."""
        fits = matmul_shape(a, b, transpose_b)
        b = b.transpose(-1, -2) if transpose_b else b  # (…, inner, cols)
        if tuple(c.shape) != fits:  # before any arithmetic: a short reply must fail as wrong, not as a crash
            raise IntegrityError(f"Matmul: reply of shape {tuple(c.shape)} does not fit its operands {fits}")
        a, b, block = a.float(), b.float(), self.block_of(c.dtype, c.shape[-1])
        r = self.matmul_r(c.shape[-1], block)  # (cols_pad,)
        z = (pad_last(b, r.shape[0]) * r).unflatten(-1, (-1, block))  # (…, inner, cols_pad/block, block)
        bs = z.sum(-1)  # (…, inner, cols_pad/block): B·r per block
        spread = torch.linalg.vector_norm(z, dim=(-3, -1)).unsqueeze(-2)  # (…, 1, cols_pad/block): ‖r∘‖b_col‖‖
        expected = (bs.mT @ a.mT).mT  # = A·bs; this order runs 4-5x faster for narrow bs on the CPU
        bound = torch.linalg.vector_norm(a, dim=-1, keepdim=True) * spread  # ≥ ‖r∘c‖ per block (Cauchy–Schwarz)
        self.compare(["Matmul"], [c], [r], [block], expected, bound, a.shape[-1], c.dtype)

    def compare(self, labels, ys, rs, blocks, expected: Tensor, bound: Tensor, inner: int, dtype) -> None:
        """Fail unless every block sum of y∘r is within SIGMAS standard deviations of honest rounding.

        ys[i] with secret rs[i] in blocks of blocks[i] owns the next rs[i].shape[-1]/blocks[i] columns of `expected`
        and `bound`, an upper bound of ‖r∘y‖ per block from the inputs (Cauchy–Schwarz): float32 outputs take it
        for ‖r∘y‖ in the tolerance, which costs no pass over y; float16 and bfloat16 need the exact ‖r∘y‖.
        """
        half = dtype in HALF
        if half:
            parts = [block_dot_and_norms(y.float(), r, block) for y, r, block in zip(ys, rs, blocks, strict=True)]
            got = torch.cat([p[0] for p in parts], dim=-1) if len(parts) > 1 else parts[0][0]
        else:
            sums = [block_dot(y.float(), r, block) for y, r, block in zip(ys, rs, blocks, strict=True)]
            got = torch.cat(sums, dim=-1) if len(sums) > 1 else sums[0]
        if got.shape != expected.shape:
            raise IntegrityError(f"{labels[0]}: reply of shape {tuple(ys[0].shape)} does not fit its operands")
        self.checks += got.numel()
        spread = None
        if half:
            spread = torch.cat([p[1] for p in parts], dim=-1) if len(parts) > 1 else parts[0][1]
        tolerance = self.tolerance(bound, inner, dtype, spread)
        finite_or_fail(tolerance, labels[0])
        if bool(((got - expected).abs_() <= tolerance).all()):  # NaN and inf fail: a reply cannot hide behind them
            return
        self.failed(labels, rs, blocks, got, expected, tolerance)

    @staticmethod
    def failed(labels, rs, blocks, got: Tensor, expected: Tensor, tolerance: Tensor) -> None:
        """Raise IntegrityError naming the module whose block sum missed its window by the most (got, expected,
        tolerance: (…, Σ blocks), the modules' blocks in order)."""
        gap = (got - expected).abs_()
        fails = ~(gap <= tolerance)
        excess = torch.where(fails, (gap - tolerance).nan_to_num(nan=float("inf")), -float("inf"))
        worst = int(torch.argmax(excess.flatten()))
        edges = torch.tensor([r.shape[-1] // block for r, block in zip(rs, blocks, strict=True)]).cumsum(0)
        what = labels[int((edges <= worst % got.shape[-1]).sum())]
        raise IntegrityError(
            f"{what}: reply fails its check by {gap.flatten()[worst].item():.4g} "
            f"(tolerance {tolerance.flatten()[worst].item():.3g}; {int(fails.sum())} of "
            f"{got.numel()} checks fail)"
        )

    def ring(self, labels: list[str], keys: tuple, u: Tensor, ys: list[Tensor], spec: RingSpec) -> None:
        """Exactly in Z_2^k: Y_u·r ≡ U·(Wqᵀ·r) per block, r odd (a unit), drawn for this call."""
        k, u_tn = spec.ring_bits, u.reshape(-1, u.shape[-1])
        self.limb_bits = spec.limb_bits
        draw = self.take("ring", keys)
        rows = fitting(labels, draw.widths, u_tn.shape[0], ys)
        if draw.digits is None or draw.digits[0] != spec.limb_bits:
            draw.digits = spec.limb_bits, ring_digits(draw.v, spec.limb_bits)
        with self.parallel():  # the one product here that is compute-bound: the idle second core helps
            expected = ring_product(u_tn, draw.digits[1], draw.v.shape[0], spec)  # (T, Σ m_i/BLOCK)
        sums = [ring_block_sums(y, r, k) for y, r in zip(rows, draw.rs, strict=True)]
        got = torch.cat(sums, dim=-1) if len(sums) > 1 else sums[0]
        self.checks += got.numel()
        bad = got != expected
        if bad.any():
            gap = (got - expected) & ((1 << k) - 1)
            gap = torch.where(gap >= 1 << (k - 1), (1 << k) - gap, gap)  # |centred difference|
            worst = int(torch.argmax(torch.where(bad, gap, -1).flatten()))
            edges = torch.tensor([r.shape[0] // BLOCK for r in draw.rs]).cumsum(0)
            what = labels[int((edges <= worst % got.shape[-1]).sum())]
            raise IntegrityError(
                f"{what}: reply fails its check in Z_2^{k}, off by 2^{math.log2(gap.flatten()[worst].item()):.1f} "
                f"({int(bad.sum())} of {bad.numel()} checks fail)"
            )

    # ---- helpers ---------------------------------------------------------------------------------

    @contextmanager
    def parallel(self):
        """The threads the caller had, for a compute-bound product inside timed()."""
        serial = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(serial)

    def weight(self, key) -> Tensor:
        return self.engine.lm_head_weight if key == "lm_head" else self.engine.module(*key).weight

    def bias(self, key) -> Tensor | None:
        return None if key == "lm_head" else self.engine.module(*key).bias

    def block(self, key) -> int:
        """Columns per check for this weight's float replies (its dtype is the server's: same fingerprint)."""
        weight = self.weight(key)
        return self.block_of(weight.dtype, weight.shape[0])

    @staticmethod
    def block_of(dtype, cols: int) -> int:
        """float32: the whole row, or equal blocks of at most BLOCK_FLOAT32 columns; otherwise BLOCK."""
        if dtype != torch.float32:
            return BLOCK
        return -(-cols // -(-cols // BLOCK_FLOAT32))

    def float_weight(self, key) -> tuple[Tensor, Tensor, Tensor | None]:
        """The weight in float32, padded to whole blocks, its squared row norms, and those of W·diag(g), g the
        RMSNorm weight in front of it (None for o_proj and down_proj): made once per module."""
        if key not in self.weights:
            weight, block, g = self.weight(key), self.block(key), self.norm_before(key)
            w = pad_rows(weight.detach().float(), -(-weight.shape[0] // block) * block)
            self.weights[key] = w, w.square().sum(1), None if g is None else (w * g.float()).square().sum(1)
        return self.weights[key]

    def norm_before(self, key) -> Tensor | None:
        """The RMSNorm weight whose output this module takes, if one does: q/k/v, gate/up, lm_head."""
        if key == "lm_head":
            return self.engine.final_norm
        layer, name = key
        if name in ("q_proj", "k_proj", "v_proj"):
            return self.engine.attention_norms[layer]
        return self.engine.ffn_norms[layer] if name in ("gate_proj", "up_proj") else None

    def fixed_weight(self, key) -> Tensor:
        """Wq in float64, padded to whole blocks: made once per module."""
        if key not in self.fixed:
            wq = fixed_weight(self.weight(key)).wq.cpu()
            self.fixed[key] = pad_rows(wq, -(-wq.shape[0] // BLOCK) * BLOCK)
        return self.fixed[key]


def finite_or_fail(tolerance: Tensor, label: str) -> None:
    """A tolerance must be a number. One taken from norms that overflowed float32 (a row of values past ~1e19, in
    a reply, or in an input made from one) would be inf and let any error in its row through: such a check fails.
    No honest activation of a float32, float16 or bfloat16 model comes near."""
    if not bool(torch.isfinite(tolerance).all()):
        where = (~torch.isfinite(tolerance)).nonzero()[0].tolist()
        raise IntegrityError(f"{label}: values too large to check (a norm overflows float32 at {where})")


def fitting(labels: list[str], widths: list[int], rows: int, ys: list[Tensor]) -> list[Tensor]:
    """The results as (rows, m) matrices, one per weight of the call, m its output width; anything else fails."""
    if len(ys) != len(widths):
        raise IntegrityError(f"{labels[0]}: {len(ys)} results for {len(widths)} modules")
    for label, width, y in zip(labels, widths, ys, strict=True):
        if y.dim() == 0 or y.shape[-1] != width or y.numel() != rows * width:
            raise IntegrityError(f"{label}: reply of shape {tuple(y.shape)} does not fit its operands")
    return [y.reshape(rows, y.shape[-1]) for y in ys]


def block_dot_and_norms(t: Tensor, r: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per block: Σ t_j·r_j (the check) and ‖t∘r‖ (how far honest rounding of t can move it)."""
    z = (pad_last(t, r.shape[-1]) * r).unflatten(-1, (-1, block))
    return z.sum(-1), torch.linalg.vector_norm(z, dim=-1)


def block_dot(t: Tensor, r: Tensor, block: int) -> Tensor:
    """Σ_j t[..., j]·r_j over each block of `block` columns: (..., cols) -> (..., cols_pad/block).

    Blocks of float32 rows are matrix-vector products, one read of t and no temporary; narrow ones (float16,
    bfloat16) a product and a sum."""
    if block == t.shape[-1] == r.shape[-1]:
        return torch.matmul(t, r).unsqueeze(-1)
    if block < BLOCK_FLOAT32 // 8:
        return (pad_last(t, r.shape[-1]) * r).unflatten(-1, (-1, block)).sum(-1)
    rows = t.reshape(-1, t.shape[-1])
    sums = [rows[:, i : i + block] @ r[i : min(i + block, t.shape[-1])] for i in range(0, r.shape[-1], block)]
    return torch.stack(sums, -1).view(*t.shape[:-1], -1)


def pad_rows(t: Tensor, rows: int, value: float = 0) -> Tensor:
    return F.pad(t, (0, 0) * (t.dim() - 1) + (0, rows - t.shape[0]), value=value) if rows > t.shape[0] else t


def pad_last(t: Tensor, cols: int) -> Tensor:
    return F.pad(t, (0, cols - t.shape[-1])) if cols > t.shape[-1] else t


def shift_mod(x: Tensor, s: int, k: int) -> Tensor:
    """x·2^s mod 2^k for any int64 x (read as its residue mod 2^k), without overflowing int64."""
    return ((x & ((1 << (k - s)) - 1)) << s) if s < k else torch.zeros_like(x)


def ring_block_sums(y_tm: Tensor, r: Tensor, k: int) -> Tensor:
    """Σ_block y_j·r_j mod 2^k, exact in int64 (any int64 y is read as its residue mod 2^k).

    y < 2^k and r < 2^RING_R_BITS, BLOCK terms: when k + RING_R_BITS + log2(BLOCK) ≤ 63 every sum is below
    2^63 and one pass does; otherwise y is cut in two limbs so that no product overflows."""
    mask = (1 << k) - 1
    y = pad_last(y_tm & mask, r.shape[0])
    if k + RING_R_BITS + (BLOCK - 1).bit_length() <= 63:
        return (y * r).view(y.shape[0], -1, BLOCK).sum(-1) & mask
    half = k // 2
    lo, hi = y & ((1 << half) - 1), y >> half  # < 2^31 each, times r < 2^8, BLOCK terms: < 2^44
    sums = [(limb * r).view(y.shape[0], -1, BLOCK).sum(-1) & mask for limb in (lo, hi)]
    return (sums[0] + shift_mod(sums[1], half, k)) & mask


def ring_product(u_tn: Tensor, v_digits: tuple[Tensor, int], width: int, spec: RingSpec) -> Tensor:
    """U·Vᵀ mod 2^k, exact, for any int64 U (read mod 2^k) and integer V (width, n) with |V| < 2^62, given as
    ring_digits(V, limb_bits) (made once per draw, before the prompt is known).

    U is cut in two limbs below 2^h (h = limb_bits), V in signed base-2^c digits with
    c = 53 − h − bit_length(n): every partial sum of limb·digitᵀ is below 2^h·2^c·n ≤ 2^53, so one float64
    GEMM of the stacked limbs against the stacked digits is exact, and the result is Σ G_ab·2^(a·h + b·c) mod 2^k.
    """
    digits, c = v_digits
    return ring_combine(ring_limbs(u_tn, spec) @ digits, width, spec, c)


def ring_digits(v: Tensor, h: int) -> tuple[Tensor, int]:
    """V (K, n) as (n, digits·K) float64: unsigned base-2^c digits while the rest is too wide, the last signed
    (|d| < 2^c), c = 53 − h − bit_length(n), so that limbs below 2^h times digits sum exactly over n terms."""
    c = FLOAT_EXACT_BITS - h - v.shape[-1].bit_length()
    if c < 1:
        raise ValueError(f"no exact float64 product for limbs of {h} bits over {v.shape[-1]} terms")
    digits, rest = [], v
    while not bool((rest.abs() < 1 << c).all()):
        digits.append(rest & ((1 << c) - 1))
        rest = rest >> c  # arithmetic shift: rest·2^c + digit is the old rest
    digits.append(rest)
    return torch.cat(digits).T.double().contiguous(), c


def ring_limbs(u_tn: Tensor, spec: RingSpec) -> Tensor:
    """U (T, n), read mod 2^k, as (2T, n) float64: its low h bits, then its high k − h bits (each below 2^h)."""
    k, h, rows = spec.ring_bits, spec.limb_bits, u_tn.shape[0]
    limbs = torch.empty(2 * rows, u_tn.shape[-1], dtype=torch.float64)
    limbs[:rows] = u_tn & ((1 << h) - 1)
    limbs[rows:] = (u_tn >> h) & ((1 << (k - h)) - 1)
    return limbs


def ring_combine(g: Tensor, width: int, spec: RingSpec, c: int) -> Tensor:
    """Σ_ab G_ab·2^(a·h + b·c) mod 2^k from the float64 product of ring_limbs and ring_digits (exact integers)."""
    k, h, mask = spec.ring_bits, spec.limb_bits, (1 << spec.ring_bits) - 1
    g, rows = g.long(), g.shape[0] // 2
    total = torch.zeros(rows, width, dtype=torch.int64)
    for a in range(2):
        for b in range(g.shape[1] // width):
            total += shift_mod(g[a * rows : (a + 1) * rows, b * width : (b + 1) * width], a * h + b * c, k)
            total &= mask
    return total
