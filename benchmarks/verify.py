"""The cost of --verify: the split prefill with and without its checks, on the embedded model.

One gpu-server over ipc; for each length, the same ids through six ops objects built exactly
as tee-client builds them (plain, with --attention server too, and otp, each with and without
--verify; --variants picks some).
Each forward is prepared as tee-client prepares it (ops.prepare before it: the otp pads and
--verify's secrets, timed as offline) and keeps the logits tee-client keeps (--logits, default
last). After --warmup untimed forwards each, --runs rounds visit every variant in turn (every
other round in reverse order, so that no variant always runs first), so drift hits all alike;
each point is a median (with the IQR and the range of the runs). The overhead three ways: the
ratio of medians; the median over rounds of each round's ratio (verified against unverified in
the same round, seconds apart: what drift between rounds cannot move), with a 95% bootstrap
interval over the rounds; and the checks' own time (the median run's timing.verify_ms) as a
share of the unverified median.
"""

import argparse
import sys
import tempfile
from contextlib import ExitStack

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from benchmarks.common import finish, markdown_table, write_json  # noqa: E402
from tee_client.model import Llama  # noqa: E402
from tee_client.ops import make_ops  # noqa: E402
from tee_client.prefill import encode_batch, prepare, timed_forward  # noqa: E402
from tee_client.settings import PrefillSettings  # noqa: E402
from tsqp.checkpoint import embedded_model_path, resolve_folder  # noqa: E402
from tsqp.launch import ServerProcess  # noqa: E402

PROMPT = "The capital of France is Paris. " * 200  # fills every length: no padding
VARIANTS = {  # name: (privacy, --verify, --attention)
    "plain": ("plain", False, "tee"),
    "plain+verify": ("plain", True, "tee"),
    "server-attention": ("plain", False, "server"),
    "server-attention+verify": ("plain", True, "server"),
    "otp": ("otp", False, "tee"),
    "otp+verify": ("otp", True, "tee"),
}


def measure(args) -> dict:
    points, variants = [], {name: VARIANTS[name] for name in args.variants}
    with tempfile.TemporaryDirectory(prefix="tsqp-bench-") as tmp, ExitStack() as stack:
        endpoint = f"ipc://{tmp}/s.ipc"
        stack.enter_context(ServerProcess(endpoint, "--model", str(embedded_model_path()), "--device", "cpu"))
        models = {}
        for name, (privacy, verify, attention) in variants.items():
            settings = PrefillSettings(
                gpu_endpoint=endpoint,
                model_path=str(embedded_model_path()),
                privacy=privacy,
                verify=verify,
                attention=attention,
                rpc_timeout=600,
            )
            ops = make_ops(settings)
            stack.callback(ops.close)
            models[name] = (Llama(ops.init(), ops, attention), ops)
        tokenizer = AutoTokenizer.from_pretrained(resolve_folder(embedded_model_path())[0])
        for length in args.lengths:
            ids, mask, *_ = encode_batch(tokenizer, [PROMPT], 1, length)
            head_rows = ids.shape[0] if args.logits == "last" else ids.numel()
            for model, ops in models.values():
                for _ in range(args.warmup):
                    ops.prepare(ids.numel(), head_rows)
                    model.forward(ids, mask, args.logits)
            runs, order = {name: [] for name in models}, list(models.items())
            for i in range(args.runs):  # interleaved, every other round backwards
                for name, (model, ops) in order if i % 2 == 0 else reversed(order):
                    offline = prepare(ops, ids.numel(), head_rows)
                    runs[name].append(timed_forward(model, ids, mask, offline, args.logits))
            points.append({"length": length, "variants": summarize(runs)})
            print(
                f"  length {length}: "
                + ", ".join(f"{k} {v['median_ms']:.0f} ms" for k, v in points[-1]["variants"].items())
            )
    return {"warmup": args.warmup, "runs": args.runs, "logits": args.logits, "points": points}


def summarize(runs: dict) -> dict:
    out = {}
    for name, timed in runs.items():
        ms = [t * 1e3 for t, _, _ in timed]
        median_s, stats, _ = sorted(timed, key=lambda r: r[0])[len(timed) // 2]
        summary = stats.summary(int(median_s * 1e9))
        out[name] = {
            "median_ms": float(np.median(ms)),
            "runs_ms": ms,
            "verify_ms": summary["timing"]["verify_ms"],
            "offline_ms": summary["timing"]["offline_ms"],
            "checks": stats.verify_checks,
        }
    for name, v in out.items():
        base = out.get(name.removesuffix("+verify"))
        v["vs_unverified"] = v["median_ms"] / base["median_ms"] if base else None
        paired = np.divide(v["runs_ms"], base["runs_ms"]) if base else None  # round by round
        v["paired_vs_unverified"] = float(np.median(paired)) if base else None
        v["paired_ci95"] = bootstrap_median_ci(paired) if base else None
        v["verify_share"] = v["verify_ms"] / base["median_ms"] if base else None
    return out


def bootstrap_median_ci(ratios: np.ndarray, resamples: int = 10000) -> list[float]:
    """A 95% percentile-bootstrap interval of the median of the per-round ratios (rounds resampled with
    replacement; a fixed seed, so the same runs give the same interval)."""
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(ratios, size=(resamples, len(ratios))), axis=1)
    return [float(q) for q in np.percentile(medians, [2.5, 97.5])]


def plot(data: dict):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(data["points"][0]["variants"])
    width = 0.8 / len(data["points"])
    for i, p in enumerate(data["points"]):
        ax.bar(
            np.arange(len(names)) + i * width,
            [p["variants"][n]["median_ms"] for n in names],
            width,
            label=f"{p['length']} tokens",
        )
    ax.set_xticks(np.arange(len(names)) + width * (len(data["points"]) - 1) / 2, names)
    ax.set(ylabel="median prefill ms", yscale="log", title="--verify overhead (SmolLM2-135M, ipc)")
    ax.legend()
    return fig


def table(data: dict) -> str:
    rows = []
    for p in data["points"]:
        for name, v in p["variants"].items():
            rows.append(
                [
                    p["length"],
                    name,
                    f"{v['median_ms']:.0f}",
                    f"{np.percentile(v['runs_ms'], 25):.0f}-{np.percentile(v['runs_ms'], 75):.0f}",
                    f"{min(v['runs_ms']):.0f}-{max(v['runs_ms']):.0f}",
                    f"{v['verify_ms']:.0f}",
                    f"{v['offline_ms']:.0f}",
                    v["checks"],
                    percent(v["vs_unverified"], -1),
                    percent(v.get("paired_vs_unverified"), -1),
                    interval(v.get("paired_ci95")),
                    percent(v.get("verify_share"), 0, signed=False),
                ]
            )
    header = ["length", "mode", "median ms", "IQR ms", "range ms", "verify ms", "offline ms", "checks"]
    header += ["vs same mode unverified (medians)", "paired, per round", "paired 95% CI", "verify ms / unverified"]
    return markdown_table(header, rows)


def interval(ci: list[float] | None) -> str:
    return "–" if ci is None else f"{percent(ci[0], -1)} to {percent(ci[1], -1)}"


def percent(ratio: float | None, less: float, signed: bool = True) -> str:
    return "–" if ratio is None else f"{(ratio + less) * 100:{'+' if signed else ''}.1f}%"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument(
        "--logits", choices=["last", "all"], default="last", help="what LMHead computes (tee-client's --logits)"
    )
    args = p.parse_args(argv)
    data = measure(args)
    write_json("verify", data)
    finish(
        "verify",
        plot(data),
        table(data),
        f"median of {args.runs} interleaved rounds after {args.warmup} warm-up, --logits {args.logits}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
