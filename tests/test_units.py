"""Pure functions and small rules, in-process: endpoints, settings, errors, stats, keys, the TCB."""

import os
import stat
import subprocess
import sys
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from protocol.endpoints import Endpoint
from protocol.errors import (
    BadReply,
    BadShape,
    CheckpointError,
    ModelMismatch,
    RemoteError,
    TSQPError,
    UsageError,
    from_reply,
)
from protocol.security import keygen, load_keypair
from tee_client.settings import ClientSettings, GenerateSettings, PrefillSettings
from tee_client.stats import Call, Stats
from tsqp.spec import llama_config, load_tokenizer


def test_the_trusted_side_imports_no_server_code():
    """tee_client runs inside the TEE: it may import protocol and tsqp, never gpu_server."""
    code = (
        "import tee_client.cli, tee_client.prefill, tee_client.model, tee_client.ops, tee_client.rpc, sys;"
        "print(sorted(m for m in sys.modules if m.startswith('gpu_server')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_entry_points_load_torch_only_after_setting_the_openmp_policy():
    code = "import gpu_server.cli, tee_client.cli, sys; print('torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(
    "url, transport, where",
    [
        ("ipc:///tmp/x.ipc", "ipc", "/tmp/x.ipc"),
        ("tcp://127.0.0.1:5555", "tcp", "127.0.0.1"),
        ("tcp://[::1]:80", "tcp", "::1"),
        ("tcp://gpu-host:5555", "tcp", "gpu-host"),
    ],
)
def test_endpoints_parse(url, transport, where):
    ep = Endpoint.parse(url)
    assert ep.transport == transport and (ep.path or ep.host) == where


@pytest.mark.parametrize(
    "url, message",
    [
        ("localhost:5555", "names no transport"),
        ("ipc://relative.ipc", "must be absolute"),
        ("ipc:///" + "x" * 120, "limited to 107 bytes"),
        ("tcp://host:0", "port in 1..65535"),
        ("tcp://host:http", "port in 1..65535"),
        ("udp://host:1", "unknown transport"),
    ],
)
def test_bad_endpoints_are_refused_with_a_reason(url, message):
    with pytest.raises(UsageError, match=message):
        Endpoint.parse(url)


def test_loopback_is_recognised():
    assert Endpoint.parse("tcp://127.0.0.2:1").is_loopback and Endpoint.parse("tcp://localhost:1").is_loopback
    assert not Endpoint.parse("tcp://0.0.0.0:1").is_loopback and not Endpoint.parse("tcp://10.0.0.1:1").is_loopback


@pytest.mark.parametrize("timeout", ["inf", "1e300", "nan", "0", "-1", "0.0001"])
def test_timeouts_must_be_positive_and_finite(timeout, monkeypatch):
    monkeypatch.setenv("LLAMA_RPC_TIMEOUT", timeout)
    with pytest.raises(Exception, match="timeout"):
        ClientSettings()


def test_settings_errors_are_one_line_usage_errors():
    with pytest.raises(UsageError, match="rpc_retries"):
        PrefillSettings.from_args(SimpleNamespace(rpc_retries=-1, prefill_length=None))


def test_remote_errors_come_back_as_their_own_type():
    assert isinstance(from_reply("BadShape", "x"), BadShape)
    assert isinstance(from_reply("ModelMismatch", "x"), ModelMismatch)
    unknown = from_reply("InternalError", "RuntimeError (details in the server log)")
    assert isinstance(unknown, RemoteError) and "InternalError" in str(unknown)
    assert all(isinstance(from_reply(t, ""), TSQPError) for t in ("BadRequest", "Nope"))


def test_stats_summary_adds_up():
    stats = Stats()
    stats.record("Init", Call(100, 100, 5_000_000, 5_000_000, 0))
    stats.record("Linear", Call(1000, 2000, 4_000_000, 1_000_000, 3_000_000))
    stats.record("Linear", Call(1000, 2000, 9_000_000, 1_000_000, 3_000_000, retries=1, retry_wait_ns=5_000_000))
    stats.tee_ns["rmsnorm"] = 2_000_000
    s = stats.summary(total_ns=20_000_000)
    t = s["timing"]
    assert t["transfer_ms"] == 2 and t["gpu_compute_ms"] == 6 and t["tee_compute_ms"] == 2
    assert t["retry_wait_ms"] == 5 and t["other_ms"] == pytest.approx(5)
    assert s["rpc"]["Linear"]["retries"] == 1 and s["rpc"]["Init"]["calls"] == 1
    assert s["operation_counts"]["gpu"] == {"Linear": 2}  # Init is outside the forward
    assert s["data_transfer"]["to_gpu_mb"] == 2000 / 1e6
    assert sum(s["timing_percentage"].values()) == pytest.approx(100)


def test_keygen_makes_a_private_secret_and_keeps_an_existing_pair(tmp_path):
    public, secret = keygen(tmp_path / "keys", "server")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
    first = load_keypair(str(secret))
    with pytest.raises(UsageError, match="already exist"):
        keygen(tmp_path / "keys", "server")
    assert load_keypair(str(secret)) == first
    keygen(tmp_path / "keys", "server", force=True)
    assert load_keypair(str(secret)) != first
    for bad in ("", "a/b", ".hidden"):
        with pytest.raises(UsageError, match="plain file name"):
            keygen(tmp_path, bad)


def test_keygen_secret_is_never_readable_by_others(tmp_path):
    """Created 0600 from the first byte: even a permissive umask gives no window."""
    old = os.umask(0)
    try:
        _, secret = keygen(tmp_path, "client")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600


def test_a_resend_is_counted_and_its_wait_is_not_transfer():
    """A peer that ignores the first request: the client resends, and says so in its stats."""
    import threading

    import msgpack
    import zmq

    from protocol.wire import PROTOCOL_VERSION
    from tee_client.rpc import RpcClient

    with zmq.Context.instance().socket(zmq.ROUTER) as peer:
        port = peer.bind_to_random_port("tcp://127.0.0.1")

        def answer_the_second():
            peer.recv_multipart()  # dropped
            route, empty, head = peer.recv_multipart()
            reply = {"v": PROTOCOL_VERSION, "id": msgpack.unpackb(head)["id"], "ok": True, "result": {}}
            peer.send_multipart([route, empty, msgpack.packb(reply)])

        threading.Thread(target=answer_the_second, daemon=True).start()
        stats = Stats()
        with RpcClient(f"tcp://127.0.0.1:{port}", timeout_s=0.3, retries=1) as rpc, stats.recording():
            rpc.call("Linear")
    call = stats.methods["Linear"].calls[0]
    assert call.retries == 1 and call.retry_wait_ns >= 0.3e9
    assert call.transfer_ns < call.wall_ns - call.retry_wait_ns + 1
    assert stats.summary(call.wall_ns)["timing"]["retry_wait_ms"] >= 300


def test_logits_default_to_last_unless_saved(monkeypatch):
    kept = lambda **given: PrefillSettings(**given).logits_kept  # noqa: E731
    assert kept() == "last"
    assert kept(save_logits="l.npz") == "all"  # saving them implies every position
    assert kept(save_logits="l.npz", logits="last") == "last"  # unless asked for explicitly
    monkeypatch.setenv("LLAMA_LOGITS", "all")
    assert kept() == "all"


def test_shared_memory_is_for_ipc_without_curve_only(monkeypatch):
    assert ClientSettings(gpu_endpoint="ipc:///tmp/x.ipc").shared_memory
    assert not ClientSettings(gpu_endpoint="tcp://127.0.0.1:5555").shared_memory
    assert not ClientSettings(gpu_endpoint="ipc:///tmp/x.ipc", shm=False).shared_memory
    monkeypatch.setenv("LLAMA_SHM", "0")
    assert not ClientSettings(gpu_endpoint="ipc:///tmp/x.ipc").shared_memory


@pytest.mark.parametrize("command", [PrefillSettings, GenerateSettings])
def test_attention_on_the_server_is_refused_in_a_privacy_mode_from_flags_and_environment(command, monkeypatch):
    assert command().attention == "tee"
    assert command(attention="server").attention == "server"  # plain: allowed
    for mode in ("otp", "mix"):
        with pytest.raises(ValidationError, match="keeps attention here"):
            command(attention="server", privacy=mode)
    monkeypatch.setenv("LLAMA_ATTENTION", "server")
    monkeypatch.setenv("LLAMA_PRIVACY", "otp")
    with pytest.raises(ValidationError, match="keeps attention here"):
        command()


def test_a_reply_header_no_server_of_this_protocol_sends_is_a_bad_reply():
    """Unreadable, mistyped, or not ok naming no error: BadReply, in one line; another version: VersionMismatch."""
    import msgspec

    from protocol.errors import BadReply, VersionMismatch
    from protocol.wire import PROTOCOL_VERSION
    from tee_client.rpc import RpcClient

    encode = msgspec.msgpack.encode
    with RpcClient("tcp://127.0.0.1:9", timeout_s=1, retries=0) as rpc:  # decode only: nothing is sent
        for frame in (
            b"\xc1",
            encode([1, 2]),
            encode({"v": PROTOCOL_VERSION, "id": 0, "ok": "yes"}),
            encode({"v": PROTOCOL_VERSION, "id": 0, "ok": True, "tensors": [{"dtype": "float64", "shape": [1]}]}),
            encode({"v": PROTOCOL_VERSION, "id": 0, "ok": False}),
        ):
            with pytest.raises(BadReply):
                rpc.decode([frame])
        with pytest.raises(VersionMismatch):
            rpc.decode([encode({"v": PROTOCOL_VERSION + 1, "id": 0, "ok": True, "extra": 1})])
        assert rpc.decode([encode({"v": PROTOCOL_VERSION, "id": 0, "ok": True})])[0].ok  # the control


def test_a_config_or_tokenizer_transformers_cannot_read_is_one_error_not_a_traceback(tmp_path):
    """The server's Init config and tokenizer are untrusted input (BadReply); the client's own copy's are a
    CheckpointError: either way one line, never transformers' own exception."""
    with pytest.raises(BadReply, match="the server's config is not a Llama config transformers can read"):
        llama_config({"model_type": "llama", "hidden_size": "wide"}, "the server's config", BadReply)
    with pytest.raises(CheckpointError, match="the tokenizer of x cannot be loaded"):
        load_tokenizer(tmp_path, "the tokenizer of x", CheckpointError)  # a folder with no tokenizer files


def test_a_result_file_is_written_whole_or_not_at_all(tmp_path):
    """An output stopped while it is written (Ctrl-C, SIGTERM, a full disk) leaves neither a half-written file
    where a whole one belongs nor a leftover beside it; an earlier file of that name stays as it was."""
    from tee_client.prefill import write_whole

    target = tmp_path / "l.npz"

    def stopped(f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_whole(str(target), stopped)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"the last run's")
    with pytest.raises(KeyboardInterrupt):
        write_whole(str(target), stopped)
    assert [p.name for p in tmp_path.iterdir()] == ["l.npz"] and target.read_bytes() == b"the last run's"

    def disk_full(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(UsageError, match=r"cannot write .*l\.npz: No space left on device"):
        write_whole(str(target), disk_full)
    write_whole(str(target), lambda f: f.write(b"whole"))
    assert [p.name for p in tmp_path.iterdir()] == ["l.npz"] and target.read_bytes() == b"whole"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~current_umask()


def test_a_result_file_goes_through_a_symlink_keeps_its_mode_and_a_fifo_is_written_in_place(tmp_path):
    """write_whole writes where a plain open would: through a symbolic link (the link stays), over a file keeping
    its permissions (a 0600 result stays private), into a FIFO (it stays one); a long name stays legal."""
    import threading

    from tee_client.prefill import check_writable, write_whole

    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_bytes(b"old")
    real.chmod(0o600)
    link.symlink_to(real.name)
    write_whole(str(link), lambda f: f.write(b"new"))
    assert link.is_symlink() and real.read_bytes() == b"new" and stat.S_IMODE(real.stat().st_mode) == 0o600
    long = tmp_path / ("a" * 250 + ".json")  # the file beside it has a short name of its own
    write_whole(str(long), lambda f: f.write(b"x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["real.json", "link.json", long.name])
    fifo, got = tmp_path / "f.json", []
    os.mkfifo(fifo)
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_whole(str(fifo), lambda f: f.write(b"through"))
    reader.join(timeout=10)
    assert got == [b"through"] and stat.S_ISFIFO(fifo.stat().st_mode)
    with pytest.raises(UsageError, match="is a folder"):
        check_writable(str(tmp_path / "sub") + "/")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
