"""gpu-server answers anything malformed with an error reply, and its lifecycle behaves."""

import os
import signal
import socket
import subprocess
import time

import msgpack
import pytest

from conftest import BIN, raw_socket
from hostile import MALFORMED, f32, request

pytestmark = pytest.mark.process  # every test here starts a gpu-server or another process


def raw_call(endpoint: str, frames: list, timeout_ms: int = 10000) -> tuple[dict, list]:
    sock = raw_socket(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "no reply"
        reply = sock.recv_multipart()
    finally:
        sock.close()
    return msgpack.unpackb(reply[0]), reply[1:]


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


def test_two_servers_started_at_once_on_one_endpoint_one_serves(checkpoints, ipc_dir):
    endpoint = f"ipc://{ipc_dir}/race.ipc"
    argv = [BIN / "gpu-server", "--endpoint", endpoint, "--device", "cpu", "--model", str(checkpoints("gqa"))]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        _, err = loser.communicate()
        assert loser.returncode == 1 and "already listening" in err and "Traceback" not in err, err
        assert winner.stdout.readline().startswith("gpu-server ready on")
        assert raw_call(endpoint, request("Ping"))[0]["ok"]  # the loser's exit stranded nobody
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(30)
            p.stdout.close()
            p.stderr.close()
    assert not os.path.exists(endpoint.removeprefix("ipc://")) and not os.path.exists(f"{ipc_dir}/race.ipc.lock")


def test_a_server_never_removes_a_socket_file_it_did_not_create(checkpoints, start_server, ipc_dir):
    first = start_server("--model", str(checkpoints("gqa")))
    second = subprocess.run(
        [BIN / "gpu-server", "--endpoint", first.endpoint, "--device", "cpu", "--model", str(checkpoints("gqa"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert os.path.exists(first.endpoint.removeprefix("ipc://"))
    assert raw_call(first.endpoint, request("Ping"))[0]["ok"]


def test_sigterm_during_the_model_load_never_prints_ready(ipc_dir):
    # The embedded model: its load takes ~0.5-0.9 s after the lock appears, a tiny checkpoint's ~6 ms (too short a
    # window to hit reliably from here: a CI run once sent the signal after the tiny model was ready).
    endpoint = f"ipc://{ipc_dir}/load.ipc"
    proc = subprocess.Popen(
        [BIN / "gpu-server", "--endpoint", endpoint, "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lock = ipc_dir / "load.ipc.lock"
    deadline = time.monotonic() + 60
    while not lock.exists() and time.monotonic() < deadline:  # the endpoint is claimed, the model loads next
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "ready" not in out, out
    assert "a signal came while the model loaded" in out, out
    assert not lock.exists() and not (ipc_dir / "load.ipc").exists()


def test_a_bad_device_is_refused_before_any_folder_is_made(ipc_dir):
    run = subprocess.run(
        [BIN / "gpu-server", "--endpoint", f"ipc://{ipc_dir}/new/s.ipc", "--device", "tpu"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and "use cpu, cuda" in run.stderr
    assert not (ipc_dir / "new").exists()


def test_folders_the_server_creates_are_private_all_the_way_down(checkpoints, start_server, ipc_dir):
    server = start_server("--model", str(checkpoints("gqa")), name="a/b/s.ipc")
    for folder in (ipc_dir / "a", ipc_dir / "a" / "b"):
        assert os.stat(folder).st_mode & 0o777 == 0o700
    assert "open to other users" not in server.log


def test_a_length_past_the_context_is_one_line_before_any_allocation(checkpoints, start_server):
    server = start_server("--model", str(checkpoints("gqa")))
    run = subprocess.run(
        [BIN / "tee-client", "prefill", "--endpoint", server.endpoint, "--length", "100000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and "past the model's context of 64 tokens" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
