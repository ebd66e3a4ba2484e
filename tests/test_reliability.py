"""The client never hangs, the server survives any bytes, several clients share one server."""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import given, settings

from conftest import BIN, raw_socket, reference_logits, run_prefill_cli
from hostile import TEMPLATES, mutated_request
from tsqp.launch import ServerProcess
from protocol.endpoints import free_tcp_port
from protocol.errors import ServerUnavailable, VersionMismatch
from protocol.messages import ITEMSIZE
from protocol.wire import PROTOCOL_VERSION
from tee_client.rpc import RpcClient

pytestmark = pytest.mark.process  # every test here starts a gpu-server or another process

PROMPTS = ["The capital of France is Paris.", "Grouped query attention shares keys and values"]


def start_client(endpoint: str, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            BIN / "tee-client",
            "prefill",
            "--endpoint",
            endpoint,
            "--length",
            "32",
            "--batch-size",
            "2",
            "--prompt",
            PROMPTS[0],
            "--prompt",
            PROMPTS[1],
            "--warmup",
            "0",
            "--output",
            str(out / "r.json"),
            "--save-logits",
            str(out / "l.npz"),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def crash_and_replace(server: ServerProcess, client: subprocess.Popen, model: Path) -> ServerProcess:
    """Once the client is well into its run, SIGKILL the server and start another on the same endpoint."""
    with RpcClient(server.endpoint, timeout_s=5) as rpc:
        deadline = time.monotonic() + 60
        while rpc.call("Ping")[0]["served"] < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert client.poll() is None, "the client finished before the server could be killed"
    os.kill(server.proc.pid, signal.SIGKILL)
    server.stop()
    return ServerProcess(server.endpoint, "--device", "cpu", "--model", str(model)).start()


def tcp_server(model: Path) -> ServerProcess:
    """Over tcp a client cannot see that its server died, so Lazy Pirate resends carry it to a restart."""
    return ServerProcess(f"tcp://127.0.0.1:{free_tcp_port()}", "--device", "cpu", "--model", str(model)).start()


def test_client_survives_a_server_restart(checkpoints, tmp_path):
    folder = checkpoints("gqa")
    server = tcp_server(folder)
    client = start_client(server.endpoint, tmp_path, "--repeat", "400", "--timeout", "1", "--retries", "20")
    replacement = crash_and_replace(server, client, folder)
    try:
        out, err = client.communicate(timeout=120)
        with RpcClient(replacement.endpoint, timeout_s=5) as rpc:
            served = rpc.call("Ping")[0]["served"]
    finally:
        replacement.stop()
    assert client.returncode == 0, err
    assert served > 10  # the run finished on the replacement
    npz = np.load(tmp_path / "l.npz")
    real = npz["attention_mask"].astype(bool)
    expected = reference_logits(folder, npz["input_ids"], npz["attention_mask"])
    assert np.abs(npz["logits"][real] - expected[real]).max() <= 1e-4


def test_client_refuses_a_server_that_changed_model(checkpoints, tmp_path):
    server = tcp_server(checkpoints("gqa"))
    client = start_client(server.endpoint, tmp_path, "--repeat", "400", "--timeout", "1", "--retries", "20")
    replacement = crash_and_replace(server, client, checkpoints("mqa-tied-bias"))
    try:
        _, err = client.communicate(timeout=120)
    finally:
        replacement.stop()
    assert client.returncode == 1
    assert "changed model mid-run" in err and "Traceback" not in err
    assert not (tmp_path / "l.npz").exists()


def client_well_into_its_run(server: ServerProcess, tmp_path: Path) -> subprocess.Popen:
    """A long prefill run (30 s deadlines) that has made 50 calls."""
    client = start_client(server.endpoint, tmp_path, "--repeat", "400", "--timeout", "30", "--retries", "2")
    with RpcClient(server.endpoint, timeout_s=5) as rpc:
        while rpc.call("Ping")[0]["served"] < 50:
            time.sleep(0.05)
    return client


def test_an_ipc_client_notices_a_killed_server_at_once(checkpoints, start_server, tmp_path):
    server = start_server("--model", str(checkpoints("gqa")))
    client = client_well_into_its_run(server, tmp_path)
    os.kill(server.proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    _, err = client.communicate(timeout=60)
    assert client.returncode == 1 and time.monotonic() - t0 < 5, err
    assert "nothing listening" in err and "stale socket file" in err and len(err.strip().splitlines()) == 1


def test_a_server_stopping_cleanly_lets_its_client_go_at_once(checkpoints, start_server, tmp_path):
    server = start_server("--model", str(checkpoints("gqa")))
    client = client_well_into_its_run(server, tmp_path)
    t0 = time.monotonic()
    server.stop()
    _, err = client.communicate(timeout=60)
    assert client.returncode == 1 and time.monotonic() - t0 < 5, err
    assert "stopping" in err or "nothing listening" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("sig, line", [(signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted")])
def test_a_signal_stops_a_client_mid_run_with_one_line_and_gives_its_region_back(
    checkpoints, start_server, tmp_path, sig, line
):
    server = start_server("--model", str(checkpoints("gqa")), "--log-level", "debug")
    client = client_well_into_its_run(server, tmp_path)
    client.send_signal(sig)
    _, err = client.communicate(timeout=30)
    assert client.returncode == 128 + sig and err.strip() == f"tee-client: {line}", err
    assert not (tmp_path / "l.npz").exists() and not (tmp_path / "r.json").exists()
    deadline = time.monotonic() + 5  # the client unwound: it handed its shared-memory region back
    while "dropped (detached)" not in server.log and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "dropped (detached)" in server.log, server.log


def test_a_message_over_the_servers_limit_is_refused_before_it_is_sent(checkpoints, start_server, tmp_path):
    server = start_server("--model", str(checkpoints("gqa")), "--max-message-mb", "0.01")
    run = subprocess.run(
        [BIN / "tee-client", "prefill", "--endpoint", server.endpoint, "--length", "64", "--timeout", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "over the server's limit of 0.01 MiB" in run.stderr and "--max-message-mb" in run.stderr
    assert "no reply" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_deadline_times_retries_bounds_a_dead_server():
    with zmq.Context.instance().socket(zmq.ROUTER) as silent:  # accepts, never answers
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        client = RpcClient(f"tcp://127.0.0.1:{port}", timeout_s=0.4, retries=2)
        t0 = time.monotonic()
        with pytest.raises(
            ServerUnavailable, match=r"no reply from tcp://127\.0\.0\.1:\d+ to Ping \(3 tries of 0\.4 s\)"
        ):
            client.call("Ping")
        elapsed = time.monotonic() - t0
        client.close()
    assert 1.2 <= elapsed < 1.2 + 1.5


def test_a_server_speaking_another_protocol_version_is_a_clear_error(ipc_dir):
    endpoint = f"ipc://{ipc_dir}/v99.ipc"
    with zmq.Context.instance().socket(zmq.REP) as other:  # a peer from another release
        other.bind(endpoint)

        def answer():
            request = msgpack.unpackb(other.recv_multipart()[0])
            other.send_multipart([msgpack.packb({"v": 99, "id": request["id"], "ok": True, "result": {}})])

        threading.Thread(target=answer, daemon=True).start()
        with RpcClient(endpoint, timeout_s=5) as rpc:
            with pytest.raises(VersionMismatch, match=f"protocol version 99, this side speaks {PROTOCOL_VERSION}"):
                rpc.call("Ping")


def test_oversize_message_is_dropped_and_the_server_carries_on(checkpoints, start_server):
    server = start_server("--model", str(checkpoints("gqa")), "--max-message-mb", "1")
    header = {"v": PROTOCOL_VERSION, "id": 1, "method": "Echo", "tensors": [{"dtype": "float32", "shape": [1 << 19]}]}
    with raw_socket(server.endpoint) as sock:
        sock.send_multipart([msgpack.packb(header), bytes(2 << 20)])
        assert not sock.poll(2000), "a 2 MiB frame got through a 1 MiB cap"
    with RpcClient(server.endpoint, timeout_s=5) as rpc:
        assert rpc.call("Ping")[0]["model"] == "gqa"
    assert server.proc.poll() is None


# ---- fuzzing -------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def test_fuzzed_requests_get_replies_and_leave_the_server_correct(checkpoints, start_server, tmp_path):
    folder = checkpoints("gqa")
    server = start_server("--model", str(folder))
    sock = raw_socket(server.endpoint)
    counts = {"ok": 0, "error": 0}

    def send(frames: list[bytes]) -> None:
        sock.send_multipart(frames)
        assert sock.poll(10_000), f"no reply to {frames[0][:80]!r}"
        reply = sock.recv_multipart()
        header = msgpack.unpackb(reply[0])
        if header["ok"]:
            counts["ok"] += 1
            assert [len(f) for f in reply[1:]] == [
                int(np.prod(t["shape"])) * ITEMSIZE[t["dtype"]] for t in header["tensors"]
            ]
        else:
            counts["error"] += 1
            assert header["error"]["type"] and header["error"]["message"]

    method, args, tensors = TEMPLATES[4]
    valid = [
        msgpack.packb(
            {"v": PROTOCOL_VERSION, "id": 1, "method": method, "args": args, "tensors": [s for s, _ in tensors]}
        ),
        *(b for _, b in tensors),
    ]
    for _ in range(50):  # warm the allocator before measuring memory
        send(valid)
    before = rss_mb(server.proc.pid)
    given(mutated_request())(settings(max_examples=2000, deadline=None, derandomize=True)(send))()
    sock.close()
    assert counts["ok"] > 250 and counts["error"] > 1000, counts  # the 50 warm-ups and about 1 in 9
    assert rss_mb(server.proc.pid) - before < 200, "server memory grew while fuzzed"
    assert server.proc.poll() is None

    _, out = run_prefill_cli(server.endpoint, tmp_path, PROMPTS, 24, 2)
    real = out["attention_mask"].astype(bool)
    assert (
        np.abs(out["logits"][real] - reference_logits(folder, out["input_ids"], out["attention_mask"])[real]).max()
        <= 1e-4
    )


def test_replies_nobody_reads_do_not_pile_up_in_server_memory(checkpoints, start_server):
    """A DEALER that sends and never reads: the server's memory for its replies stays bounded.

    Bounded, not zero: glibc keeps some freed 16 MiB results for reuse (its mmap threshold rises
    to the largest freed block), 200-300 MB here whatever the count; 80 unread replies piled up
    would be 1280 MB."""
    server = start_server("--model", str(checkpoints("gqa")))
    big = [{"dtype": "float32", "shape": [2048, 64]}, {"dtype": "float32", "shape": [64, 2048]}]
    frames = [bytes(2048 * 64 * 4)] * 2  # 1 MiB in, a 16 MiB result out
    empty = [{"dtype": "float32", "shape": [7000, 0]}, {"dtype": "float32", "shape": [0, 7000]}]
    with zmq.Context.instance().socket(zmq.DEALER) as dealer:
        dealer.setsockopt(zmq.RCVHWM, 1)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(server.endpoint)
        with RpcClient(server.endpoint, timeout_s=10) as rpc:
            rpc.call("Ping")
            before = rss_mb(server.proc.pid)
            for i in range(80):
                for specs, tensors in ((big, frames), (empty, [b"", b""])):
                    head = {"v": PROTOCOL_VERSION, "id": i, "method": "Matmul", "args": {}, "tensors": specs}
                    dealer.send_multipart([b"", msgpack.packb(head), *tensors])
            deadline = time.monotonic() + 60
            while rpc.call("Ping")[0]["served"] < 162 and time.monotonic() < deadline:  # all 160 answered
                time.sleep(0.1)
            grown = rss_mb(server.proc.pid) - before
    assert grown < 480, f"server memory grew by {grown:.0f} MB for 80 unread 16 MiB replies"
    assert server.proc.poll() is None


# ---- several clients -------------------------------------------------------------------------


def test_four_concurrent_prefills_each_get_correct_logits(checkpoints, start_server, tmp_path):
    folder = checkpoints("mqa-tied-bias")
    server = start_server("--model", str(folder))
    runs = []
    for i in range(4):
        out = tmp_path / str(i)
        out.mkdir()
        runs.append(
            (
                out,
                subprocess.Popen(
                    [
                        BIN / "tee-client",
                        "prefill",
                        "--endpoint",
                        server.endpoint,
                        "--length",
                        str(16 + 8 * i),
                        "--prompt",
                        PROMPTS[i % 2] * (i + 1),
                        "--repeat",
                        "5",
                        "--warmup",
                        "0",
                        "--save-logits",
                        str(out / "l.npz"),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    for out, proc in runs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        npz = np.load(out / "l.npz")
        real = npz["attention_mask"].astype(bool)
        expected = reference_logits(folder, npz["input_ids"], npz["attention_mask"])
        assert np.abs(npz["logits"][real] - expected[real]).max() <= 1e-4


def test_many_small_calls_from_concurrent_clients_lose_none(checkpoints, start_server):
    server = start_server("--model", str(checkpoints("gqa")))
    n_clients, n_calls, answered = 8, 250, []

    def client(i: int):
        with RpcClient(server.endpoint, timeout_s=10, retries=0) as rpc:
            ok = 0
            for j in range(n_calls):
                _, back = rpc.call("Echo", {}, [torch.full((256,), float(i * n_calls + j))])
                ok += int(back[0][0]) == i * n_calls + j
            answered.append(ok)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answered == [n_calls] * n_clients
    with RpcClient(server.endpoint, timeout_s=5) as rpc:
        stats = rpc.call("Ping")[0]
    assert stats["errors"] == 0 and stats["served"] == n_clients * n_calls + 1
