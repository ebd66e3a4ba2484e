"""Shared memory for ipc:// (protocol.shm): private regions, nothing left behind, the same logits as frames.

The fast tier checks the pieces in-process (segments, areas, reused reply buffers); the process
tier runs real servers and clients: prefill both ways against transformers, kill -9 of either
side, two clients, payloads past the region, a restarted server. conftest points every process
at one private folder (LLAMA_SHM_DIR) and checks it is empty after every test.
"""

import os
import signal
import stat
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import BIN, SHM_DIR, reference_logits, run_prefill_cli
from protocol.endpoints import free_tcp_port
from protocol.errors import BadRequest, BadShape
from protocol.messages import TensorSpec
from protocol.shm import ALIGN, MAX_REGIONS, MIN_AREA, NAME_RE, SEGMENT_PREFIX, create_segment, open_segment
from tee_client.ops import RemoteOps
from protocol.wire import PROTOCOL_VERSION, pack
from tee_client.rpc import MAX_REGIONS_LOST, ClientRegion, ReplyBuffers, RpcClient, own_frames, sent_tensors
from tee_client.verify import Verifier
from tsqp.checkpoint import load_checkpoint
from tsqp.engine import Engine
from tsqp.launch import ServerProcess

PROMPTS = ["The capital of France is Paris.", "Grouped query attention shares keys and values"]
MiB = 1 << 20
SHM_ON = {"LLAMA_SHM": "1"}  # these tests are about shared memory: on, even in a run forced to frames


# ---- in-process: the pieces ---------------------------------------------------------------


def test_a_region_is_private_unguessable_and_gone_once_both_sides_mapped_it():
    server = create_segment(str(SHM_DIR), 2 * MiB)
    assert NAME_RE.fullmatch(server.name) and "tsqp" in server.name
    st = os.stat(server.path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid() and st.st_size == 2 * MiB
    client = open_segment(str(SHM_DIR), server.name, 2 * MiB)
    assert list(SHM_DIR.iterdir()) == []  # the client unlinked it once mapped
    server.unlink()  # the server's own unlink finds nothing to remove, and removes nothing else
    client.memory[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert server.memory[:4].tolist() == [1, 2, 3, 4]  # one memory, two mappings


def test_the_client_opens_nothing_but_a_private_region_of_the_size_it_was_told(tmp_path):
    region = create_segment(str(SHM_DIR), MiB)
    try:
        with pytest.raises(BadRequest, match="not one this client accepts"):
            open_segment(str(SHM_DIR), "../" + region.name, MiB)
        with pytest.raises(BadRequest, match=f"{MiB} bytes, not {2 * MiB}"):
            open_segment(str(SHM_DIR), region.name, 2 * MiB)
        os.chmod(region.path, 0o644)
        with pytest.raises(BadRequest, match="mode 0o644"):
            open_segment(str(SHM_DIR), region.name, MiB)
        os.chmod(region.path, 0o600)
        assert open_segment(str(SHM_DIR), region.name, MiB).size == MiB  # the control: as it should be, mapped
    finally:
        region.unlink()
    target = tmp_path / "secret"
    target.write_bytes(bytes(MiB))
    target.chmod(0o600)
    link = SHM_DIR / (SEGMENT_PREFIX + "f" * 32)
    link.symlink_to(target)
    try:
        with pytest.raises(OSError):  # O_NOFOLLOW: a symlink planted under a region's name is never followed
            open_segment(str(SHM_DIR), link.name, MiB)
    finally:
        link.unlink()


def test_areas_place_tensors_aligned_and_views_check_every_offset():
    segment = create_segment(str(SHM_DIR), 2 * MiB)
    segment.unlink()
    request, reply = segment.areas(MiB)
    tensors = [torch.randn(3, 5), torch.arange(7), torch.randn(4).to(torch.bfloat16), torch.randn(2, 3)[:, 1:]]
    placed = [request.place(t) for t in tensors]
    assert all(offset % ALIGN == 0 for offset, _ in placed)
    for t, at in zip(tensors, placed, strict=True):
        spec = TensorSpec(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), shm=at)
        assert torch.equal(request.view(spec), t)
    result = reply.take([8, 8], torch.float32)
    assert reply.holds(result) and reply.place(result) == [0, 256]  # a result written in place is not copied
    result.copy_(torch.randn(8, 8))
    assert torch.equal(reply.view(TensorSpec(dtype="float32", shape=[8, 8], shm=[0, 256])), result)
    assert result.data_ptr() == segment.memory.data_ptr() + MiB  # the reply area starts past the request area
    with pytest.raises(BadRequest):
        segment.areas(MiB + 8)  # an area must start aligned, or its tensors could not be viewed in place
    assert request.place(torch.zeros(MiB // 4 + 1)) is None  # does not fit: it crosses as a frame
    for lie in ([MiB, 4], [MiB - 64, 128], [1, 4], [0, 8]):
        with pytest.raises(BadShape):
            request.view(TensorSpec(dtype="float32", shape=[1], shm=lie))


def test_a_reserved_tensor_crosses_where_it_lies_and_nothing_else_is_placed_over_it():
    segment = create_segment(str(SHM_DIR), MiB)
    segment.unlink()
    request, _ = segment.areas(MiB // 2)
    kept = request.reserve([1000], torch.float32)  # at the top, for the next message only
    kept.copy_(torch.arange(1000.0))
    request.reset()
    big = torch.randn(MiB // 8 - 512)  # fits the area, not the area less what was reserved
    assert request.place(torch.ones(16)) == [0, 64] and request.place(big) is None  # a frame, not over `kept`
    at = request.place(kept)
    assert at == [kept.data_ptr() - request.base, 4000] and at[0] + at[1] <= MiB // 2  # no copy: where it lies
    assert torch.equal(kept, torch.arange(1000.0))
    request.reset()  # the message after: nothing reserved any more
    assert request.place(big) == [0, big.nbytes]
    assert request.reserve([MiB], torch.float32) is None  # larger than the area: compute it elsewhere


def test_a_request_never_carries_borrowed_memory_and_a_resend_carries_what_was_sent():
    """A borrowed reply tensor sent back (the residual stream) crosses as a copy: placed in the request area, or, if
    it does not fit there, framed from a copy of its own; the server writes its next reply over the original, and
    a resend (Lazy Pirate, or RegionGone's to a new region) must carry what the first attempt did."""
    segment = create_segment(str(SHM_DIR), MiB)
    segment.unlink()
    request, reply = segment.areas(MiB // 4)
    region = ClientRegion(segment.name, request, reply)
    small, large = reply.take([1000], torch.float32), reply.take([75_000], torch.float32)  # "borrowed"
    small.copy_(torch.arange(1000.0))
    large.copy_(torch.arange(float(large.numel())))
    before = (small.clone(), large.clone())
    frames = own_frames(pack({"v": PROTOCOL_VERSION, "id": 1, "method": "Echo"}, [small, large], request), reply)
    assert len(frames) == 2  # `small` was placed in the request area, `large` did not fit: a frame
    reply.bytes.fill_(7)  # the server's next reply lands where both lay
    assert all(torch.equal(t, b) for t, b in zip(sent_tensors(frames, region), before, strict=True))


def test_a_mapping_outlives_its_segment_while_a_tensor_views_it():
    segment = create_segment(str(SHM_DIR), MiB)
    segment.unlink()
    view = segment.memory[100:200]
    view.fill_(7)
    del segment
    assert int(view.sum()) == 700  # still mapped: unmapped only with the last view


def test_reply_buffers_are_reused_only_once_nothing_holds_them():
    buffers, src = ReplyBuffers(), torch.randn(4, 6)
    with torch.inference_mode():
        a, b = buffers.copy(src), buffers.copy(src)
        assert a.data_ptr() != b.data_ptr()
        kept_a = a.data_ptr()
        del a
        c = buffers.copy(src)
        assert c.data_ptr() == kept_a  # reused: no fresh allocation
        view = c.view(24)
        del c
        assert buffers.copy(src).data_ptr() != kept_a  # a view still holds it: not overwritten
        assert torch.equal(view.view(4, 6), src)


# ---- real processes -------------------------------------------------------------------------


def max_error(out: dict, reference: np.ndarray) -> float:
    real = out["attention_mask"].astype(bool)
    return float(np.abs(out["logits"][real] - reference[real]).max())


@pytest.mark.process
def test_prefill_through_shared_memory_and_as_frames_give_transformers_logits(
    checkpoints, start_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("LLAMA_SHM", "1")  # this test is about both paths, whatever the run forces
    folder = checkpoints("mqa-tied-bias")
    server = start_server("--model", str(folder), "--log-level", "DEBUG", env=SHM_ON)
    logits = {}
    for transport, extra in (("shm", []), ("frames", ["--no-shm"])):
        (tmp_path / transport).mkdir()
        result, out = run_prefill_cli(server.endpoint, tmp_path / transport, PROMPTS, 40, 2, *extra)
        assert result["transport"] == transport
        assert max_error(out, reference_logits(folder, out["input_ids"], out["attention_mask"])) <= 1e-4
        logits[transport] = out["logits"]
    assert np.abs(logits["shm"] - logits["frames"]).max() <= 1e-6
    assert "shared-memory region" in server.log and "dropped (detached)" in server.log


@pytest.mark.process
def test_a_resend_after_a_late_reply_carries_the_residual_stream_as_first_sent(
    checkpoints, start_server, tmp_path, monkeypatch
):
    """A request area too small for both of a Residual call's inputs sends the borrowed residual stream h as a frame;
    a server slow past the client's deadline has already written its reply over the memory h lay in. The resend
    must carry h as it was first sent (a copy), not what lies there now: the logits stay transformers'."""
    monkeypatch.setenv("LLAMA_SHM", "1")
    folder = checkpoints("gqa")  # hidden 64, MLP 112: at 2 x 50 tokens the SiLU product (44.8 kB) fits, h (25.6 kB) not
    late = ("--inject-fault", "Residual:2:slow", "--max-message-mb", "0.05")
    server = start_server("--model", str(folder), *late, env={**SHM_ON, "TSQP_TESTING": "1"})
    result, out = run_prefill_cli(server.endpoint, tmp_path, PROMPTS, 50, 2, "--timeout", "1")
    assert result["transport"] == "shm" and result["rpc"]["Residual"]["retries"] == 1  # the late reply was resent
    assert max_error(out, reference_logits(folder, out["input_ids"], out["attention_mask"])) <= 1e-4


@pytest.mark.process
def test_copies_of_a_request_resent_many_times_never_run_after_the_client_moved_on(
    checkpoints, start_server, tmp_path, monkeypatch
):
    """A server held past many short deadlines: each resend leaves the copy before it queued at the server (ZeroMQ
    delivers them), and once the client has its reply and reads the reply area in place, none of them may run
    (they would read a request area since rewritten and write the reply area under it). The logits stay
    transformers'."""
    monkeypatch.setenv("LLAMA_SHM", "1")
    folder = checkpoints("gqa")
    server = start_server(
        "--model", str(folder), "--inject-fault", "Residual:2:slow", env={**SHM_ON, "TSQP_TESTING": "1"}
    )
    result, out = run_prefill_cli(server.endpoint, tmp_path, PROMPTS, 50, 2, "--timeout", "0.15", "--retries", "12")
    assert result["transport"] == "shm" and result["rpc"]["Residual"]["retries"] >= 5  # many copies queued
    assert max_error(out, reference_logits(folder, out["input_ids"], out["attention_mask"])) <= 1e-4


@pytest.mark.process
def test_a_region_lost_now_and_then_is_set_up_again_each_time(checkpoints, start_server):
    """Regions lost over a long run (evicted, idle) cost a re-attach each, not shared memory for good: only a server
    that drops region after region, none serving a call, sends a client back to frames (MAX_REGIONS_LOST)."""
    server = start_server("--model", str(checkpoints("gqa")), env=SHM_ON)
    x = torch.randn(4, 64)
    with RpcClient(server.endpoint, timeout_s=10, shm=True) as rpc:
        rpc.call("Ping")
        for _ in range(MAX_REGIONS_LOST + 2):
            assert torch.equal(rpc.call("Echo", {}, [x])[1][0], x) and rpc.region is not None
            lost = rpc.region.name
            others = [RpcClient(server.endpoint, timeout_s=10, shm=True) for _ in range(MAX_REGIONS)]
            for other in others:  # as many regions again: this client's, the least recently used, is evicted
                other.call("Ping")
                other.call("Echo", {}, [x])
            for other in others:
                other.close()
            assert torch.equal(rpc.call("Echo", {}, [x])[1][0], x)  # RegionGone, a new region, the call resent
            assert rpc.region is not None and rpc.region.name != lost


@pytest.mark.process
def test_a_server_without_shared_memory_and_a_tcp_server_serve_frames(checkpoints, start_server):
    folder, x = checkpoints("gqa"), torch.randn(3, MiB)
    off = start_server("--model", str(folder), "--no-shm")
    with ServerProcess(f"tcp://127.0.0.1:{free_tcp_port()}", "--device", "cpu", "--model", str(folder)) as tcp:
        for server in (off, tcp):
            with RpcClient(server.endpoint, timeout_s=10, shm=True) as rpc:
                assert "shm" not in rpc.call("Ping")[0]  # not offered: frames, no error
                assert torch.equal(rpc.call("Echo", {}, [x])[1][0], x) and rpc.region is None


@pytest.mark.process
def test_a_borrowed_reply_is_read_where_it_crossed_but_never_under_verify(checkpoints, start_server):
    """Ops.call(borrow=True) over shared memory hands out the reply area's own tensors, no copy, valid until the
    next call's reply lands on them; with --verify every reply is copied out first and no input is computed in the
    region, so that what was checked is what the model uses (the server can write the region at any moment)."""
    folder = checkpoints("gqa")
    server = start_server("--model", str(folder), env=SHM_ON)
    for verify in (False, True):
        with RpcClient(server.endpoint, timeout_s=10, shm=True) as rpc:
            ops = RemoteOps(rpc)
            if verify:
                ops.verifier = Verifier(Engine(load_checkpoint(folder, torch.float32, torch.device("cpu"))))
            c = ops.init().config
            a, x = (torch.randn(1, 6, n) for n in (c.num_attention_heads * c.head_dim, c.hidden_size))
            first = ops.residual(0, "o_proj", ["gate_proj", "up_proj"], a, x, borrow=True)
            kept = [t.clone() for t in first]
            again = ops.residual(0, "o_proj", ["gate_proj", "up_proj"], a, 2 * x, borrow=True)
            assert rpc.region is not None
            assert all(rpc.region.reply.holds(t) for t in first) == (not verify)
            if verify:  # copies: still what their reply held
                assert all(torch.equal(t, k) for t, k in zip(first, kept, strict=True))
            else:  # the reply area itself: the next reply wrote over it
                assert torch.equal(first[0], again[0]) and not torch.equal(first[0], kept[0])
            assert not rpc.region.reply.holds(ops.linear(0, ["q_proj"], x)[0])  # not borrowed: a copy, always
            # nor is an input computed in the region under --verify: what the check reads must be private
            assert (ops.request_buffer((1, 6, c.intermediate_size)) is None) == verify


def start_client(endpoint: str, out, *extra: str) -> subprocess.Popen:
    argv = ["prefill", "--endpoint", endpoint, "--length", "32", "--batch-size", "2", "--warmup", "0"]
    argv += ["--repeat", "400", "--save-logits", str(out / "l.npz"), *extra]
    return subprocess.Popen(
        [BIN / "tee-client", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **SHM_ON},
    )


def wait_until_served(endpoint: str, calls: int) -> None:
    with RpcClient(endpoint, timeout_s=5, shm=False) as rpc:
        deadline = time.monotonic() + 60
        while rpc.call("Ping")[0]["served"] < calls and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.mark.process
def test_kill_9_of_the_server_leaves_nothing_behind(checkpoints, start_server, tmp_path):
    server = start_server("--model", str(checkpoints("gqa")), env=SHM_ON)
    client = start_client(server.endpoint, tmp_path)
    wait_until_served(server.endpoint, 50)
    os.kill(server.proc.pid, signal.SIGKILL)
    _, err = client.communicate(timeout=60)
    assert client.returncode == 1 and "nothing listening" in err and len(err.strip().splitlines()) == 1, err
    assert list(SHM_DIR.iterdir()) == []


@pytest.mark.process
def test_kill_9_of_a_client_leaves_nothing_behind_and_the_server_serves_on(checkpoints, start_server, tmp_path):
    server = start_server("--model", str(checkpoints("gqa")), env=SHM_ON)
    client = start_client(server.endpoint, tmp_path)
    wait_until_served(server.endpoint, 50)
    assert list(SHM_DIR.iterdir()) == []  # mapped by both: already unlinked, while in use
    os.kill(client.pid, signal.SIGKILL)
    client.communicate(timeout=60)
    with RpcClient(server.endpoint, timeout_s=10, shm=True) as rpc:  # the next client: a region of its own
        rpc.call("Ping")
        x = torch.randn(5, 64)
        assert torch.equal(rpc.call("Echo", {}, [x])[1][0], x) and rpc.region is not None
    assert list(SHM_DIR.iterdir()) == []


@pytest.mark.process
def test_two_clients_get_their_own_regions(checkpoints, start_server):
    server = start_server("--model", str(checkpoints("gqa")), env=SHM_ON)
    a, b = (RpcClient(server.endpoint, timeout_s=10, shm=True) for _ in range(2))
    with a, b:
        for rpc in (a, b):
            rpc.call("Ping")
        for i in range(20):  # interleaved: each writes its own request area, reads its own reply area
            xa, xb = torch.full((MiB,), float(i)), torch.full((MiB,), float(-i))
            assert torch.equal(a.call("Echo", {}, [xa])[1][0], xa)
            assert torch.equal(b.call("Echo", {}, [xb])[1][0], xb)
        assert a.region is not None and b.region is not None and a.region.name != b.region.name


@pytest.mark.process
def test_payloads_past_the_region_grow_it_or_cross_as_frames(checkpoints, start_server):
    caps = ("--max-message-mb", "64", "--max-result-mb", "4")
    server = start_server("--model", str(checkpoints("gqa")), *caps, env=SHM_ON)
    with RpcClient(server.endpoint, timeout_s=30, shm=True) as rpc:
        rpc.call("Ping")
        for size in (1024, 8 * MiB, 40 * MiB, 40 * MiB):
            x = torch.randn(size // 4)
            assert torch.equal(rpc.call("Echo", {}, [x])[1][0], x)  # no error, whatever fits where
        assert rpc.region.request.size == 64 * MiB  # grown to the server's cap for requests
        assert rpc.region.reply.size == 4 * MiB  # capped by --max-result-mb: larger replies came as frames
    big = start_server("--model", str(checkpoints("gqa")), name="big.ipc", env=SHM_ON)
    with RpcClient(big.endpoint, timeout_s=30, shm=True) as rpc:
        rpc.call("Ping")
        x = torch.randn(40 * MiB // 4)
        for _ in range(2):  # the first reply does not fit the first reply area: frames, then a larger region
            assert torch.equal(rpc.call("Echo", {}, [x])[1][0], x)
        assert rpc.region.reply.size >= 40 * MiB and rpc.region.request.size >= 40 * MiB > MIN_AREA


@pytest.mark.process
def test_a_restarted_server_gets_a_new_region_without_an_error(checkpoints, start_server):
    first = start_server("--model", str(checkpoints("gqa")), env=SHM_ON)
    with RpcClient(first.endpoint, timeout_s=10, shm=True) as rpc:
        rpc.call("Ping")
        x = torch.randn(4096)
        assert torch.equal(rpc.call("Echo", {}, [x])[1][0], x)
        old = rpc.region.name
        first.stop()
        with ServerProcess(first.endpoint, "--device", "cpu", "--model", str(checkpoints("gqa")), env=SHM_ON):
            assert torch.equal(rpc.call("Echo", {}, [x])[1][0], x)  # RegionGone, attach afresh, resend
            assert rpc.region is not None and rpc.region.name != old


@pytest.mark.process
def test_back_to_back_calls_lose_no_reply(checkpoints, start_server):
    """Round trips fast enough to outrun zmq's bookkeeping of the server's reply pipe (high-water mark 2):
    no reply may be dropped, through shared memory or as frames (no resends: a lost reply fails the test)."""
    server = start_server("--model", str(checkpoints("gqa")), env=SHM_ON)
    for shm in (True, False):
        with RpcClient(server.endpoint, timeout_s=5, retries=0, shm=shm) as rpc:
            rpc.call("Ping")
            x = torch.randn(16384)
            for i in range(2000):
                back = rpc.call("Echo", {}, [x] if i % 2 else [])[1]
                assert len(back) == i % 2
            assert (rpc.region is not None) is shm
