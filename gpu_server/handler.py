"""One request in, one reply out: the protocol side of gpu-server.

`Handler.handle` never raises: whatever the frames hold, the answer is a reply, and an
error reply names the error's type (protocol.errors) and what was wrong.
"""

import sys
import time

import msgpack
from pydantic import ValidationError

from gpu_server.engine import Engine
from protocol.errors import BadRequest, BadShape, ModelMismatch, TSQPError, UnknownMethod
from protocol.messages import METHODS, Request
from protocol.wire import PROTOCOL_VERSION, check_version, encode_tensors, unpack_header, unpack_tensors


class Handler:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.served = 0
        self.errors = 0
        self.methods = {
            "Init": lambda args, ts: self.engine.init(),
            "Ping": lambda args, ts: (self.ping(), []),
            "Echo": lambda args, ts: ({}, ts),
            "Embedding": lambda args, ts: ({}, [self.engine.embedding(*ts)]),
            "Linear": lambda args, ts: ({}, self.engine.linear(args.layer, args.names, *ts)),
            "Matmul": lambda args, ts: ({}, [self.engine.matmul(*ts, transpose_b=args.transpose_b)]),
            "LMHead": lambda args, ts: ({}, [self.engine.lm_head(*ts)]),
        }

    def handle(self, frames: list) -> list:
        self.served += 1
        header = {}
        try:
            t0 = time.perf_counter_ns()
            header = unpack_header(frames[0])
            request, args, tensors = self.decode(header, frames[1:])
            t1 = time.perf_counter_ns()
            result, out = self.methods[request.method](args, tensors)
            self.engine.synchronize()
            t2 = time.perf_counter_ns()
            specs, buffers = encode_tensors(out)
            t3 = time.perf_counter_ns()
        except Exception as e:  # every failure becomes a reply; the server keeps serving
            self.errors += 1
            return [msgpack.packb(self.error_header(header, e), use_bin_type=True)]
        timing = {"decode_ms": (t1 - t0) / 1e6, "compute_ms": (t2 - t1) / 1e6, "encode_ms": (t3 - t2) / 1e6}
        reply = {
            "v": PROTOCOL_VERSION,
            "id": request.id,
            "ok": True,
            "result": result,
            "tensors": specs,
            "timing": timing,
        }
        return [msgpack.packb(reply, use_bin_type=True), *buffers]

    def decode(self, header: dict, frames: list):
        check_version(header)
        request = Request.model_validate(header)
        method = METHODS.get(request.method)
        if method is None:
            raise UnknownMethod(f"unknown method {request.method!r}; this server answers {', '.join(METHODS)}")
        if method.n_tensors is not None and len(request.tensors) != method.n_tensors:
            raise BadShape(f"{request.method} takes {method.n_tensors} tensor(s), got {len(request.tensors)}")
        if request.fingerprint not in (None, self.engine.ckpt.fingerprint):
            raise ModelMismatch(
                f"this server holds {self.engine.ckpt.name} (fingerprint {self.engine.ckpt.fingerprint[:12]}), "
                f"the request was made for fingerprint {request.fingerprint[:12]}"
            )
        args = method.args.model_validate(request.args)
        return request, args, unpack_tensors(request.tensors, frames)

    def ping(self) -> dict:
        ckpt = self.engine.ckpt
        return {
            "model": ckpt.name,
            "fingerprint": ckpt.fingerprint,
            "protocol": PROTOCOL_VERSION,
            "device": str(self.engine.device),
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "served": self.served,
            "errors": self.errors,
        }

    @staticmethod
    def error_header(header: dict, e: Exception) -> dict:
        request_id = header.get("id") if isinstance(header.get("id"), int) else 0
        if isinstance(e, ValidationError):
            e = BadRequest(
                f"invalid {header.get('method', 'request')!s:.40}: {e.errors()[0]['loc']} {e.errors()[0]['msg']}"
            )
        if isinstance(e, TSQPError):
            error = {"type": type(e).__name__, "message": str(e)}
        else:
            print(f"gpu-server: internal error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            error = {"type": "InternalError", "message": f"{type(e).__name__}: {e}"}
        return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error}
