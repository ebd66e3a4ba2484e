"""The Freivalds checks in-process: honest products pass in every dtype, one changed element fails."""

import pytest
import torch

from tee_client.masking import Csprng
from tee_client.verify import IntegrityError, Verifier
from tsqp.checkpoint import load_checkpoint
from tsqp.engine import Engine
from tsqp.ring import fixed_weight, model_ring, ring_linear


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
    args = {"layer": 1, "names": ["q_proj", "k_proj", "v_proj"]}
    ys = engine.linear(1, args["names"], x)
    for _ in range(20):  # honest: never fails, whatever r is drawn
        verifier.check("Linear", args, [x], ys)
    a, b = activations(2 * 40, 16, dtype).view(2, 40, 16), activations(2 * 40, 16, dtype).view(2, 40, 16)
    scores = engine.matmul(a, b, transpose_b=True)
    verifier.check("Matmul", {"transpose_b": True}, [a, b], [scores])

    for what, (method, margs, sent, got) in {
        "Linear": ("Linear", args, [x], ys),
        "Matmul": ("Matmul", {"transpose_b": True}, [a, b], [scores]),
    }.items():
        wrong = [t.clone() for t in got]
        flat = wrong[0].view(-1)
        flat[flat.numel() // 3] += flat.float().square().mean().sqrt().to(dtype)  # one element, by the RMS
        with pytest.raises(IntegrityError, match=what):
            verifier.check(method, margs, sent, wrong)
        flat[flat.numel() // 3] = float("nan")  # a reply cannot hide behind NaN either
        with pytest.raises(IntegrityError, match=what):
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
    rows[0, 1, 2] += 1
    with pytest.raises(IntegrityError, match="Embedding"):
        verifier.check("Embedding", {}, [ids], [rows])
