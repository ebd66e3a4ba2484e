"""The server's request handling in-process: Handler(Engine(...)) on a real tiny checkpoint, no socket.

The same hostile table and fuzzer as the process tests (tests/hostile.py), in a fraction of
the time, plus what only shows in-process: the method table is the one dispatch, and with
shared memory on, offsets and lengths are checked against the region before anything is read.
"""

from collections import Counter
from types import SimpleNamespace

import msgpack
import msgspec
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM
from hypothesis import given, settings

from gpu_server.handler import Handler
from gpu_server.regions import Regions
from hostile import IDS, MALFORMED, TEMPLATES, f32, mutated_request, request, shm_malformed
from protocol.messages import ITEMSIZE, TensorSpec
from protocol.shm import ALIGN, open_segment
from protocol.wire import TORCH_DTYPES
from tsqp.checkpoint import load_checkpoint
from tsqp.engine import Engine
from tsqp.methods import METHODS, dispatch, reply_layout
from tsqp.spec import llama_config


@pytest.fixture(scope="module")
def handler(checkpoints):
    ckpt = load_checkpoint(checkpoints("gqa"), torch.float32, torch.device("cpu"))
    return Handler(Engine(ckpt), max_message_bytes=2**20)


def reply_of(handler, frames, reply_area=None) -> tuple[dict, list]:
    """The reply, checked: one frame of the right length per tensor not in shared memory, and every
    tensor in shared memory aligned, of the right length, inside the reply area."""
    out = handler.handle(frames)
    header = msgpack.unpackb(out[0])
    specs = header.get("tensors", [])
    nbytes = lambda t: int(np.prod(t["shape"])) * ITEMSIZE[t["dtype"]]  # noqa: E731
    assert [len(memoryview(f)) for f in out[1:]] == [nbytes(t) for t in specs if "shm" not in t]
    for t in (t for t in specs if "shm" in t):
        offset, length = t["shm"]
        assert reply_area is not None and length == nbytes(t) > 0 and offset % ALIGN == 0
        assert offset + length <= reply_area.size
    return header, out[1:]


@pytest.fixture(scope="module")
def shm(checkpoints, tmp_path_factory):
    """A handler with shared memory on, and a region attached and mapped as a client does it."""
    folder = tmp_path_factory.mktemp("regions")
    ckpt = load_checkpoint(checkpoints("gqa"), torch.float32, torch.device("cpu"))
    regions = Regions(str(folder), 2**20, 2**20, torch.device("cpu"))
    handler = Handler(Engine(ckpt), max_message_bytes=2**20, regions=regions)
    header, _ = reply_of(handler, request("ShmAttach", {"request_bytes": 2**20, "reply_bytes": 2**20}))
    info = header["result"]["shm"]
    segment = open_segment(str(folder), info["name"], info["request_bytes"] + info["reply_bytes"])
    assert list(folder.iterdir()) == []  # unlinked as soon as both sides mapped it
    request_area, reply_area = segment.areas(info["request_bytes"])
    yield SimpleNamespace(handler=handler, name=info["name"], request=request_area, reply=reply_area)
    regions.close()


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
    assert counts["ok"] > 200 and counts["error"] > 1000, counts  # about 1 in 9 stays valid
    header, _ = reply_of(handler, request("Ping"))
    assert header["ok"]


@pytest.mark.parametrize("name", list(shm_malformed("tsqp-shm-x", 2**20)))
def test_shared_memory_offsets_and_lengths_are_checked_before_anything_is_read(shm, name):
    frames, error_type = shm_malformed(shm.name, shm.request.size)[name]
    header, _ = reply_of(shm.handler, frames, shm.reply)
    if error_type is None:  # the control: the same request, honest, is answered
        assert header["ok"], header
    else:
        assert header["ok"] is False and header["error"]["type"] == error_type, header


def test_fuzzed_shared_memory_requests_stay_inside_the_region(shm):
    """Offsets and lengths aimed at a real region: every reply is well formed and lies in the reply area,
    no error is an internal one (every lie is caught by a check, not by torch), the server goes on."""
    types = Counter()

    def send(frames):
        header, _ = reply_of(shm.handler, frames, shm.reply)
        types["ok" if header["ok"] else header["error"]["type"]] += 1

    given(mutated_request(region=shm.name))(settings(max_examples=2000, deadline=None, derandomize=True)(send))()
    assert types["ok"] > 300 and types["BadShape"] > 300 and types["InternalError"] == 0, types
    assert reply_of(shm.handler, request("Ping", shm=shm.name), shm.reply)[0]["ok"]


def test_a_request_older_than_the_newest_run_on_its_region_is_not_run(shm):
    """A client's resends leave older copies queued at the server; one run after a newer request would read a request
    area the client has rewritten since and write the reply area under tensors it reads. Ids on a region only grow."""
    x = torch.randn(3, 64)
    shm.request.bytes[: x.nbytes].view(torch.float32).view(3, 64).copy_(x)
    linear = lambda i: request(  # noqa: E731
        "Linear", {"layer": 0, "names": ["q_proj"]}, [("float32", [3, 64], [0, x.nbytes])], shm=shm.name, id=i
    )
    older, newer = next(IDS), next(IDS)
    assert reply_of(shm.handler, linear(newer), shm.reply)[0]["ok"]
    shm.reply.bytes.fill_(0x5A)  # what the client reads now: no stale copy may write over it
    for stale in (older, newer):
        header, _ = reply_of(shm.handler, linear(stale), shm.reply)
        assert header["ok"] is False and "older than" in header["error"]["message"], header
    assert bool((shm.reply.bytes == 0x5A).all())
    assert reply_of(shm.handler, linear(next(IDS)), shm.reply)[0]["ok"]  # the control: a newer one runs


def test_results_through_shared_memory_equal_frames_and_leave_the_request_area_alone(shm):
    x = torch.randn(3, 64)
    shm.request.bytes.fill_(0xA5)  # a canary around x: the server only ever writes the reply area
    shm.request.bytes[: x.nbytes].view(torch.float32).view(3, 64).copy_(x)
    args = {"layer": 1, "names": ["q_proj", "k_proj"]}
    header, _ = reply_of(
        shm.handler, request("Linear", args, [("float32", [3, 64], [0, x.nbytes])], shm=shm.name), shm.reply
    )
    placed = [shm.reply.view(msgspec.convert(t, TensorSpec)).clone() for t in header["tensors"]]
    framed, frames = reply_of(shm.handler, request("Linear", args, [("float32", [3, 64], x.numpy().tobytes())]))
    assert [t["shape"] for t in header["tensors"]] == [t["shape"] for t in framed["tensors"]] == [[3, 64], [3, 32]]
    for a, f in zip(placed, frames, strict=True):
        assert torch.equal(a, torch.frombuffer(bytearray(f), dtype=torch.float32).view(a.shape))
    assert bool((shm.request.bytes[x.nbytes :] == 0xA5).all())


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


def test_residual_is_the_residual_add_and_the_next_modules_on_the_normed_stream(handler, checkpoints):
    """What a fused decode step relies on: [x + o(a), gate(norm(h)) / s, up(norm(h)) / s], s = 1/rms(h) per row;
    against transformers' own modules of the same checkpoint."""
    reference, layer = LlamaForCausalLM.from_pretrained(checkpoints("gqa"), dtype=torch.float32), 1
    model = reference.model
    a, x = torch.randn(3, 64), torch.randn(3, 64)
    _, (h, gate, up), _ = dispatch(
        handler.engine, "Residual", {"layer": layer, "out": "o_proj", "names": ["gate_proj", "up_proj"]}, [a, x]
    )
    block = model.layers[layer]
    with torch.no_grad():
        want_h = x + block.self_attn.o_proj(a)
        normed = block.post_attention_layernorm(want_h)
        scale = torch.rsqrt(want_h.pow(2).mean(-1, keepdim=True) + block.post_attention_layernorm.variance_epsilon)
        torch.testing.assert_close(h, want_h)
        torch.testing.assert_close(gate * scale, block.mlp.gate_proj(normed), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(up * scale, block.mlp.up_proj(normed), rtol=1e-5, atol=1e-5)
        # after the last layer's down_proj: the final norm and lm_head
        m = torch.randn(3, 112)
        _, (x2, logits), _ = dispatch(
            handler.engine, "Residual", {"layer": layer, "out": "down_proj", "names": ["lm_head"]}, [m, h]
        )
        torch.testing.assert_close(x2, h + block.mlp.down_proj(m))
        scale = torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + model.norm.variance_epsilon)
        want = reference.lm_head(model.norm(x2))
        torch.testing.assert_close(logits * scale, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_stored_for_matvec_keep_their_values_and_results(checkpoints, dtype):
    """gpu-server's layout (Engine.store_for_matvec): float32 weights with at least as many outputs as inputs
    column-major, the others as they were, every value and every result unchanged; other dtypes untouched."""
    folder = checkpoints("gqa")
    plain = Engine(load_checkpoint(folder, dtype, torch.device("cpu")))
    stored = Engine(load_checkpoint(folder, dtype, torch.device("cpu")))
    stored.store_for_matvec()
    wide = 0
    for key, module in stored.linears.items():
        if module is None:
            continue
        w = module.weight
        column_major = w.shape[0] >= w.shape[1] and dtype == torch.float32
        wide += column_major
        assert w.t().is_contiguous() == column_major and w.is_contiguous() != column_major, key
        assert torch.equal(w, plain.linears[key].weight), key
    assert wide == (4 * len(stored.layers) if dtype == torch.float32 else 0)  # q, o, gate, up in each layer
    assert stored.lm_head_weight.t().is_contiguous() == (dtype == torch.float32)
    for rows in (1, 5):
        x, m = torch.randn(rows, 64, dtype=dtype), torch.randn(rows, 112, dtype=dtype)
        calls = [
            ("Embedding", {}, [torch.arange(rows)]),
            ("Linear", {"layer": 0, "names": ["q_proj", "k_proj", "v_proj"]}, [x]),
            ("Linear", {"layer": 1, "names": ["gate_proj", "up_proj"]}, [x]),
            ("Linear", {"layer": 1, "names": ["down_proj"]}, [m]),
            ("Residual", {"layer": 0, "out": "o_proj", "names": ["gate_proj", "up_proj"]}, [x, x]),
            ("LMHead", {}, [x]),
        ]
        for method, args, tensors in calls:
            want, got = dispatch(plain, method, args, tensors)[1], dispatch(stored, method, args, tensors)[1]
            for a, b in zip(got, want, strict=True):
                if dtype == torch.float32:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                else:
                    assert torch.equal(a, b)  # untouched: the very same kernels


def test_the_tables_reply_shapes_are_what_the_engine_returns(handler):
    """tee-client holds every reply to Method.shapes (tee_client.ops.check_reply): for every template, and the ring
    methods, the shapes and dtype the table names are those an honest engine answers with."""
    from tsqp.ring import fixed_weight, model_ring

    engine, config = handler.engine, llama_config(handler.engine.ckpt.config)
    calls = []
    for method, args, tensors in TEMPLATES:
        ts = [torch.frombuffer(bytearray(data), dtype=TORCH_DTYPES[s["dtype"]]).view(s["shape"]) for s, data in tensors]
        calls.append((method, args, ts))
    weights = [engine.module(0, "gate_proj").weight, engine.module(0, "up_proj").weight, engine.lm_head_weight]
    spec = model_ring(fixed_weight(w) for w in weights)
    ring = {"ring_bits": spec.ring_bits, "limb_bits": spec.limb_bits}
    u = torch.randint(0, 1 << 20, (1, 3, 64))
    calls += [("LinearRing", {**ring, "layer": 0, "names": ["gate_proj", "up_proj"]}, [u]), ("LMHeadRing", ring, [u])]
    for method, args, tensors in calls:
        layout = reply_layout(config, method, args, tensors, torch.float32)
        _, out, _ = dispatch(engine, method, args, tensors)
        if method in ("Init", "Ping", "Echo"):
            assert layout is None
            continue
        shapes, dtype = layout
        assert [tuple(t.shape) for t in out] == shapes and all(t.dtype == dtype for t in out), method
