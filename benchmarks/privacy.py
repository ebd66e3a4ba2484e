"""What the GPU host sees in each privacy mode, what simple attacks read off it, and what each mode costs.

Leakage. A recording gpu-server (--record keeps every request, as a curious host would) gets PROMPT,
128 real tokens of a private letter, twice in each mode (plain, otp, mix), sent exactly as tee-client
sends it (make_ops + Llama). The spy knows the weights; against what it kept it runs benchmarks/attacks.py:
  - token recovery on the layer-0 q/k/v input: each received row matched to the row of largest |cos| in
    RMSNorm(embedding)·w of layer 0; top-1 and top-5, raw and after removing the received tensor's top 1
    or 2 singular directions (the better kept);
  - max |cos| of the received rows with every plaintext hidden state of the same width that plain mode
    puts through a weight matmul (every Linear/LMHead input, as four calls per layer would send them:
    plaintext_states), per received weight-matmul input, raw and after removing the top 2 directions; the
    largest over the mode's requests;
  - |correlation| of the layer-0 tensors of the two runs (≈1 if a pad were reused);
  - the subspace attack per 16-token block: the share of each block's distinct tokens found among the
    table rows lying most in the span of what the block sent (weighted by the block's distinct tokens);
  - whether the prompt's token ids appear, in order, in any request.
otp's int64 ring elements are read as float64. Baselines, built here from plain mode's layer-0 input X
(the seed prototype's two schemes): (D + αβᵀ)·X, and X − R with Gaussian R of σ = 2, 4, 8 × RMS(X), plus
the mean of 4 independent looks at 8× (the averaging attack); their two runs are two independent draws.

Cost. One gpu-server without --record, remote over ipc, batch 1, float32, at each of --lengths tokens:
after --warmup forwards per mode, --runs rounds each run plain, otp and mix once. Per mode: the median
online time (the forward, tee_client.prefill.timed_forward) and its IQR; the ratio to plain in the same
round (median over rounds); the offline time (otp's pads and their products r·Wqᵀ, drawn by prepare just
before the forward, outside its time); mask and unmask time inside the forward; bytes each way.
"""

import argparse
import math
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.attacks import (  # noqa: E402
    expected_max_abs_cos,
    nearest_embedding_recovery,
    recovery_after_svd,
    remove_top_directions,
    run_correlation,
    seed_gaussian_pad,
    seed_rank_one_mix,
    subspace_attack,
)
from benchmarks.common import finish, markdown_table, write_json  # noqa: E402
from tee_client.model import Llama, rms_norm  # noqa: E402
from tee_client.ops import Ops, make_ops  # noqa: E402
from tee_client.prefill import encode_batch, prepare, timed_forward  # noqa: E402
from tee_client.privacy import MODES  # noqa: E402
from tee_client.settings import PrefillSettings  # noqa: E402
from tee_client.stats import SETUP  # noqa: E402
from tsqp.checkpoint import embedded_model_path, load_checkpoint  # noqa: E402
from tsqp.launch import ServerProcess  # noqa: E402
from tsqp.spec import load_tokenizer  # noqa: E402

PROMPT = (
    "Dear Dr. Alvarez, I am writing to follow up on my visit to the clinic last Tuesday. Since we spoke, the pain "
    "in my lower back has spread to my left leg, and I now wake up two or three times a night. The physiotherapist "
    "suggested that I stop running for a month, but I have a marathon in Lisbon on the twelfth of October and I "
    "would rather not cancel it. My blood pressure readings at home have been higher than usual, around 150 over "
    "95, even though I take the tablets every morning. Could you tell me whether the new medication might be the "
    "cause, and whether I should book another appointment before the end of the month? I have also attached the "
    "results of the scan from the hospital. Thank you for your patience, Maria Santos."
)  # 163 tokens: cut to LEAK_LENGTH, all real
LEAK_LENGTH = 128  # a multiple of MIX_BLOCK, so the mixer's blocks are the rows 16 at a time
MIX_BLOCK = 16
WEIGHT_MATMULS = ("Linear", "LMHead", "LinearRing", "LMHeadRing")
TIMING = ("offline_ms", "mask_ms", "unmask_ms", "transfer_ms", "gpu_compute_ms", "tee_compute_ms", "other_ms")
COLORS = {"plain": "tab:gray", "otp": "tab:purple", "mix": "tab:olive"}
SIGMAS = (2, 4, 8)
LOOKS = 4  # looks averaged at the largest σ


def client(mode: str, endpoint: str, stack: ExitStack) -> tuple[Llama, Ops]:
    """A Llama forward and its ops, exactly as tee-client builds them (tee_client.ops.make_ops)."""
    settings = PrefillSettings(
        backend="remote",
        privacy=mode,
        mix_block=MIX_BLOCK,
        gpu_endpoint=endpoint,
        model_path=str(embedded_model_path()),  # named outright, so an exported LLAMA_MODEL_PATH cannot swap it in
        dtype="float32",
        rpc_timeout=60,  # the longest call (otp's LMHeadRing at 512 tokens) takes seconds
    )
    ops = make_ops(settings)
    stack.callback(ops.close)
    return Llama(ops.init(), ops), ops


def server(endpoint: str, *args: str) -> ServerProcess:
    return ServerProcess(
        endpoint, "--model", str(embedded_model_path()), "--device", "cpu", "--dtype", "float32", *args
    )


# ---- leakage ---------------------------------------------------------------------------------------


def spy(tokenizer) -> tuple[dict, torch.Tensor]:
    """mode -> the forward requests a recording server kept, for each of two runs of PROMPT; and its ids."""
    ids, mask, *_ = encode_batch(tokenizer, [PROMPT], 1, LEAK_LENGTH)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="tsqp-spy-") as tmp, ExitStack() as stack:
        record = Path(tmp) / "record"
        spying = stack.enter_context(server(f"ipc://{tmp}/s.ipc", "--record", str(record)))
        for mode in MODES:
            model, ops = client(mode, spying.endpoint, stack)
            runs[mode] = []
            for _ in range(2):
                prepare(ops, LEAK_LENGTH)
                model.forward(ids, mask)
                runs[mode].append(take(record))
    return runs, ids[0]


def take(folder: Path) -> list[dict]:
    """The forward's requests recorded since the last take, in order (Init and Ping left out); their files go."""
    calls = []
    for path in sorted(folder.glob("*.pt")):
        request = torch.load(path)
        path.unlink()
        if request["method"] not in SETUP:
            calls.append(request)
    return calls


def first_layer_table(ckpt) -> torch.Tensor:
    """What a layer-0 q/k/v input is for each token: RMSNorm(embedding)·w, in float64. The spy has the model."""
    eps = ckpt.config["rms_norm_eps"]
    return rms_norm(ckpt.embed.detach().float(), ckpt.layers[0].input_norm.detach().float(), eps).double()


def rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).double()


def matmul_inputs(calls: list[dict]) -> list[torch.Tensor]:
    """Every weight-matmul input of one forward, as (rows, width) float64: the first is layer 0's q/k/v input. A
    Residual request (plain mode's two calls per layer) holds two: o_proj's or down_proj's input, and the residual
    stream."""
    return [rows(t) for c in calls if c["method"] in (*WEIGHT_MATMULS, "Residual") for t in inputs(c)]


def inputs(call: dict) -> list[torch.Tensor]:
    return call["tensors"] if call["method"] == "Residual" else call["tensors"][:1]


def plaintext_states(calls: list[dict], ckpt) -> list[torch.Tensor]:
    """Every hidden state plain mode's forward puts through a weight matmul, as (rows, width) float64, as its four
    calls per layer would send them: a Linear's or LMHead's input; of a Residual request, o_proj's or down_proj's
    input, and its residual stream through the RMSNorm that follows (the spy has its weight): the q/k/v input of
    the layer o_proj's call is in, or the gate/up input of down_proj's."""
    states, eps = [], ckpt.config["rms_norm_eps"]
    for c in calls:
        if c["method"] == "Residual":
            a, x = c["tensors"]
            layer = ckpt.layers[c["args"]["layer"]]
            norm = layer.input_norm if c["args"]["out"] == "o_proj" else layer.post_attention_norm
            states += [rows(a), rows(rms_norm(x.float(), norm.detach().float(), eps))]
        elif c["method"] in WEIGHT_MATMULS:
            states.append(rows(c["tensors"][0]))
    return states


def layer0_input(calls: list[dict]) -> torch.Tensor:
    return rows(next(c["tensors"][0] for c in calls if c["method"] in WEIGHT_MATMULS))


def by_width(tensors: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """(rows, width) tensors stacked per width: the hidden states (576) and the MLP's inner activations (1536)."""
    return {width: torch.cat([t for t in tensors if t.shape[1] == width]) for width in {t.shape[1] for t in tensors}}


def holds_ids(t: torch.Tensor, ids: torch.Tensor) -> bool:
    """Does the flattened tensor hold the prompt's ids in order (the way an Embedding request does)?"""
    flat = t.flatten()
    starts = (flat[: max(len(flat) - len(ids) + 1, 0)] == ids[0]).nonzero().flatten().tolist()
    return any(bool((flat[i : i + len(ids)] == ids).all()) for i in starts)


def constructions(runs: dict, ids: torch.Tensor) -> dict:
    """name -> (received tensors of run 1, the layer-0 tensor of run 2, ids seen, methods): what the spy attacks."""
    out = {}
    for mode in MODES:
        first, second = runs[mode]
        seen = any(holds_ids(t, ids) for c in first for t in c["tensors"])
        out[mode] = (matmul_inputs(first), layer0_input(second), seen, sorted({c["method"] for c in first}))
    x = layer0_input(runs["plain"][0])
    out["seed D+αβᵀ"] = ([seed_rank_one_mix(x)], seed_rank_one_mix(x), None, None)
    for sigma in SIGMAS:
        out[f"seed pad σ={sigma}×"] = ([seed_gaussian_pad(x, sigma)], seed_gaussian_pad(x, sigma), None, None)
    averaged = lambda: torch.stack([seed_gaussian_pad(x, SIGMAS[-1]) for _ in range(LOOKS)]).mean(dim=0)
    out[f"seed pad σ={SIGMAS[-1]}×, mean of {LOOKS}"] = ([averaged()], averaged(), None, None)
    return out


def max_abs_cosines(received: list[torch.Tensor], plaintext: dict[int, torch.Tensor]) -> dict:
    """attacks.max_abs_cosine of each received tensor against all plaintext rows of its width; the largest of each,
    and the level random vectors would reach over as many pairs (attacks.expected_max_abs_cos).

    The same numbers as calling it once per tensor, with the plaintext side (rows centred, of unit length, raw and
    with its top 2 directions removed) computed once per width instead of once per tensor: that SVD of 11648 rows,
    121 times per mode, takes minutes on two cores.
    """
    centre = lambda t: t - t.mean(dim=1, keepdim=True)
    sides = {}
    for width, states in plaintext.items():
        centred = centre(states)
        sides[width] = F.normalize(centred, dim=1), F.normalize(remove_top_directions(centred, 2), dim=1)
    worst = lambda a, b: (F.normalize(a, dim=1) @ b.T).abs().max().item()
    raw = svd2 = 0.0
    pairs = dict.fromkeys(plaintext, 0)  # width -> received rows × plaintext rows compared
    for r in received:
        a, (b, b_svd2) = centre(r), sides[r.shape[1]]
        raw, svd2 = max(raw, worst(a, b)), max(svd2, worst(remove_top_directions(a, 2), b_svd2))
        pairs[r.shape[1]] += len(r) * len(b)
    return {
        "max_abs_cos": raw,
        "max_abs_cos_svd2": svd2,
        "random_max_abs_cos": max(expected_max_abs_cos(n, width) for width, n in pairs.items() if n),
    }


def leakage(received: list, again: torch.Tensor, plaintext: dict, table: torch.Tensor, ids: torch.Tensor) -> dict:
    """Every attack on one construction: `received` its tensors of run 1 (layer 0's first), `again` run 2's layer 0."""
    layer0 = received[0]
    raw = nearest_embedding_recovery(layer0, table, ids)
    svd = recovery_after_svd(layer0, table, ids, ks=(1, 2))
    blocks = [
        (subspace_attack(block, table, block_ids)["recall"], len(torch.unique(block_ids)))
        for block, block_ids in zip(layer0.split(MIX_BLOCK), ids.split(MIX_BLOCK), strict=True)
    ]
    return {
        "top1": raw["top1"],
        "top5": raw["top5"],
        "svd_top1": svd["top1"],
        "svd_top5": svd["top5"],
        "svd_k": svd["best_k"],
        **max_abs_cosines(received, plaintext),
        "tensors_compared": len(received),
        "run_correlation": run_correlation(layer0, again),
        "block_token_recall": sum(recall * n for recall, n in blocks) / sum(n for _, n in blocks),
    }


def measure_leakage(ckpt) -> dict:
    runs, ids = spy(load_tokenizer(ckpt.folder))
    table = first_layer_table(ckpt)
    plaintext = by_width(plaintext_states(runs["plain"][0], ckpt))
    results = {}
    for name, (received, again, seen, methods) in constructions(runs, ids).items():
        results[name] = {"ids_seen": seen, "methods": methods, **leakage(received, again, plaintext, table, ids)}
        print(f"  {name}: top-1 {results[name]['top1']:.0%}, after SVD {results[name]['svd_top1']:.0%}", flush=True)
    vocab = table.shape[0]
    return {
        "tokens": LEAK_LENGTH,
        "vocab": vocab,
        "chance": {"top1": 1 / vocab, "top5": 5 / vocab, "block": MIX_BLOCK / vocab},
        "constructions": results,
    }


# ---- cost ------------------------------------------------------------------------------------------


def measure_cost(args, tokenizer) -> list[dict]:
    points = []
    with tempfile.TemporaryDirectory(prefix="tsqp-bench-") as tmp, ExitStack() as stack:
        serving = stack.enter_context(server(f"ipc://{tmp}/s.ipc"))
        clients = {mode: client(mode, serving.endpoint, stack) for mode in MODES}
        for length in args.lengths:
            copies = " ".join([PROMPT] * math.ceil(length / LEAK_LENGTH))  # each copy is over LEAK_LENGTH tokens
            ids, mask, *_ = encode_batch(tokenizer, [copies], 1, length)  # all real tokens, no padding
            for model, ops in clients.values():
                for _ in range(args.warmup):
                    prepare(ops, length)
                    model.forward(ids, mask)
            runs = {mode: [] for mode in MODES}
            for _ in range(args.runs):  # interleaved: each round runs every mode once
                for mode, (model, ops) in clients.items():
                    offline_ns = prepare(ops, length)  # this forward's pads, drawn before it starts
                    seconds, stats, _ = timed_forward(model, ids, mask, offline_ns)
                    runs[mode].append((seconds, stats.summary(int(seconds * 1e9))))
            points.append({"length": length, "modes": summarize(runs)})
            print(
                f"  length {length}: "
                + ", ".join(f"{mode} {v['median_ms']:.0f} ms" for mode, v in points[-1]["modes"].items()),
                flush=True,
            )
    return points


def summarize(runs: dict) -> dict:
    """Per mode: medians over the rounds, and the ratio to plain's time in the same round."""
    plain = [seconds for seconds, _ in runs["plain"]]
    out = {}
    for mode, timed in runs.items():
        seconds = [s for s, _ in timed]
        data = timed[0][1]["data_transfer"]  # the same bytes every round
        out[mode] = {
            "median_ms": float(np.median(seconds)) * 1e3,
            "iqr_ms": [float(np.percentile(seconds, q)) * 1e3 for q in (25, 75)],
            "runs_ms": [s * 1e3 for s in seconds],
            "vs_plain": float(np.median([s / p for s, p in zip(seconds, plain, strict=True)])),
            "timing": {key: float(np.median([summary["timing"][key] for _, summary in timed])) for key in TIMING},
            "to_gpu_mb": data["to_gpu_mb"],
            "to_cpu_mb": data["to_cpu_mb"],
            "resends": sum(m["retries"] for _, summary in timed for m in summary["rpc"].values()),
        }
    return out


# ---- report ----------------------------------------------------------------------------------------


def plot(data: dict):
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    leak = data["leakage"]
    names = list(leak["constructions"])
    at = np.arange(len(names))
    for i, (key, label) in enumerate(
        (
            ("top1", "top-1, raw"),
            ("svd_top1", "top-1, top 1-2 directions removed"),
            ("block_token_recall", "block subspace recall"),
        )
    ):
        ax.bar(at + (i - 1) * 0.27, [leak["constructions"][n][key] for n in names], 0.27, label=label)
    ax.axhline(
        leak["chance"]["top1"],
        color="k",
        linestyle="--",
        linewidth=1,
        label=f"chance top-1 (1/V = {leak['chance']['top1']:.1e})",
    )
    ax.set_xticks(at, names, rotation=30, ha="right")
    ax.set(
        ylabel="fraction of the prompt's tokens",
        ylim=(0, 1.05),
        title=f"What a spying server reads ({leak['tokens']} tokens)",
    )
    ax.legend(fontsize=8)
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        x = np.arange(len(data["cost"])) + (i - 1) * width
        online = np.array([p["modes"][mode]["median_ms"] for p in data["cost"]])
        iqr = np.array([p["modes"][mode]["iqr_ms"] for p in data["cost"]]).T
        offline = [p["modes"][mode]["timing"]["offline_ms"] for p in data["cost"]]
        bx.bar(x, online, width, yerr=np.abs(iqr - online), capsize=3, color=COLORS[mode], label=f"{mode} online")
        bx.bar(x, offline, width, bottom=online, color=COLORS[mode], alpha=0.35, hatch="//")
    bx.set_xticks(np.arange(len(data["cost"])), [f"{p['length']} tokens" for p in data["cost"]])
    bx.set(ylabel="ms (median, IQR bars)", title="Prefill time per mode (remote ipc, batch 1, float32)")
    handles, _ = bx.get_legend_handles_labels()
    bx.legend(
        handles=[*handles, Patch(facecolor="white", edgecolor="black", hatch="//", label="offline (pads), stacked")],
        fontsize=8,
    )
    return fig


def leakage_table(leak: dict) -> str:
    yes_no = lambda v: "-" if v is None else ("yes" if v else "no")
    rows = [
        [
            name,
            yes_no(v["ids_seen"]),
            f"{v['top1']:.1%}",
            f"{v['top5']:.1%}",
            f"{v['svd_top1']:.1%} (k={v['svd_k']})",
            f"{v['svd_top5']:.1%}",
            f"{v['max_abs_cos']:.3f} / {v['max_abs_cos_svd2']:.3f} ({v['random_max_abs_cos']:.2f})",
            f"{v['run_correlation']:.3f}",
            f"{v['block_token_recall']:.1%}",
        ]
        for name, v in leak["constructions"].items()
    ]
    header = [
        "construction",
        "ids seen",
        "top-1",
        "top-5",
        "top-1 after SVD",
        "top-5 after SVD",
        "max abs cos / top-2 removed (random)",
        "run corr",
        "block subspace recall",
    ]
    return markdown_table(header, rows)


def cost_table(cost: list[dict]) -> str:
    rows = []
    for p in cost:
        for mode, v in p["modes"].items():
            t = v["timing"]
            rows.append(
                [
                    p["length"],
                    mode,
                    f"{v['median_ms']:.0f}",
                    f"{v['iqr_ms'][0]:.0f}-{v['iqr_ms'][1]:.0f}",
                    f"{v['vs_plain']:.2f}x",
                    f"{t['offline_ms']:.0f}",
                    f"{t['mask_ms']:.0f} / {t['unmask_ms']:.0f}",
                    " / ".join(
                        f"{ms / v['median_ms']:.0%}"
                        for ms in (
                            t["transfer_ms"],
                            t["gpu_compute_ms"],
                            t["tee_compute_ms"],
                            t["mask_ms"] + t["unmask_ms"],
                        )
                    ),
                    f"{v['to_gpu_mb']:.1f} / {v['to_cpu_mb']:.1f}",
                ]
            )
    header = [
        "tokens",
        "mode",
        "online ms",
        "IQR ms",
        "vs plain",
        "offline ms",
        "mask / unmask ms",
        "transfer / server / TEE / mask+unmask",
        "MB to GPU / to CPU",
    ]
    return markdown_table(header, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per mode and length (default 1)")
    p.add_argument("--runs", type=int, default=3, help="interleaved timed rounds per length (default 3)")
    p.add_argument(
        "--lengths", type=int, nargs="+", default=[128, 512], help="prompt lengths to time (default 128 512)"
    )
    args = p.parse_args(argv)
    ckpt = load_checkpoint(embedded_model_path(), torch.float32, torch.device("cpu"))  # the spy's copy of the model
    print("leakage: one recording server, two runs of the prompt per mode", flush=True)
    leak = measure_leakage(ckpt)
    print(f"cost: {args.runs} interleaved rounds after {args.warmup} warm-up, lengths {args.lengths}", flush=True)
    data = {
        "warmup": args.warmup,
        "runs": args.runs,
        "leakage": leak,
        "cost": measure_cost(args, load_tokenizer(ckpt.folder)),
    }
    write_json("privacy", data)
    resends = {
        f"{mode} at {p['length']}": v["resends"] for p in data["cost"] for mode, v in p["modes"].items() if v["resends"]
    }
    finish(
        "privacy",
        plot(data),
        leakage_table(leak) + "\n\n" + cost_table(data["cost"]),
        f"leakage: chance is {leak['chance']['top1']:.1e} (top-1), {leak['chance']['top5']:.1e} (top-5), "
        f"{leak['chance']['block']:.1e} (block subspace recall, K/V); (random) is the max |cos| random vectors "
        "would reach over as many pairs; run corr is |correlation| of two runs' layer-0 tensors",
        f"cost: median of {args.runs} interleaved rounds after {args.warmup} warm-up; vs plain is the median over "
        "rounds of mode/plain; offline is drawn before the forward and is not in online ms; "
        + (f"requests resent after a lost reply (the wait is in online ms): {resends}" if resends else "no resends"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
