"""The TSQP wire format.

Every request and every reply is one ZeroMQ multipart message (REQ/REP):

    frame 0    msgpack header, validated by the pydantic models in protocol.messages
    frame 1..  one frame per entry of header["tensors"]: the tensor's raw bytes,
               C-contiguous, little-endian, exactly prod(shape) * itemsize long

    request    {"v": PROTOCOL_VERSION, "id": n, "method": "Linear",
                "args": {"layer": 3, "names": ["q_proj", "k_proj", "v_proj"]},
                "tensors": [{"dtype": "float32", "shape": [1, 128, 576]}],
                "fingerprint": "…"}   (optional: the model the client initialised with)
    reply      {"v", "id", "ok": true, "result": {...}, "tensors": [...],
                "timing": {"decode_ms", "compute_ms", "encode_ms"}}
    error      {"v", "id", "ok": false, "error": {"type": "BadShape", "message": "..."}}

A server refuses (ModelMismatch) a request whose fingerprint is not its model's, so a client
whose server was replaced mid-run gets an error, never silently different logits.
Tensor elements are never msgpacked: a tensor crosses as one frame, zero-copy above pyzmq's
64 KiB threshold. bfloat16 crosses as its 2-byte payload. `encode_ms` in a reply covers moving
the result to host memory and framing it, everything but the final send.
"""

import warnings
from collections.abc import Sequence

import msgpack
import torch

from protocol.errors import BadRequest, BadShape, VersionMismatch
from protocol.messages import ITEMSIZE, TensorSpec

PROTOCOL_VERSION = 1

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


def encode_tensors(tensors: Sequence[torch.Tensor]) -> tuple[list[dict], list[memoryview]]:
    return [tensor_spec(t) for t in tensors], [tensor_buffer(t) for t in tensors]


def pack(header: dict, tensors: Sequence[torch.Tensor] = ()) -> list:
    """Frames for one message: the msgpack header, then each tensor's raw buffer."""
    specs, buffers = encode_tensors(tensors)
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


def unpack_tensors(specs: Sequence[TensorSpec], frames: Sequence) -> list[torch.Tensor]:
    if len(frames) != len(specs):
        raise BadShape(f"{len(specs)} tensor descriptors but {len(frames)} tensor frames")
    return [tensor_from_buffer(s, f) for s, f in zip(specs, frames, strict=True)]


def frame_bytes(frames: Sequence) -> int:
    return sum(memoryview(f).nbytes for f in frames)
