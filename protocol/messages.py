"""Pydantic models of every header that crosses the wire, and of each method's arguments.

Each header is validated here before anything is allocated or computed; which method takes
which arguments is the method table's business (tsqp.methods).
"""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, field_validator

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}  # every dtype the wire carries
DType = Literal[tuple(ITEMSIZE)]
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_DIMS = 8
MAX_ELEMENTS = 2**40  # bounds every dimension and the element count (zero dims counted as one)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Offset = Annotated[int, Field(ge=0, le=MAX_ELEMENTS * 8)]  # bytes; any larger cannot lie in a region


class TensorSpec(Strict):
    dtype: DType
    shape: Annotated[list[Annotated[int, Field(ge=0, le=MAX_ELEMENTS)]], Field(max_length=MAX_DIMS)]
    shm: tuple[Offset, Offset] | None = None  # [offset, nbytes] in the sender's shared-memory area (protocol.shm)

    @field_validator("shape")
    @classmethod
    def bounded(cls, shape: list[int]) -> list[int]:
        extent = 1
        for d in shape:  # an empty tensor can still have strides that overflow int64
            extent *= max(d, 1)
        if extent > MAX_ELEMENTS:
            raise ValueError(f"shape {shape} spans more than 2**40 elements")
        return shape

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
    shm: Annotated[str, Field(max_length=64)] | None = None  # the client's shared-memory region (protocol.shm)


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
    timing: Timing = Timing()
    error: ErrorInfo | None = None


# ---- per-method arguments ----------------------------------------------------------------


class NoArgs(Strict):
    pass


def distinct(names: list[str]) -> list[str]:
    if len(set(names)) != len(names):
        raise ValueError("module names must be distinct")
    return names


ModuleNames = Annotated[list[Literal[MODULES]], Field(min_length=1, max_length=3), AfterValidator(distinct)]


class LinearArgs(Strict):
    layer: NonNegativeInt
    names: ModuleNames
    bias: bool = True  # the mix privacy mode adds biases itself, after un-mixing


class ResidualArgs(Strict):
    """Residual: x + a·W_outᵀ (layer's `out` module, with its bias), then the next modules on it, weighted by the
    RMSNorm between them: gate_proj/up_proj after o_proj; q/k/v_proj of layer + 1 after down_proj (lm_head after
    the last layer's)."""

    layer: NonNegativeInt
    out: Literal["o_proj", "down_proj"]
    names: Annotated[list[Literal[(*MODULES, "lm_head")]], Field(min_length=1, max_length=3), AfterValidator(distinct)]


class MatmulArgs(Strict):
    transpose_b: bool = False


class RingArgs(Strict):
    """The ring Z_2^ring_bits of the otp privacy mode, and its limb width (tsqp.ring)."""

    ring_bits: Annotated[int, Field(ge=2, le=62)]
    limb_bits: Annotated[int, Field(ge=1, le=53)]


class LinearRingArgs(RingArgs):
    layer: NonNegativeInt
    names: ModuleNames


class ShmAttachArgs(Strict):
    """A shared-memory region of these sizes for this client (protocol.shm); the server may give less."""

    request_bytes: Annotated[int, Field(ge=1, le=MAX_ELEMENTS)]
    reply_bytes: Annotated[int, Field(ge=1, le=MAX_ELEMENTS)]
    replaces: Annotated[str, Field(max_length=64)] | None = None  # the client's previous region: dropped


class ShmOffer(Strict):
    """Init and Ping, when the server offers shared memory: the largest areas it creates."""

    max_request_bytes: Annotated[int, Field(ge=0, le=MAX_ELEMENTS)]
    max_reply_bytes: Annotated[int, Field(ge=0, le=MAX_ELEMENTS)]


class ShmRegion(Strict):
    """ShmAttach's answer: the region's file name in the shm folder, and the two areas' sizes."""

    name: Annotated[str, Field(max_length=64)]
    request_bytes: Annotated[int, Field(ge=0, le=MAX_ELEMENTS)]
    reply_bytes: Annotated[int, Field(ge=0, le=MAX_ELEMENTS)]


class ShmDetachArgs(Strict):
    name: Annotated[str, Field(max_length=64)]
