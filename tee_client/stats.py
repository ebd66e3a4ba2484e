"""Where a prefill's time and bytes went.

Ops backends record one `Call` per linear op (RPC or in-process); the model's trusted-side
functions are wrapped in `tee_op`, which counts and times them while a `Stats` is recording.
Everything is measured with perf_counter_ns; recording costs about a microsecond per op.
"""

import contextvars
import functools
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

SETUP = ("Init", "Ping", "ShmAttach", "ShmDetach")  # calls outside the forward: listed under rpc, not counted in timing

_active: contextvars.ContextVar["Stats | None"] = contextvars.ContextVar("tsqp_stats", default=None)


@dataclass
class Call:
    """One op call. transfer = moving and (de)serializing data; compute = the linear math."""

    bytes_sent: int
    bytes_received: int
    wall_ns: int
    transfer_ns: int
    compute_ns: int
    serialize_ns: int = 0
    deserialize_ns: int = 0
    server_decode_ns: int = 0
    server_encode_ns: int = 0
    retries: int = 0  # resends before the reply came
    retry_wait_ns: int = 0  # time lost to the tries that got no reply (not transfer)


@dataclass
class MethodStats:
    calls: list[Call] = field(default_factory=list)

    def summary(self) -> dict:
        rtt = np.array([c.wall_ns for c in self.calls]) / 1e6
        total = lambda attr: sum(getattr(c, attr) for c in self.calls) / 1e6  # noqa: E731
        wire = (
            total("wall_ns")
            - total("serialize_ns")
            - total("deserialize_ns")
            - total("compute_ns")
            - total("server_decode_ns")
            - total("server_encode_ns")
            - total("retry_wait_ns")
        )
        return {
            "calls": len(self.calls),
            "retries": sum(c.retries for c in self.calls),
            "bytes_sent": sum(c.bytes_sent for c in self.calls),
            "bytes_received": sum(c.bytes_received for c in self.calls),
            "rtt_ms": {
                "mean": rtt.mean(),
                "p50": np.percentile(rtt, 50),
                "p99": np.percentile(rtt, 99),
                "total": rtt.sum(),
            },
            "serialize_ms": total("serialize_ns"),
            "deserialize_ms": total("deserialize_ns"),
            "server_decode_ms": total("server_decode_ns"),
            "server_compute_ms": total("compute_ns"),
            "server_encode_ms": total("server_encode_ns"),
            "wire_and_queue_ms": wire,
        }


@dataclass
class Stats:
    methods: dict[str, MethodStats] = field(default_factory=lambda: defaultdict(MethodStats))
    tee_ns: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tee_counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    crypto_ns: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # mask, unmask, verify
    verify_checks: int = 0  # --verify: checks run (one per block of a row, see tee_client.verify)
    offline_ns: int = 0  # privacy modes: pads drawn before the forward, outside its time

    def record(self, method: str, call: Call) -> None:
        self.methods[method].calls.append(call)

    @contextmanager
    def recording(self):
        token = _active.set(self)
        try:
            yield self
        finally:
            _active.reset(token)

    def summary(self, total_ns: int) -> dict:
        """The result-JSON sections: rpc, timing, timing_percentage, data_transfer, operation_counts."""
        rpc = {m: s.summary() for m, s in self.methods.items() if s.calls}
        forward = [c for m, s in self.methods.items() if m not in SETUP for c in s.calls]
        parts = {  # they add up to total_ms
            "transfer": sum(c.transfer_ns for c in forward) / 1e6,
            "gpu_compute": sum(c.compute_ns for c in forward) / 1e6,
            "tee_compute": sum(self.tee_ns.values()) / 1e6,
            "crypto": (self.crypto_ns["mask"] + self.crypto_ns["unmask"]) / 1e6,
            "verify": self.crypto_ns["verify"] / 1e6,
            "retry_wait": sum(c.retry_wait_ns for c in forward) / 1e6,
        }
        parts["other"] = total_ns / 1e6 - sum(parts.values())
        timing = {
            "total_ms": total_ns / 1e6,
            **{f"{k}_ms": v for k, v in parts.items() if k not in ("crypto", "verify")},
            "mask_ms": self.crypto_ns["mask"] / 1e6,
            "unmask_ms": self.crypto_ns["unmask"] / 1e6,
            "offline_ms": self.offline_ns / 1e6,  # outside total_ms: before the prompt was read
            "verify_ms": parts["verify"],
        }
        to_gpu, to_cpu = sum(c.bytes_sent for c in forward), sum(c.bytes_received for c in forward)
        return {
            "rpc": rpc,
            "timing": timing,
            "timing_percentage": {k: 100 * v / max(total_ns / 1e6, 1e-9) for k, v in parts.items()},
            "data_transfer": {
                "to_gpu_mb": to_gpu / 1e6,
                "to_cpu_mb": to_cpu / 1e6,
                "total_mb": (to_gpu + to_cpu) / 1e6,
            },
            "operation_counts": {
                "gpu": {m: len(s.calls) for m, s in self.methods.items() if m not in SETUP and s.calls},
                "tee": dict(self.tee_counts),
            },
        }


def tee_op(name: str):
    """Count and time a trusted-side function while a Stats is recording."""

    def wrap(fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            stats = _active.get()
            if stats is None:
                return fn(*args, **kwargs)
            t0 = time.perf_counter_ns()
            out = fn(*args, **kwargs)
            stats.tee_ns[name] += time.perf_counter_ns() - t0
            stats.tee_counts[name] += 1
            return out

        return timed

    return wrap


def current() -> "Stats | None":
    return _active.get()
