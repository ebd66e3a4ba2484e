"""The TSQP wire format.

Every request and every reply is one ZeroMQ multipart message (REQ/REP):

    frame 0    msgpack header, decoded straight into the Structs of protocol.messages
    frame 1..  one frame per entry of header["tensors"] without "shm": the tensor's raw
               bytes, C-contiguous, little-endian, exactly prod(shape) * itemsize long

    A tensor spec with "shm": [offset, nbytes] has no frame: its bytes lie at that offset
    in the sender's area of the client's shared-memory region (ipc:// only; protocol.shm
    has the layout, the handshake and who owns what when), and the header names the
    region: request {"shm": "tsqp-shm-…"}. Tensors that do not fit there cross as frames.

    request    {"v": PROTOCOL_VERSION, "id": n, "method": "Linear",
                "args": {"layer": 3, "names": ["q_proj", "k_proj", "v_proj"]},
                "tensors": [{"dtype": "float32", "shape": [1, 128, 576]}],
                "fingerprint": "…",   (optional: the model the client initialised with)
                "shm": "tsqp-shm-…"}  (optional: the client's shared-memory region)
    reply      {"v", "id", "ok": true, "result": {...}, "tensors": [...],
                "timing": {"decode_ms", "compute_ms", "encode_ms"}}
    error      {"v", "id", "ok": false, "error": {"type": "BadShape", "message": "..."}}

A server refuses (ModelMismatch) a request whose fingerprint is not its model's, so a client
whose server was replaced mid-run gets an error, never silently different logits.
Tensor elements are never msgpacked: a tensor crosses as one frame, zero-copy above pyzmq's
64 KiB threshold, or through shared memory. bfloat16 crosses as its 2-byte payload. `encode_ms`
in a reply covers moving the result to host memory and framing or placing it, everything but
the final send.
"""

import warnings
from collections.abc import Sequence

import msgspec
import torch
import zmq

from protocol.errors import BadRequest, BadShape, VersionMismatch
from protocol.messages import ITEMSIZE, Reply, Request, TensorSpec

PROTOCOL_VERSION = 2  # 2: tensors may lie in shared memory (protocol.shm)

# Received frames are read-only and tensors view them without a copy; nothing writes to them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

TORCH_DTYPES = {name: getattr(torch, name) for name in ITEMSIZE}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def tensor_spec(t: torch.Tensor) -> dict:
    if t.dtype not in DTYPE_NAMES:
        raise BadShape(f"dtype {t.dtype} cannot cross the wire")
    return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """The raw bytes of `t` (moved to host memory, made contiguous), without copying again."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def tensor_from_buffer(spec: TensorSpec, buf) -> torch.Tensor:
    """A tensor viewing `buf` (no copy); the byte length must match the descriptor."""
    view = memoryview(buf)
    if view.nbytes != spec.nbytes:
        raise BadShape(f"frame has {view.nbytes} bytes, {spec.dtype}{spec.shape} needs {spec.nbytes}")
    if spec.numel == 0:
        return torch.empty(spec.shape, dtype=TORCH_DTYPES[spec.dtype])
    return torch.frombuffer(view, dtype=TORCH_DTYPES[spec.dtype]).view(spec.shape)


def encode_tensors(tensors: Sequence[torch.Tensor], area=None) -> tuple[list[dict], list[memoryview]]:
    """Specs and frames; with `area` (this side's protocol.shm.Area) each tensor that fits is placed there instead."""
    specs, buffers = [], []
    for t in tensors:
        spec = tensor_spec(t)
        at = area.place(t) if area is not None else None
        if at is None:
            buffers.append(tensor_buffer(t))
        else:
            spec["shm"] = at
        specs.append(spec)
    return specs, buffers


ENCODER = msgspec.msgpack.Encoder()
UNREADABLE = (msgspec.DecodeError, ValueError, RecursionError)  # bad msgpack, bad UTF-8, nested too deep
DECODERS = {kind: msgspec.msgpack.Decoder(kind) for kind in (Request, Reply)}


def encode_header(header: dict) -> bytes:
    return ENCODER.encode(header)


def pack(header: dict, tensors: Sequence[torch.Tensor] = (), area=None) -> list:
    """Frames for one message: the msgpack header, then each tensor's raw buffer (unless it went to `area`)."""
    specs, buffers = encode_tensors(tensors, area)
    return [encode_header({**header, "tensors": specs}), *buffers]


def renumbered(frame0: bytes, request_id: int) -> bytes:
    """A request header again, under another id (a resend: see tee_client.rpc)."""
    return encode_header({**msgspec.msgpack.decode(frame0), "id": request_id})


def decode_header(frame0, kind: type[Request] | type[Reply]) -> Request | Reply:
    """Frame 0 as a `kind`, decoded and validated in one pass; VersionMismatch for a peer speaking another
    version, BadShape for a broken tensor descriptor, BadRequest for anything else that is wrong."""
    try:
        header = DECODERS[kind].decode(frame0)
    except UNREADABLE as e:
        raise header_error(frame0, e) from None
    if header.v != PROTOCOL_VERSION:
        raise version_mismatch(header.v)
    return header


def loose_header(frame0) -> dict:
    """Frame 0 as a plain map, whatever it holds ({} if it is none): for the error path, where the typed
    decode failed but a reply still names the request's id."""
    try:
        header = msgspec.msgpack.decode(frame0)
    except UNREADABLE:
        return {}
    return header if isinstance(header, dict) else {}


def header_error(frame0, e: Exception) -> Exception:
    """Why a header did not decode, as the error its sender is told (another version first)."""
    if not isinstance(e, msgspec.ValidationError):
        return BadRequest(f"header is not valid msgpack ({type(e).__name__}: {e})")
    header = loose_header(frame0)
    if not header:
        return BadRequest("header must be a msgpack map")
    if header.get("v") != PROTOCOL_VERSION:
        return version_mismatch(header.get("v"))
    kind = BadShape if "at `$.tensors" in str(e) else BadRequest  # a tensor descriptor, or the rest
    return kind(f"invalid {header.get('method', 'header')!s:.40}: {e}")


def version_mismatch(v) -> VersionMismatch:
    return VersionMismatch(f"protocol version {v!r}, this side speaks {PROTOCOL_VERSION}")


def unpack_tensors(specs: Sequence[TensorSpec], frames: Sequence, area=None) -> list[torch.Tensor]:
    """Tensors viewing their frames, or (specs with "shm") the peer's `area`, each checked against it first."""
    framed = [s for s in specs if s.shm is None]
    if len(frames) != len(framed):
        raise BadShape(f"{len(framed)} tensor descriptors without shared memory but {len(frames)} tensor frames")
    if area is None and len(framed) != len(specs):
        raise BadShape("a tensor lies in shared memory, but the message names no region of this peer")
    frames = iter(frames)
    return [tensor_from_buffer(s, next(frames)) if s.shm is None else area.view(s) for s in specs]


def frame_bytes(frames: Sequence) -> int:
    return sum(memoryview(f).nbytes for f in frames)


def send_frames(socket: zmq.Socket, frames: Sequence) -> None:
    """Send one message: the header copied (small: cheapest), tensor frames zero-copy."""
    last = len(frames) - 1
    socket.send(frames[0], zmq.SNDMORE if last else 0)
    for i in range(1, last + 1):
        socket.send(frames[i], zmq.SNDMORE if i < last else 0, copy=False)


def recv_frames(socket: zmq.Socket) -> list:
    """Receive one message (zmq.Again past the socket's RCVTIMEO): the header as bytes, tensor frames zero-copy."""
    frames = [socket.recv()]
    while socket.getsockopt(zmq.RCVMORE):
        frames.append(socket.recv(copy=False))
    return frames
