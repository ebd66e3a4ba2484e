"""What a curious GPU server can learn from the tensors it receives: attacks and the views they attack.

Pure functions on torch tensors (float64 inside); no I/O, no processes, no fixed seeds for masks.

Which attack answers which question
- `nearest_embedding_recovery`: can the server read the prompt's tokens straight off what it got?
  Each received row is matched to the embedding row of largest |cosine|; the score is the fraction
  of rows whose true token is the best match (top-1) or among the best five (top-5). |cos| rather
  than cos because every linear mask leaves a sign ambiguity, and raw rows rather than centred ones
  because centring by a mean breaks under per-row scales (pass centre=True for additive noise on a
  real table whose rows share a mean direction). Works on layer-0 inputs, which are table rows.
- `remove_top_directions` / `recovery_after_svd`: does a shared low-rank component hide the tokens?
  The seed's M = D + αβᵀ over tokens sends dᵢxᵢ + αᵢs with one s = βᵀX for every row; projecting out
  the top singular direction (from the rows and from the table alike) leaves dᵢxᵢ, read as above.
- `max_abs_cosine`: does any received row point along any plaintext hidden state? Rows centred,
  raw and after removing each tensor's top two singular directions.
- `run_correlation`: was a pad reused? The same prompt sent twice correlates ≈1 under pad reuse.
- `averaging_attack`: do fresh Gaussian pads on the same activation average away? σ drops as 1/√n.
- `ica_attack`: can a fresh token mix of one block be un-mixed blindly (symmetric FastICA, tanh)?
  Only if the sources are non-Gaussian; a Gaussian random table is not identifiable by ICA at all.
- `subspace_attack`: which tokens lie in the row space of one received block? A fresh invertible mix
  of K rows keeps their span, and layer-0 rows are table rows: every true token lies in the span
  (residual 0), a random row keeps only about K/d of its energy there. This reads the bag of tokens
  of each block through any mixing, orthogonal or not.

Chance: a guess uniform over the V table rows hits the true token with probability 1/V (top-1),
5/V (top-5); for the block attacks a component hitting any of the block's K tokens has K/V.

The views (what the server receives), for benchmarks to call on plaintext hidden states X (T, d):
`seed_rank_one_mix` and `seed_gaussian_pad` (the old prototype's two schemes, broken),
`ring_otp_view` (a ring one-time pad: the negative control) and `fresh_mix` (GELO-style mixing).
"""

import math
import os

import torch

RING_BITS = 50  # the one-time pad's ring is Z / 2^50: float64 GEMMs on it stay exact for short sums
FRACTION_BITS = 16  # fixed-point scale of the values encoded into the ring


# ---------------------------------------------------------------- helpers


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(dtype=torch.float64, device="cpu")


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-300)


def _generator() -> torch.Generator:
    """A fresh generator seeded from the OS: masks are never reproducible from the code."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def _top_directions(t: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k right singular vectors of t, as rows (k, d)."""
    if k <= 0:
        return t.new_zeros((0, t.shape[1]))
    _, _, vh = torch.linalg.svd(t, full_matrices=False)
    return vh[:k]


def _project_out(t: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    return t - (t @ directions.T) @ directions


def _haar_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # the sign fix that makes Q Haar-distributed


# ---------------------------------------------------------------- attacks


def nearest_embedding_recovery(
    received: torch.Tensor, embed: torch.Tensor, true_ids: torch.Tensor, top=(1, 5), centre: bool = False
) -> dict:
    """Fraction of received rows whose true token is among the `top` table rows of largest |cos|."""
    rows, table = _f64(received), _f64(embed)
    if centre:
        mean = table.mean(dim=0)
        rows, table = rows - mean, table - mean
    scores = (_unit_rows(rows) @ _unit_rows(table).T).abs()
    best = scores.topk(max(top), dim=1).indices
    hit = best == true_ids.reshape(-1, 1).to(best.device)
    out = {f"top{k}": hit[:, :k].any(dim=1).double().mean().item() for k in top}
    out.update({f"chance_top{k}": k / table.shape[0] for k in top})
    out["n"] = rows.shape[0]
    return out


def remove_top_directions(received: torch.Tensor, k: int) -> torch.Tensor:
    """Received rows with their top-k right singular directions projected out (k = 0: unchanged)."""
    rows = _f64(received)
    return _project_out(rows, _top_directions(rows, k))


def recovery_after_svd(
    received: torch.Tensor, embed: torch.Tensor, true_ids: torch.Tensor, ks=(0, 1, 2), top=(1, 5)
) -> dict:
    """Nearest-embedding recovery after removing the top k directions, for each k; the best k wins.

    The same directions are projected out of the table, so the true token's row still matches.
    """
    rows, table = _f64(received), _f64(embed)
    by_k = {}
    for k in ks:
        directions = _top_directions(rows, k)
        by_k[k] = nearest_embedding_recovery(
            _project_out(rows, directions), _project_out(table, directions), true_ids, top=top
        )
    best_k = max(by_k, key=lambda k: (by_k[k][f"top{top[0]}"], -k))
    return {**by_k[best_k], "best_k": best_k, "by_k": by_k}


def max_abs_cosine(received: torch.Tensor, plaintext: torch.Tensor, centre: bool = True) -> dict:
    """Max over received rows and plaintext rows of |cos|: raw, and after removing top 2 directions.

    Centring subtracts each row's own mean (a ring view's values all sit near 2^(k-1)).
    """
    a, b = _f64(received), _f64(plaintext)
    if centre:
        a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    worst = lambda x, y: (_unit_rows(x) @ _unit_rows(y).T).abs().max().item()
    return {
        "max_abs_cos": worst(a, b),
        "max_abs_cos_svd2": worst(remove_top_directions(a, 2), remove_top_directions(b, 2)),
    }


def expected_max_abs_cos(pairs: int, d: int) -> float:
    """Typical max of |cos| over `pairs` independent random pairs in d dimensions: √(2 ln(2·pairs) / d)."""
    return math.sqrt(2 * math.log(2 * pairs) / d)


def run_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """|Pearson correlation| over all entries of two received tensors of one prompt sent twice."""
    x, y = _f64(a).flatten(), _f64(b).flatten()
    x, y = x - x.mean(), y - y.mean()
    return (x @ y / (x.norm() * y.norm()).clamp_min(1e-300)).abs().item()


def averaging_attack(looks: list, embed: torch.Tensor, true_ids: torch.Tensor, top=(1, 5)) -> dict:
    """Average several received looks at one activation, then read the tokens off the mean."""
    mean = torch.stack([_f64(look) for look in looks]).mean(dim=0)
    return {**nearest_embedding_recovery(mean, embed, true_ids, top=top), "looks": len(looks)}


def fast_ica(mixed: torch.Tensor, iterations: int = 200, tol: float = 1e-6) -> torch.Tensor:
    """Symmetric FastICA with the tanh nonlinearity: (K, n) mixed signals -> (K, n) unit-variance sources.

    The n columns are the samples (here the d features of the hidden states), the K rows the signals.
    """
    x = _f64(mixed)
    x = x - x.mean(dim=1, keepdim=True)
    eigenvalues, eigenvectors = torch.linalg.eigh(x @ x.T / x.shape[1])
    keep = eigenvalues > eigenvalues.max() * 1e-12
    whiten = eigenvectors[:, keep].T / eigenvalues[keep].sqrt().reshape(-1, 1)
    z = whiten @ x
    w = _symmetric_decorrelation(torch.randn(z.shape[0], z.shape[0], generator=_generator(), dtype=torch.float64))
    for _ in range(iterations):
        g = torch.tanh(w @ z)
        w_new = _symmetric_decorrelation(g @ z.T / z.shape[1] - (1 - g**2).mean(dim=1, keepdim=True) * w)
        converged = (torch.diagonal(w_new @ w.T).abs() - 1).abs().max().item() < tol
        w = w_new
        if converged:
            break
    return w @ z


def _symmetric_decorrelation(w: torch.Tensor) -> torch.Tensor:
    """(W Wᵀ)^(-1/2) W: the rows made orthonormal without favouring any of them."""
    eigenvalues, eigenvectors = torch.linalg.eigh(w @ w.T)
    return eigenvectors @ torch.diag(eigenvalues.clamp_min(1e-300).rsqrt()) @ eigenvectors.T @ w


def _block_report(components: torch.Tensor, embed: torch.Tensor, true_ids: torch.Tensor) -> dict:
    """How well K components match a block's K tokens, by |cos| with the table rows.

    top1: fraction of components whose nearest table row is one of the block's tokens (lenient: any
    vector in the block's span has that, un-mixed or not); distinct: fraction of the block's distinct
    tokens that are some component's nearest row; separation: mean over components of the largest
    |cos| with a true row (1 when every component is one token, about 0.5 for a random mix of 16).
    """
    cos = _unit_rows(_f64(components)) @ _unit_rows(_f64(embed)).T
    nearest = cos.abs().argmax(dim=1)
    truth = torch.unique(true_ids)
    return {
        "top1": torch.isin(nearest, truth).double().mean().item(),
        "distinct": torch.isin(truth, nearest).double().mean().item(),
        "separation": cos[:, truth].abs().max(dim=1).values.mean().item(),
    }


def ica_attack(received_block: torch.Tensor, embed: torch.Tensor, true_ids_block: torch.Tensor) -> dict:
    """Un-mix one received K×d block by FastICA, then match each component to the table (|cos|: sign free).

    Reports `_block_report` for the ICA components and, as the baseline ICA has to beat, for the
    received rows themselves (`received_*`). Chance for top1 is K/V.
    """
    k = received_block.shape[0]
    ica = _block_report(fast_ica(received_block), embed, true_ids_block)
    raw = _block_report(received_block, embed, true_ids_block)
    return {**ica, **{f"received_{key}": v for key, v in raw.items()}, "chance_top1": k / embed.shape[0], "k": k}


def subspace_attack(received_block: torch.Tensor, embed: torch.Tensor, true_ids_block: torch.Tensor) -> dict:
    """Rank the table rows by the share of their energy inside the row space of one received block.

    Returns `recall`: the fraction of the block's distinct true tokens among the top-K rows (the bag
    of tokens, order unknown), and the share of energy in the span for true and other rows.
    """
    rows, table = _f64(received_block), _f64(embed)
    basis = _top_directions(rows, torch.linalg.matrix_rank(rows).item())
    share = ((table @ basis.T).norm(dim=1) / table.norm(dim=1).clamp_min(1e-300)) ** 2
    truth = torch.unique(true_ids_block)
    guess = share.topk(rows.shape[0]).indices
    others = torch.ones_like(share, dtype=torch.bool)
    others[truth] = False
    return {
        "recall": torch.isin(truth, guess).double().mean().item(),
        "chance": rows.shape[0] / table.shape[0],
        "share_true_min": share[truth].min().item(),
        "share_other_max": share[others].max().item(),
    }


# ---------------------------------------------------------------- the views a server receives


def seed_rank_one_mix(x: torch.Tensor) -> torch.Tensor:
    """The seed's "ours" linear mask over tokens, M·X = D·X + α(βᵀX), M = D + αβᵀ fresh for this call.

    The seed gives no distributions; taken here: D's diagonal log-uniform in [1/2, 2] with random
    signs, α and β standard normal (M is invertible unless 1 + βᵀD⁻¹α = 0, probability zero).
    """
    x, gen = _f64(x), _generator()
    t = x.shape[0]
    d = torch.exp(math.log(2) * (2 * torch.rand(t, generator=gen, dtype=torch.float64) - 1))
    d = d * (2 * torch.randint(0, 2, (t,), generator=gen) - 1)
    alpha = torch.randn(t, 1, generator=gen, dtype=torch.float64)
    beta = torch.randn(t, 1, generator=gen, dtype=torch.float64)
    return d.reshape(-1, 1) * x + alpha @ (beta.T @ x)


def seed_gaussian_pad(x: torch.Tensor, sigma_ratio: float) -> torch.Tensor:
    """The seed's OTP in floats, X − R, with R Gaussian of σ = sigma_ratio × RMS(X), fresh per call."""
    x = _f64(x)
    sigma = sigma_ratio * x.pow(2).mean().sqrt()
    return x - sigma * torch.randn(x.shape, generator=_generator(), dtype=torch.float64)


def ring_otp_view(x: torch.Tensor, bits: int = RING_BITS, fraction_bits: int = FRACTION_BITS) -> torch.Tensor:
    """What the server sees under a ring one-time pad: (encode(X) + R) mod 2^bits, R uniform; as float64.

    encode(X) = round(X · 2^fraction_bits); the view is uniform on [0, 2^bits) whatever X is.
    """
    encoded = torch.round(_f64(x) * 2.0**fraction_bits).to(torch.int64)
    pad = torch.randint(0, 2**bits, x.shape, generator=_generator(), dtype=torch.int64)
    return torch.remainder(encoded + pad, 2**bits).to(torch.float64)


def fresh_mix(x: torch.Tensor, block: int = 16, cond: float = 4) -> torch.Tensor:
    """A fresh dense invertible mix per block of `block` rows: A = U diag(σ) Vᵀ, U, V Haar, σ log-uniform.

    σ spans [1/√cond, √cond], so A's condition number is at most `cond` (cond = 4: σ in [1/2, 2]).
    """
    x, gen = _f64(x), _generator()
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], block):
        n = min(block, x.shape[0] - start)
        log_sigma = 0.5 * math.log(cond) * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
        a = _haar_orthogonal(n, gen) @ torch.diag(torch.exp(log_sigma)) @ _haar_orthogonal(n, gen).T
        out[start : start + n] = a @ x[start : start + n]
    return out
