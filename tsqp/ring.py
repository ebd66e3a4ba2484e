"""Exact ring arithmetic of the `otp` mode: fixed-point weights and u·Wqᵀ mod 2^k. Both sides run this file.

Bit budget (b = WEIGHT_BITS, L = l1_bits, h = limb bits, k = ring bits, a = activation bits):
  weights   Wq_jk = round(W_jk·2^e_j) ∈ [-(2^(b-1)-1), 2^(b-1)-1],  Σ_k |Wq_jk| < 2^L for every row j
  limbs     u = hi·2^h + lo, 0 ≤ lo, hi < 2^h, so each float64 limb GEMM has every partial sum < 2^h·2^L ≤ 2^53
  ring      Z_2^k, k = min(2h, 62), h = 53 - L (h = 31 when k is capped)
  client    xq = round(x·2^a_i) ∈ [-(2^(a-1)-1), 2^(a-1)-1] with a = k - L, so |xq·Wqᵀ| < 2^(a-1)·2^L = 2^(k-1)
Security (argued in tee_client/masking.py): the server sees u = xq + r mod 2^k with r uniform and used once, so u is
uniform and independent of x; Wq and e are functions of the weights the server holds anyway.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch

WEIGHT_BITS = 20  # signed bits per fixed-point weight: |Wq| ≤ 2^19 - 1, i.e. 2^-19 of its row's largest entry
FLOAT_EXACT_BITS = 53  # float64 holds every integer of magnitude ≤ 2^53 exactly
MAX_RING_BITS = 62  # sums of two ring elements stay below 2^63: no int64 overflow
MIN_ACT_BITS = 8  # a ring too small to give activations this many bits is refused


def pow2_exponent(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Largest integer e per entry with amax·2^e ≤ 2^(bits-1) - 1 (0 where amax is 0), as int64.

    Exact, from frexp and comparisons only (no log2 rounding), so every machine gets the same e from the same amax.
    """
    limit = 2.0 ** (bits - 1) - 1
    mant, exp = torch.frexp(amax.double())  # amax = mant·2^exp, mant ∈ [0.5, 1)
    e = bits - 1 - exp.long()  # amax·2^e = mant·2^(bits-1) ∈ [2^(bits-2), 2^(bits-1)): one too many if > limit
    e = e - (torch.ldexp(mant, torch.full_like(e, bits - 1)) > limit).long()
    return torch.where(amax == 0, torch.zeros_like(e), e)


@dataclass(frozen=True)
class FixedWeight:
    """W (m, n) in fixed point: W_jk ≈ wq[j, k] / 2^exp[j]."""

    wq: torch.Tensor  # (m, n) float64, integer values, |wq| ≤ 2^(WEIGHT_BITS-1) - 1
    exp: torch.Tensor  # (m,) int64: the power-of-two scale e_j of row j
    l1_bits: int  # Σ_k |wq[j, k]| < 2^l1_bits for every row j (strict)

    def to(self, device) -> "FixedWeight":
        return FixedWeight(self.wq.to(device), self.exp.to(device), self.l1_bits)


def fixed_weight(w: torch.Tensor, bits: int = WEIGHT_BITS) -> FixedWeight:
    """Quantize W (m, n) with one power-of-two scale per output row; computed in float64 on the CPU, kept on w.device.

    Multiplying by 2^e is exact and round() is exact in float64, so the server and the client get bit-identical Wq.
    """
    w64 = w.detach().to("cpu", torch.float64)
    if not torch.isfinite(w64).all():
        raise ValueError("weight has NaN or inf entries")
    exp = pow2_exponent(w64.abs().amax(dim=1), bits)  # all-zero rows get e = 0 and stay zero
    wq = torch.round(torch.ldexp(w64, exp[:, None]))
    l1_max = int(wq.abs().long().sum(dim=1).max())
    return FixedWeight(wq.to(w.device), exp.to(w.device), l1_max.bit_length())  # v < 2^bit_length(v), also for v = 0


@dataclass(frozen=True)
class RingSpec:
    """The ring Z_2^ring_bits and the width of the two limbs a ring element is split into for the float64 GEMMs."""

    ring_bits: int  # k
    limb_bits: int  # h: u = hi·2^h + lo

    def check(self, fw: FixedWeight) -> None:
        """Raise ValueError unless both limb GEMMs with this weight are exact in float64."""
        k, h = self.ring_bits, self.limb_bits
        if not (0 < k - h <= h and k <= MAX_RING_BITS and h + fw.l1_bits <= FLOAT_EXACT_BITS):
            raise ValueError(f"ring k={k}, h={h} is not exact for weights with l1_bits={fw.l1_bits}")


def ring_spec(l1_bits: int) -> RingSpec:
    """The largest ring whose limb GEMMs are exact for weights with Σ|Wq_j| < 2^l1_bits.

    Proof of exactness: a limb is ≤ 2^h - 1, so every partial sum of limb·Wq_jᵀ, in any summation order, has
    magnitude ≤ (2^h - 1)·Σ_k|Wq_jk| < 2^h·2^l1_bits = 2^53 (h = 53 - l1_bits). All products and partial sums are
    therefore integers float64 represents exactly, and each rounding step returns its exact argument.
    """
    h = FLOAT_EXACT_BITS - l1_bits
    k = 2 * h
    if k > MAX_RING_BITS:
        k, h = MAX_RING_BITS, MAX_RING_BITS // 2  # h = 31 ≤ 53 - l1_bits: the bound still holds
    if k - l1_bits < MIN_ACT_BITS:
        raise ValueError(f"l1_bits={l1_bits} leaves {k - l1_bits} activation bits in Z_2^{k}: lower the weight bits")
    return RingSpec(k, h)


def model_ring(weights: Iterable[FixedWeight]) -> RingSpec:
    """One ring for all matrices of a model (so one masked x can go to q, k and v at once)."""
    return ring_spec(max(fw.l1_bits for fw in weights))


def ring_linear(u: torch.Tensor, fw: FixedWeight, spec: RingSpec) -> torch.Tensor:
    """u (..., n) int64 -> u·Wqᵀ mod 2^k (..., m) int64 in [0, 2^k), exact; computed on fw's device. No bias.

    Two float64 GEMMs, one per limb, exact by ring_spec's bound; then y = Y_hi·2^h + Y_lo mod 2^k in int64.
    """
    if u.dtype != torch.int64:
        raise ValueError(f"ring elements must be int64, got {u.dtype}")
    if u.shape[-1] != fw.wq.shape[1]:
        raise ValueError(f"u has width {u.shape[-1]}, the weight takes {fw.wq.shape[1]}")
    spec.check(fw)
    k, h = spec.ring_bits, spec.limb_bits
    mask = (1 << k) - 1
    u = u.to(fw.wq.device) & mask  # reduce instead of checking: any int64 input is read as its residue mod 2^k
    lo = (u & ((1 << h) - 1)).double()  # < 2^h
    hi = (u >> h).double()  # < 2^(k-h) ≤ 2^h
    wq_t = fw.wq.t()
    # |Y| < 2^53: the float64 -> int64 casts are exact; & of a negative int64 (two's complement) is its residue.
    y_lo = (lo @ wq_t).long() & mask
    y_hi = (hi @ wq_t).long() & ((1 << (k - h)) - 1)
    # (y_hi << h) < 2^k and y_lo < 2^k, with k ≤ 62: the sum is < 2^63, no overflow.
    return ((y_hi << h) + y_lo) & mask
