"""gpu-server's lifecycle: run -> startup / main loop / shutdown.

startup    validate the settings, claim the endpoint (an ipc endpoint: take its lock file, so
           exactly one of two servers started at once serves), load the model, bind, print
           one `ready` line (not if a signal came during the load)
main loop  wait for a request (at most 100 ms, so signals are seen), answer one at a time; once a
           second, drop shared-memory regions nobody used for long (gpu_server.regions)
shutdown   deliver the reply to the request in hand (2 s at most), answer any request that
           arrived meanwhile with ServerStopping, close, drop every shared-memory region,
           remove the socket file only if it is still the one this server bound, release the lock

Signals are handled in one place (`handle_exit`): they only set `should_exit`.
"""

import fcntl
import gc
import logging
import os
import signal
import time
from pathlib import Path

import zmq

from gpu_server.handler import Fault, Handler
from gpu_server.regions import Regions
from gpu_server.settings import ServerSettings
from protocol.endpoints import Endpoint, make_private_dir, probe_ipc, runtime_dir
from protocol.errors import EndpointBusy, UsageError
from protocol.security import serve_curve
from protocol.wire import PROTOCOL_VERSION, TORCH_DTYPES, encode_header, loose_header, recv_frames, send_frames
from tsqp.checkpoint import load_checkpoint
from tsqp.engine import Engine

POLL_MS = 100
SWEEP_S = 1.0  # how often idle shared-memory regions are looked for
SHUTDOWN_LINGER_MS = 2000
# Replies wait in a peer's queue while it does not read them; a REQ client has at most one
# outstanding, so a queue of two bounds what a client that stops reading can pin in memory.
SEND_HWM = 2
log = logging.getLogger("gpu_server")


class Server:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.endpoint = Endpoint.parse(settings.gpu_endpoint)
        self.should_exit = False
        self.socket = None
        self.auth = None  # the CURVE authenticator thread, when CURVE is on
        self.lock_fd = None  # held while this server owns an ipc endpoint
        self.bound_inode = None  # the socket file this server created

    def run(self) -> None:
        self.install_signal_handlers()
        try:
            self.startup()
            if not self.should_exit:
                self.main_loop()
        finally:
            self.shutdown()

    def startup(self) -> None:
        s = self.settings
        device = s.device  # an unusable device fails here, before anything is created
        fault = self.fault()
        self.claim_endpoint()
        ckpt = load_checkpoint(s.model_path, TORCH_DTYPES[s.dtype], device)
        if self.should_exit:
            log.info("stopping: a signal came while the model loaded")
            return
        engine = Engine(ckpt, s.max_result_bytes)
        engine.store_for_matvec()  # this process owns its copy of the model
        self.handler = Handler(engine, s.max_message_bytes, self.record_dir(), fault, self.regions(device))
        self.socket = self.bind()
        # Everything loaded so far lives as long as the process: out of the cyclic collector's sight, neither a
        # collection while serving nor the interpreter's exit walks it again (a stop took ~1.9 s, now ~0.4 s).
        gc.freeze()
        print(
            f"gpu-server ready on {self.endpoint.url} (model {ckpt.name}, device {device}, dtype {s.dtype})",
            flush=True,
        )

    def record_dir(self) -> Path | None:
        if self.settings.record_dir is None:
            return None
        folder = Path(self.settings.record_dir)
        make_private_dir(folder)
        log.warning("RECORDING every request's tensors to %s (--record): this server keeps what clients send", folder)
        return folder

    def fault(self) -> Fault | None:
        if self.settings.inject_fault is None:
            return None
        if os.environ.get(Fault.ENV) != "1":
            raise UsageError(f"--inject-fault is for tests only: it is refused unless {Fault.ENV}=1")
        fault = Fault(self.settings.inject_fault)  # a malformed spec is refused before anything is announced
        log.warning("FAULT INJECTION on: reply %s will be wrong (--inject-fault, testing)", self.settings.inject_fault)
        return fault

    def regions(self, device) -> Regions | None:
        """Shared memory for ipc clients (protocol.shm), unless turned off or CURVE is on."""
        s = self.settings
        if not s.shared_memory:
            return None
        return Regions(s.shm_dir, s.max_message_bytes, s.max_result_bytes, device)

    def main_loop(self) -> None:
        regions, swept = self.handler.regions, time.monotonic()
        while not self.should_exit:
            try:  # a blocking recv with a timeout (RCVTIMEO = POLL_MS): no poll call on the way of every request
                frames = recv_frames(self.socket)
            except zmq.Again:
                frames = None
            if frames is not None:
                reply = self.handler.handle(frames)
                # Let zmq take in its peers' read acknowledgements first: with SNDHWM 2 a pipe whose acks are
                # not yet processed looks full, and REP drops the reply unsent. A recv that finds a request
                # waiting processes them only once per 100 messages; asking for EVENTS always does.
                self.socket.getsockopt(zmq.EVENTS)
                send_frames(self.socket, reply)
            if regions is not None and time.monotonic() - swept > SWEEP_S:
                regions.sweep()
                swept = time.monotonic()

    def shutdown(self) -> None:
        if self.auth is not None:
            self.auth.stop()
        if self.socket is not None:
            self.refuse_waiting_requests()
            self.socket.close(linger=SHUTDOWN_LINGER_MS)  # deliver the last reply, unless its client is gone
            # Replies are sent zero-copy from tensor memory: wait until zmq is done with it
            # (term blocks until every message is out or the linger expires) before Python frees it.
            zmq.Context.instance().term()
            if self.handler.regions is not None:
                self.handler.regions.close()  # unlinks any region file a client never mapped
            self.remove_own_socket_file()
            print("gpu-server stopped", flush=True)
        self.release_endpoint()

    def refuse_waiting_requests(self) -> None:
        """Tell a client whose request came in after the signal that no answer is coming."""
        while self.socket.poll(0, zmq.POLLIN):
            header = loose_header(self.socket.recv_multipart()[0])  # whatever it was, it gets the same answer
            request_id = header.get("id") if isinstance(header.get("id"), int) else 0
            error = {"type": "ServerStopping", "message": f"gpu-server on {self.endpoint.url} is stopping"}
            reply = {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error}
            self.socket.send(encode_header(reply))

    # ---- endpoint ---------------------------------------------------------------------------

    def claim_endpoint(self) -> None:
        """Fail early, before the model loads, if another server holds or is taking the endpoint."""
        if self.endpoint.transport != "ipc":
            return
        path = self.endpoint.path
        parent = Path(path).parent
        if parent == runtime_dir() or not parent.exists():
            make_private_dir(parent)  # folders we create are private (0700), all the way down
        elif parent.stat().st_mode & 0o077:
            log.warning(
                "%s is open to other users; the socket itself is 0600, but a private folder "
                "(the default endpoint's) also keeps others from replacing it",
                parent,
            )
        self.lock_fd = take_lock(f"{path}.lock", self.endpoint.url)
        state = probe_ipc(path)
        if state == "live":
            raise EndpointBusy(f"another server is already listening on {self.endpoint.url}")
        if state == "not-a-socket":
            raise EndpointBusy(f"{path} exists and is not a socket; choose another --endpoint")
        if state == "stale":
            log.info("removing stale socket file %s (no server behind it)", path)
            os.unlink(path)

    def bind(self) -> zmq.Socket:
        socket = zmq.Context.instance().socket(zmq.REP)
        socket.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
        socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVTIMEO, POLL_MS)  # the main loop looks at should_exit this often
        if self.settings.curve_secret_key:
            self.auth = serve_curve(socket, self.settings.curve_secret_key, self.settings.curve_authorized_keys)
        elif self.endpoint.transport == "tcp" and not self.endpoint.is_loopback:
            log.warning(
                "%s is reachable from other hosts and CURVE is off: anyone who can reach it may use the "
                "server, and tensors cross in the clear (see --curve-secret-key)",
                self.endpoint.url,
            )
        old_umask = os.umask(0o177)  # the ipc socket file is created 0600
        try:
            socket.bind(self.endpoint.url)
        except zmq.ZMQError as e:
            socket.close(linger=0)
            raise EndpointBusy(f"cannot bind {self.endpoint.url}: {e}") from None
        finally:
            os.umask(old_umask)
        if self.endpoint.transport == "ipc":
            self.bound_inode = os.stat(self.endpoint.path).st_ino
        return socket

    def remove_own_socket_file(self) -> None:
        if self.bound_inode is None:
            return
        try:
            if os.stat(self.endpoint.path).st_ino == self.bound_inode:
                os.unlink(self.endpoint.path)
        except FileNotFoundError:
            pass

    def release_endpoint(self) -> None:
        if self.lock_fd is not None:
            os.unlink(f"{self.endpoint.path}.lock")  # while still locked: the next server makes a fresh one
            os.close(self.lock_fd)
            self.lock_fd = None

    # ---- signals ----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)

    def handle_exit(self, sig, frame) -> None:
        self.should_exit = True


def take_lock(lock_path: str, url: str) -> int:
    """An exclusive lock on `lock_path`, held for the server's life; EndpointBusy if another has it.

    The file is unlinked by its holder on exit, so after locking, check that the path still
    names the file we locked (else a server that stopped meanwhile removed it: try again).
    """
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EndpointBusy(f"another server is already listening on (or starting on) {url}") from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
