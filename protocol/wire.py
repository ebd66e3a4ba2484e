"""The TSQP wire format.

Every request and every reply is one ZeroMQ multipart message (REQ/REP):

    frame 0    msgpack header, validated by the pydantic models in protocol.messages
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

import msgpack
import torch
import zmq

from protocol.errors import BadRequest, BadShape, VersionMismatch
from protocol.messages import ITEMSIZE, TensorSpec

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


def pack(header: dict, tensors: Sequence[torch.Tensor] = (), area=None) -> list:
    """Frames for one message: the msgpack header, then each tensor's raw buffer (unless it went to `area`)."""
    specs, buffers = encode_tensors(tensors, area)
    return [msgpack.packb({**header, "tensors": specs}, use_bin_type=True), *buffers]


def unpack_header(frame0) -> dict:
    try:
        header = msgpack.unpackb(memoryview(frame0), raw=False, strict_map_key=True)
    except Exception as e:
        raise BadRequest(f"header is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise BadRequest("header must be a msgpack map")
    return header


def check_version(header: dict) -> None:
    if header.get("v") != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {header.get('v')!r}, this side speaks {PROTOCOL_VERSION}")


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
