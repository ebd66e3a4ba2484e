"""The client side of the privacy modes: cryptographic randomness, `otp` one-time pads, `mix` token mixing.

otp (Slalom-style additive pads): ring Z_2^k from tsqp.ring (k ≤ 62). Row i of x is sent in fixed point with a secret
power-of-two scale, xq_i = round(x_i·2^a_i) with |xq_i| ≤ 2^(act_bits-1) - 1 and act_bits = k - l1_bits, so
|xq·Wqᵀ| < 2^(k-1) and the centred lift decodes it without wrap-around. The server sees only u = xq + r mod 2^k. r is
uniform on Z_2^k and masks exactly one x, so u is uniform and independent of x and of the scales, whatever the server
does and over any number of requests, as long as no pad is used twice: Pad and PadBook make a second use raise. The
client subtracts r·Wqᵀ mod 2^k (computed offline, before the prompt is known) from the server's u·Wqᵀ to get xq·Wqᵀ.
Privacy only: a malicious server can return wrong products and nothing here detects it; if the client then reacts
visibly (an error, a retry), that reaction can leak a bit (selective failure), so check integrity before acting.

mix (GELO-style, heuristic, no proof): each block of K consecutive rows X_b is sent as A_b·X_b with A_b = U·diag(σ)·Vᵀ
fresh per block and per call, U, V Haar-orthogonal, σ log-uniform in [1/√κ, √κ]. A is deliberately not orthogonal:
(AX)ᵀ(AX) = XᵀX would otherwise be visible. A call with a single row (decode) is only scaled, i.e. not hidden.

Randomness: os.urandom, the kernel's CSPRNG (getrandom(2), ~300 MB/s here). `cryptography` is not installed in the
venv, so there is no user-space AES-CTR keystream. Never torch/numpy generators: they are predictable.
"""

import math
import os
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tsqp.ring import FixedWeight, RingSpec, pow2_exponent, ring_linear


class Csprng:
    """Cryptographic random tensors (CPU) from os.urandom; instances share no state, every call reads fresh bytes."""

    def ring(self, shape: tuple[int, ...], bits: int) -> torch.Tensor:
        """int64 uniform in [0, 2^bits): 8 random bytes per entry, masked (uniform because 2^bits divides 2^64)."""
        if not 0 < bits < 64:
            raise ValueError(f"bits={bits} is not in 1..63")
        words = np.frombuffer(os.urandom(8 * math.prod(shape)), dtype=np.int64) & ((1 << bits) - 1)
        return torch.from_numpy(words).reshape(shape)

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        """float64 uniform in [0, 1), 53 random bits each."""
        return self.ring(shape, 53).double() * 2.0**-53

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """float64 standard normal (Box-Muller)."""
        radius = torch.sqrt(-2.0 * torch.log1p(-self.uniform(shape)))  # log(1 - u), 1 - u ∈ (0, 1]
        return radius * torch.cos(2.0 * math.pi * self.uniform(shape))


@dataclass
class Pad:
    """One call's one-time pad: r, and r·Wqᵀ mod 2^k per weight name. Otp.mask clears r, Otp.unmask drops rw[name]."""

    r: torch.Tensor | None  # (rows, n) int64 uniform in [0, 2^k); None once used
    rw: dict[str, torch.Tensor]  # name -> (rows, m) int64 r·Wqᵀ mod 2^k
    act_bits: int  # signed fixed-point bits of x, for the widest of these weights
    rows: int | None = None  # rows of the x it masked (a prefix of r), set by Otp.mask


class Otp:
    """Additive one-time pads in Z_2^k for one model's fixed-point weights (on the client's device)."""

    def __init__(self, weights: dict[str, FixedWeight], spec: RingSpec, rng: Csprng):
        for fw in weights.values():
            spec.check(fw)
        self.weights, self.spec, self.rng = weights, spec, rng
        self.mask_k = (1 << spec.ring_bits) - 1

    def pad(self, rows: int, names: Sequence[str]) -> Pad:
        """Offline: a pad for up to `rows` rows of one x sent to every weight in `names` (e.g. q, k and v)."""
        fws = [self.weights[name] for name in names]
        widths = {fw.wq.shape[1] for fw in fws}
        if len(widths) != 1:
            raise ValueError(f"one x cannot feed weights of widths {sorted(widths)}")
        r = self.rng.ring((rows, widths.pop()), self.spec.ring_bits)
        rw = {name: ring_linear(r, fw, self.spec) for name, fw in zip(names, fws, strict=True)}
        return Pad(r, rw, self.spec.ring_bits - max(fw.l1_bits for fw in fws))

    def mask(self, x: torch.Tensor, pad: Pad) -> tuple[torch.Tensor, torch.Tensor]:
        """Online: x (..., n) float -> (u (..., n) int64 for the server, x_exp (T,) int64 secret row exponents).

        T = rows of x (all leading dims flattened) ≤ the pad's rows; x_i is sent as round(x_i·2^x_exp[i]) + r_i.
        """
        x_tn = x.detach().double().reshape(-1, x.shape[-1])
        if pad.r is None:
            raise ValueError("this pad has already masked an x")
        if x_tn.shape[0] > pad.r.shape[0] or x_tn.shape[1] != pad.r.shape[1]:
            raise ValueError(f"x of shape {tuple(x_tn.shape)} does not fit a pad of shape {tuple(pad.r.shape)}")
        if not torch.isfinite(x_tn).all():
            raise ValueError("x has NaN or inf entries")
        rows = x_tn.shape[0]
        r, pad.r, pad.rows = pad.r[:rows], None, rows
        x_exp = pow2_exponent(x_tn.abs().amax(dim=1), pad.act_bits)  # all-zero rows: 0
        xq = torch.round(torch.ldexp(x_tn, x_exp[:, None])).long()  # |xq| ≤ 2^(act_bits-1) - 1 < 2^61
        u = (xq + r) & self.mask_k  # |xq| + r < 2^61 + 2^62: no overflow; & maps a negative sum to its residue
        return u.reshape(x.shape), x_exp

    def unmask(
        self, y_u: torch.Tensor, pad: Pad, name: str, x_exp: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Online: the server's u·Wqᵀ mod 2^k (..., m) -> x·Wᵀ (+ bias, which the server never applies) in float32."""
        fw = self.weights[name]
        y_tm = y_u.reshape(-1, y_u.shape[-1])
        if y_u.dtype != torch.int64 or y_tm.shape != (pad.rows, fw.wq.shape[0]) or x_exp.shape != (pad.rows,):
            raise ValueError(f"{name}: y_u {tuple(y_tm.shape)} {y_u.dtype} does not match the masked x")
        if name not in pad.rw:
            raise ValueError(f"this pad has no product for {name}: not planned, or already used")
        k = self.spec.ring_bits
        yq = ((y_tm & self.mask_k) - pad.rw.pop(name)[: pad.rows]) & self.mask_k  # xq·Wqᵀ mod 2^k
        yq = torch.where(yq >= 1 << (k - 1), yq - (1 << k), yq)  # centred lift to [-2^(k-1), 2^(k-1))
        y = torch.ldexp(yq.double(), -(x_exp[:, None] + fw.exp[None, :]))  # divide by 2^a_i·2^e_j, exact scaling
        if bias is not None:
            y = y + bias.double()
        return y.float().reshape(y_u.shape)


class PadBook:
    """Pads drawn offline for planned calls, one per key; take(key) hands a pad out once and forgets it."""

    def __init__(self, otp: Otp, plan: Iterable[tuple[Hashable, int, Sequence[str]]]):
        """plan: (key, rows, weight names) per future call, e.g. (("Linear", 3, "qkv"), 512, ("q_proj", "k_proj"))."""
        self._pads: dict[Hashable, Pad] = {}
        for key, rows, names in plan:
            if key in self._pads:
                raise ValueError(f"two calls planned under the key {key!r}")
            self._pads[key] = otp.pad(rows, names)

    def take(self, key: Hashable) -> Pad:
        if key not in self._pads:
            raise KeyError(f"no pad for {key!r}: never planned, or already taken")
        return self._pads.pop(key)

    def __len__(self) -> int:
        return len(self._pads)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._pads


def random_mixing(rng: Csprng, count: int, size: int, cond: float) -> tuple[torch.Tensor, torch.Tensor]:
    """count random size×size A = U·diag(σ)·Vᵀ and A⁻¹ = V·diag(1/σ)·Uᵀ, float64 (count, size, size) each.

    U, V Haar-orthogonal (QR of a Gaussian, signs fixed by diag(R)); log σ uniform, so σ ∈ [1/√cond, √cond] and
    cond(A) ≤ cond.
    """

    def haar() -> torch.Tensor:
        q, r = torch.linalg.qr(rng.normal((count, size, size)))
        return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)

    u, v = haar(), haar()
    sigma = torch.exp((rng.uniform((count, 1, size)) - 0.5) * math.log(cond))  # scales the columns of U and V
    return (u * sigma) @ v.mT, (v / sigma) @ u.mT


def _apply_blocks(mats: list[torch.Tensor], x_tn: torch.Tensor) -> torch.Tensor:
    """Block-diagonal product: consecutive row blocks of x_tn (T, d) times the (count, size, size) stacks, in order."""
    out, start = [], 0
    for m in mats:
        count, size = m.shape[0], m.shape[1]
        x_bkd = x_tn[start : start + count * size].double().reshape(count, size, -1)
        out.append((m @ x_bkd).reshape(count * size, -1))
        start += count * size
    return torch.cat(out)


@dataclass
class MixKey:
    """The inverse of one mix; Mixer.unmix clears it, so it serves once."""

    inv: list[torch.Tensor] | None  # (count, size, size) float64 stacks of A_b⁻¹, in row order
    rows: int


class Mixer:
    """Token-axis mixing: the T rows are cut into blocks of `block`, the remainder joining the last block (so no block
    is smaller than min(block, T)), and block b is sent as A_b·X_b with a fresh A_b per call (see random_mixing)."""

    def __init__(self, rng: Csprng, block: int = 16, cond: float = 4.0):
        self.rng, self.block, self.cond = rng, block, cond

    def mix(self, x: torch.Tensor) -> tuple[torch.Tensor, MixKey]:
        """x (..., d) -> (A·x in x's dtype, the key to undo it); all leading dims are flattened into T rows."""
        x_tn = x.reshape(-1, x.shape[-1])
        rows = x_tn.shape[0]
        if rows <= self.block:
            groups = [(1, rows)]
        else:  # (rows // block - 1) blocks of `block`, then one of block + rows % block
            groups = [(rows // self.block - 1, self.block), (1, self.block + rows % self.block)]
        pairs = [random_mixing(self.rng, count, size, self.cond) for count, size in groups if count]
        mixed = _apply_blocks([a for a, _ in pairs], x_tn)
        return mixed.to(x.dtype).reshape(x.shape), MixKey([inv for _, inv in pairs], rows)

    def unmix(self, y: torch.Tensor, key: MixKey) -> torch.Tensor:
        """The server's (A·x)·Wᵀ (..., m) -> x·Wᵀ in y's dtype (add any bias after)."""
        return self.unmix_all([y], key)[0]

    def unmix_all(self, ys: Sequence[torch.Tensor], key: MixKey) -> list[torch.Tensor]:
        """unmix for every product of one mixed x (q, k and v of one call): the key serves this once."""
        if key.inv is None:
            raise ValueError("this mix key has already been used")
        for y in ys:
            if y.reshape(-1, y.shape[-1]).shape[0] != key.rows:
                raise ValueError(f"y has {y.reshape(-1, y.shape[-1]).shape[0]} rows, the mix had {key.rows}")
        inv, key.inv = key.inv, None
        return [_apply_blocks(inv, y.reshape(-1, y.shape[-1])).to(y.dtype).reshape(y.shape) for y in ys]
