"""Every header that crosses the wire, and each method's arguments, as msgspec Structs.

A header is decoded and validated in one pass (protocol.wire.decode_header): types, bounds,
lengths and unknown fields are checked by msgspec while it reads the msgpack bytes, before
anything is allocated or computed. Which method takes which arguments is the method table's
business (tsqp.methods); `parse` validates a method's `args` against its Struct.
"""

from typing import Annotated, Any, Literal

import msgspec

from protocol.errors import BadRequest

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}  # every dtype the wire carries
DType = Literal[tuple(ITEMSIZE)]
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_DIMS = 8
MAX_ELEMENTS = 2**40  # bounds every dimension and the element count (zero dims counted as one)


class Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_ELEMENTS)]
Offset = Annotated[int, msgspec.Meta(ge=0, le=MAX_ELEMENTS * 8)]  # bytes; any larger cannot lie in a region
Name = Annotated[str, msgspec.Meta(max_length=64)]


class TensorSpec(Strict):
    dtype: DType
    shape: Annotated[list[Count], msgspec.Meta(max_length=MAX_DIMS)]
    shm: tuple[Offset, Offset] | None = None  # [offset, nbytes] in the sender's shared-memory area (protocol.shm)

    def __post_init__(self):
        extent = 1
        for d in self.shape:  # an empty tensor can still have strides that overflow int64
            extent *= max(d, 1)
        if extent > MAX_ELEMENTS:
            raise ValueError(f"shape {self.shape} spans more than 2**40 elements")

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


class Request(Strict):
    v: int
    id: int
    method: str
    args: dict[str, Any] = {}
    tensors: list[TensorSpec] = []
    fingerprint: str | None = None  # the model the client initialised with; a server holding another refuses
    shm: Name | None = None  # the client's shared-memory region (protocol.shm)


class Timing(Strict):
    decode_ms: float = 0.0
    compute_ms: float = 0.0
    encode_ms: float = 0.0


class ErrorInfo(Strict):
    type: str
    message: str


class Reply(Strict):
    v: int
    id: int
    ok: bool
    result: dict[str, Any] = {}
    tensors: list[TensorSpec] = []
    timing: Timing = msgspec.field(default_factory=Timing)
    error: ErrorInfo | None = None


# ---- per-method arguments ----------------------------------------------------------------


def parse(kind: type[msgspec.Struct], args: dict):
    """`args` (a request's, or a reply's result) validated as `kind`; BadRequest naming the first problem if not."""
    try:
        return msgspec.convert(args, kind)
    except msgspec.ValidationError as e:
        raise BadRequest(f"{kind.__name__}: {e}") from None


class NoArgs(Strict):
    pass


def distinct(names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise ValueError("module names must be distinct")


Names = Annotated[list[Literal[MODULES]], msgspec.Meta(min_length=1, max_length=3)]


class LinearArgs(Strict):
    layer: Annotated[int, msgspec.Meta(ge=0)]
    names: Names
    bias: bool = True  # the mix privacy mode adds biases itself, after un-mixing

    def __post_init__(self):
        distinct(self.names)


class ResidualArgs(Strict):
    """Residual: x + a·W_outᵀ (layer's `out` module, with its bias), then the next modules on it, weighted by the
    RMSNorm between them: gate_proj/up_proj after o_proj; q/k/v_proj of layer + 1 after down_proj (lm_head after
    the last layer's)."""

    layer: Annotated[int, msgspec.Meta(ge=0)]
    out: Literal["o_proj", "down_proj"]
    names: Annotated[list[Literal[(*MODULES, "lm_head")]], msgspec.Meta(min_length=1, max_length=3)]

    def __post_init__(self):
        distinct(self.names)


class MatmulArgs(Strict):
    transpose_b: bool = False


class RingArgs(Strict):
    """The ring Z_2^ring_bits of the otp privacy mode, and its limb width (tsqp.ring)."""

    ring_bits: Annotated[int, msgspec.Meta(ge=2, le=62)]
    limb_bits: Annotated[int, msgspec.Meta(ge=1, le=53)]


class LinearRingArgs(RingArgs):
    layer: Annotated[int, msgspec.Meta(ge=0)]
    names: Names

    def __post_init__(self):
        distinct(self.names)


class ShmAttachArgs(Strict):
    """A shared-memory region of these sizes for this client (protocol.shm); the server may give less."""

    request_bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_ELEMENTS)]
    reply_bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_ELEMENTS)]
    replaces: Name | None = None  # the client's previous region: dropped


class ShmOffer(Strict):
    """Init and Ping, when the server offers shared memory: the largest areas it creates."""

    max_request_bytes: Count
    max_reply_bytes: Count


class ShmRegion(Strict):
    """ShmAttach's answer: the region's file name in the shm folder, and the two areas' sizes."""

    name: Name
    request_bytes: Count
    reply_bytes: Count


class ShmDetachArgs(Strict):
    name: Name
