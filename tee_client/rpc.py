"""The client end of the wire: one request, one reply, never a hang. It moves bytes, nothing else.

A tensor goes out and comes back with the same dtype and bytes (what crosses in which dtype
is the ops layer's business, tee_client.ops). Lazy Pirate (zguide): send, then wait for the
reply in slices; on silence close the socket (linger 0), open a fresh one and resend, a
bounded number of times; then raise ServerUnavailable. For an ipc:// endpoint the client
also looks at the socket file between slices and before each resend: a missing or stale file
means the server is gone, and it says so at once instead of waiting out its deadlines. Every
method is a pure function of its inputs, so a resend (the same bytes again) is always safe.
"""

import time
from collections.abc import Sequence

import zmq
from torch import Tensor

from protocol.endpoints import Endpoint, probe_ipc
from protocol.errors import BadRequest, ModelMismatch, ServerUnavailable, TooLarge, from_reply
from protocol.messages import Reply
from protocol.wire import PROTOCOL_VERSION, check_version, frame_bytes, pack, unpack_header, unpack_tensors
from tee_client.stats import Call, current

SLICE_MS = 250  # how often a waiting ipc client looks at the socket file

ABSENT = {
    "missing": "no socket file",
    "stale": "a stale socket file, no server behind it",
    "not-a-socket": "a file that is not a socket",
}


class RpcClient:
    def __init__(self, endpoint: str, timeout_s: float = 30.0, retries: int = 2, curve_keys: tuple | None = None):
        self.endpoint = Endpoint.parse(endpoint)
        self.curve_keys = curve_keys  # (public, secret, server public): see protocol.security
        self.timeout_ms = max(1, round(timeout_s * 1000))
        self.retries = retries
        self.max_message_bytes: int | None = None  # the server's inbound cap, once its Init reply says it
        self.next_id = 0
        self.socket = None
        self.fail_fast_if_absent()
        self.context = zmq.Context()  # our own, so close() can wait until zmq is done with our buffers
        self.connect()

    def call(
        self, method: str, args: dict | None = None, tensors: Sequence[Tensor] = (), fingerprint: str | None = None
    ) -> tuple[dict, list[Tensor]]:
        """Send one request; return the reply's result and tensors, or raise the error it names."""
        t0 = time.perf_counter_ns()
        self.next_id += 1
        header = {"v": PROTOCOL_VERSION, "id": self.next_id, "method": method, "args": args or {}}
        if fingerprint:
            header["fingerprint"] = fingerprint
        frames = pack(header, tensors)
        self.check_size(method, frames)
        t1 = time.perf_counter_ns()
        reply_frames, resends, waited_ns = self.exchange(method, frames)
        t2 = time.perf_counter_ns()
        reply, out = self.decode(reply_frames)
        t3 = time.perf_counter_ns()
        if method == "Init":
            self.max_message_bytes = reply.result.get("max_message_bytes")
        self.record(method, frames, reply_frames, reply, (t0, t1, t2, t3), resends, waited_ns)
        return reply.result, out

    def exchange(self, method: str, frames: list) -> tuple[list, int, int]:
        """The reply frames, how many resends it took, and the time spent waiting before the last send."""
        t_first = time.perf_counter_ns()
        for attempt in range(self.retries + 1):
            if attempt:
                self.fail_fast_if_absent()
                self.connect()  # the REQ socket is stuck awaiting a reply: replace it
                t_last = time.perf_counter_ns()
            else:
                t_last = t_first
            self.socket.send_multipart(frames, copy=False)
            if self.wait_for_reply():
                return self.socket.recv_multipart(copy=False), attempt, t_last - t_first
        tries = self.retries + 1
        hint = "; with CURVE on, check that this client's key is authorized" if self.curve_keys else ""
        raise ServerUnavailable(
            f"no reply from {self.endpoint.url} to {method} "
            f"({tries} tr{'y' if tries == 1 else 'ies'} of {self.timeout_ms / 1000:g} s){hint}"
        )

    def wait_for_reply(self) -> bool:
        deadline = time.monotonic() + self.timeout_ms / 1000
        while (left_ms := (deadline - time.monotonic()) * 1000) > 0:
            if self.socket.poll(min(SLICE_MS, max(1, int(left_ms))), zmq.POLLIN):
                return True
            self.fail_fast_if_absent()
        return False

    def decode(self, frames: list) -> tuple[Reply, list[Tensor]]:
        header = unpack_header(frames[0])
        check_version(header)
        reply = Reply.model_validate(header)
        if reply.id != self.next_id:
            raise BadRequest(f"reply id {reply.id} does not match request {self.next_id}")
        if not reply.ok:
            error = from_reply(reply.error.type, reply.error.message)
            if isinstance(error, ModelMismatch):
                raise ModelMismatch(f"the server at {self.endpoint.url} changed model mid-run: {error}")
            raise error
        return reply, unpack_tensors(reply.tensors, frames[1:])

    def check_size(self, method: str, frames: list) -> None:
        """Refuse, before sending, a message the server would drop unread (its --max-message-mb)."""
        size = frame_bytes(frames)
        if self.max_message_bytes is not None and size > self.max_message_bytes:
            raise TooLarge(
                f"a {method} request of {size / 2**20:.3g} MiB is over the server's limit of "
                f"{self.max_message_bytes / 2**20:.3g} MiB (gpu-server --max-message-mb); use a shorter --length "
                "or a smaller --batch-size, or raise the server's limit"
            )

    def record(self, method, frames, reply_frames, reply, times, resends: int, waited_ns: int) -> None:
        stats = current()
        if stats is None:
            return
        t0, t1, t2, t3 = times
        ns = lambda ms: int(ms * 1e6)  # noqa: E731
        timing = reply.timing
        stats.record(
            method,
            Call(
                bytes_sent=frame_bytes(frames),
                bytes_received=frame_bytes(reply_frames),
                wall_ns=t3 - t0,
                transfer_ns=t3 - t0 - ns(timing.compute_ms) - waited_ns,
                compute_ns=ns(timing.compute_ms),
                serialize_ns=t1 - t0,
                deserialize_ns=t3 - t2,
                server_decode_ns=ns(timing.decode_ms),
                server_encode_ns=ns(timing.encode_ms),
                retries=resends,
                retry_wait_ns=waited_ns,
            ),
        )

    # ---- the socket -------------------------------------------------------------------------

    def fail_fast_if_absent(self) -> None:
        """An ipc endpoint with no live socket file cannot answer: say so now, not after the deadline."""
        if self.endpoint.transport == "ipc":
            state = probe_ipc(self.endpoint.path)
            if state != "live":
                raise ServerUnavailable(
                    f"nothing listening at {self.endpoint.url} ({ABSENT[state]}); is gpu-server running?"
                )

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
