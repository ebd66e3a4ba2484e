"""One request in, one reply out: the protocol side of gpu-server.

`Handler.handle` never raises: whatever the frames hold, the answer is a reply, and an
error reply names the error's type (protocol.errors) and what was wrong. What a method does
is the method table's business (tsqp.methods); this file only decodes, dispatches, encodes.
"""

import logging
import time
from pathlib import Path

import torch

from gpu_server.regions import Regions
from protocol.errors import BadRequest, BadShape, ModelMismatch, RegionGone, TSQPError, UsageError
from protocol.messages import Request, ShmAttachArgs, ShmDetachArgs, parse
from protocol.wire import PROTOCOL_VERSION, decode_header, encode_header, encode_tensors, loose_header, unpack_tensors
from tsqp.engine import Engine
from tsqp.methods import dispatch

log = logging.getLogger("gpu_server")
SHM_METHODS = ("ShmAttach", "ShmDetach")  # transport, not model: answered here (protocol.shm)


class Handler:
    def __init__(
        self,
        engine: Engine,
        max_message_bytes: int | None = None,
        record_dir: Path | None = None,
        fault: "Fault | None" = None,
        regions: Regions | None = None,
    ):
        self.engine = engine
        self.served = 0
        self.errors = 0
        self.limits = {"max_message_bytes": max_message_bytes} if max_message_bytes else {}
        self.record_dir = record_dir  # gpu-server --record: keep every request's tensors, as a spy would
        self.fault = fault  # gpu-server --inject-fault (tests only): a lying server
        self.regions = regions  # shared memory with ipc clients (gpu_server.regions); None: frames only
        if regions is not None:  # Init and Ping say so
            self.limits["shm"] = regions.offer()

    def handle(self, frames: list) -> list:
        self.served += 1
        try:
            t0 = time.perf_counter_ns()
            request = self.decode(frames[0])
            region = self.region(request)
            tensors = unpack_tensors(request.tensors, frames[1:], region and region.request)
            if region is not None:  # token ids are checked, then indexed with: not from memory the client can change
                tensors = [t if t.is_floating_point() else t.clone() for t in tensors]
            if self.record_dir is not None and request.method not in SHM_METHODS:  # what the model calls showed
                self.record(request, tensors)
            t1 = time.perf_counter_ns()
            if region is None:
                result, out, compute_ns = self.dispatch(request, tensors)
            else:
                with self.engine.results_in(region.reply.reset().take):  # results straight into the reply area
                    result, out, compute_ns = self.dispatch(request, tensors)
            if request.method == "Ping":  # how this server is doing, beside what the model is
                result = {**result, **self.limits, "served": self.served, "errors": self.errors}
            elif request.method == "Init":  # so a client refuses to send what this server would drop
                result = {**result, **self.limits}
            if self.fault is not None:
                out = self.fault.apply(request.method, out)
            t2 = time.perf_counter_ns()
            specs, buffers = encode_tensors(out, region and region.reply)
            t3 = time.perf_counter_ns()
        except Exception as e:  # every failure becomes a reply; the server keeps serving
            self.errors += 1
            return [encode_header(self.error_header(frames[0], e))]
        timing = {"decode_ms": (t1 - t0) / 1e6, "compute_ms": compute_ns / 1e6, "encode_ms": (t3 - t2) / 1e6}
        reply = {"v": PROTOCOL_VERSION, "id": request.id, "ok": True, "result": result, "tensors": specs}
        return [encode_header({**reply, "timing": timing}), *buffers]

    def region(self, request: Request):
        """The shared-memory region the request names (gpu_server.regions), or None: its tensors are frames."""
        if request.shm is None:
            return None
        if self.regions is None:
            raise RegionGone("shared memory is off on this server")
        region = self.regions.get(request.shm)
        # A client that resends (Lazy Pirate) leaves its earlier copies queued here, under older ids. Run after a
        # newer one, such a copy would read a request area the client has since rewritten and write the reply
        # area under tensors the client reads: ids on one region only grow.
        if request.id <= region.last_id:
            raise BadRequest(f"request {request.id} is older than {region.last_id}, already run on its region")
        region.last_id = request.id
        return region

    def dispatch(self, request: Request, tensors: list) -> tuple[dict, list, int]:
        """The method table's call, or one of the two transport methods that set up shared memory."""
        if request.method not in SHM_METHODS:
            return dispatch(self.engine, request.method, request.args, tensors)
        if self.regions is None:
            raise BadRequest(f"{request.method}: shared memory is off on this server")
        if tensors:
            raise BadShape(f"{request.method} takes no tensors")
        if request.method == "ShmAttach":
            return {"shm": self.regions.attach(parse(ShmAttachArgs, request.args))}, [], 0
        self.regions.detach(parse(ShmDetachArgs, request.args).name)
        return {}, [], 0

    def decode(self, frame0) -> Request:
        request = decode_header(frame0, Request)
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
    def error_header(frame0, e: Exception) -> dict:
        header = loose_header(frame0)  # what the request says of itself, valid or not
        request_id = header.get("id") if isinstance(header.get("id"), int) else 0
        if isinstance(e, TSQPError):
            error = {"type": type(e).__name__, "message": str(e)}
        else:  # a bug, or a library failing on input we did not foresee: the log keeps the traceback
            log.error("internal error answering %.40s", header.get("method"), exc_info=e)
            error = {"type": "InternalError", "message": f"{type(e).__name__} (details in the server log)"}
        return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error}


class Fault:
    """`--inject-fault METHOD:N[:shape|:slow]` (tests only): the N-th reply of METHOD comes back wrong.

    One element of its first tensor moves by the tensor's RMS (a typical activation), or by a
    quarter of the ring for ring elements; everything else is the honest result. What `--verify`
    must catch. With `:shape`, the first tensor comes back one column short instead: what every
    client must refuse in one line (tee_client.ops.check_reply), --verify or not. With `:slow`, the
    reply is right but held SLOW_S seconds once computed (in the reply area already): a client with
    a shorter deadline resends, and its resend must carry what it first sent.
    """

    ENV = "TSQP_TESTING"  # the switch is refused unless this is set to 1
    SLOW_S = 1.5

    def __init__(self, spec: str):
        method, count, *kind = spec.split(":")
        if not method or not count.isdigit() or int(count) < 1 or kind not in ([], ["shape"], ["slow"]):
            raise UsageError(
                f"--inject-fault {spec!r}: expected METHOD:N, METHOD:N:shape or METHOD:N:slow, e.g. Linear:3 "
                "(N counts from 1)"
            )
        self.method, self.n, self.seen, self.kind = method, int(count), 0, kind[0] if kind else None

    def apply(self, method: str, out: list) -> list:
        if method != self.method:
            return out
        self.seen += 1
        if self.seen != self.n or not out or out[0].numel() == 0:
            return out
        if self.kind == "slow":
            log.warning("holding %s reply %d for %.1f s (testing)", method, self.n, self.SLOW_S)
            time.sleep(self.SLOW_S)
            return out
        if self.kind == "shape":
            log.warning("injected a short %s reply %d (testing)", method, self.n)
            return [out[0][..., :-1].contiguous(), *out[1:]]
        wrong = out[0].clone()
        flat = wrong.view(-1)
        if wrong.is_floating_point():
            step = flat.float().square().mean().sqrt().clamp_min(1e-3).item()
        else:  # ring elements: a quarter of the ring (the largest element tells its size)
            step = 1 << max(int(flat.max()).bit_length() - 2, 0)
        flat[min(wrong.shape[-1] + 1, flat.numel() - 1)] += step  # row 1, column 1: the second token
        log.warning("injected a fault into %s reply %d (testing)", method, self.n)
        return [wrong, *out[1:]]
