"""gpu-server's lifecycle: run -> startup / main loop / shutdown.

startup    check the endpoint is free, load the model, bind, print one `ready` line
main loop  poll (so signals are seen within 100 ms), answer one request at a time
shutdown   finish the request in hand, deliver its reply (2 s at most), close, remove the ipc socket file
"""

import os
import signal
import sys
from pathlib import Path

import zmq

from gpu_server.checkpoint import load_checkpoint
from gpu_server.engine import Engine
from gpu_server.handler import Handler
from gpu_server.settings import ServerSettings
from protocol.endpoints import Endpoint, make_private_dir, probe_ipc, runtime_dir
from protocol.security import serve_curve
from protocol.wire import TORCH_DTYPES

POLL_MS = 100
SHUTDOWN_LINGER_MS = 2000


class EndpointBusy(Exception):
    """Another live server already listens on the endpoint."""


class Server:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.endpoint = Endpoint.parse(settings.gpu_endpoint)
        self.should_exit = False
        self.socket = None
        self.auth = None  # the CURVE authenticator thread, when CURVE is on

    def run(self) -> None:
        self.install_signal_handlers()
        try:
            self.startup()
            self.main_loop()
        finally:
            self.shutdown()

    def startup(self) -> None:
        self.claim_endpoint()
        s = self.settings
        ckpt = load_checkpoint(s.model_path, TORCH_DTYPES[s.dtype], s.device)
        self.handler = Handler(Engine(ckpt, s.max_result_bytes))
        self.socket = self.bind()
        print(
            f"gpu-server ready on {self.endpoint.url} (model {ckpt.name}, device {s.device}, dtype {s.dtype})",
            flush=True,
        )

    def main_loop(self) -> None:
        while not self.should_exit:
            if self.socket.poll(POLL_MS, zmq.POLLIN):
                frames = self.socket.recv_multipart(copy=False)
                self.socket.send_multipart(self.handler.handle(frames), copy=False)

    def shutdown(self) -> None:
        if self.auth is not None:
            self.auth.stop()
        if self.socket is not None:
            self.socket.close(linger=SHUTDOWN_LINGER_MS)  # deliver the last reply, unless its client is gone
            # Replies are sent zero-copy from tensor memory: wait until zmq is done with it
            # (term blocks until every message is out or the linger expires) before Python frees it.
            zmq.Context.instance().term()
            if self.endpoint.transport == "ipc" and probe_ipc(self.endpoint.path) != "missing":
                os.unlink(self.endpoint.path)
            print("gpu-server stopped", flush=True)

    # ---- endpoint ---------------------------------------------------------------------------

    def claim_endpoint(self) -> None:
        """Fail early, before the model loads, if a live server holds the endpoint."""
        if self.endpoint.transport != "ipc":
            return
        path = self.endpoint.path
        parent = os.path.dirname(path)
        if os.path.abspath(parent) == str(runtime_dir()) or not os.path.exists(parent):
            make_private_dir(Path(parent))  # a folder we create is private (0700)
        elif os.stat(parent).st_mode & 0o077:
            print(
                f"gpu-server: note: {parent} is open to other users; the socket itself is 0600, but a private "
                "folder (the default endpoint's) also keeps others from replacing it",
                flush=True,
            )
        state = probe_ipc(path)
        if state == "live":
            raise EndpointBusy(f"another server is already listening on {self.endpoint.url}")
        if state == "not-a-socket":
            raise EndpointBusy(f"{path} exists and is not a socket; choose another --endpoint")
        if state == "stale":
            print(f"gpu-server: removing stale socket file {path} (no server behind it)", flush=True)
            os.unlink(path)

    def bind(self) -> zmq.Socket:
        socket = zmq.Context.instance().socket(zmq.REP)
        socket.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
        socket.setsockopt(zmq.LINGER, 0)
        if self.settings.curve_secret_key:
            self.auth = serve_curve(socket, self.settings.curve_secret_key, self.settings.curve_authorized_keys)
        elif self.endpoint.transport == "tcp" and not self.endpoint.is_loopback:
            print(
                f"gpu-server: WARNING: {self.endpoint.url} is reachable from other hosts and CURVE is off: "
                "anyone who can reach it may use the server, and tensors cross in the clear "
                "(see --curve-secret-key)",
                file=sys.stderr,
                flush=True,
            )
        old_umask = os.umask(0o177)  # the ipc socket file is created 0600
        try:
            socket.bind(self.endpoint.url)
        except zmq.ZMQError as e:
            socket.close(linger=0)
            raise EndpointBusy(f"cannot bind {self.endpoint.url}: {e}") from None
        finally:
            os.umask(old_umask)
        return socket

    # ---- signals ----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)

    def handle_exit(self, sig, frame) -> None:
        self.should_exit = True
