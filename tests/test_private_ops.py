"""PrivateOps in-process (no server): pads are handed out once per forward and the logits stay right."""

import pytest
import torch
from transformers import LlamaForCausalLM

from tee_client.model import Llama
from tee_client.ops import LocalOps
from tee_client.privacy import PrivateOps
from tsqp.checkpoint import load_checkpoint
from tsqp.engine import Engine


@pytest.fixture(scope="module")
def ckpt(checkpoints):
    return load_checkpoint(checkpoints("mqa-tied-bias"), torch.float32, torch.device("cpu"))


def forward(model: Llama, rows: int = 12):
    ids = torch.arange(3, 3 + rows).reshape(1, rows)
    return model.forward(ids, torch.ones_like(ids))


@pytest.mark.parametrize("mode", ["otp", "mix"])
def test_a_private_forward_matches_transformers(ckpt, mode):
    ops = PrivateOps(LocalOps(Engine(ckpt)), ckpt, mode)
    model = Llama(ops.init(), ops)
    ops.prepare(12)
    ids = torch.arange(3, 15).reshape(1, 12)
    with torch.no_grad():
        reference = LlamaForCausalLM.from_pretrained(ckpt.folder, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(forward(model), reference, atol={"otp": 5e-3, "mix": 1e-3}[mode], rtol=0)


def test_every_pad_serves_exactly_one_call(ckpt):
    ops = PrivateOps(LocalOps(Engine(ckpt)), ckpt, "otp")
    model = Llama(ops.init(), ops)
    ops.prepare(12)
    planned = len(ops.book)
    assert planned == 4 * len(ckpt.layers) + 1  # q/k/v, o, gate/up, down per layer; lm_head
    forward(model)
    assert len(ops.book) == 0  # every pad taken once, none left over
    with pytest.raises(KeyError, match="already taken"):
        forward(model)  # no second use without fresh pads
    ops.prepare(12)
    first = {key: pad.r.clone() for key, pad in ops.book._pads.items()}
    ops.prepare(12)
    assert all(not torch.equal(first[key], pad.r) for key, pad in ops.book._pads.items())  # fresh every forward
