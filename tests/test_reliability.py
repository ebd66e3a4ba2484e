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
from hypothesis import given, settings, strategies as st

from conftest import BIN, raw_socket, reference_logits, run_prefill_cli
from gpu_server.launch import ServerProcess
from protocol.errors import ServerUnavailable, VersionMismatch
from protocol.messages import ITEMSIZE
from protocol.wire import PROTOCOL_VERSION
from tee_client.rpc import RpcClient

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


def test_client_survives_a_server_restart(checkpoints, start_server, tmp_path):
    folder = checkpoints("gqa")
    server = start_server("--model", str(folder))
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


def test_client_refuses_a_server_that_changed_model(checkpoints, start_server, tmp_path):
    server = start_server("--model", str(checkpoints("gqa")))
    client = start_client(server.endpoint, tmp_path, "--repeat", "400", "--timeout", "1", "--retries", "20")
    replacement = crash_and_replace(server, client, checkpoints("mqa-tied-bias"))
    try:
        _, err = client.communicate(timeout=120)
    finally:
        replacement.stop()
    assert client.returncode == 1
    assert "changed model mid-run" in err and "Traceback" not in err
    assert not (tmp_path / "l.npz").exists()


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

F32 = lambda *shape: (
    {"dtype": "float32", "shape": list(shape)},
    np.random.default_rng(0).standard_normal(shape, dtype=np.float32).tobytes(),
)  # noqa: E731
TEMPLATES = [
    ("Ping", {}, []),
    ("Init", {}, []),
    ("Echo", {}, [F32(3, 4)]),
    ("Embedding", {}, [({"dtype": "int64", "shape": [1, 3]}, np.array([[1, 5, 9]], dtype=np.int64).tobytes())]),
    ("Linear", {"layer": 1, "names": ["q_proj", "k_proj", "v_proj"]}, [F32(1, 3, 64)]),
    ("Linear", {"layer": 0, "names": ["down_proj"]}, [F32(2, 112)]),
    ("Matmul", {"transpose_b": True}, [F32(1, 2, 2, 3, 16), F32(1, 2, 1, 3, 16)]),
    ("LMHead", {}, [F32(2, 64)]),
]
dims = st.integers(min_value=-3, max_value=1 << 40)
ints = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)  # what msgpack can carry


@st.composite
def mutated_request(draw) -> list[bytes]:
    method, args, tensors = draw(st.sampled_from(TEMPLATES))
    specs, frames = [dict(s) for s, _ in tensors], [b for _, b in tensors]
    header = {
        "v": PROTOCOL_VERSION,
        "id": draw(st.integers(0, 1 << 31)),
        "method": method,
        "args": dict(args),
        "tensors": specs,
    }
    mutation = draw(
        st.sampled_from(
            [
                "none",
                "shape",
                "dtype",
                "frames",
                "truncate",
                "nan",
                "version",
                "method",
                "args",
                "field",
                "header_bytes",
            ]
        )
    )
    if mutation == "shape" and specs:
        specs[draw(st.integers(0, len(specs) - 1))]["shape"] = draw(st.lists(dims, max_size=9))
    elif mutation == "dtype" and specs:
        specs[0]["dtype"] = draw(st.sampled_from(["float16", "bfloat16", "int32", "int64", "float64", "complex64", ""]))
    elif mutation == "frames":
        frames = draw(st.lists(st.binary(max_size=256), max_size=4))
    elif mutation == "truncate" and frames:
        frames[-1] = frames[-1][: draw(st.integers(0, max(len(frames[-1]) - 1, 0)))]
    elif mutation == "nan" and frames and specs[0]["dtype"] == "float32":
        frames[0] = np.full(
            len(frames[0]) // 4, draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38])), np.float32
        ).tobytes()
    elif mutation == "version":
        header["v"] = draw(st.one_of(ints, st.text(max_size=3), st.none()))
    elif mutation == "method":
        header["method"] = draw(st.one_of(st.text(max_size=12), ints))
    elif mutation == "args":
        header["args"] = draw(
            st.dictionaries(
                st.text(max_size=8), st.one_of(ints, st.text(max_size=4), st.lists(ints, max_size=3)), max_size=3
            )
        )
    elif mutation == "field":
        del header[draw(st.sampled_from(["v", "id", "method", "tensors"]))]
    packed = msgpack.packb(header)
    if mutation == "header_bytes":
        packed = draw(st.one_of(st.binary(max_size=64), st.just(packed[: len(packed) // 2])))
    return [packed, *frames]


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
    assert counts["ok"] > 300 and counts["error"] > 1000, counts
    assert rss_mb(server.proc.pid) - before < 200, "server memory grew while fuzzed"
    assert server.proc.poll() is None

    _, out = run_prefill_cli(server.endpoint, tmp_path, PROMPTS, 24, 2)
    real = out["attention_mask"].astype(bool)
    assert (
        np.abs(out["logits"][real] - reference_logits(folder, out["input_ids"], out["attention_mask"])[real]).max()
        <= 1e-4
    )


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
