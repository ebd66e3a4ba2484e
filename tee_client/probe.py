"""Transport measurements shared by `diagnose-transport` and `benchmarks/transport.py`.

Three layers, measured the same way (after warm-up, many repetitions, medians and p99):
  raw       a plain pyzmq REQ/REP byte ping-pong: what the transport itself costs
  protocol  the service's own Echo call: header, validation, tensor frames, both ways
  memcpy    copying the same bytes in memory: the floor any transport is compared with
"""

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
import zmq

from tee_client.rpc import RpcClient
from tee_client.stats import Call, Stats

KiB, MiB = 1 << 10, 1 << 20
SIZES = [0, KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB]


def repetitions(size: int, budget_bytes: int = 256 * MiB, low: int = 5, high: int = 300) -> int:
    """Enough round trips for a stable median, bounded by the bytes they move."""
    return max(low, min(high, budget_bytes // max(size, 1)))


def warmups(n: int) -> int:
    """Untimed round trips before `n` timed ones: a tenth of them, at least 3 (a fresh connection, and a server
    whose request path has not run yet, answer the first calls slowly)."""
    return max(3, n // 10)


def spread(samples_ns) -> dict:
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    return {
        "median_ms": float(np.median(ms)),
        "p99_ms": float(np.percentile(ms, 99)),
        "min_ms": float(ms.min()),
        "n": int(ms.size),
    }


def human(n: int) -> str:
    """A byte count as people say it: 512 B, 4 KiB, 64 MiB."""
    return f"{n} B" if n < KiB else (f"{n // KiB} KiB" if n < MiB else f"{n // MiB} MiB")


def gbps(size: int, seconds: float, ways: int = 2) -> float:
    return ways * size / seconds / 1e9 if seconds > 0 else float("nan")


# ---- raw pyzmq ---------------------------------------------------------------------------


RAW_ECHO = """
import sys, zmq
sock = zmq.Context().socket(zmq.REP)
sock.setsockopt(zmq.LINGER, 0)
url = sys.argv[1]
if url.endswith(":0"):
    url = f"{url[:-2]}:{sock.bind_to_random_port(url[:-2])}"
else:
    sock.bind(url)
print(url, flush=True)
while True:  # as gpu-server waits and answers: small messages as bytes, large ones zero-copy
    frame = sock.recv(copy=False)
    small = len(frame) < 65536
    sock.send(frame.bytes if small else frame, copy=small)
"""


@contextmanager
def raw_echo_server(url: str):
    """A plain pyzmq REP echo in its own process (zmq only, no protocol); yields the bound url."""
    proc = subprocess.Popen([sys.executable, "-c", RAW_ECHO, url], stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait()
        proc.stdout.close()


def time_raw(url: str, size: int, n: int, warmup: int | None = None, timeout_ms: int = 30000) -> list[int]:
    """`n` round trips of a `size`-byte message to a raw echo, in nanoseconds. It waits as the service's client
    does (one blocking receive with a timeout, no poll), so the two differ by the protocol alone."""
    payload = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    warmup = warmups(n) if warmup is None else warmup
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, timeout_ms)
    req.connect(url)
    samples = []
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter_ns()
            req.send(payload, copy=size < 64 * KiB)
            try:
                req.recv(copy=size < 64 * KiB)
            except zmq.Again:
                raise TimeoutError(f"raw echo at {url} did not answer") from None
            if i >= warmup:
                samples.append(time.perf_counter_ns() - t0)
    finally:
        req.close(linger=0)
    return samples


# ---- the service's own protocol --------------------------------------------------------------


def time_protocol(rpc: RpcClient, size: int, n: int, warmup: int | None = None, borrow: bool = False) -> list[Call]:
    """`n` Echo round trips of one `size`-byte tensor (none for size 0: a bare call); borrow: the reply read where
    it crossed, as a plain forward reads its Residual replies (RpcClient.call)."""
    tensors = [torch.randn(size // 4)] if size else []
    for _ in range(warmups(n) if warmup is None else warmup):
        rpc.call("Echo", {}, tensors, borrow=borrow)
    stats = Stats()
    with stats.recording():
        for _ in range(n):
            rpc.call("Echo", {}, tensors, borrow=borrow)
    return stats.methods["Echo"].calls


def summarize_calls(calls: list[Call]) -> dict:
    """Round-trip spread, and the median of each part of it, for protocol calls."""
    rtt = spread([c.wall_ns for c in calls])
    median = lambda attr: float(np.median([getattr(c, attr) for c in calls])) / 1e6
    rtt.update(
        {
            "client_serialize_ms": median("serialize_ns"),
            "client_deserialize_ms": median("deserialize_ns"),
            "server_decode_ms": median("server_decode_ns"),
            "server_encode_ms": median("server_encode_ns"),
            "bytes_per_call": calls[0].bytes_sent + calls[0].bytes_received,
        }
    )
    parts = ("client_serialize_ms", "client_deserialize_ms", "server_decode_ms", "server_encode_ms")
    codec = sum(rtt[k] for k in parts)
    rtt["serialization_pct"] = 100 * codec / rtt["median_ms"] if rtt["median_ms"] else 0.0
    return rtt


# ---- memory ------------------------------------------------------------------------------


def memcpy_bandwidth(size: int = 64 * MiB, repeat: int = 10) -> dict:
    """GB/s copying `size` bytes into reused memory, and into a fresh buffer each time."""
    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    reused, fresh = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        reused.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        src.copy()
        fresh.append(time.perf_counter() - t0)
    return {
        "size_bytes": size,
        "reused_gbps": gbps(size, float(np.median(reused)), ways=1),
        "fresh_gbps": gbps(size, float(np.median(fresh)), ways=1),
    }
