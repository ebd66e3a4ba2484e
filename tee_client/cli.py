"""tee-client: the trusted side of TSQP. Owns the prompt, the tokenizer and every non-linear step."""

import argparse
import json
import sys
import typing

from pydantic import ValidationError

from gpu_server.checkpoint import CheckpointError
from gpu_server.cli import add_model_flags
from protocol.endpoints import default_endpoint
from protocol.errors import TSQPError, describe
from tee_client.settings import Backend, PrefillSettings

PREFILL_EPILOG = f"""
Flags may also come from the environment (a flag wins): LLAMA_GPU_ENDPOINT,
LLAMA_PREFILL_LENGTH, LLAMA_TEE_BATCH_SIZE, LLAMA_PROMPT_PATH, LLAMA_TEE_RESULT_PATH,
LLAMA_RPC_TIMEOUT, LLAMA_RPC_RETRIES, LLAMA_CURVE_SECRET_KEY, LLAMA_CURVE_SERVER_KEY, LLAMA_MODEL_FINGERPRINT,
LLAMA_BACKEND, LLAMA_SAVE_LOGITS, LLAMA_WARMUP, LLAMA_REPEAT, and for the in-process
backends LLAMA_MODEL_PATH, LLAMA_GPU_DEVICE, LLAMA_DTYPE (tee-only always runs on the CPU).
The default endpoint is {default_endpoint()}.

With --backend remote (the default) the client needs only the endpoint: the model's config,
norm weights, rope parameters and tokenizer arrive in the server's Init reply.
"""


def parse_args(argv=None) -> argparse.Namespace:
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
        help="tokens per sequence: pad or truncate to N (default 128)",
    )
    pre.add_argument(
        "--batch-size",
        dest="tee_batch_size",
        type=int,
        metavar="B",
        help="sequences; prompts are cycled to fill (default 1)",
    )
    pre.add_argument("--output", dest="tee_result_path", metavar="result.json", help="write the result JSON here")
    pre.add_argument(
        "--save-logits", metavar="logits.npz", help="write logits [B,N,vocab], input_ids and attention_mask"
    )
    pre.add_argument("--backend", choices=typing.get_args(Backend), help="where the linear ops run (default remote)")
    add_model_flags(pre, where=" for passthrough/tee-only")
    pre.add_argument(
        "--timeout", dest="rpc_timeout", type=float, metavar="S", help="seconds to wait for one reply (default 30)"
    )
    pre.add_argument(
        "--retries", dest="rpc_retries", type=int, metavar="N", help="resends over a fresh socket (default 2)"
    )
    add_curve_flags(pre)
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
    args = parse_args(argv)
    from tee_client.prefill import run_prefill, save_outputs, summary

    try:
        settings = PrefillSettings.from_args(args)
        result, logits, input_ids, attention_mask = run_prefill(settings)
        save_outputs(settings, result, logits, input_ids, attention_mask)
    except (TSQPError, CheckpointError, ValueError, OSError, ValidationError) as e:
        print(f"tee-client: error: {describe(e)}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else summary(result))
    return 0
