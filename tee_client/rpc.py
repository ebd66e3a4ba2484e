"""The client end of the wire: one request, one reply, never a hang.

Lazy Pirate (zguide): send, poll with a deadline; on silence close the socket (linger 0),
open a fresh one and resend, a bounded number of times; then raise ServerUnavailable.
Every method is a pure function of its inputs, so a resend is always safe.
"""

import time
from collections.abc import Sequence

import zmq
from torch import Tensor

from protocol.endpoints import Endpoint, probe_ipc
from protocol.errors import BadRequest, ModelMismatch, RemoteError, ServerUnavailable
from protocol.messages import Reply
from protocol.wire import PROTOCOL_VERSION, check_version, frame_bytes, pack, unpack_header, unpack_tensors
from tee_client.stats import Call, current


class RpcClient:
    def __init__(self, endpoint: str, timeout_s: float = 30.0, retries: int = 2, curve_keys: tuple | None = None):
        self.endpoint = Endpoint.parse(endpoint)
        self.curve_keys = curve_keys  # (public, secret, server public): see protocol.security
        self.timeout_ms = int(timeout_s * 1000)
        self.retries = retries
        self.wire_dtype = None  # floating tensors are cast to the server's dtype once Init says it
        self.fingerprint = None  # sent with every request once Init says it
        self.next_id = 0
        self.socket = None
        self.fail_fast_if_absent()
        self.context = zmq.Context()  # our own, so close() can wait until zmq is done with our buffers
        self.connect()

    def call(self, method: str, args: dict | None = None, tensors: Sequence[Tensor] = ()) -> tuple[dict, list[Tensor]]:
        """Send one request; return the reply's result and tensors, or raise RemoteError."""
        t0 = time.perf_counter_ns()
        self.next_id += 1
        header = {"v": PROTOCOL_VERSION, "id": self.next_id, "method": method, "args": args or {}}
        if self.fingerprint:
            header["fingerprint"] = self.fingerprint
        frames = pack(header, [self.to_wire(t) for t in tensors])
        t1 = time.perf_counter_ns()
        reply_frames = self.exchange(method, frames)
        t2 = time.perf_counter_ns()
        reply, out = self.decode(reply_frames)
        t3 = time.perf_counter_ns()
        self.record(method, frames, reply_frames, reply, t0, t1, t2, t3)
        return reply.result, out

    def exchange(self, method: str, frames: list) -> list:
        for _ in range(self.retries + 1):
            self.socket.send_multipart(frames, copy=False)
            if self.socket.poll(self.timeout_ms, zmq.POLLIN):
                return self.socket.recv_multipart(copy=False)
            self.connect()  # the REQ socket is stuck awaiting a reply: replace it
        tries = self.retries + 1
        hint = "; with CURVE on, check that this client's key is authorized" if self.curve_keys else ""
        raise ServerUnavailable(
            f"no reply from {self.endpoint.url} to {method} "
            f"({tries} tr{'y' if tries == 1 else 'ies'} of {self.timeout_ms / 1000:g} s){hint}"
        )

    def decode(self, frames: list) -> tuple[Reply, list[Tensor]]:
        header = unpack_header(frames[0])
        check_version(header)
        reply = Reply.model_validate(header)
        if reply.id != self.next_id:
            raise BadRequest(f"reply id {reply.id} does not match request {self.next_id}")
        if not reply.ok and reply.error.type == "ModelMismatch":
            raise ModelMismatch(f"the server at {self.endpoint.url} changed model mid-run: {reply.error.message}")
        if not reply.ok:
            raise RemoteError(reply.error.type, reply.error.message)
        return reply, [t.float() if t.is_floating_point() else t for t in unpack_tensors(reply.tensors, frames[1:])]

    def to_wire(self, t: Tensor) -> Tensor:
        return t.to(self.wire_dtype) if self.wire_dtype is not None and t.is_floating_point() else t

    def record(self, method, frames, reply_frames, reply, t0, t1, t2, t3) -> None:
        stats = current()
        if stats is None:
            return
        ns = lambda ms: int(ms * 1e6)  # noqa: E731
        timing = reply.timing
        stats.record(
            method,
            Call(
                bytes_sent=frame_bytes(frames),
                bytes_received=frame_bytes(reply_frames),
                wall_ns=t3 - t0,
                transfer_ns=t3 - t0 - ns(timing.compute_ms),
                compute_ns=ns(timing.compute_ms),
                serialize_ns=t1 - t0,
                deserialize_ns=t3 - t2,
                server_decode_ns=ns(timing.decode_ms),
                server_encode_ns=ns(timing.encode_ms),
            ),
        )

    # ---- the socket -------------------------------------------------------------------------

    def fail_fast_if_absent(self) -> None:
        """An ipc endpoint with no live socket file cannot answer: say so now, not after the deadline."""
        if self.endpoint.transport == "ipc":
            state = probe_ipc(self.endpoint.path)
            if state != "live":
                what = {
                    "missing": "no socket file",
                    "stale": "a stale socket file, no server behind it",
                    "not-a-socket": "a file that is not a socket",
                }[state]
                raise ServerUnavailable(f"nothing listening at {self.endpoint.url} ({what}); is gpu-server running?")

    def connect(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
        self.socket = self.context.socket(zmq.REQ)
        self.socket.setsockopt(zmq.LINGER, 0)
        if self.curve_keys:
            self.socket.curve_publickey, self.socket.curve_secretkey, self.socket.curve_serverkey = self.curve_keys
        self.socket.connect(self.endpoint.url)

    def close(self) -> None:
        """Drop anything unsent and wait until zmq lets go of the (zero-copy) request buffers."""
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
            self.context.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
