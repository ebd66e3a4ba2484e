"""Load: many small calls from concurrent clients against one gpu-server; none may be lost.

For 1, 2, 4 and 8 clients (threads, each with its own socket), every client sends --calls
Echo requests of a 1 KiB tensor after 20 warm-up calls and checks each reply is its own.
Reports calls sent and answered, throughput, and round-trip p50 / p99 per client count.
"""

import argparse
import sys
import tempfile
import threading
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import finish, markdown_table, write_json  # noqa: E402
from tsqp.launch import ServerProcess  # noqa: E402
from tee_client.rpc import RpcClient  # noqa: E402


def one_client(url: str, calls: int, seed: int, out: dict) -> None:
    rtts, answered = [], 0
    with RpcClient(url, timeout_s=30, retries=0) as rpc:
        for i in range(20 + calls):
            payload = torch.full((256,), float(seed * 1_000_000 + i))
            t0 = time.perf_counter_ns()
            _, back = rpc.call("Echo", {}, [payload])
            if i >= 20:
                rtts.append(time.perf_counter_ns() - t0)
                answered += bool(torch.equal(back[0], payload))
    out[seed] = (answered, rtts)


def run(url: str, clients: int, calls: int) -> dict:
    results = {}
    threads = [threading.Thread(target=one_client, args=(url, calls, c, results)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    rtt_ms = np.concatenate([np.array(r) for _, r in results.values()]) / 1e6
    answered = sum(a for a, _ in results.values())
    return {
        "clients": clients,
        "sent": clients * calls,
        "answered": answered,
        "lost": clients * calls - answered,
        "calls_per_s": round(answered / wall),
        "p50_ms": float(np.median(rtt_ms)),
        "p99_ms": float(np.percentile(rtt_ms, 99)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calls", type=int, default=1000, help="calls per client")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tsqp-bench-") as tmp:
        url = f"ipc://{tmp}/s.ipc"
        with ServerProcess(url, "--device", "cpu"):
            rows = [run(url, n, args.calls) for n in (1, 2, 4, 8)]
    write_json("load", {"calls_per_client": args.calls, "payload_bytes": 1024, "rows": rows})
    header = ["clients", "sent", "answered", "lost", "calls/s", "p50 ms", "p99 ms"]
    keys = ["clients", "sent", "answered", "lost", "calls_per_s", "p50_ms", "p99_ms"]
    finish("load", plot(rows), markdown_table(header, [[r[k] for k in keys] for r in rows]))
    return 0 if all(r["lost"] == 0 for r in rows) else 1


def plot(rows: list[dict]):
    fig, ax = plt.subplots(figsize=(6, 4))
    clients = [r["clients"] for r in rows]
    ax.plot(clients, [r["calls_per_s"] for r in rows], marker="o", label="throughput (calls/s)")
    ax2 = ax.twinx()
    ax2.plot(clients, [r["p99_ms"] for r in rows], marker="s", color="C1", label="p99 round trip (ms)")
    ax.set(xlabel="concurrent clients", ylabel="calls/s", title="Echo 1 KiB from concurrent clients, one server")
    ax2.set_ylabel("p99 ms")
    fig.legend(loc="upper left")
    return fig


if __name__ == "__main__":
    sys.exit(main())
