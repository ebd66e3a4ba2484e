"""IPC vs TCP: round trip and throughput from 0 B to 64 MiB, raw pyzmq beside the service protocol.

Four lines on one log-log plot: {ipc, tcp://127.0.0.1} x {raw REQ/REP echo, protocol Echo}.
Both layers cross a process boundary: raw into a zmq-only echo process, protocol into a real
gpu-server. All four run at once and each size is timed in five rounds that visit the four in
turn (3 warm-up round trips each time), over 5 to 300 repetitions in all, bounded by the bytes
moved; medians and p99 are reported, and ratios compare numbers from the same rounds.
"""

import sys
import tempfile
from contextlib import ExitStack

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import finish, markdown_table, write_json  # noqa: E402
from protocol.endpoints import free_tcp_port  # noqa: E402
from tsqp.launch import ServerProcess  # noqa: E402
from tee_client import probe  # noqa: E402
from tee_client.probe import human  # noqa: E402
from tee_client.rpc import RpcClient  # noqa: E402


def measure(tmp: str, sizes: list[int], rounds: int = 5) -> dict:
    """All four endpoints stay up; each size is timed in `rounds` rounds that visit every series
    in turn, so drift on a shared host hits all four alike."""
    with ExitStack() as stack:
        raw = {
            t: stack.enter_context(probe.raw_echo_server(u))
            for t, u in (("ipc", f"ipc://{tmp}/raw.ipc"), ("tcp", "tcp://127.0.0.1:0"))
        }
        proto_urls = {"ipc": f"ipc://{tmp}/proto.ipc", "tcp": f"tcp://127.0.0.1:{free_tcp_port()}"}
        for url in proto_urls.values():
            stack.enter_context(ServerProcess(url, "--device", "cpu"))
        rpc = {t: stack.enter_context(RpcClient(u, timeout_s=60)) for t, u in proto_urls.items()}
        series = {f"{t} {layer}": [] for t in ("ipc", "tcp") for layer in ("raw", "protocol")}
        for size in sizes:
            n = max(1, probe.repetitions(size) // rounds)
            samples = {name: [] for name in series}
            for _ in range(rounds):
                for t in ("ipc", "tcp"):
                    samples[f"{t} raw"] += probe.time_raw(raw[t], size, n)
                    samples[f"{t} protocol"] += probe.time_protocol(rpc[t], size, n)
            for name, got in samples.items():
                summary = probe.summarize_calls(got) if "protocol" in name else probe.spread(got)
                series[name].append({"size": size, **summary})
    return series


def plot(series: dict):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in series.items():
        rows = [r for r in rows if r["size"] > 0]
        ax.plot(
            [r["size"] for r in rows],
            [r["median_ms"] for r in rows],
            marker="o",
            ms=3,
            linestyle="-" if "protocol" in name else "--",
            label=name,
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="payload each way (bytes)",
        ylabel="round trip, median (ms)",
        title="Round trip vs payload: ipc vs tcp loopback, raw zmq vs TSQP protocol",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def table(series: dict) -> str:
    names = list(series)
    header = ["payload"] + [f"{n} p50 ms (p99)" for n in names] + ["ipc protocol GB/s", "tcp protocol GB/s"]
    rows = []
    for i, size in enumerate(r["size"] for r in series[names[0]]):
        row = [human(size)] + [f"{series[n][i]['median_ms']:.3f} ({series[n][i]['p99_ms']:.3f})" for n in names]
        row += [f"{probe.gbps(size, series[n][i]['median_ms'] / 1e3):.2f}" for n in ("ipc protocol", "tcp protocol")]
        rows.append(row)
    return markdown_table(header, rows)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tsqp-bench-") as tmp:
        series = measure(tmp, probe.SIZES)
    memcpy = probe.memcpy_bandwidth()
    write_json("transport", {"series": series, "memcpy": memcpy})
    finish(
        "transport",
        plot(series),
        table(series),
        f"\nmemcpy: {memcpy['reused_gbps']:.1f} GB/s into reused memory, "
        f"{memcpy['fresh_gbps']:.1f} GB/s into fresh buffers",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
