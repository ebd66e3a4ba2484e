"""Where a gpu-server listens and a tee-client connects.

    ipc:///path/to/socket   a Unix socket on this host: the default, and the fast one
    tcp://host:port         a server on another host (loopback unless told otherwise)

The default endpoint is a socket in a folder only its owner can enter, so another local
user can neither connect to the server nor replace its socket.
"""

import errno
import ipaddress
import os
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import UsageError

IPC_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
SHM_DIR = "/dev/shm"  # where ipc:// peers create and open shared-memory regions (protocol.shm), by default


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"tsqp-{os.getuid()}"


def default_endpoint() -> str:
    return f"ipc://{runtime_dir() / 'gpu-server.ipc'}"


@dataclass(frozen=True)
class Endpoint:
    url: str
    transport: str  # "ipc" or "tcp"
    path: str = ""  # ipc
    host: str = ""  # tcp

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        transport, sep, rest = url.partition("://")
        if not sep:
            raise UsageError(f"endpoint {url!r} names no transport: use ipc:///path/to/socket or tcp://host:port")
        if transport == "ipc":
            if not rest.startswith("/"):
                raise UsageError(f"endpoint {url!r}: an ipc path must be absolute (ipc:///tmp/x.ipc)")
            if len(rest.encode()) > IPC_PATH_MAX:
                raise UsageError(f"endpoint {url!r}: ipc paths are limited to {IPC_PATH_MAX} bytes")
            return cls(url, "ipc", path=rest)
        if transport == "tcp":
            host, _, port = rest.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UsageError(f"endpoint {url!r}: expected tcp://host:port with a port in 1..65535")
            return cls(url, "tcp", host=host.strip("[]"))
        raise UsageError(f"endpoint {url!r}: unknown transport {transport!r} (ipc or tcp)")

    @property
    def is_loopback(self) -> bool:
        if self.transport == "ipc":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def probe_ipc(path: str) -> str:
    """'missing', 'not-a-socket', 'stale' (a file nobody listens on) or 'live'."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    if not stat.S_ISSOCK(mode):
        return "not-a-socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return "stale"
            if e.errno not in (errno.EAGAIN, errno.ETIMEDOUT):  # a full backlog: someone listens
                raise
    return "live"


def make_private_dir(path: Path) -> None:
    """Create `path` and every missing folder above it as 0700, or check that it is ours and private."""
    try:
        for folder in reversed([p for p in (path, *path.parents) if not p.exists()]):
            folder.mkdir(mode=0o700, exist_ok=True)
        st = path.stat()
        if st.st_uid != os.getuid():
            raise UsageError(f"{path} belongs to another user; choose another folder")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(path, 0o700)
    except OSError as e:
        raise UsageError(f"cannot make the private folder {path}: {e.strerror}") from None


def free_tcp_port() -> int:
    """A loopback port nobody listens on right now (for tests and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
