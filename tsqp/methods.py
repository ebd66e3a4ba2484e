"""The method table: every call the linear side answers, in one place.

Each entry names the method, the pydantic model of its arguments, how many tensors it takes
and the engine call it dispatches to. gpu-server's handler (behind ZeroMQ) and the in-process
backends of tee-client both go through `dispatch`, so validation, the engine call and its
timing are written once. Adding a method means one line here and its code in the Engine.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel
from torch import Tensor

from protocol.errors import BadShape, UnknownMethod
from protocol.messages import LinearArgs, LinearRingArgs, MatmulArgs, NoArgs, ResidualArgs, RingArgs
from tsqp.engine import Engine
from tsqp.ring import RingSpec

Result = tuple[dict, list[Tensor]]


@dataclass(frozen=True)
class Method:
    args: type[BaseModel]
    n_tensors: int | None  # None: any number (Echo)
    run: Callable[[Engine, BaseModel, list[Tensor]], Result]


METHODS: dict[str, Method] = {
    "Init": Method(NoArgs, 0, lambda e, a, ts: e.init_reply),
    "Ping": Method(NoArgs, 0, lambda e, a, ts: (e.describe(), [])),
    "Echo": Method(NoArgs, None, lambda e, a, ts: ({}, ts)),
    "Embedding": Method(NoArgs, 1, lambda e, a, ts: ({}, [e.embedding(*ts)])),
    "Linear": Method(LinearArgs, 1, lambda e, a, ts: ({}, e.linear(a.layer, a.names, *ts, bias=a.bias))),
    "Matmul": Method(MatmulArgs, 2, lambda e, a, ts: ({}, [e.matmul(*ts, transpose_b=a.transpose_b)])),
    "LMHead": Method(NoArgs, 1, lambda e, a, ts: ({}, [e.lm_head(*ts)])),
    "Residual": Method(ResidualArgs, 2, lambda e, a, ts: ({}, e.residual(a.layer, a.out, a.names, *ts))),
    "LinearRing": Method(LinearRingArgs, 1, lambda e, a, ts: ({}, e.linear_ring(a.layer, a.names, *ts, ring(a)))),
    "LMHeadRing": Method(RingArgs, 1, lambda e, a, ts: ({}, [e.lm_head_ring(*ts, ring(a))])),
}


def ring(args: RingArgs) -> RingSpec:
    return RingSpec(args.ring_bits, args.limb_bits)


def lookup(name: str, n_tensors: int) -> Method:
    """The method `name`, if it exists and takes `n_tensors` tensors."""
    method = METHODS.get(name)
    if method is None:
        raise UnknownMethod(f"unknown method {name!r}; this server answers {', '.join(METHODS)}")
    if method.n_tensors is not None and n_tensors != method.n_tensors:
        raise BadShape(f"{name} takes {method.n_tensors} tensor(s), got {n_tensors}")
    return method


def dispatch(engine: Engine, name: str, args: dict, tensors: list[Tensor]) -> tuple[dict, list[Tensor], int]:
    """Validate, run `name` on `engine`, wait for the device: (result, tensors, compute ns)."""
    method = lookup(name, len(tensors))
    parsed = method.args.model_validate(args)
    t0 = time.perf_counter_ns()
    result, out = method.run(engine, parsed, tensors)
    engine.synchronize()
    return result, out, time.perf_counter_ns() - t0
