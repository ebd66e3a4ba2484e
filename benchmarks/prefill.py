"""Prefill on the embedded model: the split (ipc through shared memory, ipc as frames, tcp, ipc with the
attention on the server), passthrough, tee-only and transformers.

Every placement runs the same ids: the TSQP Llama forward on six ops objects (remote over ipc
through shared memory, over ipc with every tensor a ZeroMQ frame, over tcp, over ipc with
--attention server, passthrough, tee-only: one model file, different backends; attention in the
TEE unless named), and transformers' own LlamaForCausalLM forward
in this process as the reference. --logits last (the default, as tee-client's) asks LMHead for
each row's last position only and compares with transformers' `logits_to_keep=1`; --logits all
compares every position with a full forward. After --warmup untimed forwards each, --runs
rounds visit every placement once, so drift on a shared host hits all alike; each point is a
median, its time breakdown that median run's.
"""

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from benchmarks.common import finish, markdown_table, write_json  # noqa: E402
from tsqp.checkpoint import embedded_model_path, resolve_folder  # noqa: E402
from protocol.endpoints import free_tcp_port  # noqa: E402
from tsqp.launch import ServerProcess  # noqa: E402
from tee_client.ops import make_ops  # noqa: E402
from tee_client.model import Llama  # noqa: E402
from tee_client.prefill import encode_batch  # noqa: E402
from tee_client.settings import PrefillSettings  # noqa: E402
from tee_client.stats import Stats  # noqa: E402

PROMPT = "The capital of France is Paris. " * 200  # long enough to fill every length: no padding
POINTS = [(128, 1), (256, 1), (512, 1), (1024, 1), (256, 4)]
PLACEMENTS = [
    "remote ipc",
    "remote ipc frames",
    "remote tcp",
    "remote ipc, server attention",
    "passthrough",
    "tee-only",
    "transformers",
]


def placements(ipc: str, tcp: str, device: torch.device, stack: ExitStack, logits: str) -> dict:
    """name -> forward(input_ids, attention_mask): the same Llama on six ops objects, and transformers."""
    from transformers import LlamaForCausalLM

    def tsqp(backend: str, endpoint: str = ipc, shm: bool = True, attention: str = "tee") -> Callable:
        """The ops object exactly as tee-client builds it (tee_client.ops.make_ops)."""
        settings = PrefillSettings(
            backend=backend,
            gpu_endpoint=endpoint,
            model_path=str(embedded_model_path()),
            gpu_device=str(device),
            dtype="float32",
            rpc_timeout=300,
            shm=shm,
        )
        ops = make_ops(settings)
        stack.callback(ops.close)
        model = Llama(ops.init(), ops, attention)
        if backend == "remote" and ops.transport() != ("shm" if shm and endpoint == ipc else "frames"):
            raise RuntimeError(f"{backend} {endpoint}: tensors cross as {ops.transport()}, not as planned")
        return lambda ids, mask: model.forward(ids, mask, logits)

    folder, _ = resolve_folder(embedded_model_path())
    reference = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()

    keep = {"logits_to_keep": 1} if logits == "last" else {}  # like for like: LMHead at the last position only

    @torch.inference_mode()
    def transformers_forward(input_ids, attention_mask):
        out = reference(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **keep).logits
        return out.to("cpu")  # the same ending as the TSQP placements: logits in host memory

    return {
        "remote ipc": tsqp("remote", ipc),
        "remote ipc frames": tsqp("remote", ipc, shm=False),
        "remote tcp": tsqp("remote", tcp),
        "remote ipc, server attention": tsqp("remote", ipc, attention="server"),
        "passthrough": tsqp("passthrough"),
        "tee-only": tsqp("tee-only"),
        "transformers": transformers_forward,
    }


def measure(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    points = []
    with tempfile.TemporaryDirectory(prefix="tsqp-bench-") as tmp, ExitStack() as stack:
        ipc, tcp = f"ipc://{tmp}/s.ipc", f"tcp://127.0.0.1:{free_tcp_port()}"
        for url in (ipc, tcp):
            # the embedded model named outright, so an exported LLAMA_MODEL_PATH cannot swap it in
            stack.enter_context(
                ServerProcess(
                    url,
                    *("--model", str(embedded_model_path()), "--device", str(device), "--dtype", "float32"),
                    env={"LLAMA_SHM": "1"},
                )
            )
        forwards = placements(ipc, tcp, device, stack, args.logits)
        tokenizer = AutoTokenizer.from_pretrained(resolve_folder(embedded_model_path())[0])
        points_asked = [tuple(map(int, p.split("x"))) for p in args.points.split(",")] if args.points else POINTS
        for length, batch in points_asked:
            ids, mask, *_ = encode_batch(tokenizer, [PROMPT], batch, length)
            for forward in forwards.values():
                for _ in range(args.warmup):
                    forward(ids, mask)
            runs = {name: [] for name in forwards}
            for _ in range(args.runs):  # interleaved: each round visits every placement once
                for name, forward in forwards.items():
                    runs[name].append(timed_forward(forward, ids, mask, device))
            points.append({"length": length, "batch": batch, "placements": summarize(runs)})
            print(
                f"  length {length} batch {batch}: "
                + ", ".join(f"{k} {v['median_s'] * 1e3:.0f} ms" for k, v in points[-1]["placements"].items()),
                flush=True,
            )
    return {"device": str(device), "logits": args.logits, "warmup": args.warmup, "runs": args.runs, "points": points}


def timed_forward(forward, ids, mask, device) -> tuple[float, Stats]:
    stats = Stats()
    with stats.recording():
        t0 = time.perf_counter_ns()
        forward(ids, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter_ns() - t0) / 1e9, stats


def summarize(runs: dict) -> dict:
    out = {}
    for name, timed in runs.items():
        seconds = [t for t, _ in timed]
        median_s, stats = sorted(timed, key=lambda r: r[0])[len(timed) // 2]
        summary = stats.summary(int(median_s * 1e9)) if stats.methods else None
        out[name] = {
            "median_s": median_s,
            "runs_s": seconds,
            "timing": summary and summary["timing"],
            "data_mb": summary["data_transfer"]["total_mb"] if summary else 0.0,
        }
    for p in out.values():
        p["ratio_to_transformers"] = p["median_s"] / out["transformers"]["median_s"]
    return out


def plot(data: dict):
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    single = [p for p in data["points"] if p["batch"] == 1]
    for name in PLACEMENTS:
        ax.plot(
            [p["length"] for p in single],
            [p["placements"][name]["median_s"] * 1e3 for p in single],
            marker="o",
            label=name,
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="prefill length (tokens, batch 1)",
        ylabel="median prefill time (ms)",
        title=f"Prefill time by placement ({data['device']})",
    )
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks([p["length"] for p in single], [str(p["length"]) for p in single])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    shown = next((p for p in data["points"] if p["length"] == 512 and p["batch"] == 1), data["points"][-1])
    at512 = shown["placements"]
    names = [n for n in PLACEMENTS if at512[n]["timing"]]
    bottom = np.zeros(len(names))
    for part, label in (
        ("transfer_ms", "transfer"),
        ("gpu_compute_ms", "linear ops (server / engine)"),
        ("tee_compute_ms", "TEE non-linear"),
        ("other_ms", "other"),
    ):
        values = np.array([at512[n]["timing"][part] for n in names])
        bx.bar(names, values, bottom=bottom, label=label)
        bottom += values
    bx.set(ylabel="ms", title=f"Where the time goes at length {shown['length']}, batch {shown['batch']}")
    bx.tick_params(axis="x", labelrotation=20)
    bx.legend()
    return fig


def table(data: dict) -> str:
    rows = []
    for p in data["points"]:
        for name in PLACEMENTS:
            v = p["placements"][name]
            t = v["timing"]
            split = (
                (
                    f"{t['transfer_ms'] / t['total_ms']:.0%} / {t['gpu_compute_ms'] / t['total_ms']:.0%} / "
                    f"{t['tee_compute_ms'] / t['total_ms']:.0%}"
                )
                if t
                else "-"
            )
            rows.append(
                [
                    p["length"],
                    p["batch"],
                    name,
                    f"{v['median_s'] * 1e3:.0f}",
                    f"{np.percentile(v['runs_s'], 25) * 1e3:.0f}-{np.percentile(v['runs_s'], 75) * 1e3:.0f}",
                    f"{p['length'] * p['batch'] / v['median_s']:.0f}",
                    f"{v['ratio_to_transformers']:.2f}x",
                    split,
                    f"{v['data_mb']:.0f}",
                ]
            )
    return markdown_table(
        [
            "length",
            "batch",
            "placement",
            "median ms",
            "IQR ms",
            "tokens/s",
            "vs transformers",
            "transfer / linear / TEE",
            "MB moved",
        ],
        rows,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--device", default=None, help="device for the server, passthrough and transformers (default: cuda if any)"
    )
    p.add_argument(
        "--logits",
        choices=("last", "all"),
        default="last",
        help="LMHead at each row's last position (reference: logits_to_keep=1; the default) or at every position",
    )
    p.add_argument(
        "--points", default=None, help="length x batch to run, e.g. 512x1,1024x1 (default: every point of POINTS)"
    )
    args = p.parse_args(argv)
    data = measure(args)
    name = "prefill" if args.logits == "last" else "prefill-all-logits"
    write_json(name, data)
    finish(
        name,
        plot(data),
        table(data),
        f"logits {args.logits}; median of {args.runs} interleaved rounds after {args.warmup} warm-up",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
