"""What recording stats costs: prefill time with stats on vs off, alternated, against one server.

Stats on: every op call's Call record and every TEE step's timing (what every prefill reports).
Stats off: the same forward with no Stats recording. Runs alternate on/off after warm-up so
drift hits both; medians, quartiles and the ratio of medians are reported. Because a shared
2-core host is noisy, the bookkeeping is also timed directly (per TEE step, per recorded call)
and multiplied by one forward's counts: a bound that does not depend on the noise.
"""

import argparse
import sys
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import finish, markdown_table, write_json  # noqa: E402
from tsqp.launch import ServerProcess  # noqa: E402
from tee_client.ops import RemoteOps  # noqa: E402
from tee_client.model import Llama  # noqa: E402
from tee_client.prefill import encode_batch  # noqa: E402
from tee_client.rpc import RpcClient  # noqa: E402
from tee_client.stats import Call, Stats, tee_op  # noqa: E402


def forward_seconds(model: Llama, ids, mask, record: bool) -> float:
    stats = Stats()
    t0 = time.perf_counter()
    if record:
        with stats.recording():
            model.forward(ids, mask)
    else:
        model.forward(ids, mask)
    return time.perf_counter() - t0


def bookkeeping_ns(n: int = 50_000) -> dict:
    """Cost of one recorded TEE step and of one recorded op call, net of the bare function call."""
    bare, timed = (lambda: None), tee_op("probe")(lambda: None)
    stats = Stats()
    with stats.recording():
        t0 = time.perf_counter_ns()
        for _ in range(n):
            timed()
        t1 = time.perf_counter_ns()
        for _ in range(n):
            bare()
        t2 = time.perf_counter_ns()
        for _ in range(n):
            stats.record("Linear", Call(1, 1, 1, 1, 1, 1, 1, 1, 1))
            time.perf_counter_ns()
        t3 = time.perf_counter_ns()
    return {"tee_step_ns": ((t1 - t0) - (t2 - t1)) / n, "call_ns": (t3 - t2) / n}


def measure(length: int, runs: int) -> tuple[dict, dict]:
    """Alternating timed forwards with stats on and off, and one forward's op counts."""
    with tempfile.TemporaryDirectory(prefix="tsqp-bench-") as tmp:
        url = f"ipc://{tmp}/s.ipc"
        with ServerProcess(url, "--device", "cpu"), RpcClient(url) as rpc:
            ops = RemoteOps(rpc)
            spec = ops.init()
            model = Llama(spec, ops)
            ids, mask, *_ = encode_batch(spec.tokenizer, ["The capital of France is"], 1, length)
            for _ in range(2):
                forward_seconds(model, ids, mask, True)
            counted = Stats()
            with counted.recording():
                model.forward(ids, mask)
            counts = {
                "tee_steps": sum(counted.tee_counts.values()),
                "calls": sum(len(m.calls) for m in counted.methods.values()),
            }
            times = {"on": [], "off": []}
            for _ in range(runs):
                for mode in ("on", "off"):
                    times[mode].append(forward_seconds(model, ids, mask, mode == "on"))
    return times, counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--runs", type=int, default=15, help="timed runs each, on and off")
    args = p.parse_args(argv)
    times, counts = measure(args.length, args.runs)
    summary = {
        m: {"median_s": float(np.median(t)), "q1_s": float(np.percentile(t, 25)), "q3_s": float(np.percentile(t, 75))}
        for m, t in times.items()
    }
    overhead = 100 * (summary["on"]["median_s"] / summary["off"]["median_s"] - 1)
    unit = bookkeeping_ns()
    bound_ms = (unit["tee_step_ns"] * counts["tee_steps"] + unit["call_ns"] * counts["calls"]) / 1e6
    bound_pct = 100 * bound_ms / (summary["off"]["median_s"] * 1e3)
    write_json(
        "stats_overhead",
        {
            "length": args.length,
            "runs": args.runs,
            "times_s": times,
            "summary": summary,
            "overhead_pct": overhead,
            "counts": counts,
            "bookkeeping_ns": unit,
            "bookkeeping_ms": bound_ms,
            "bookkeeping_pct": bound_pct,
        },
    )
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.boxplot([times["off"], times["on"]], tick_labels=["stats off", "stats on"])
    ax.set(ylabel="prefill time (s)", title=f"Stats overhead, length {args.length}: {overhead:+.2f}%")
    rows = [[k, v["median_s"] * 1e3, v["q1_s"] * 1e3, v["q3_s"] * 1e3] for k, v in summary.items()]
    finish(
        "stats_overhead",
        fig,
        markdown_table(["stats", "median ms", "q1 ms", "q3 ms"], rows),
        f"overhead of recording stats: {overhead:+.2f}% (ratio of medians, {args.runs} alternating runs each)",
        f"bookkeeping timed directly: {unit['tee_step_ns']:.0f} ns per TEE step x {counts['tee_steps']} + "
        f"{unit['call_ns']:.0f} ns per call x {counts['calls']} = {bound_ms:.3f} ms per forward, "
        f"{bound_pct:.3f}% of the median forward",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
