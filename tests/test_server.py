"""gpu-server answers anything malformed with an error reply, and its lifecycle behaves."""

import os
import signal
import socket
import subprocess
import time

import msgpack
import pytest

from conftest import BIN, raw_socket
from protocol.wire import PROTOCOL_VERSION


def request(method: str, args: dict | None = None, tensors=(), **header) -> list:
    specs = [{"dtype": d, "shape": s} for d, s, _ in tensors]
    head = {"v": PROTOCOL_VERSION, "id": 7, "method": method, "args": args or {}, "tensors": specs, **header}
    return [msgpack.packb(head), *(b for _, _, b in tensors)]


def f32(*shape) -> tuple:
    n = 1
    for d in shape:
        n *= d
    return ("float32", list(shape), bytes(4 * n))


def raw_call(endpoint: str, frames: list, timeout_ms: int = 10000) -> tuple[dict, list]:
    sock = raw_socket(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "no reply"
        reply = sock.recv_multipart()
    finally:
        sock.close()
    return msgpack.unpackb(reply[0]), reply[1:]


MALFORMED = {
    "not msgpack": ([b"\xc1\x00"], "BadRequest"),
    "not a map": ([msgpack.packb([1, 2])], "BadRequest"),
    "wrong version": (request("Ping", v=PROTOCOL_VERSION + 1), "VersionMismatch"),
    "unknown method": (request("Generate"), "UnknownMethod"),
    "unknown argument": (request("Matmul", {"transpose": True}, [f32(2, 2), f32(2, 2)]), "BadRequest"),
    "unknown module": (request("Linear", {"layer": 0, "names": ["x_proj"]}, [f32(1, 64)]), "BadRequest"),
    "layer out of range": (request("Linear", {"layer": 99, "names": ["q_proj"]}, [f32(1, 64)]), "UnknownModule"),
    "wrong last dim": (request("Linear", {"layer": 0, "names": ["q_proj"]}, [f32(1, 65)]), "BadShape"),
    "wrong dtype": (
        request("Linear", {"layer": 0, "names": ["q_proj"]}, [("float16", [1, 64], bytes(128))]),
        "BadShape",
    ),
    "unknown dtype": (request("LMHead", {}, [("float64", [1, 64], bytes(512))]), "BadRequest"),
    "missing frame": (request("LMHead", {}, [f32(1, 64)])[:1], "BadShape"),
    "lying byte length": (request("LMHead", {}, [("float32", [1, 64], bytes(100))]), "BadShape"),
    "inner dims differ": (request("Matmul", {}, [f32(2, 3), f32(4, 2)]), "BadShape"),
    "too few tensors": (request("Matmul", {}, [f32(2, 3)]), "BadShape"),
    "ids out of vocab": (request("Embedding", {}, [("int64", [1], (10**6).to_bytes(8, "little"))]), "BadShape"),
    "float ids": (request("Embedding", {}, [f32(1, 2)]), "BadShape"),
    "huge result": (request("Matmul", {}, [f32(1, 1), ("float32", [1, 1 << 30], b"")]), "BadShape"),
}


def test_malformed_requests_get_error_replies_and_server_keeps_serving(checkpoints, start_server):
    server = start_server("--model", str(checkpoints("gqa")))
    for name, (frames, error_type) in MALFORMED.items():
        header, _ = raw_call(server.endpoint, frames)
        assert header["ok"] is False, name
        assert header["error"]["type"] == error_type, f"{name}: {header['error']}"
        assert header["error"]["message"], name
    header, _ = raw_call(server.endpoint, request("Ping"))
    assert header["ok"] and header["result"]["errors"] == len(MALFORMED)
    header, frames = raw_call(
        server.endpoint, request("Linear", {"layer": 1, "names": ["q_proj", "k_proj"]}, [f32(3, 64)])
    )
    assert header["ok"] and [t["shape"] for t in header["tensors"]] == [[3, 64], [3, 32]]
    assert [len(f) for f in frames] == [3 * 64 * 4, 3 * 32 * 4]
    assert server.proc.poll() is None


def test_result_over_the_cap_is_refused(checkpoints, start_server):
    server = start_server("--model", str(checkpoints("gqa")), "--max-result-mb", "1")
    header, _ = raw_call(server.endpoint, request("Matmul", {}, [f32(512, 2), f32(2, 1024)]))
    assert header["error"]["type"] == "TooLarge"


def test_a_broadcast_bomb_is_refused_before_it_allocates(checkpoints, start_server):
    """16 MiB operands, a 4 MiB result, but broadcasting would materialize 16 GiB."""
    server = start_server("--model", str(checkpoints("gqa")))
    header, _ = raw_call(server.endpoint, request("Matmul", {}, [f32(1, 1000, 1, 4096), f32(1000, 1, 4096, 1)]))
    assert header["error"]["type"] == "TooLarge"
    assert raw_call(server.endpoint, request("Ping"))[0]["ok"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_request_in_hand_then_stops_cleanly(sig, checkpoints, start_server):
    server = start_server("--model", str(checkpoints("gqa")))
    path = server.endpoint.removeprefix("ipc://")
    assert os.stat(path).st_mode & 0o777 == 0o600
    sock = raw_socket(server.endpoint)
    sock.send_multipart(request("Ping"))  # connected, and the server idle in its loop
    assert sock.poll(10_000)
    sock.recv_multipart()
    sock.send_multipart(request("Matmul", {}, [f32(4096, 4096), f32(4096, 4096)]))  # ~140 GFLOP: seconds of work
    time.sleep(0.5)
    os.kill(server.proc.pid, sig)
    assert sock.poll(60_000), f"the request in hand was dropped:\n{server.log}"
    header = msgpack.unpackb(sock.recv_multipart()[0])
    sock.close()
    assert header["ok"] and header["tensors"][0]["shape"] == [4096, 4096]
    assert server.proc.wait(30) == 0
    assert not os.path.exists(path)
    assert "stopped" in server.log


def test_stale_socket_file_does_not_block_start(checkpoints, start_server, ipc_dir):
    stale = ipc_dir / "s.ipc"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # closing leaves the file behind, with nobody listening: a crashed server
    assert stale.exists()
    server = start_server("--model", str(checkpoints("gqa")))
    assert "stale" in server.log
    assert raw_call(server.endpoint, request("Ping"))[0]["ok"]


def test_live_server_on_the_endpoint_refuses_a_second(checkpoints, start_server):
    first = start_server("--model", str(checkpoints("gqa")))
    t0 = time.monotonic()
    second = subprocess.run(
        [BIN / "gpu-server", "--endpoint", first.endpoint, "--device", "cpu", "--model", str(checkpoints("gqa"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0
    assert "already listening" in second.stderr and "Traceback" not in second.stderr
    assert time.monotonic() - t0 < 30  # refused before loading a model
    assert raw_call(first.endpoint, request("Ping"))[0]["ok"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--dtype", "float64"], "invalid choice"),
        (["--endpoint", "localhost:50051"], "names no transport"),
        (["--device", "tpu"], "use cpu, cuda"),
    ],
)
def test_bad_server_arguments_give_one_clear_line(args, message, ipc_dir):
    run = subprocess.run(
        [BIN / "gpu-server", "--endpoint", f"ipc://{ipc_dir}/x.ipc", *args], capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0
    assert message in run.stderr and "Traceback" not in run.stderr


def test_client_against_nothing_fails_fast_with_one_line(ipc_dir):
    t0 = time.monotonic()
    run = subprocess.run(
        [BIN / "tee-client", "prefill", "--endpoint", f"ipc://{ipc_dir}/none.ipc"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "nothing listening" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 20


def test_client_against_a_silent_tcp_port_gives_up_after_its_retries():
    with socket.socket() as s:  # a port that accepts connections but never speaks ZMTP
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        run = subprocess.run(
            [
                BIN / "tee-client",
                "prefill",
                "--endpoint",
                f"tcp://127.0.0.1:{port}",
                "--timeout",
                "0.5",
                "--retries",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        elapsed = time.monotonic() - t0
    assert run.returncode == 1
    assert "no reply from tcp://127.0.0.1" in run.stderr and "2 tries" in run.stderr
    assert "Traceback" not in run.stderr
    assert elapsed < 15
