"""The server's request handling in-process: Handler(Engine(...)) on a real tiny checkpoint, no socket.

The same hostile table and fuzzer as the process tests (tests/hostile.py), in a fraction of
the time, plus what only shows in-process: the method table is the one dispatch.
"""

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from gpu_server.handler import Handler
from hostile import MALFORMED, TEMPLATES, f32, mutated_request, request
from protocol.messages import ITEMSIZE
from tsqp.checkpoint import load_checkpoint
from tsqp.engine import Engine
from tsqp.methods import METHODS, dispatch


@pytest.fixture(scope="module")
def handler(checkpoints):
    ckpt = load_checkpoint(checkpoints("gqa"), torch.float32, torch.device("cpu"))
    return Handler(Engine(ckpt), max_message_bytes=2**20)


def reply_of(handler, frames) -> tuple[dict, list]:
    out = handler.handle(frames)
    header = msgpack.unpackb(out[0])
    assert [len(memoryview(f)) for f in out[1:]] == [
        int(np.prod(t["shape"])) * ITEMSIZE[t["dtype"]] for t in header.get("tensors", [])
    ]
    return header, out[1:]


@pytest.mark.parametrize("name", list(MALFORMED))
def test_each_malformed_request_gets_its_error_type(handler, name):
    frames, error_type = MALFORMED[name]
    header, _ = reply_of(handler, frames)
    assert header["ok"] is False
    assert header["error"]["type"] == error_type, header["error"]
    assert header["error"]["message"]


def test_an_internal_error_reply_carries_no_backtrace(handler, monkeypatch, caplog):
    def broken(*_):
        raise RuntimeError("at /usr/lib/libtorch.so+0x1234: boom\nframe #0: c10::Error")

    monkeypatch.setattr(handler.engine, "lm_head", broken)
    header, _ = reply_of(handler, request("LMHead", {}, [f32(1, 64)]))
    assert header["error"]["type"] == "InternalError"
    assert "libtorch" not in header["error"]["message"] and "\n" not in header["error"]["message"]
    assert "boom" in caplog.text  # the server log keeps the details


def test_fuzzed_requests_always_get_a_well_formed_reply(handler):
    counts = {"ok": 0, "error": 0}

    def send(frames):
        header, _ = reply_of(handler, frames)
        counts["ok" if header["ok"] else "error"] += 1
        if not header["ok"]:
            assert header["error"]["type"] and header["error"]["message"]

    given(mutated_request())(settings(max_examples=2000, deadline=None, derandomize=True)(send))()
    assert counts["ok"] > 300 and counts["error"] > 1000, counts
    header, _ = reply_of(handler, request("Ping"))
    assert header["ok"]


def test_init_and_ping_tell_the_message_limit(handler):
    for method in ("Init", "Ping"):
        header, _ = reply_of(handler, request(method))
        assert header["result"]["max_message_bytes"] == 2**20


def test_every_template_method_is_in_the_table_and_dispatches(handler):
    """One table serves the handler and the in-process backends: dispatch is the same call."""
    assert {m for m, _, _ in TEMPLATES} <= set(METHODS)
    x = torch.randn(2, 64)
    via_handler, frames = reply_of(handler, request("LMHead", {}, [("float32", [2, 64], x.numpy().tobytes())]))
    _, out, _ = dispatch(handler.engine, "LMHead", {}, [x])
    assert torch.equal(torch.frombuffer(bytearray(frames[0]), dtype=torch.float32).view(2, -1), out[0])
