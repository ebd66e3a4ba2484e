"""IPC vs TCP, frames vs shared memory: round trip and throughput from 0 B to 64 MiB, raw pyzmq beside the protocol.

Six lines on one log-log plot: raw REQ/REP echo over ipc and over tcp://127.0.0.1, and the
service's own Echo over ipc with tensors as ZeroMQ frames, over ipc through shared memory
(protocol.shm) with the reply copied out, as every reply under --verify, and borrowed (read
where it crossed, as a plain forward's Residual replies), and over tcp. Every line crosses a
process boundary: raw into a zmq-only echo process, protocol into a real gpu-server. All run at
once and each size is timed in five rounds that visit them in turn (3 warm-up round trips each
time), over 5 to 300 repetitions in all, bounded by the bytes moved; medians and p99 are
reported, and ratios compare numbers from the same rounds.
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
        ipc, tcp = f"ipc://{tmp}/proto.ipc", f"tcp://127.0.0.1:{free_tcp_port()}"
        for url in (ipc, tcp):
            stack.enter_context(ServerProcess(url, "--device", "cpu", env={"LLAMA_SHM": "1"}))
        rpc = {
            "ipc frames": stack.enter_context(RpcClient(ipc, timeout_s=60, shm=False)),
            "ipc shm": stack.enter_context(RpcClient(ipc, timeout_s=60, shm=True)),
            "tcp frames": stack.enter_context(RpcClient(tcp, timeout_s=60)),
        }
        for client in rpc.values():
            client.call("Ping")  # the shm client learns the offer; its first tensor attaches a region
        rpc["ipc shm, borrowed"] = rpc["ipc shm"]  # the same client, the reply read in the reply area
        names = ("ipc raw", "ipc frames", "ipc shm", "ipc shm, borrowed", "tcp raw", "tcp frames")
        series = {name: [] for name in names}
        for size in sizes:
            n = max(1, probe.repetitions(size) // rounds)
            samples = {name: [] for name in series}
            for _ in range(rounds):
                for name in series:
                    if name.endswith("raw"):
                        samples[name] += probe.time_raw(raw[name.split()[0]], size, n)
                    else:
                        samples[name] += probe.time_protocol(rpc[name], size, n, borrow=name.endswith("borrowed"))
            for name, got in samples.items():
                summary = probe.spread(got) if name.endswith("raw") else probe.summarize_calls(got)
                series[name].append({"size": size, **summary})
        if rpc["ipc shm"].region is None:
            raise RuntimeError("the ipc shm client never got a shared-memory region: nothing to compare")
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
            linestyle="--" if name.endswith("raw") else "-",
            label=name,
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="payload each way (bytes)",
        ylabel="round trip, median (ms)",
        title="Round trip vs payload: raw zmq vs the TSQP protocol (frames, shared memory)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


PROTOCOL = ("ipc frames", "ipc shm", "ipc shm, borrowed", "tcp frames")
SHM = ("ipc shm", "ipc shm, borrowed")


def table(series: dict) -> str:
    names = list(series)
    header = ["payload"] + [f"{n} p50 ms (p99)" for n in names] + [f"{n} GB/s" for n in PROTOCOL]
    header += [f"{n} vs frames" for n in SHM]
    rows = []
    for i, size in enumerate(r["size"] for r in series[names[0]]):
        row = [human(size)] + [f"{series[n][i]['median_ms']:.3f} ({series[n][i]['p99_ms']:.3f})" for n in names]
        row += [f"{probe.gbps(size, series[n][i]['median_ms'] / 1e3):.2f}" for n in PROTOCOL]
        row += [f"{series['ipc frames'][i]['median_ms'] / series[n][i]['median_ms']:.1f}x" for n in SHM]
        rows.append(row)
    return markdown_table(header, rows)


def notes(series: dict) -> list[str]:
    """The two targets: the empty call against raw zmq, 64 MiB through shared memory against frames."""
    empty = {n: series[n][0]["median_ms"] for n in series}
    largest = {n: series[n][-1] for n in series}
    return [
        f"\nempty call over ipc: protocol {empty['ipc frames']:.3f} ms (shm client {empty['ipc shm']:.3f} ms), "
        f"raw zmq {empty['ipc raw']:.3f} ms: {empty['ipc frames'] / empty['ipc raw']:.2f}x "
        f"({empty['ipc shm'] / empty['ipc raw']:.2f}x)",
        f"{human(largest['ipc shm']['size'])} Echo over ipc: {largest['ipc frames']['median_ms']:.1f} ms as frames, "
        f"{largest['ipc shm']['median_ms']:.1f} ms through shared memory copied out "
        f"({largest['ipc frames']['median_ms'] / largest['ipc shm']['median_ms']:.1f}x faster), "
        f"{largest['ipc shm, borrowed']['median_ms']:.1f} ms borrowed "
        f"({largest['ipc frames']['median_ms'] / largest['ipc shm, borrowed']['median_ms']:.1f}x faster)",
    ]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tsqp-bench-") as tmp:
        series = measure(tmp, probe.SIZES)
    memcpy = probe.memcpy_bandwidth()
    write_json("transport", {"series": series, "memcpy": memcpy})
    finish(
        "transport",
        plot(series),
        table(series),
        *notes(series),
        f"memcpy: {memcpy['reused_gbps']:.1f} GB/s into reused memory, "
        f"{memcpy['fresh_gbps']:.1f} GB/s into fresh buffers",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
