"""Pydantic models of every header that crosses the wire, and the method table.

Each header is validated here before anything is allocated or computed.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}  # every dtype the wire carries
DType = Literal[tuple(ITEMSIZE)]
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_DIMS = 8


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(Strict):
    dtype: DType
    shape: Annotated[list[NonNegativeInt], Field(max_length=MAX_DIMS)]

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


class LinearArgs(Strict):
    layer: NonNegativeInt
    names: Annotated[list[Literal[MODULES]], Field(min_length=1, max_length=3)]

    @field_validator("names")
    @classmethod
    def distinct(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("module names must be distinct")
        return names


class MatmulArgs(Strict):
    transpose_b: bool = False


class Method(Strict):
    args: type[BaseModel]
    n_tensors: int | None  # None: any number (Echo)


METHODS: dict[str, Method] = {
    "Init": Method(args=NoArgs, n_tensors=0),
    "Ping": Method(args=NoArgs, n_tensors=0),
    "Echo": Method(args=NoArgs, n_tensors=None),
    "Embedding": Method(args=NoArgs, n_tensors=1),
    "Linear": Method(args=LinearArgs, n_tensors=1),
    "Matmul": Method(args=MatmulArgs, n_tensors=2),
    "LMHead": Method(args=NoArgs, n_tensors=1),
}
