"""tee-client: the trusted side of TSQP. Owns the prompt, the tokenizer and every non-linear step."""

import argparse
import sys
import typing

from protocol.endpoints import default_endpoint
from tsqp.cli import add_model_flags, add_shm_flag, keep_freed_memory, prefer_passive_openmp, run_cli

PREFILL_EPILOG = f"""
Flags may also come from the environment (a flag wins): LLAMA_GPU_ENDPOINT,
LLAMA_PREFILL_LENGTH, LLAMA_TEE_BATCH_SIZE, LLAMA_PROMPT_PATH, LLAMA_TEE_RESULT_PATH,
LLAMA_RPC_TIMEOUT, LLAMA_RPC_RETRIES, LLAMA_CURVE_SECRET_KEY, LLAMA_CURVE_SERVER_KEY, LLAMA_MODEL_FINGERPRINT,
LLAMA_BACKEND, LLAMA_PRIVACY, LLAMA_MIX_BLOCK, LLAMA_VERIFY, LLAMA_SAVE_LOGITS, LLAMA_LOGITS, LLAMA_WARMUP,
LLAMA_REPEAT, LLAMA_SHM (0: no shared memory), LLAMA_SHM_DIR (variable only), and for the
in-process backends and the privacy modes LLAMA_MODEL_PATH, LLAMA_GPU_DEVICE, LLAMA_DTYPE
(tee-only always runs on the CPU).
The default endpoint is {default_endpoint()}.

With --backend remote and --privacy plain (the defaults) the client needs only the endpoint:
the model's config, norm weights, rope parameters and tokenizer arrive in the server's Init
reply. With --privacy otp or mix it loads its own copy of --model (same --dtype as the server)
and refuses a server whose fingerprint differs.
"""


def parse_args(argv=None) -> argparse.Namespace:
    from tee_client.settings import Backend, Privacy

    p = argparse.ArgumentParser(prog="tee-client", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser(
        "prefill",
        help="run one prefill and report logits, time and where the time went",
        epilog=PREFILL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pre.add_argument(
        "--endpoint", dest="gpu_endpoint", metavar="URL", help="gpu-server's ipc:///path or tcp://host:port"
    )
    pre.add_argument(
        "--prompt", action="append", metavar="TEXT", help="a prompt (repeatable; default: 'The capital of France is')"
    )
    pre.add_argument("--prompt-file", dest="prompt_path", metavar="F", help="prompts, one per non-empty line")
    pre.add_argument(
        "--length",
        dest="prefill_length",
        type=int,
        metavar="N",
        help="tokens per sequence: pad or truncate to N (default 128; at most the model's context)",
    )
    pre.add_argument(
        "--batch-size",
        dest="tee_batch_size",
        type=int,
        metavar="B",
        help="sequences; prompts are cycled to fill (default: one per prompt)",
    )
    pre.add_argument("--output", dest="tee_result_path", metavar="result.json", help="write the result JSON here")
    pre.add_argument(
        "--save-logits",
        metavar="logits.npz",
        help="write logits [B,N,vocab] (implies --logits all), input_ids and attention_mask",
    )
    pre.add_argument(
        "--logits",
        choices=("last", "all"),
        help="ask LMHead for each row's last real position only (last; the default) or for every position "
        "(all; the default with --save-logits, and --logits last then saves last_logits [B,1,vocab])",
    )
    pre.add_argument("--backend", choices=typing.get_args(Backend), help="where the linear ops run (default remote)")
    pre.add_argument(
        "--privacy",
        choices=typing.get_args(Privacy),
        help="what the GPU host may see: plain (everything; the default), otp (uniform one-time-padded ring "
        "elements: nothing about the prompt), mix (tokens mixed in fresh random blocks: heuristic, faster); "
        "otp and mix keep token ids and attention in this process and load --model here too",
    )
    pre.add_argument(
        "--verify",
        action="store_const",
        const=True,
        help="check every reply of the GPU host (Freivalds, a fresh secret vector per call) against this "
        "client's own copy of --model; a failed check stops the run (exit 1)",
    )
    pre.add_argument(
        "--mix-block",
        dest="mix_block",
        type=int,
        metavar="K",
        help="tokens mixed together in --privacy mix (default 16)",
    )
    add_model_flags(pre, where=" for passthrough/tee-only and the privacy modes")
    pre.add_argument(
        "--timeout", dest="rpc_timeout", type=float, metavar="S", help="seconds to wait for one reply (default 30)"
    )
    pre.add_argument(
        "--retries", dest="rpc_retries", type=int, metavar="N", help="resends over a fresh socket (default 2)"
    )
    add_curve_flags(pre)
    add_shm_flag(pre)
    pre.add_argument(
        "--expect-fingerprint",
        dest="model_fingerprint",
        metavar="HEX",
        help="refuse a server whose model fingerprint does not start with HEX (12+ hex digits)",
    )
    pre.add_argument("--warmup", type=int, metavar="N", help="untimed forwards before timing (default 1)")
    pre.add_argument("--repeat", type=int, metavar="N", help="timed forwards; the median is reported (default 1)")
    pre.add_argument("--json", action="store_true", help="print the result JSON instead of the summary")
    return p.parse_args(argv)


def add_curve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-secret-key", metavar="FILE", help="CURVE on: this client's .key_secret (see tsqp-keygen)")
    p.add_argument("--curve-server-key", metavar="FILE", help="CURVE: the server's public .key")


def main(argv=None) -> int:
    prefer_passive_openmp()  # before torch loads
    keep_freed_memory()
    args = parse_args(argv)

    def prefill() -> int:
        import json

        from tee_client.prefill import run_prefill, save_outputs, summary
        from tee_client.settings import PrefillSettings

        settings = PrefillSettings.from_args(args)
        result, logits, input_ids, attention_mask = run_prefill(settings)
        save_outputs(settings, result, logits, input_ids, attention_mask)
        print(json.dumps(result, indent=2) if args.json else summary(result))
        return 0

    return run_cli("tee-client", prefill)


def diagnose_transport(argv=None) -> int:
    """The diagnose-transport command (tee_client.diagnose), with the same start as tee-client."""
    prefer_passive_openmp()  # before torch loads
    keep_freed_memory()
    from tee_client.diagnose import main as diagnose

    return diagnose(argv)


if __name__ == "__main__":
    sys.exit(main())
