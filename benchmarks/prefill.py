"""Prefill on the embedded model: the split (ipc, tcp), passthrough, tee-only and transformers.

Every placement runs the same prompts at the same lengths: the three TSQP backends through
tee_client.prefill (one model file, different ops objects), and transformers' own
LlamaForCausalLM forward in this process as the reference. Each point is the median of
--runs timed forwards after --warmup untimed ones; the time breakdown is that median run's.
"""

import argparse
import sys
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import machine, markdown_table, png_path, write_json  # noqa: E402
from gpu_server.checkpoint import embedded_model_path, resolve_folder  # noqa: E402
from gpu_server.launch import ServerProcess, free_tcp_port  # noqa: E402
from tee_client.prefill import encode_batch, run_prefill  # noqa: E402
from tee_client.settings import PrefillSettings  # noqa: E402

PROMPT = "The capital of France is Paris. " * 200  # long enough to fill every length: no padding
POINTS = [(128, 1), (256, 1), (512, 1), (1024, 1), (256, 4)]
PLACEMENTS = ["remote ipc", "remote tcp", "passthrough", "tee-only", "transformers"]


def tsqp_point(backend: str, endpoint: str, length: int, batch: int, args) -> dict:
    settings = PrefillSettings(
        backend=backend,
        gpu_endpoint=endpoint,
        prefill_length=length,
        tee_batch_size=batch,
        prompt=[PROMPT],
        warmup=args.warmup,
        repeat=args.runs,
        gpu_device=args.device,
    )
    result, *_ = run_prefill(settings)
    return {
        "median_s": result["time_seconds"],
        "runs_s": result["runs_seconds"],
        "timing": result["timing"],
        "data_mb": result["data_transfer"]["total_mb"],
    }


def transformers_point(model, tokenizer, length: int, batch: int, args) -> dict:
    ids, mask, _ = encode_batch(tokenizer, [PROMPT], batch, length)
    ids, mask = ids.to(model.device), mask.to(model.device)
    runs = []
    with torch.inference_mode():
        for i in range(args.warmup + args.runs):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                runs.append(time.perf_counter() - t0)
    return {"median_s": float(np.median(runs)), "runs_s": runs, "timing": None, "data_mb": 0.0}


def measure(args) -> dict:
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder, _ = resolve_folder(embedded_model_path())
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reference = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    points = []
    with tempfile.TemporaryDirectory(prefix="tsqp-bench-") as tmp:
        ipc, tcp = f"ipc://{tmp}/s.ipc", f"tcp://127.0.0.1:{free_tcp_port()}"
        server_args = ("--device", str(device))
        with ServerProcess(ipc, *server_args), ServerProcess(tcp, *server_args):
            for length, batch in POINTS:
                row = {
                    "length": length,
                    "batch": batch,
                    "placements": {
                        "remote ipc": tsqp_point("remote", ipc, length, batch, args),
                        "remote tcp": tsqp_point("remote", tcp, length, batch, args),
                        "passthrough": tsqp_point("passthrough", ipc, length, batch, args),
                        "tee-only": tsqp_point("tee-only", ipc, length, batch, args),
                        "transformers": transformers_point(reference, tokenizer, length, batch, args),
                    },
                }
                reference_s = row["placements"]["transformers"]["median_s"]
                for p in row["placements"].values():
                    p["ratio_to_transformers"] = p["median_s"] / reference_s
                points.append(row)
                print(
                    f"  length {length} batch {batch}: "
                    + ", ".join(f"{k} {v['median_s'] * 1e3:.0f} ms" for k, v in row["placements"].items()),
                    flush=True,
                )
    return {"device": str(device), "warmup": args.warmup, "runs": args.runs, "points": points}


def plot(data: dict) -> None:
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
    ax.set_xticks([p["length"] for p in single], [str(p["length"]) for p in single])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    at512 = next(p for p in data["points"] if p["length"] == 512 and p["batch"] == 1)["placements"]
    names = [n for n in PLACEMENTS if at512[n]["timing"]]
    bottom = np.zeros(len(names))
    for part, label in (
        ("transfer_ms", "transfer"),
        ("gpu_compute_ms", "linear ops (GPU side)"),
        ("tee_compute_ms", "TEE non-linear"),
        ("other_ms", "other"),
    ):
        values = np.array([at512[n]["timing"][part] for n in names])
        bx.bar(names, values, bottom=bottom, label=label)
        bottom += values
    bx.set(ylabel="ms", title="Where the time goes at length 512")
    bx.legend()
    fig.tight_layout()
    fig.savefig(png_path("prefill"), dpi=120)


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
    args = p.parse_args(argv)
    data = measure(args)
    path = write_json("prefill", data)
    plot(data)
    m = machine()
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, gpu {m['gpu']}, torch {m['torch']}, {m['date']}; "
        f"median of {args.runs} after {args.warmup} warm-up"
    )
    print(table(data))
    print(f"wrote {path} and {png_path('prefill')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
