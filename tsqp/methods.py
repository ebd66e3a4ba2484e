"""The method table: every call the linear side answers, in one place.

Each entry names the method, the Struct of its arguments (protocol.messages), how many tensors it takes,
the engine call it dispatches to, and the shapes of its reply. gpu-server's handler (behind
ZeroMQ) and the in-process backends of tee-client both go through `dispatch`, so validation,
the engine call and its timing are written once; tee-client holds every reply to its shapes
(tee_client.ops.check_reply), so a broken or hostile server gets a one-line BadReply, not a
crash. Adding a method means one line here and its code in the Engine.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
from torch import Tensor

from protocol.errors import BadShape, UnknownMethod
from protocol.messages import LinearArgs, LinearRingArgs, MatmulArgs, NoArgs, ResidualArgs, RingArgs, parse
from tsqp.engine import Engine
from tsqp.ring import RingSpec
from tsqp.spec import out_features

Result = tuple[dict, list[Tensor]]


@dataclass(frozen=True)
class Method:
    args: type[msgspec.Struct]
    n_tensors: int | None  # None: any number (Echo)
    run: Callable[[Engine, msgspec.Struct, list[Tensor]], Result]
    # the shapes of the result's tensors, from the model's config, the request's args (as sent) and tensors; None:
    # nothing to say (Init, Ping, Echo). The client holds every reply to them (tee_client.ops.check_reply).
    shapes: Callable[[Any, dict, list[Tensor]], list[tuple]] | None = None


# ---- what each reply holds (Method.shapes) -------------------------------------------------------


def embedded(config, args: dict, tensors: list[Tensor]) -> list[tuple]:
    return [(*tensors[0].shape, config.hidden_size)]


def products(config, args: dict, tensors: list[Tensor]) -> list[tuple]:
    """One product per module named, of the last tensor (Linear's x, Residual's residual stream)."""
    rows = tuple(tensors[-1].shape[:-1])
    return [(*rows, out_features(config, name)) for name in args["names"]]


def residual(config, args: dict, tensors: list[Tensor]) -> list[tuple]:
    return [tuple(tensors[1].shape), *products(config, args, tensors)]


def product(config, args: dict, tensors: list[Tensor]) -> list[tuple]:
    return [matmul_shape(*tensors, args.get("transpose_b", False))]


def matmul_shape(a: Tensor, b: Tensor, transpose_b: bool) -> tuple:
    """The shape of a·b (a·bᵀ with transpose_b): the broadcast batch, a's rows, b's columns."""
    cols = b.shape[-2] if transpose_b else b.shape[-1]
    return (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], cols)


def logits(config, args: dict, tensors: list[Tensor]) -> list[tuple]:
    return [(*tensors[0].shape[:-1], config.vocab_size)]


METHODS: dict[str, Method] = {
    "Init": Method(NoArgs, 0, lambda e, a, ts: e.init_reply),
    "Ping": Method(NoArgs, 0, lambda e, a, ts: (e.describe(), [])),
    "Echo": Method(NoArgs, None, lambda e, a, ts: ({}, ts)),
    "Embedding": Method(NoArgs, 1, lambda e, a, ts: ({}, [e.embedding(*ts)]), embedded),
    "Linear": Method(LinearArgs, 1, lambda e, a, ts: ({}, e.linear(a.layer, a.names, *ts, bias=a.bias)), products),
    "Matmul": Method(MatmulArgs, 2, lambda e, a, ts: ({}, [e.matmul(*ts, transpose_b=a.transpose_b)]), product),
    "LMHead": Method(NoArgs, 1, lambda e, a, ts: ({}, [e.lm_head(*ts)]), logits),
    "Residual": Method(ResidualArgs, 2, lambda e, a, ts: ({}, e.residual(a.layer, a.out, a.names, *ts)), residual),
    "LinearRing": Method(
        LinearRingArgs, 1, lambda e, a, ts: ({}, e.linear_ring(a.layer, a.names, *ts, ring(a))), products
    ),
    "LMHeadRing": Method(RingArgs, 1, lambda e, a, ts: ({}, [e.lm_head_ring(*ts, ring(a))]), logits),
}


def ring(args: RingArgs) -> RingSpec:
    return RingSpec(args.ring_bits, args.limb_bits)


def reply_layout(config, name: str, args: dict, tensors: list[Tensor], wire_dtype) -> tuple[list, torch.dtype] | None:
    """The shapes (Method.shapes) and the dtype a reply to this request must have: int64 for the ring methods, the
    wire's dtype for the others; None where the table says nothing (Init, Ping, Echo)."""
    method = METHODS.get(name)
    if method is None or method.shapes is None:
        return None
    return method.shapes(config, args, tensors), torch.int64 if issubclass(method.args, RingArgs) else wire_dtype


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
    parsed = parse(method.args, args)
    t0 = time.perf_counter_ns()
    result, out = method.run(engine, parsed, tensors)
    engine.synchronize()
    return result, out, time.perf_counter_ns() - t0
