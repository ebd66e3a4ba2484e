"""diagnose-transport: is it IPC? does a server answer? is shared memory on? how slow is a call, and why?

Measures, at the endpoint: the socket file (ipc), who answers (model, protocol version), the
round trip of an empty call and of Echo payloads through the service's own protocol, as ZeroMQ
frames and (ipc, when both sides have it on) through shared memory; beside them, on this host,
a raw pyzmq REQ/REP ping-pong on the same transport, the other transport for comparison, and
memcpy bandwidth. Ends with plain findings. Exit 1 when nothing answers.
"""

import argparse
import json
import os
import stat
import sys
import tempfile

from protocol.endpoints import Endpoint, default_endpoint, probe_ipc
from protocol.errors import ServerUnavailable, TSQPError, VersionMismatch
from tee_client import probe
from tee_client.cli import add_curve_flags
from tee_client.settings import ClientSettings
from tsqp.cli import run_cli, timeout_arg

TRANSPORT_NOTES = {
    "ipc": "ipc: a Unix-domain socket, this host only, no TCP stack: the fast path for one host",
    "tcp-loopback": "tcp on loopback: same host through the TCP stack; an ipc:// endpoint avoids it",
    "tcp-remote": "tcp to another host: bounded by the network; use CURVE, the tensors are otherwise in the clear",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="diagnose-transport", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--endpoint",
        dest="gpu_endpoint",
        metavar="URL",
        help=f"the gpu-server endpoint (default: LLAMA_GPU_ENDPOINT, else {default_endpoint()})",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--timeout", type=timeout_arg, default=5.0, help="seconds to wait for each reply (default 5; no retries)"
    )
    p.add_argument(
        "--max-size-mb", type=size_arg, default=64, help="largest payload to time, 0 to 1024 (default 64 MiB)"
    )
    add_curve_flags(p)
    return p.parse_args(argv)


def size_arg(text: str) -> float:
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not 0 <= mb <= 1024:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in MiB between 0 and 1024")
    return mb


def diagnose(settings: ClientSettings, timeout_s: float = 5.0, max_size: int = 64 * probe.MiB) -> dict:
    url = settings.gpu_endpoint
    ep = Endpoint.parse(url)
    kind = "ipc" if ep.transport == "ipc" else ("tcp-loopback" if ep.is_loopback else "tcp-remote")
    report = {"endpoint": url, "transport": kind, "transport_note": TRANSPORT_NOTES[kind], "findings": []}
    if ep.transport == "ipc":
        report["socket_file"] = socket_file(ep.path)
    sizes = [s for s in probe.SIZES if s <= max_size]
    report["server"], report["protocol"] = server_side(settings, timeout_s, sizes, report["findings"])
    report["shm"], report["protocol_shm"] = shm_side(settings, timeout_s, sizes, report["server"])
    report["raw"] = raw_side(ep.transport, sizes)
    report["raw_other_transport"] = raw_side("tcp" if ep.transport == "ipc" else "ipc", [0, probe.MiB])
    report["memcpy"] = probe.memcpy_bandwidth(min(max(max_size, probe.MiB), 64 * probe.MiB))
    report["findings"] += findings(report)
    report["ok"] = report["server"] is not None
    return report


def socket_file(path: str) -> dict:
    state = probe_ipc(path)
    info = {"path": path, "state": state}
    if state != "missing":
        info["mode"] = oct(stat.S_IMODE(os.stat(path).st_mode))
        info["folder_mode"] = oct(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode))
    return info


def server_side(settings: ClientSettings, timeout_s: float, sizes: list[int], notes: list[str]):
    """Who answers, and Echo round trips through the protocol with every tensor as a ZeroMQ frame."""
    try:
        with settings.rpc_client(timeout_s=timeout_s, retries=0, shm=False) as rpc:
            return rpc.call("Ping")[0], time_sizes(rpc, sizes)
    except ServerUnavailable as e:
        notes.append(f"nothing answers: {e}")
    except VersionMismatch as e:
        notes.append(f"a server answers but refuses the protocol version ({e}); client and server releases differ")
    except TSQPError as e:
        notes.append(f"a server answers but the call failed: {type(e).__name__}: {e}")
    return None, []


def time_sizes(rpc, sizes: list[int]) -> list[dict]:
    timed = [probe.summarize_calls(probe.time_protocol(rpc, s, probe.repetitions(s))) for s in sizes]
    return [{"size": s, **t} for s, t in zip(sizes, timed, strict=True)]


def shm_side(settings: ClientSettings, timeout_s: float, sizes: list[int], server: dict | None):
    """Whether tensors would cross through shared memory here ({"on", "why"}), and the same Echo round trips if so."""
    if server is None:
        return {"on": False, "why": "no server answered"}, []
    if not settings.gpu_endpoint.startswith("ipc://"):
        return {"on": False, "why": "tcp: another host cannot map this host's memory, tensors cross as frames"}, []
    if not settings.shared_memory:
        why = "CURVE is on: it encrypts frames, not memory" if settings.curve_secret_key else "off here (LLAMA_SHM=0)"
        return {"on": False, "why": why}, []
    if "shm" not in server:
        return {"on": False, "why": "the server does not offer it (gpu-server --no-shm or LLAMA_SHM=0)"}, []
    try:
        with settings.rpc_client(timeout_s=timeout_s, retries=0, shm=True) as rpc:
            rpc.call("Ping")  # learns the offer; a region is attached by the first call with a tensor
            rows = time_sizes(rpc, sizes)
            attached = rpc.region is not None or max(sizes, default=0) == 0
    except TSQPError as e:
        return {"on": False, "why": f"a call through shared memory failed: {type(e).__name__}: {e}"}, []
    if not attached:
        return {"on": False, "why": "the server offers it, but no region could be set up: frames are used"}, []
    return {"on": True, "why": f"regions in {settings.shm_dir}, one per client", **server["shm"]}, rows


def raw_side(transport: str, sizes: list[int]) -> dict:
    with tempfile.TemporaryDirectory(prefix="tsqp-diag-") as tmp:
        url = f"ipc://{tmp}/raw.ipc" if transport == "ipc" else "tcp://127.0.0.1:0"
        with probe.raw_echo_server(url) as bound:
            timed = [probe.spread(probe.time_raw(bound, s, probe.repetitions(s))) for s in sizes]
            return {"transport": transport, "sizes": [{"size": s, **t} for s, t in zip(sizes, timed, strict=True)]}


def findings(r: dict) -> list[str]:
    out = []
    sock = r.get("socket_file", {})
    if sock.get("state") == "stale":
        out.append(
            f"stale socket file {sock['path']}: a server died without cleaning up; starting gpu-server removes it"
        )
    elif sock.get("state") == "missing":
        out.append(f"no socket file at {sock['path']}: start gpu-server with --endpoint {r['endpoint']}")
    elif sock.get("state") == "live" and sock.get("mode") not in ("0o600", None):
        out.append(f"socket file mode is {sock['mode']}: other local users may connect; expected 0o600")
    raw, other = r["raw"]["sizes"], r["raw_other_transport"]["sizes"]
    ipc_us, tcp_us = (raw[0]["median_ms"] * 1000, other[0]["median_ms"] * 1000)[:: 1 if r["transport"] == "ipc" else -1]
    compare = f"an empty raw round trip takes {ipc_us:.0f} us over ipc, {tcp_us:.0f} us over tcp loopback on this host"
    if r["transport"] == "tcp-loopback" and tcp_us > ipc_us:
        out.append(f"TCP on loopback: an ipc:// endpoint is {tcp_us / ipc_us:.1f}x faster here ({compare})")
    elif r["transport"] == "tcp-remote":
        out.append(f"TCP to another host; for reference, {compare}")
    else:
        out.append(compare[0].upper() + compare[1:])
    if r["protocol"]:
        empty, largest = r["protocol"][0], r["protocol"][-1]
        out.append(
            f"an empty call takes {empty['median_ms'] * 1000:.0f} us through the protocol, "
            f"{raw[0]['median_ms'] * 1000:.0f} us as raw zmq: the protocol adds "
            f"{(empty['median_ms'] - raw[0]['median_ms']) * 1000:.0f} us per call"
        )
        bw = probe.gbps(largest["size"], largest["median_ms"] / 1e3)
        out.append(
            f"{largest['size'] / probe.MiB:g} MiB each way moves at {bw:.2f} GB/s; serialization is "
            f"{largest['serialization_pct']:.0f}% of that round trip; memcpy runs at "
            f"{r['memcpy']['reused_gbps']:.1f} GB/s into reused memory"
        )
        if empty["median_ms"] > 5:
            out.append("an empty call over 5 ms: the server is busy, far away, or the host is overloaded")
    if r["protocol_shm"]:
        framed, shared = r["protocol"][-1], r["protocol_shm"][-1]
        out.append(
            f"shared memory is on: {probe.human(shared['size'])} each way takes {shared['median_ms']:.2f} ms, "
            f"{framed['median_ms'] / shared['median_ms']:.1f}x faster than as frames ({framed['median_ms']:.2f} ms)"
        )
    elif r["server"]:
        out.append(f"shared memory is off: {r['shm']['why']}")
    return out


def render(r: dict) -> str:
    lines = [f"endpoint   {r['endpoint']}", f"transport  {r['transport_note']}"]
    if "socket_file" in r:
        s = r["socket_file"]
        lines.append(
            f"socket     {s['state']}" + (f", mode {s['mode']}, folder {s['folder_mode']}" if "mode" in s else "")
        )
    srv = r["server"]
    lines.append(
        "server     "
        + (
            f"{srv['model']}, protocol {srv['protocol']}, device {srv['device']}, dtype {srv['dtype']}, "
            f"fingerprint {srv['fingerprint'][:12]}"
            if srv
            else "no answer"
        )
    )
    lines.append(f"shm        {'on' if r['shm']['on'] else 'off'}: {r['shm']['why']}")
    raw = {row["size"]: row for row in r["raw"]["sizes"]}
    shared = {row["size"]: row for row in r["protocol_shm"]}
    lines.append(
        f"\n{'payload':>10} {'frames p50 ms':>14} {'p99 ms':>9} {'GB/s':>7} {'serial. %':>10}"
        f" {'shm p50 ms':>11} {'GB/s':>7} {'raw ' + r['raw']['transport'] + ' p50 ms':>16} {'GB/s':>7}"
    )
    for row in r["protocol"] or [{"size": s} for s in raw]:
        size, rw, sh = row["size"], raw[row["size"]], shared.get(row["size"])
        proto = (
            f"{row['median_ms']:>14.3f} {row['p99_ms']:>9.3f} {probe.gbps(size, row['median_ms'] / 1e3):>7.2f}"
            f" {row['serialization_pct']:>10.1f}"
            if "median_ms" in row
            else f"{'-':>14} {'-':>9} {'-':>7} {'-':>10}"
        )
        shm = (
            f"{sh['median_ms']:>11.3f} {probe.gbps(size, sh['median_ms'] / 1e3):>7.2f}" if sh else f"{'-':>11} {'-':>7}"
        )
        lines.append(
            f"{probe.human(size):>10} {proto} {shm} {rw['median_ms']:>16.3f}"
            f" {probe.gbps(size, rw['median_ms'] / 1e3):>7.2f}"
        )
    m = r["memcpy"]
    lines.append(
        f"\nmemcpy     {m['reused_gbps']:.1f} GB/s into reused memory, {m['fresh_gbps']:.1f} GB/s into fresh buffers"
    )
    lines.append("findings")
    lines += [f"  - {f}" for f in r["findings"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    """diagnose-transport's body; the command itself is tee_client.cli.diagnose_transport."""
    args = parse_args(argv)

    def run() -> int:
        report = diagnose(ClientSettings.from_args(args), args.timeout, int(args.max_size_mb * probe.MiB))
        print(json.dumps(report, indent=2) if args.json else render(report))
        return 0 if report["ok"] else 1

    return run_cli("diagnose-transport", run)


if __name__ == "__main__":
    from tee_client.cli import diagnose_transport

    sys.exit(diagnose_transport())
