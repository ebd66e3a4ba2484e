"""The privacy modes' math, in process: tsqp.ring (exact ring GEMM) and tee_client.masking (pads, mixing).

References are plain float64 torch products or Python-int products, never the code under test.
"""

import math

import numpy as np
import pytest
import torch

from tee_client.masking import Csprng, Mixer, Otp, PadBook, random_mixing
from tsqp.ring import WEIGHT_BITS, RingSpec, fixed_weight, model_ring, pow2_exponent, ring_linear, ring_spec

GEN = torch.Generator().manual_seed(1234)  # test data only; pads and mixing use Csprng


def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN, dtype=torch.float64) * std


def ring_product_ref(u: torch.Tensor, wq: torch.Tensor, ring_bits: int) -> torch.Tensor:
    """u·Wqᵀ mod 2^k with Python ints (numpy object arrays): no float, no int64 overflow."""
    u_obj = np.array(u.tolist(), dtype=object)
    wq_obj = np.array(wq.long().tolist(), dtype=object)
    return torch.tensor(((u_obj @ wq_obj.T) % (1 << ring_bits)).tolist(), dtype=torch.int64)


def chi2_uniform(values: torch.Tensor, bins: int) -> float:
    counts = torch.bincount(values.flatten(), minlength=bins).double()
    expected = values.numel() / bins
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_LIMIT_255 = 400.0  # 255 degrees of freedom: mean 255, sd 22.6; 400 has p < 1e-9


# -- tsqp.ring ---------------------------------------------------------------------------------------------------


def test_pow2_exponent_is_the_largest_that_fits():
    amax = torch.tensor([1.0, 0.75, 2.0**19 - 1, 2.0**19, 3e-8, 1e-40, 123456.789, 0.0], dtype=torch.float64)
    limit = 2.0 ** (WEIGHT_BITS - 1) - 1
    for a, e in zip(amax.tolist(), pow2_exponent(amax, WEIGHT_BITS).tolist(), strict=True):
        if a == 0:
            assert e == 0
        else:
            assert math.ldexp(a, e) <= limit < math.ldexp(a, e + 1)


def test_fixed_weight_against_float_math():
    w = randn(40, 96, std=0.05)
    w[3] = 0.0  # an all-zero row
    w[5, 7] = 40.0  # a row with an outlier
    fw = fixed_weight(w)
    assert fw.wq.dtype == torch.float64 and torch.equal(fw.wq, fw.wq.round())
    scale = 2.0 ** fw.exp.double()[:, None]
    assert (w * scale - fw.wq).abs().max() <= 0.5  # round to nearest at scale 2^e_j
    assert torch.equal(fw.wq[3], torch.zeros(96, dtype=torch.float64))
    row_max = fw.wq.abs().amax(dim=1)
    nonzero = row_max > 0
    assert (row_max <= 2 ** (WEIGHT_BITS - 1) - 1).all()
    assert (row_max[nonzero] >= 2 ** (WEIGHT_BITS - 2)).all()  # the scale uses the whole range
    l1 = fw.wq.abs().sum(dim=1).max().item()
    assert l1 < 2**fw.l1_bits and l1 >= 2 ** (fw.l1_bits - 1)
    assert torch.equal(fixed_weight(w.float()).wq, fixed_weight(w.float().double()).wq)
    with pytest.raises(ValueError):
        fixed_weight(torch.tensor([[1.0, float("nan")]]))


def test_l1_bits_is_strict_at_a_power_of_two():
    top = 2.0 ** (WEIGHT_BITS - 1) - 1
    fw = fixed_weight(torch.tensor([[top, -top, 2.0]], dtype=torch.float64))  # e = 0: Σ|Wq| = 2^WEIGHT_BITS exactly
    assert fw.exp.tolist() == [0]
    assert fw.l1_bits == WEIGHT_BITS + 1


@pytest.mark.parametrize("n, m, rows", [(64, 48, 5), (576, 32, 4), (1536, 24, 3), (14336, 8, 2)])
def test_ring_linear_is_exact_for_uniform_u(n, m, rows):
    fw = fixed_weight(randn(m, n, std=0.05))
    spec = ring_spec(fw.l1_bits)
    u = Csprng().ring((rows, n), spec.ring_bits)
    y = ring_linear(u, fw, spec)
    assert y.dtype == torch.int64 and y.shape == (rows, m)
    assert torch.equal(y, ring_product_ref(u, fw.wq, spec.ring_bits))
    assert torch.equal(ring_linear(u.reshape(1, rows, n), fw, spec), y.reshape(1, rows, m))


@pytest.mark.parametrize("n", [64, 576, 1536, 14336])
def test_ring_linear_worst_case_stays_exact(n):
    """Every u at 2^k - 1 and every Wq at the weight limit: the largest partial sums the limb GEMMs can meet."""
    top = 2 ** (WEIGHT_BITS - 1) - 1
    signs = torch.where(randn(3, n) > 0, 1.0, -1.0).double()
    signs[0] = 1.0
    signs[1] = -1.0
    fw = fixed_weight(signs * top)
    assert fw.exp.tolist() == [0, 0, 0] and fw.wq.abs().min() == top
    h = 53 - fw.l1_bits  # the widest limb the bound allows
    spec = RingSpec(2 * h, h)
    if n < 14336:
        assert spec == ring_spec(fw.l1_bits)
    else:  # exact, but it would leave too few bits for the activations
        with pytest.raises(ValueError):
            ring_spec(fw.l1_bits)
    k = spec.ring_bits
    l1_max = n * top
    assert l1_max < 2**fw.l1_bits
    assert (2**h - 1) * l1_max < 2**53 and (2 ** (k - h) - 1) * l1_max < 2**53  # largest |partial sum| per limb
    u = torch.full((2, n), 2**k - 1, dtype=torch.int64)
    assert torch.equal(ring_linear(u, fw, spec), ring_product_ref(u, fw.wq, k))


def test_ring_linear_refuses_what_it_cannot_do_exactly():
    fw = fixed_weight(randn(8, 576, std=0.05))
    spec = ring_spec(fw.l1_bits)
    u = Csprng().ring((2, 576), spec.ring_bits)
    with pytest.raises(ValueError):
        ring_linear(u.int(), fw, spec)
    with pytest.raises(ValueError):
        ring_linear(u[:, :-1], fw, spec)
    with pytest.raises(ValueError):  # one limb bit too many for these weights
        ring_linear(u, fw, RingSpec(spec.ring_bits + 2, spec.limb_bits + 1))
    with pytest.raises(ValueError):
        ring_linear(u, fw, RingSpec(64, 32))


def test_model_ring_is_exact_for_every_matrix():
    fws = [fixed_weight(randn(m, n, std=0.05)) for m, n in [(96, 576), (1536, 576), (576, 1536)]]
    spec = model_ring(fws)
    for fw in fws:
        spec.check(fw)
        assert spec.limb_bits + fw.l1_bits <= 53
    assert spec == ring_spec(max(fw.l1_bits for fw in fws)) and spec.ring_bits <= 62


# -- otp -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    """Float64 weights of one small layer, its fixed-point copy, and the ring they share."""
    w = {
        "q_proj": randn(576, 576, std=0.05),
        "k_proj": randn(192, 576, std=0.05),
        "v_proj": randn(192, 576, std=0.15),
        "down_proj": randn(576, 1536, std=0.02),
    }
    w["k_proj"][17] = 0.0  # an all-zero output row
    fws = {name: fixed_weight(t) for name, t in w.items()}
    return w, fws, model_ring(fws.values())


def activations(rows: int, n: int) -> torch.Tensor:
    x = randn(rows, n)
    x[1] *= 250.0  # |x| up to ~1e3
    x[2] *= 1e-6  # tiny
    x[3] = 0.0
    x[4, 11] = 1000.0  # one outlier in an ordinary row
    return x.float()


def assert_rows_close(y: torch.Tensor, ref: torch.Tensor, rtol: float):
    err = (y.double() - ref).norm(dim=-1)
    assert (err <= rtol * ref.norm(dim=-1) + 1e-30).all(), (err / ref.norm(dim=-1)).max()


def test_otp_round_trip(model):
    w, fws, spec = model
    otp = Otp(fws, spec, Csprng())
    x = activations(7, 576)
    bias = randn(576).float()
    pad = otp.pad(9, ["q_proj", "k_proj", "v_proj"])  # planned for 9 rows, used for 7
    u, x_exp = otp.mask(x.reshape(1, 7, 576), pad)
    assert u.shape == (1, 7, 576) and u.dtype == torch.int64
    for name in ["q_proj", "k_proj", "v_proj"]:
        y_u = ring_linear(u, fws[name], spec)  # what the server runs
        b = bias[: w[name].shape[0]] if name == "q_proj" else None
        y = otp.unmask(y_u, pad, name, x_exp, bias=b)
        ref = x.double() @ w[name].T + (b.double() if b is not None else 0.0)
        assert y.dtype == torch.float32 and y.shape == (1, 7, w[name].shape[0])
        assert_rows_close(y[0], ref, 1e-5)
        assert (y[0, 3] == (b if b is not None else 0.0)).all()  # the zero row of x


def test_otp_zero_weight_row_and_down_proj(model):
    w, fws, spec = model
    otp = Otp(fws, spec, Csprng())
    x = activations(6, 576)
    pad = otp.pad(6, ["k_proj"])
    u, x_exp = otp.mask(x, pad)
    y = otp.unmask(ring_linear(u, fws["k_proj"], spec), pad, "k_proj", x_exp)
    assert (y[:, 17] == 0).all()
    assert_rows_close(y, x.double() @ w["k_proj"].T, 1e-5)
    h = activations(5, 1536)
    pad = otp.pad(5, ["down_proj"])
    u, x_exp = otp.mask(h, pad)
    y = otp.unmask(ring_linear(u, fws["down_proj"], spec), pad, "down_proj", x_exp)
    assert_rows_close(y, h.double() @ w["down_proj"].T, 1e-5)


def test_otp_decodes_the_largest_products():
    """Constant rows of x against rows of the largest Wq: |xq·Wqᵀ| comes within 0.1% of 2^(k-1), the lift's limit."""
    top = 2 ** (WEIGHT_BITS - 1) - 1
    w = torch.full((2, 1024), float(top), dtype=torch.float64)
    w[1] *= -1
    fws = {"w": fixed_weight(w)}
    spec = model_ring(fws.values())
    otp = Otp(fws, spec, Csprng())
    x = torch.tensor([[3.0] * 1024, [-3.0] * 1024, [1e-3] * 1024])
    pad = otp.pad(3, ["w"])
    u, x_exp = otp.mask(x, pad)
    y = otp.unmask(ring_linear(u, fws["w"], spec), pad, "w", x_exp)
    xq_max = 2 ** (spec.ring_bits - fws["w"].l1_bits - 1) - 1
    assert xq_max * 1024 * top > 0.999 * 2 ** (spec.ring_bits - 1)
    assert_rows_close(y, x.double() @ w.T, 1e-5)


def test_otp_refuses_bad_input(model):
    _, fws, spec = model
    otp = Otp(fws, spec, Csprng())
    for bad in [float("nan"), float("inf")]:
        x = randn(2, 576).float()
        x[1, 5] = bad
        with pytest.raises(ValueError):
            otp.mask(x, otp.pad(2, ["q_proj"]))
    with pytest.raises(ValueError):  # more rows than planned
        otp.mask(randn(3, 576).float(), otp.pad(2, ["q_proj"]))
    with pytest.raises(ValueError):  # one x for two widths
        otp.pad(2, ["q_proj", "down_proj"])
    with pytest.raises(ValueError):  # a ring too wide for the down projection
        Otp(fws, ring_spec(fws["q_proj"].l1_bits - 1), Csprng())


def test_masked_activations_are_uniform_and_fresh(model):
    _, fws, spec = model
    otp = Otp(fws, spec, Csprng())
    k = spec.ring_bits
    rows = 512
    inputs = {"zeros": torch.zeros(rows, 576), "huge": torch.full((rows, 576), 1e30), "random": activations(rows, 576)}
    for label, x in inputs.items():
        u1, _ = otp.mask(x, otp.pad(rows, ["q_proj"]))
        u2, _ = otp.mask(x, otp.pad(rows, ["q_proj"]))
        assert u1.min() >= 0 and u1.max() < 2**k
        assert chi2_uniform(u1 >> (k - 8), 256) < CHI2_LIMIT_255, label  # top byte
        assert chi2_uniform(u1 & 255, 256) < CHI2_LIMIT_255, label  # low byte
        assert (u1 == u2).float().mean() < 1e-4, label  # the same x never looks the same twice
    # independence of x: the top byte of u does not depend on the sign of x
    x = activations(rows, 576)
    u, _ = otp.mask(x, otp.pad(rows, ["q_proj"]))
    for part in [x > 0, x <= 0]:
        assert chi2_uniform(u[part] >> (k - 8), 256) < CHI2_LIMIT_255


def test_pads_are_handed_out_once(model):
    _, fws, spec = model
    otp = Otp(fws, spec, Csprng())
    qkv = ("q_proj", "k_proj", "v_proj")
    plan = [(("Linear", layer, "qkv"), 8, qkv) for layer in range(3)] + [(("Linear", 0, "down"), 8, ["down_proj"])]
    book, other = PadBook(otp, plan), PadBook(otp, plan)
    assert len(book) == 4
    pads = {key: book.take(key) for key, _, _ in plan}
    assert len(book) == 0
    for key, _, _ in plan:
        with pytest.raises(KeyError):
            book.take(key)
    rs = [pad.r for pad in pads.values()] + [other.take(key).r for key, _, _ in plan]
    values = torch.cat([r.flatten() for r in rs])
    assert values.unique().numel() == values.numel()  # no two pads, in one book or two, share an r value
    with pytest.raises(ValueError):
        PadBook(otp, plan[:1] * 2)

    pad = pads[plan[0][0]]
    u, x_exp = otp.mask(randn(8, 576).float(), pad)
    assert pad.r is None
    with pytest.raises(ValueError):  # a pad masks one x only
        otp.mask(randn(8, 576).float(), pad)
    otp.unmask(ring_linear(u, fws["q_proj"], spec), pad, "q_proj", x_exp)
    with pytest.raises(ValueError):  # and unmasks each product once
        otp.unmask(ring_linear(u, fws["q_proj"], spec), pad, "q_proj", x_exp)
    with pytest.raises(ValueError):  # a product it was not drawn for
        otp.unmask(ring_linear(u, fws["q_proj"], spec), pad, "down_proj", x_exp)


def test_csprng_streams_differ_and_are_uniform():
    a, b = Csprng(), Csprng()
    ra, rb = a.ring((4096,), 50), b.ring((4096,), 50)
    assert not torch.equal(ra, rb) and (ra == rb).sum() == 0
    assert ra.min() >= 0 and ra.max() < 2**50 and ra.max() >= 2**49
    assert chi2_uniform(a.ring((200_000,), 62) >> 54, 256) < CHI2_LIMIT_255
    uni = a.uniform((200_000,))
    assert uni.min() >= 0 and uni.max() < 1 and abs(uni.mean() - 0.5) < 0.005
    z = a.normal((200_000,))
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02 and abs(((z**4).mean() - 3)) < 0.1
    with pytest.raises(ValueError):
        a.ring((4,), 64)


# -- mix -----------------------------------------------------------------------------------------------------------


def test_random_mixing_is_invertible_well_conditioned_and_not_orthogonal():
    a, a_inv = random_mixing(Csprng(), 64, 16, 4.0)
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.allclose(a @ a_inv, eye.expand(64, 16, 16), atol=1e-12)
    sv = torch.linalg.svdvals(a)
    assert sv.min() >= 0.5 * (1 - 1e-12) and sv.max() <= 2.0 * (1 + 1e-12)
    assert (torch.linalg.cond(a) <= 4.0 * (1 + 1e-9)).all()
    assert ((a.mT @ a - eye).norm(dim=(-2, -1)) > 0.1).all()
    assert not torch.allclose(a[0], a[1])


@pytest.mark.parametrize("shape", [(37, 576), (2, 37, 576), (16, 576), (5, 576), (33, 576)])
def test_mix_round_trip(shape):
    mixer = Mixer(Csprng())
    x = randn(*shape).float()
    w = randn(300, 576, std=0.05).float()
    mixed, key = mixer.mix(x)
    assert mixed.shape == x.shape and mixed.dtype == torch.float32
    assert (mixed - x).norm() > 0.1 * x.norm()
    y = mixer.unmix(mixed @ w.T, key)  # the server's float32 product
    assert y.shape == (*shape[:-1], 300) and y.dtype == torch.float32
    ref = x.double() @ w.double().T
    assert_rows_close(y.reshape(-1, 300), ref.reshape(-1, 300), 1e-5)
    with pytest.raises(ValueError):  # a key serves once
        mixer.unmix(mixed @ w.T, key)


def test_mix_blocks_are_fresh_full_size_and_not_orthogonal():
    mixer = Mixer(Csprng(), block=16, cond=4.0)
    x = torch.eye(37, 64)  # A·[I | 0] = [A | 0] shows the block-diagonal A itself
    mixed, key = mixer.mix(x)
    mixed_again, _ = mixer.mix(x)
    assert not torch.allclose(mixed, mixed_again)
    a = mixed[:, :37].double()
    assert (a[:16, 16:] == 0).all() and (a[16:, :16] == 0).all() and (mixed[:, 37:] == 0).all()
    assert (a[16:, 16:] != 0).all()  # the 5 spare rows join the last block: 21×21, not 16 + 5
    for block in [a[:16, :16], a[16:, 16:]]:
        assert (block.T @ block - torch.eye(len(block), dtype=torch.float64)).norm() > 0.1
        assert torch.linalg.cond(block) <= 4.0 * (1 + 1e-5)
    with pytest.raises(ValueError):  # rows must match the mix
        mixer.unmix(torch.zeros(36, 8), key)
