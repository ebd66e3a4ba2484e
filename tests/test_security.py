"""Only the right peers talk to the server: private ipc sockets, loopback by default, CURVE over TCP."""

import os
import socket
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from conftest import BIN, run_prefill_cli
from protocol.endpoints import free_tcp_port
from tsqp.launch import ServerProcess
from protocol.errors import ServerUnavailable
from protocol.security import client_keys, keygen
from tee_client.rpc import RpcClient

NOBODY = 65534
pytestmark = pytest.mark.process  # every test here starts a gpu-server or another process

CONNECT_AS_OTHER_USER = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("refused")
else:
    print("connected")
"""


def connect_as_nobody(path: Path) -> str:
    run = subprocess.run(
        ["/usr/bin/python3", "-c", CONNECT_AS_OTHER_USER, str(path)],
        user=NOBODY,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return run.stdout.strip() or run.stderr


def test_default_ipc_socket_is_private(checkpoints):
    with tempfile.TemporaryDirectory(dir="/tmp") as runtime:
        os.chmod(runtime, 0o755)  # anyone may traverse it: only the server's own folder and socket protect it
        folder = Path(runtime) / f"tsqp-{os.getuid()}"
        sock = folder / "gpu-server.ipc"
        with ServerProcess(
            f"ipc://{sock}", "--device", "cpu", "--model", str(checkpoints("gqa")), env={"XDG_RUNTIME_DIR": runtime}
        ):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            if os.geteuid() == 0:  # root can act as another user, so check that one really is refused
                assert connect_as_nobody(sock) == "refused"
                os.chmod(folder, 0o755)
                os.chmod(sock, 0o666)
                assert connect_as_nobody(sock) == "connected"  # the control: opened up, the check does fail


def test_binding_beyond_loopback_without_curve_warns(checkpoints):
    with ServerProcess(
        f"tcp://0.0.0.0:{free_tcp_port()}", "--device", "cpu", "--model", str(checkpoints("gqa"))
    ) as server:
        assert "WARNING" in server.log and "CURVE is off" in server.log


@pytest.fixture
def keys(tmp_path) -> Path:
    """server, client and intruder key pairs; only client's public key is authorized."""
    folder = tmp_path / "keys"
    for name in ("server", "client", "intruder"):
        keygen(folder, name)
    (folder / "authorized").mkdir()
    (folder / "authorized" / "client.key").write_bytes((folder / "client.key").read_bytes())
    assert stat.S_IMODE((folder / "client.key_secret").stat().st_mode) == 0o600
    return folder


def curve_server(checkpoints, keys: Path, port: int) -> ServerProcess:
    return ServerProcess(
        f"tcp://127.0.0.1:{port}",
        "--device",
        "cpu",
        "--model",
        str(checkpoints("gqa")),
        "--curve-secret-key",
        str(keys / "server.key_secret"),
        "--curve-authorized-keys",
        str(keys / "authorized"),
    )


def test_curve_admits_the_authorized_client_only(checkpoints, keys, tmp_path):
    with curve_server(checkpoints, keys, free_tcp_port()) as server:
        result, out = run_prefill_cli(
            server.endpoint,
            tmp_path,
            ["The capital of France is"],
            12,
            1,
            "--curve-secret-key",
            str(keys / "client.key_secret"),
            "--curve-server-key",
            str(keys / "server.key"),
        )
        assert result["model"] == "gqa" and out["logits"].shape[:2] == (1, 12)

        intruder = client_keys(str(keys / "intruder.key_secret"), str(keys / "server.key"))
        for curve_keys in (intruder, None):  # an unauthorized key, and no CURVE at all
            with RpcClient(server.endpoint, timeout_s=1, retries=0, curve_keys=curve_keys) as rpc:
                with pytest.raises(ServerUnavailable):
                    rpc.call("Ping")


class RecordingProxy:
    """A TCP relay that keeps every byte it forwards, so a test can look at what the wire carries."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self.pump, args=(src, dst), daemon=True).start()

    def pump(self, src, dst):
        while data := src.recv(65536):
            self.seen += data
            dst.sendall(data)


SECRET = torch.frombuffer(bytearray(b"TSQP-PLAINTEXT!!" * 4096), dtype=torch.float32)  # 64 KiB of a known pattern


@pytest.mark.parametrize("curve", [True, False])
def test_curve_encrypts_the_tensors_on_the_wire(curve, checkpoints, keys):
    port = free_tcp_port()
    launch = (
        curve_server(checkpoints, keys, port)
        if curve
        else ServerProcess(f"tcp://127.0.0.1:{port}", "--device", "cpu", "--model", str(checkpoints("gqa")))
    )
    with launch:
        proxy = RecordingProxy(port)
        curve_keys = client_keys(str(keys / "client.key_secret"), str(keys / "server.key")) if curve else None
        with RpcClient(f"tcp://127.0.0.1:{proxy.port}", timeout_s=10, retries=0, curve_keys=curve_keys) as rpc:
            _, back = rpc.call("Echo", {}, [SECRET])
    assert torch.equal(back[0], SECRET)
    assert len(proxy.seen) > 2 * SECRET.nbytes
    assert (b"TSQP-PLAINTEXT!!" in proxy.seen) is not curve  # in the clear without CURVE, never with it


def test_a_missing_socket_folder_is_created_private(checkpoints, ipc_dir):
    sock = ipc_dir / "new" / "gpu.ipc"
    with ServerProcess(f"ipc://{sock}", "--device", "cpu", "--model", str(checkpoints("gqa"))):
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_a_pinned_fingerprint_refuses_any_other_model(checkpoints, start_server, tmp_path):
    server = start_server("--model", str(checkpoints("gqa")))
    result, _ = run_prefill_cli(server.endpoint, tmp_path, ["The capital of France is"], 8, 1)
    pinned = result["fingerprint"][:16]
    again, _ = run_prefill_cli(server.endpoint, tmp_path, ["Rotary"], 8, 1, "--expect-fingerprint", pinned)
    assert again["fingerprint"] == result["fingerprint"]

    other = start_server("--model", str(checkpoints("mqa-tied-bias")), name="other.ipc")
    run = subprocess.run(
        [BIN / "tee-client", "prefill", "--endpoint", other.endpoint, "--expect-fingerprint", pinned],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert f"not the pinned {pinned}" in run.stderr and "Traceback" not in run.stderr
