"""Decode speed on the embedded model: the split (ipc through shared memory, tcp) against transformers' generate.

Each placement generates --new-tokens greedy tokens (end-of-sequence ignored) after a prompt of
128, 512 and 1024 tokens, batch 1, float32: the split through tee-client's own generation loop
(tee_client.generate.generate: KV cache in the client, one row per linear op per step), and
transformers' LlamaForCausalLM.generate with its own KV cache, in this process, timed per token
through its streamer hook; and the same again with its weights laid out as gpu-server stores them
(tsqp.engine.store_for_matvec: wide float32 weights column-major on the CPU), to show how much of the
split's speed is that layout, not the split; the ratio column is against transformers as it comes.
After --warmup untimed generations each, --runs rounds visit every placement once (interleaved, so
drift on a shared host hits all alike). Per run: the median decode step (ms per new token) and the
time to the first token; each point is the median over runs, with the spread of the per-run medians.
"""

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from benchmarks.common import finish, markdown_table, write_json  # noqa: E402
from protocol.endpoints import free_tcp_port  # noqa: E402
from tee_client.generate import Sampler, Streamer, generate  # noqa: E402
from tee_client.model import Llama  # noqa: E402
from tee_client.ops import make_ops  # noqa: E402
from tee_client.prefill import encode_batch  # noqa: E402
from tee_client.settings import GenerateSettings  # noqa: E402
from tsqp.checkpoint import embedded_model_path, resolve_folder  # noqa: E402
from tsqp.engine import store_for_matvec  # noqa: E402
from tsqp.launch import ServerProcess  # noqa: E402

PROMPT = "The capital of France is Paris. " * 200  # long enough to fill every context
CONTEXTS = [128, 512, 1024]
PLACEMENTS = ["split ipc", "split tcp", "transformers", "transformers, server's layout"]


class TokenClock:
    """transformers' streamer hook: put() is called with the prompt, then with each new token; their times."""

    def __init__(self):
        self.times: list[int] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter_ns())

    def end(self) -> None:
        pass


def placements(ipc: str, tcp: str, device: torch.device, stack: ExitStack, new_tokens: int) -> dict:
    """name -> run(input_ids, attention_mask) -> (ttft ns, [ns per decode step])."""
    from transformers import LlamaForCausalLM

    def split(endpoint: str):
        settings = GenerateSettings(gpu_endpoint=endpoint, model_path=str(embedded_model_path()), rpc_timeout=300)
        ops = make_ops(settings)
        stack.callback(ops.close)
        spec = ops.init()
        model = Llama(spec, ops)

        def run(ids, mask):
            streamer = Streamer(spec.tokenizer, ids.shape[0], None)
            out = generate(model, Sampler(0.0, 0, 1.0, seed=0), streamer, ids, mask, new_tokens, set())
            return out.prefill.step_ns[0], out.decode.step_ns

        return run

    folder, _ = resolve_folder(embedded_model_path())

    def transformers(layout: bool):
        reference = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        if layout:
            store_for_matvec(m.weight for m in reference.modules() if isinstance(m, torch.nn.Linear))
        return lambda ids, mask: transformers_generate(reference, ids, mask)

    @torch.inference_mode()
    def transformers_generate(reference, ids, mask):
        clock = TokenClock()
        t0 = time.perf_counter_ns()
        reference.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=None,
            streamer=clock,
        )
        new = clock.times[1:]  # times[0]: the prompt itself
        return new[0] - t0, list(np.diff(new))

    return {
        "split ipc": split(ipc),
        "split tcp": split(tcp),
        "transformers": transformers(False),
        "transformers, server's layout": transformers(True),
    }


def measure(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    points = []
    with tempfile.TemporaryDirectory(prefix="tsqp-bench-") as tmp, ExitStack() as stack:
        ipc, tcp = f"ipc://{tmp}/s.ipc", f"tcp://127.0.0.1:{free_tcp_port()}"
        for url in (ipc, tcp):
            server = ServerProcess(url, "--model", str(embedded_model_path()), "--device", str(device))
            stack.enter_context(server)
        runners = placements(ipc, tcp, device, stack, args.new_tokens)
        tokenizer = AutoTokenizer.from_pretrained(resolve_folder(embedded_model_path())[0])
        for context in [int(c) for c in args.contexts.split(",")]:
            ids, mask, *_ = encode_batch(tokenizer, [PROMPT], 1, context)
            for run in runners.values():
                for _ in range(args.warmup):
                    run(ids, mask)
            runs = {name: [] for name in runners}
            for _ in range(args.runs):  # interleaved: each round visits every placement once
                for name, run in runners.items():
                    ttft_ns, steps_ns = run(ids, mask)
                    runs[name].append((ttft_ns / 1e6, float(np.median(steps_ns)) / 1e6))
            points.append({"context": context, "placements": summarize(runs)})
            print(
                f"  context {context}: "
                + ", ".join(f"{k} {v['decode_ms']:.1f} ms/token" for k, v in points[-1]["placements"].items()),
                flush=True,
            )
    return {
        "device": str(device),
        "new_tokens": args.new_tokens,
        "warmup": args.warmup,
        "runs": args.runs,
        "points": points,
    }


def summarize(runs: dict) -> dict:
    out = {}
    for name, timed in runs.items():
        decode = [d for _, d in timed]
        out[name] = {
            "decode_ms": float(np.median(decode)),
            "decode_ms_runs": decode,
            "ttft_ms": float(np.median([t for t, _ in timed])),
            "tokens_per_sec": 1000 / float(np.median(decode)),
        }
    for name, p in out.items():  # per round, then the median: the ratio is measured side by side
        p["ratio_to_transformers"] = float(
            np.median([a[1] / b[1] for a, b in zip(runs[name], runs["transformers"], strict=True)])
        )
    return out


def plot(data: dict):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    contexts = [p["context"] for p in data["points"]]
    for name in PLACEMENTS:
        ax.plot(contexts, [p["placements"][name]["decode_ms"] for p in data["points"]], marker="o", label=name)
    ax.set(
        xscale="log",
        xlabel="context (prompt tokens, batch 1)",
        ylabel="median decode time (ms per token)",
        title=f"Decode speed ({data['device']}, {data['new_tokens']} new tokens)",
    )
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def table(data: dict) -> str:
    rows = []
    for p in data["points"]:
        for name in PLACEMENTS:
            v = p["placements"][name]
            rows.append(
                [
                    p["context"],
                    name,
                    f"{v['decode_ms']:.1f}",
                    f"{min(v['decode_ms_runs']):.1f}-{max(v['decode_ms_runs']):.1f}",
                    f"{v['tokens_per_sec']:.1f}",
                    f"{v['ttft_ms']:.0f}",
                    f"{v['ratio_to_transformers']:.2f}x",
                ]
            )
    header = ["context", "placement", "ms/token", "range", "tokens/s", "first token ms", "vs transformers"]
    return markdown_table(header, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per placement and context")
    p.add_argument("--runs", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="prompt lengths, e.g. 128,512")
    p.add_argument("--device", default=None, help="device for the servers and transformers (default: cuda if any)")
    args = p.parse_args(argv)
    data = measure(args)
    write_json("generate", data)
    finish(
        "generate",
        plot(data),
        table(data),
        f"greedy, batch 1, {args.new_tokens} new tokens; median of {args.runs} interleaved rounds "
        f"after {args.warmup} warm-up; range: the per-run medians",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
