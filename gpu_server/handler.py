"""One request in, one reply out: the protocol side of gpu-server.

`Handler.handle` never raises: whatever the frames hold, the answer is a reply, and an
error reply names the error's type (protocol.errors) and what was wrong. What a method does
is the method table's business (tsqp.methods); this file only decodes, dispatches, encodes.
"""

import logging
import time
from pathlib import Path

import msgpack
import torch
from pydantic import ValidationError

from protocol.errors import BadRequest, BadShape, ModelMismatch, TSQPError
from protocol.messages import Request
from protocol.wire import PROTOCOL_VERSION, check_version, encode_tensors, unpack_header, unpack_tensors
from tsqp.engine import Engine
from tsqp.methods import dispatch

log = logging.getLogger("gpu_server")


class Handler:
    def __init__(self, engine: Engine, max_message_bytes: int | None = None, record_dir: Path | None = None):
        self.engine = engine
        self.served = 0
        self.errors = 0
        self.limits = {"max_message_bytes": max_message_bytes} if max_message_bytes else {}
        self.record_dir = record_dir  # gpu-server --record: keep every request's tensors, as a spy would

    def handle(self, frames: list) -> list:
        self.served += 1
        header = {}
        try:
            t0 = time.perf_counter_ns()
            header = unpack_header(frames[0])
            request = self.decode(header)
            tensors = unpack_tensors(request.tensors, frames[1:])
            if self.record_dir is not None:
                self.record(request, tensors)
            t1 = time.perf_counter_ns()
            result, out, compute_ns = dispatch(self.engine, request.method, request.args, tensors)
            if request.method == "Ping":  # how this server is doing, beside what the model is
                result = {**result, **self.limits, "served": self.served, "errors": self.errors}
            elif request.method == "Init":  # so a client refuses to send what this server would drop
                result = {**result, **self.limits}
            t2 = time.perf_counter_ns()
            specs, buffers = encode_tensors(out)
            t3 = time.perf_counter_ns()
        except Exception as e:  # every failure becomes a reply; the server keeps serving
            self.errors += 1
            return [msgpack.packb(self.error_header(header, e), use_bin_type=True)]
        timing = {"decode_ms": (t1 - t0) / 1e6, "compute_ms": compute_ns / 1e6, "encode_ms": (t3 - t2) / 1e6}
        reply = {"v": PROTOCOL_VERSION, "id": request.id, "ok": True, "result": result, "tensors": specs}
        return [msgpack.packb({**reply, "timing": timing}, use_bin_type=True), *buffers]

    def decode(self, header: dict) -> Request:
        check_version(header)
        request = Request.model_validate(header)
        fingerprint = self.engine.ckpt.fingerprint
        if request.fingerprint not in (None, fingerprint):
            raise ModelMismatch(
                f"this server holds {self.engine.ckpt.name} (fingerprint {fingerprint[:12]}), "
                f"the request was made for fingerprint {request.fingerprint[:12]}"
            )
        return request

    def record(self, request: Request, tensors: list) -> None:
        """Save what this request showed the server: REQUESTNUMBER-METHOD.pt with method, args, tensors."""
        path = self.record_dir / f"{self.served:08d}-{request.method}.pt"
        torch.save({"method": request.method, "args": request.args, "tensors": [t.clone() for t in tensors]}, path)

    @staticmethod
    def error_header(header: dict, e: Exception) -> dict:
        request_id = header.get("id") if isinstance(header.get("id"), int) else 0
        if isinstance(e, ValidationError):
            first = e.errors()[0]
            kind = BadShape if first["loc"][:1] == ("tensors",) else BadRequest  # a tensor descriptor, or the rest
            e = kind(f"invalid {header.get('method', 'request')!s:.40}: {first['loc']} {first['msg']}")
        if isinstance(e, TSQPError):
            error = {"type": type(e).__name__, "message": str(e)}
        else:  # a bug, or a library failing on input we did not foresee: the log keeps the traceback
            log.error("internal error answering %.40s", header.get("method"), exc_info=e)
            error = {"type": "InternalError", "message": f"{type(e).__name__} (details in the server log)"}
        return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error}
