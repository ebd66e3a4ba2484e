"""The Freivalds checks in-process: honest products pass in every dtype, one changed element fails,
and the secrets drawn ahead serve one call each and are new every forward."""

import pytest
import torch

from tee_client.masking import Csprng
from tee_client.model import rms_norm
from tee_client.verify import BLOCK, RING_R_BITS, IntegrityError, Verifier, ring_block_sums, ring_digits, ring_product
from tsqp.checkpoint import load_checkpoint
from tsqp.engine import Engine
from tsqp.ring import RingSpec, fixed_weight, model_ring, ring_linear

QKV = {"layer": 1, "names": ["q_proj", "k_proj", "v_proj"]}
GATE_UP = ["gate_proj", "up_proj"]


@pytest.fixture(scope="module")
def engines(checkpoints):
    folder = checkpoints("mqa-tied-bias")  # biases on every projection
    return {
        dtype: Engine(load_checkpoint(folder, dtype, torch.device("cpu")))
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    }


def activations(rows: int, width: int, dtype) -> torch.Tensor:
    x = torch.randn(rows, width) * 3
    x[0] *= 10  # an outlier row (float16 overflows past 65504)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_honest_linear_and_matmul_replies_pass_and_one_changed_element_fails(engines, dtype):
    engine = engines[dtype]
    verifier = Verifier(Engine(engine.ckpt))
    x = activations(40, 64, dtype)
    x[3] = 0  # a row of zeros: its products are the biases alone
    args = QKV
    ys = engine.linear(1, args["names"], x)
    for _ in range(20):  # honest: never fails, whatever r is drawn
        verifier.check("Linear", args, [x], ys)
    # attention as a prefill sends it: 3 query heads per kv head, broadcast; 40 keys (not whole blocks of 32)
    q, k, v = (activations(2 * n * 40, 16, dtype).view(1, 2, n, 40, 16) for n in (3, 1, 1))
    scores = engine.matmul(q, k, transpose_b=True)
    probs = torch.softmax(scores.float(), dim=-1).to(dtype)
    out = engine.matmul(probs, v)
    for _ in range(20):
        verifier.check("Matmul", {"transpose_b": True}, [q, k], [scores])
        verifier.check("Matmul", {}, [probs, v], [out])

    for what, (method, margs, sent, got) in {
        "Linear": ("Linear", args, [x], ys),
        "Matmul": ("Matmul", {"transpose_b": True}, [q, k], [scores]),
        "Matmul ": ("Matmul", {}, [probs, v], [out]),  # P·V
    }.items():
        wrong = [t.clone() for t in got]
        flat = wrong[0].view(-1)
        flat[flat.numel() // 3] += flat.float().square().mean().sqrt().to(dtype)  # one element, by the RMS
        with pytest.raises(IntegrityError, match=what.strip()):
            verifier.check(method, margs, sent, wrong)
        flat[flat.numel() // 3] = float("nan")  # a reply cannot hide behind NaN either
        with pytest.raises(IntegrityError, match=what.strip()):
            verifier.check(method, margs, sent, wrong)
        if dtype != torch.float16:  # past float16's range; bfloat16's reaches 3e38
            # nor behind a value whose square overflows float32: a tolerance taken from ‖r∘y‖ would be inf
            flat[flat.numel() // 3] = 1e20
            with pytest.raises(IntegrityError, match=what.strip()):
                verifier.check(method, margs, sent, wrong)


def test_ring_replies_are_checked_exactly(engines):
    engine = engines[torch.float32]
    weight = engine.module(0, "gate_proj").weight
    spec = model_ring([fixed_weight(weight)])
    u = Csprng().ring((24, weight.shape[1]), spec.ring_bits)
    y = ring_linear(u, fixed_weight(weight), spec)
    verifier = Verifier(Engine(engine.ckpt))
    args = {"layer": 0, "names": ["gate_proj"], "ring_bits": spec.ring_bits, "limb_bits": spec.limb_bits}
    verifier.check("LinearRing", args, [u], [y])
    for change in (1, 2, 1 << (spec.ring_bits - 1)):  # the smallest, an even one, the largest
        wrong = y.clone()
        wrong[5, 7] = (wrong[5, 7] + change) & ((1 << spec.ring_bits) - 1)
        with pytest.raises(IntegrityError, match="LinearRing layer 0 gate_proj"):
            verifier.check("LinearRing", args, [u], [wrong])


def test_embedding_rows_must_equal_the_clients_own_table(engines):
    engine = engines[torch.bfloat16]
    verifier = Verifier(Engine(engine.ckpt))
    ids = torch.tensor([[3, 9, 27]])
    rows = engine.embedding(ids)
    verifier.check("Embedding", {}, [ids], [rows])
    for wrong in (rows[:, :2], rows[..., :-1]):  # a row short, a column short
        with pytest.raises(IntegrityError, match="Embedding: reply of shape"):
            verifier.check("Embedding", {}, [ids], [wrong])
    rows[0, 1, 2] += 1
    with pytest.raises(IntegrityError, match="Embedding"):
        verifier.check("Embedding", {}, [ids], [rows])


def test_prepared_secrets_serve_one_call_each_and_are_new_every_forward(engines):
    engine = engines[torch.float32]
    verifier = Verifier(Engine(engine.ckpt))
    x = activations(40, 64, torch.float32)
    ys = engine.linear(1, QKV["names"], x)
    a, b = activations(80, 16, torch.float32).view(2, 40, 16), activations(80, 16, torch.float32).view(2, 40, 16)
    scores = engine.matmul(a, b, transpose_b=True)
    verifier.check("Linear", QKV, [x], ys)  # the first forward: drawn on the spot
    verifier.check("Matmul", {"transpose_b": True}, [a, b], [scores])
    key = ("float", tuple((1, name) for name in QKV["names"]))
    assert verifier.wanted == {key} and not verifier.ready

    verifier.prepare()  # the next forward's: drawn ahead, one per call the last forward made
    first = verifier.ready[key]
    assert verifier.pool.shape == (scores.shape[-1],)
    verifier.check("Linear", QKV, [x], ys)
    assert key not in verifier.ready  # taken: it serves this one call
    verifier.check("Linear", QKV, [x], ys)  # the same call again in this forward: a fresh draw, still checked
    verifier.check("Matmul", {"transpose_b": True}, [a, b], [scores])
    verifier.check("Matmul", {"transpose_b": True}, [a, b], [scores])  # past the pool: fresh values
    assert verifier.pool_used == 2 * scores.shape[-1]

    verifier.prepare()
    second = verifier.ready[key]
    assert all(not torch.equal(r1, r2) for r1, r2 in zip(first.rs, second.rs, strict=True))
    verifier.prepare()  # what a forward left unused is dropped, never handed out again
    assert verifier.ready[key] is not second
    wrong = [y.clone() for y in ys]
    wrong[2][7, 3] += wrong[2].square().mean().sqrt()
    with pytest.raises(IntegrityError, match="Linear layer 1 v_proj"):  # a prepared secret catches it too
        verifier.check("Linear", QKV, [x], wrong)


def test_float32_replies_are_caught_at_a_twentieth_of_the_rms(engines):
    engine = engines[torch.float32]
    verifier = Verifier(Engine(engine.ckpt))
    x = activations(40, 64, torch.float32)
    args = {"layer": 0, "names": ["gate_proj", "up_proj"]}
    for row in (0, 5, 39):
        for module in range(2):
            verifier.prepare()
            ys = engine.linear(0, args["names"], x)
            ys[module][row, 11] += ys[module][row].square().mean().sqrt() / 20
            with pytest.raises(IntegrityError, match=f"Linear layer 0 {args['names'][module]}"):
                verifier.check("Linear", args, [x], ys)


def test_a_reply_that_does_not_fit_or_that_nothing_checks_fails_cleanly(engines):
    engine = engines[torch.float32]
    verifier = Verifier(Engine(engine.ckpt))
    x = activations(8, 64, torch.float32)
    ys = engine.linear(1, QKV["names"], x)
    for wrong in ([ys[0][:, :-1], *ys[1:]], ys[:2], [ys[0][:-1], *ys[1:]]):
        with pytest.raises(IntegrityError, match="Linear layer 1"):
            verifier.check("Linear", QKV, [x], wrong)
    a, b = activations(80, 16, torch.float32).view(2, 40, 16), activations(80, 16, torch.float32).view(2, 40, 16)
    scores = engine.matmul(a, b, transpose_b=True)
    for wrong in (scores[:, :-1], scores[:, :, :-1], scores[:1], scores[..., None]):  # a row, a column, a head short
        with pytest.raises(IntegrityError, match="Matmul: reply of shape"):
            verifier.check("Matmul", {"transpose_b": True}, [a, b], [wrong])
    with pytest.raises(IntegrityError, match="Residual layer 0 o_proj .h.: 1 results for 2 modules"):
        verifier.check("Residual", {"layer": 0, "out": "o_proj", "names": ["gate_proj"]}, [x, x], ys[:1])
    with pytest.raises(IntegrityError, match="Residual layer 0: --verify checks a Residual reply in float32 only"):
        half = Verifier(Engine(engines[torch.float16].ckpt))
        half.check("Residual", {"layer": 0, "out": "o_proj", "names": ["gate_proj"]}, [x.half(), x.half()], ys[:2])


def test_residual_replies_pass_and_a_wrong_residual_stream_or_product_fails(checkpoints):
    """Residual (a forward's two calls per layer): h = x + a·W_outᵀ against [a, x]·[W_out, I]ᵀ, then the next
    modules' products of h ⊙ g against the reply's h; one element of either, moved by its tensor's RMS, fails."""
    engine = Engine(load_checkpoint(checkpoints("gqa"), torch.float32, torch.device("cpu")))  # no biases
    verifier = Verifier(Engine(engine.ckpt))
    x = activations(40, 64, torch.float32)
    x[3] = 0  # a row of zeros
    for args, width in (
        ({"layer": 0, "out": "o_proj", "names": GATE_UP}, 64),
        ({"layer": 0, "out": "down_proj", "names": QKV["names"]}, 112),  # feeds layer 1
    ):
        a = activations(40, width, torch.float32)
        ys = engine.residual(args["layer"], args["out"], args["names"], a, x)
        for _ in range(20):  # honest: never fails, whatever r is drawn
            verifier.check("Residual", args, [a, x], ys)
        names = [f"Residual layer 0 {args['out']}: the residual stream h"] + [
            f"Residual layer 0 {n}" for n in args["names"]
        ]
        for i, what in enumerate(names):
            wrong = [t.clone() for t in ys]
            flat = wrong[i].view(-1)
            flat[flat.numel() // 3] += flat.square().mean().sqrt()
            with pytest.raises(IntegrityError, match=what):
                verifier.check("Residual", args, [a, x], wrong)


def test_a_residual_reply_is_caught_at_a_twentieth_of_the_changed_rows_rms_in_h_and_in_every_product(checkpoints):
    """Each of a Residual reply's checks stands on its own tolerance: one element moved by a twentieth of its row's
    RMS fails, in h and in each product, in a typical row and in an outlier one (ten times the others' norm). The
    RMSNorm weights are made small, so that the products are small against the residual stream, as in SmolLM2:
    there a tolerance shared with the residual check, which grows with ‖a_i‖ and ‖x_i‖, let a product's error
    of several tenths of its row RMS through."""
    engine = Engine(load_checkpoint(checkpoints("gqa"), torch.float32, torch.device("cpu")))
    for norm in engine.attention_norms + engine.ffn_norms:
        norm.mul_(0.03)
    verifier = Verifier(Engine(engine.ckpt))
    x = activations(40, 64, torch.float32)
    for args, width in (
        ({"layer": 0, "out": "o_proj", "names": GATE_UP}, 64),
        ({"layer": 0, "out": "down_proj", "names": QKV["names"]}, 112),
    ):
        a = activations(40, width, torch.float32)
        ys = engine.residual(args["layer"], args["out"], args["names"], a, x)
        verifier.check("Residual", args, [a, x], ys)
        named = [f"{args['out']}: the residual stream h", *args["names"]]
        for i, what in enumerate(named):
            for row in (0, 5, 39):
                wrong = [t.clone() for t in ys]
                wrong[i][row, 11] += wrong[i][row].square().mean().sqrt() / 20
                with pytest.raises(IntegrityError, match=f"Residual layer 0 {what}"):
                    verifier.check("Residual", args, [a, x], wrong)


def test_a_residual_reply_cannot_hide_behind_a_row_whose_norm_overflows(checkpoints):
    """A row of h with one element of 1e20 has a float32 norm of inf: a tolerance taken from it would pass the row
    and everything else in it (and, through the next call's x, the next call's row too). It fails instead."""
    engine = Engine(load_checkpoint(checkpoints("gqa"), torch.float32, torch.device("cpu")))
    verifier = Verifier(Engine(engine.ckpt))
    x, a = activations(40, 64, torch.float32), activations(40, 64, torch.float32)
    args = {"layer": 0, "out": "o_proj", "names": GATE_UP}
    ys = engine.residual(0, "o_proj", GATE_UP, a, x)
    for planted in ([1e20] + [0.0] * 63, [1e19] * 64):  # one huge element; or modest ones whose squares add past
        wrong = [t.clone() for t in ys]
        wrong[0][5] = torch.tensor(planted)
        wrong[1][5] = torch.randn(wrong[1].shape[1]) * 1e3  # and any products
        with pytest.raises(IntegrityError, match=r"Residual layer 0 o_proj: values too large to check .* at \[5\]"):
            verifier.check("Residual", args, [a, x], wrong)


def test_the_next_residual_call_reuses_the_row_norms_of_the_h_a_check_passed_only_while_it_is_unchanged(checkpoints):
    """The h a Residual check passed goes back as the next call's x; its row norms are kept (a pass less), but only
    for that very memory, unwritten since: a copy, other rows, or a write in place get norms of their own."""
    engine = Engine(load_checkpoint(checkpoints("gqa"), torch.float32, torch.device("cpu")))
    verifier = Verifier(Engine(engine.ckpt))
    x, a = activations(40, 64, torch.float32), activations(40, 64, torch.float32)
    h, *products = engine.residual(0, "o_proj", GATE_UP, a, x)
    verifier.check("Residual", {"layer": 0, "out": "o_proj", "names": GATE_UP}, [a, x], [h, *products])
    kept = verifier.row_norms(h)
    assert torch.equal(kept, torch.linalg.vector_norm(h, dim=1))
    assert verifier.row_norms(h.view(40, 64)) is kept
    assert verifier.row_norms(h.clone()) is not kept and verifier.row_norms(h[1:]) is not kept
    a = activations(40, 112, torch.float32)
    ys = engine.residual(0, "down_proj", QKV["names"], a, h)
    verifier.check("Residual", {"layer": 0, "out": "down_proj", "names": QKV["names"]}, [a, h], ys)  # kept: passes
    after, kept = ys[0], verifier.row_norms(ys[0])
    after.mul_(3)
    fresh = verifier.row_norms(after)
    assert fresh is not kept and torch.equal(fresh, torch.linalg.vector_norm(after, dim=1))


@pytest.mark.parametrize("ring_bits, limb_bits, width", [(50, 25, 576), (62, 31, 64), (40, 20, 1536)])
def test_ring_arithmetic_is_exact(ring_bits, limb_bits, width):
    """U·Vᵀ mod 2^k and the block sums against Python's integers, for wide V (Wqᵀ·r) of either sign."""
    rng, spec, mask = Csprng(), RingSpec(ring_bits, limb_bits), (1 << ring_bits) - 1
    u = rng.ring((5, width), ring_bits)
    u[0, 0] = -1  # any int64 is read as its residue
    v = rng.ring((6, width), 33) - (1 << 32)  # |v| ≤ 2^32, what a block of 32 r_j < 2^8 times |Wq| < 2^19 reaches
    want = [[sum(int(a) * int(b) for a, b in zip(row, col, strict=True)) & mask for col in v] for row in u]
    assert ring_product(u, ring_digits(v, limb_bits), v.shape[0], spec).tolist() == want
    r = rng.ring((2 * BLOCK,), RING_R_BITS) | 1
    y = rng.ring((3, 2 * BLOCK), 63)  # any int64: read mod 2^k
    sums = [
        [
            sum((int(a) & mask) * int(b) for a, b in zip(row[i : i + BLOCK], r[i : i + BLOCK], strict=True)) & mask
            for i in (0, BLOCK)
        ]
        for row in y
    ]
    assert ring_block_sums(y, r, ring_bits).tolist() == sums


def test_rmsnorm_rows_are_bounded_without_a_pass_and_a_tenth_of_the_rms_is_still_caught(engines):
    """normed: x is the output of the RMSNorm in front of the modules, so ‖x_i ⊘ g‖ ≤ √n bounds its rows without
    reading them: honest replies pass, and one element moved by a tenth of its row's RMS still fails."""
    engine = engines[torch.float32]
    verifier = Verifier(Engine(engine.ckpt))
    h = activations(40, 64, torch.float32)
    eps = engine.ckpt.config["rms_norm_eps"]
    for layer, names, norm in ((1, QKV["names"], engine.attention_norms[1]), (0, GATE_UP, engine.ffn_norms[0])):
        x, args = rms_norm(h, norm, eps), {"layer": layer, "names": names}
        ys = engine.linear(layer, names, x)
        for _ in range(20):
            verifier.check("Linear", args, [x], ys, normed=True)
        for module, name in enumerate(names):
            for row in (0, 5, 39):
                wrong = [y.clone() for y in ys]
                wrong[module][row, 11] += wrong[module][row].square().mean().sqrt() / 10
                with pytest.raises(IntegrityError, match=f"Linear layer {layer} {name}"):
                    verifier.check("Linear", args, [x], wrong, normed=True)
    x = rms_norm(h, engine.final_norm, eps)
    logits = engine.lm_head(x)
    verifier.check("LMHead", {}, [x], [logits], normed=True)
    logits[3, 7] += logits[3].square().mean().sqrt() / 10
    with pytest.raises(IntegrityError, match="LMHead"):
        verifier.check("LMHead", {}, [x], [logits], normed=True)
    with pytest.raises(ValueError, match="no RMSNorm"):  # o_proj's input is attention's output: no such bound
        verifier.check("Linear", {"layer": 0, "names": ["o_proj"]}, [h], engine.linear(0, ["o_proj"], h), normed=True)


def test_errors_each_within_their_modules_tolerance_that_add_up_fail_the_call(engines):
    """A call's modules are checked together (one r across them): errors each too small for its own module's
    tolerance, in two modules of one row, fail the call's check, which names the call."""
    engine = engines[torch.float32]
    verifier = Verifier(Engine(engine.ckpt))
    x, args = activations(8, 64, torch.float32), {"layer": 1, "names": ["k_proj", "v_proj"]}
    ys = engine.linear(1, args["names"], x)
    verifier.check("Linear", args, [x], ys)
    verifier.prepare()  # the next call's secrets, drawn ahead: read here to aim the errors
    draw = verifier.ready["float", ((1, "k_proj"), (1, "v_proj"))]
    c = Verifier.tolerance(1.0, x.shape[1], torch.float32)
    wrong = [y.clone() for y in ys]
    for module, y in enumerate(wrong):
        own = c * (x[2].norm() * draw.spread[module] + draw.bias_norms[module])  # this module's own, row 2
        y[2, 0] += 0.9 * own / draw.rs[module][0]
    with pytest.raises(IntegrityError, match="Linear layer 1 k_proj/v_proj: replies fail their combined check"):
        verifier.check("Linear", args, [x], wrong)
