"""The client end of the wire: one request, one reply, never a hang. It moves bytes, nothing else.

A tensor goes out and comes back with the same dtype and bytes (what crosses in which dtype
is the ops layer's business, tee_client.ops). Lazy Pirate (zguide): send, then wait for the
reply in slices; on silence close the socket (linger 0), open a fresh one and resend (under a new
id), a bounded number of times; then raise ServerUnavailable. For an ipc:// endpoint the client
also looks at the socket file between slices and before each resend: a missing or stale file
means the server is gone, and it says so at once instead of waiting out its deadlines. Every
method is a pure function of its inputs, so a resend (the same bytes again) is safe; over shared
memory each resend takes a new id, and the server runs no request older than the newest it ran
on that region, so the copies still queued there never run after this client has moved on.

Over ipc:// (unless shared memory is off, or CURVE is on) the client maps a region it shares with
the server (protocol.shm): tensors go into its request area instead of frames, and replies are
copied out of its reply area into reused buffers before anyone sees them, unless the caller
borrows them (`call(..., borrow=True)`: views of the reply area, valid until the next call). The
region is attached when a call first carries tensors, grown when a call needs more room, and
dropped on close; if anything about it fails, calls go on as frames. Nothing else changes: the header is still the
message, and the lockstep of REQ/REP says who owns the region when.
"""

import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import zmq
from torch import Tensor

from protocol.endpoints import Endpoint, probe_ipc
from protocol.errors import (
    BadReply,
    BadRequest,
    ModelMismatch,
    RegionGone,
    ServerUnavailable,
    TooLarge,
    TSQPError,
    VersionMismatch,
    from_reply,
)
from protocol.messages import Reply, Request, ShmOffer, ShmRegion, parse
from protocol.shm import MIN_AREA, Area, aligned, area_size, open_segment
from protocol.wire import (
    PROTOCOL_VERSION,
    decode_header,
    frame_bytes,
    pack,
    recv_frames,
    renumbered,
    send_frames,
    unpack_tensors,
)
from tee_client.stats import Call, current

SLICE_MS = 250  # how often a waiting ipc client looks at the socket file
DETACH_MS = 200  # how long close() waits for the server to take back the shared-memory region
MAX_REGIONS_LOST = 3  # regions lost in a row, none serving a call between: frames from then on
ONE_THREAD_BYTES = 8 << 20  # reply tensors smaller than this are copied out of shared memory on one thread

ABSENT = {
    "missing": "no socket file",
    "stale": "a stale socket file, no server behind it",
    "not-a-socket": "a file that is not a socket",
}


class RpcClient:
    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 30.0,
        retries: int = 2,
        curve_keys: tuple | None = None,
        shm: bool | None = None,
        shm_dir: str | None = None,
    ):
        self.endpoint = Endpoint.parse(endpoint)
        self.curve_keys = curve_keys  # (public, secret, server public): see protocol.security
        self.timeout_ms = max(1, round(timeout_s * 1000))
        self.retries = retries
        self.max_message_bytes: int | None = None  # the server's inbound cap, once its Init reply says it
        # shared memory: wanted here (ipc, not turned off, no CURVE), offered there (Init or Ping), attached;
        # None: as LLAMA_SHM and LLAMA_SHM_DIR say (tsqp.settings)
        if shm is None or shm_dir is None:
            from tsqp.settings import TransportSettings

            defaults = TransportSettings(gpu_endpoint=endpoint)
            shm = defaults.shm if shm is None else shm
            shm_dir = shm_dir or defaults.shm_dir
        self.shm_wanted = shm and self.endpoint.transport == "ipc" and curve_keys is None
        self.shm_dir = shm_dir
        self.shm_offer: ShmOffer | None = None
        self.region: ClientRegion | None = None
        self.reply_need = 0  # bytes of the largest reply that did not fit the reply area: grow it before the next call
        self.regions_lost = 0  # regions in a row the server no longer knew (dropped while idle, evicted, restarted)
        self.buffers = ReplyBuffers()
        self.next_id = 0
        self.socket = None
        self.fail_fast_if_absent()
        self.context = zmq.Context()  # our own, so close() can wait until zmq is done with our buffers
        self.connect()

    def call(
        self,
        method: str,
        args: dict | None = None,
        tensors: Sequence[Tensor] = (),
        fingerprint: str | None = None,
        borrow: bool = False,
    ) -> tuple[dict, list[Tensor]]:
        """Send one request; return the reply's result and tensors, or raise the error it names.

        borrow: a reply tensor in shared memory is handed out where it lies, not copied: valid only until the next
        call (whose reply the server writes over it), and the server could rewrite it meanwhile. For a caller that
        is done with it by then and checks nothing about it (tee_client.ops.Ops.call)."""
        region = self.region_for(tensors) if self.shm_offer is not None and method not in SHM_METHODS else None
        t0 = time.perf_counter_ns()
        self.next_id += 1
        header = {"v": PROTOCOL_VERSION, "id": self.next_id, "method": method, "args": args or {}}
        if fingerprint:
            header["fingerprint"] = fingerprint
        if region is not None:
            header["shm"] = region.name
        frames = pack(header, tensors, region and region.request.reset())
        if region is not None:
            frames = own_frames(frames, region.reply)
        self.check_size(method, frames)
        t1 = time.perf_counter_ns()
        reply_frames, resends, waited_ns = self.exchange(method, frames)
        t2 = time.perf_counter_ns()
        try:
            reply, out = self.decode(reply_frames, region, borrow)
        except RegionGone:
            if region is None:
                raise
            self.region = None  # the server dropped it (or restarted): attach afresh, or use frames, and resend
            self.regions_lost += 1
            if self.regions_lost > MAX_REGIONS_LOST:
                self.shm_offer = None
            # what this attempt sent, not `tensors`: a borrowed one lies where the server may have written since
            return self.call(method, args, sent_tensors(frames, region), fingerprint, borrow)
        if region is not None:
            self.regions_lost = 0  # a region that serves: losses now and then over a long run cost a re-attach each
        t3 = time.perf_counter_ns()
        if method in ("Init", "Ping"):
            self.learn_limits(reply.result)
            if method == "Init" and self.shm_offer is not None and self.region is None:
                self.attach(MIN_AREA, MIN_AREA)  # set up with the model, not in the first forward; grown on demand
        sent = len(frames[0]) + sum(t.nbytes for t in tensors)
        self.record(
            method, sent, len(reply_frames[0]) + sum(t.nbytes for t in out), reply, (t0, t1, t2, t3), resends, waited_ns
        )
        return reply.result, out

    def exchange(self, method: str, frames: list) -> tuple[list, int, int]:
        """The reply frames, how many resends it took, and the time spent waiting before the last send."""
        t_first = time.perf_counter_ns()
        for attempt in range(self.retries + 1):
            if attempt:
                self.fail_fast_if_absent()
                self.connect()  # the REQ socket is stuck awaiting a reply: replace it
                # a new id: the copies already sent still reach the server, which runs none older than the newest
                # on a region (gpu_server.regions), so that none runs after this client has moved on
                self.next_id += 1
                frames = [renumbered(frames[0], self.next_id), *frames[1:]]
                t_last = time.perf_counter_ns()
            else:
                t_last = t_first
            send_frames(self.socket, frames)
            if (reply := self.receive()) is not None:
                return reply, attempt, t_last - t_first
        tries = self.retries + 1
        hint = "; with CURVE on, check that this client's key is authorized" if self.curve_keys else ""
        raise ServerUnavailable(
            f"no reply from {self.endpoint.url} to {method} "
            f"({tries} tr{'y' if tries == 1 else 'ies'} of {self.timeout_ms / 1000:g} s){hint}"
        )

    def receive(self) -> list | None:
        """The reply's frames, waited for in slices (between them an ipc client looks at the socket file);
        None at the deadline. A blocking recv with a timeout: no poll call on the way of every reply."""
        deadline = time.monotonic() + self.timeout_ms / 1000
        while (left_ms := (deadline - time.monotonic()) * 1000) > 0:
            wait_ms = min(SLICE_MS, max(1, int(left_ms)))
            if wait_ms != self.rcvtimeo:
                self.socket.setsockopt(zmq.RCVTIMEO, wait_ms)
                self.rcvtimeo = wait_ms
            try:
                return recv_frames(self.socket)
            except zmq.Again:
                self.fail_fast_if_absent()
        return None

    def decode(
        self, frames: list, region: "ClientRegion | None" = None, borrow: bool = False
    ) -> tuple[Reply, list[Tensor]]:
        try:
            reply = decode_header(frames[0], Reply)
        except VersionMismatch:
            raise
        except BadRequest as e:  # a server that sent what no version of this protocol is
            raise BadReply(f"the server's reply header is malformed: {e}") from None
        if reply.id != self.next_id:
            raise BadRequest(f"reply id {reply.id} does not match request {self.next_id}")
        if not reply.ok:
            if reply.error is None:
                raise BadReply("the server replied not ok, naming no error")
            error = from_reply(reply.error.type, reply.error.message)
            if isinstance(error, ModelMismatch):
                raise ModelMismatch(f"the server at {self.endpoint.url} changed model mid-run: {error}")
            raise error
        out = unpack_tensors(reply.tensors, frames[1:], region and region.reply)
        if region is None:
            return reply, out
        framed = sum(s.nbytes for s in reply.tensors if s.shm is None)
        if framed:  # did not fit the reply area: make it large enough before the next call
            self.reply_need = max(self.reply_need, sum(aligned(s.nbytes) for s in reply.tensors))
        if borrow:
            return reply, out
        # the server may write the reply area again later: copy out now, into reused memory
        return reply, [t if s.shm is None else self.buffers.copy(t) for s, t in zip(reply.tensors, out, strict=True)]

    # ---- shared memory (protocol.shm) ---------------------------------------------------------

    def learn_limits(self, result: dict) -> None:
        """What Init and Ping tell: the server's message cap, and whether it offers shared memory."""
        self.max_message_bytes = result.get("max_message_bytes")
        offer = result.get("shm")
        if self.shm_wanted and offer is not None and self.shm_offer is None:
            try:
                self.shm_offer = parse(ShmOffer, offer)
            except BadRequest:
                self.shm_wanted = False  # a server we do not understand: frames

    def reserve(self, shape, dtype: torch.dtype) -> Tensor | None:
        """A tensor in the request area for the next call to send where it lies, not copied at the send: the caller
        computes into it, then passes it in that call's tensors. None without a region or room (compute elsewhere:
        the call copies it as ever); valid for the next call only."""
        return self.region.request.reserve(shape, dtype) if self.region is not None else None

    def region_for(self, tensors: Sequence[Tensor]) -> "ClientRegion | None":
        """The region to use for this call: attached, or grown, when these tensors or the last reply need it."""
        region = self.region
        if region is None and not tensors:
            return None  # nothing to place: do not set up shared memory for a bare call
        offer = self.shm_offer
        need = area_size(sum(aligned(t.nbytes) for t in tensors), offer.max_request_bytes)
        want = area_size(self.reply_need, offer.max_reply_bytes)
        if region is None or need > region.request.size or want > region.reply.size:
            if region is not None:
                need, want = max(need, region.request.size), max(want, region.reply.size)
            region = self.attach(need, want)
        return region

    def attach(self, request_bytes: int, reply_bytes: int) -> "ClientRegion | None":
        """A (new, larger) region from the server, mapped here; None, and frames from now on, if that fails."""
        old, self.region = self.region, None
        args = {"request_bytes": request_bytes, "reply_bytes": reply_bytes, "replaces": old and old.name}
        try:
            info = parse(ShmRegion, self.call("ShmAttach", args)[0]["shm"])
            if info.request_bytes > request_bytes or info.reply_bytes > reply_bytes:
                raise BadRequest("the server made a larger region than asked for")
            segment = open_segment(self.shm_dir, info.name, info.request_bytes + info.reply_bytes)
            region = ClientRegion(info.name, *segment.areas(info.request_bytes))
        except ServerUnavailable:
            raise  # nothing answers: that is the user's error, not shared memory's
        except (TSQPError, OSError, KeyError, TypeError):
            self.shm_offer = None  # no error to the user: every call goes on as frames
            return None
        self.region = region
        return region

    def detach(self) -> None:
        """Hand the region back (best effort, DETACH_MS at most); it is unmapped here once unused."""
        region, self.region = self.region, None
        if region is None or (self.endpoint.transport == "ipc" and probe_ipc(self.endpoint.path) != "live"):
            return
        self.next_id += 1
        header = {"v": PROTOCOL_VERSION, "id": self.next_id, "method": "ShmDetach", "args": {"name": region.name}}
        try:
            self.connect()  # the REQ socket may be waiting for a reply that never came
            self.socket.send_multipart(pack(header))
            self.socket.poll(DETACH_MS)  # delivered and done; the reply itself says nothing
        except zmq.ZMQError:
            pass

    def check_size(self, method: str, frames: list) -> None:
        """Refuse, before sending, a message the server would drop unread (its --max-message-mb)."""
        size = frame_bytes(frames)
        if self.max_message_bytes is not None and size > self.max_message_bytes:
            raise TooLarge(
                f"a {method} request of {size / 2**20:.3g} MiB is over the server's limit of "
                f"{self.max_message_bytes / 2**20:.3g} MiB (gpu-server --max-message-mb); use a shorter --length "
                "or a smaller --batch-size, or raise the server's limit"
            )

    def record(self, method, sent: int, received: int, reply, times, resends: int, waited_ns: int) -> None:
        stats = current()
        if stats is None:
            return
        t0, t1, t2, t3 = times
        ns = lambda ms: int(ms * 1e6)  # noqa: E731
        timing = reply.timing
        stats.record(
            method,
            Call(
                bytes_sent=sent,
                bytes_received=received,
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
        self.rcvtimeo = -1  # zmq's default: block; set per wait (`receive`)
        if self.curve_keys:
            self.socket.curve_publickey, self.socket.curve_secretkey, self.socket.curve_serverkey = self.curve_keys
        self.socket.connect(self.endpoint.url)

    def close(self) -> None:
        """Drop anything unsent and wait until zmq lets go of the (zero-copy) request buffers."""
        if self.socket is not None:
            self.detach()
            self.socket.close(linger=0)
            self.socket = None
            self.context.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


SHM_METHODS = ("ShmAttach", "ShmDetach")  # they set shared memory up: never sent through it


def own_frames(frames: list, reply: Area) -> list:
    """`frames`, each tensor frame that views the reply area (a borrowed reply tensor sent back that did not fit the
    request area) replaced by a copy: the server writes its next reply there, and a resend must carry what this
    attempt did. A tensor placed in the request area was copied there already."""
    out = frames[:1]
    for frame in frames[1:]:
        view = np.frombuffer(frame, dtype=np.uint8)
        start = view.ctypes.data - reply.base
        out.append(view.copy() if -view.nbytes < start < reply.size else frame)
    return out


def sent_tensors(frames: list, region: "ClientRegion") -> list[Tensor]:
    """The tensors a request sent, as its frames and its request area hold them: what a resend must carry."""
    return unpack_tensors(decode_header(frames[0], Request).tensors, frames[1:], region.request)


@dataclass(eq=False)
class ClientRegion:
    name: str
    request: Area  # this client writes
    reply: Area  # the server writes; copied out of before use


class ReplyBuffers:
    """Where reply tensors are copied out of shared memory: reused memory, no fresh allocation per reply.

    A buffer is handed out again only once nothing else holds it: no Python reference but the
    pool's, no other tensor (a view) on its storage; so a reply never overwrites a tensor the model
    still uses. Up to PER_SHAPE buffers are kept per dtype and shape; beyond that (or if this torch
    cannot count storage users) a copy gets fresh memory.
    """

    PER_SHAPE = 4

    def __init__(self):
        self.pool: dict[tuple, list[Tensor]] = defaultdict(list)

    def copy(self, src: Tensor) -> Tensor:
        """src in a reused buffer; below ONE_THREAD_BYTES by this thread alone: waking a second one cost more than
        it gave (a forward's replies, 512 tokens: ~22 ms of copies instead of ~32), and leaves the reply in this
        core's cache. Larger copies are bandwidth: two threads (64 MiB: ~4.1 ms instead of ~4.9)."""
        if src.nbytes >= ONE_THREAD_BYTES:
            return self.take(src.dtype, src.shape).copy_(src)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.take(src.dtype, src.shape).copy_(src)
        finally:
            torch.set_num_threads(threads)

    def take(self, dtype: torch.dtype, shape) -> Tensor:
        kept = self.pool[(dtype, tuple(shape))]
        for buf in kept:  # as in _alone: the pool's list, this loop and the call hold it
            if _ALONE is not None and _holders(buf) == _ALONE:
                return buf
        with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
            buf = torch.empty(shape, dtype=dtype)
        if len(kept) < self.PER_SHAPE:
            kept.append(buf)
        return buf


def _holders(t: Tensor) -> tuple[int, int]:
    """(tensors on t's storage, Python references to t): both count this call's own."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata), sys.getrefcount(t)


def _alone() -> tuple[int, int] | None:
    """_holders of a pooled buffer nothing else holds, seen from where `take` looks (a list, a loop)."""
    try:
        for buf in [torch.empty(1)]:
            return _holders(buf)
    except (AttributeError, RuntimeError):  # no such private call in this torch: never reuse, always correct
        return None


_ALONE = _alone()
