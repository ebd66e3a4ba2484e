"""tee-client: the trusted side of TSQP. Owns the prompt, the tokenizer and every non-linear step."""

import argparse
import sys
import typing

from protocol.endpoints import default_endpoint
from tsqp.cli import add_model_flags, add_shm_flag, keep_freed_memory, prefer_passive_openmp, run_cli

SHARED_VARIABLES = """LLAMA_GPU_ENDPOINT, LLAMA_TEE_BATCH_SIZE, LLAMA_PROMPT_PATH, LLAMA_TEE_RESULT_PATH,
LLAMA_RPC_TIMEOUT, LLAMA_RPC_RETRIES, LLAMA_CURVE_SECRET_KEY, LLAMA_CURVE_SERVER_KEY, LLAMA_MODEL_FINGERPRINT,
LLAMA_BACKEND, LLAMA_PRIVACY, LLAMA_ATTENTION, LLAMA_MIX_BLOCK, LLAMA_VERIFY, LLAMA_SHM (0: no shared memory),
LLAMA_SHM_DIR (variable only), and for the in-process backends and the privacy modes
LLAMA_MODEL_PATH, LLAMA_GPU_DEVICE, LLAMA_DTYPE (tee-only always runs on the CPU)"""

WHO_LOADS = f"""The default endpoint is {default_endpoint()}.

With --backend remote and --privacy plain (the defaults) the client needs only the endpoint:
the model's config, norm weights, rope parameters and tokenizer arrive in the server's Init
reply. With --privacy otp or mix, or --verify, it loads its own copy of --model (same --dtype
as the server) and refuses a server whose fingerprint differs.
"""

PREFILL_EPILOG = f"""
Flags may also come from the environment (a flag wins): LLAMA_PREFILL_LENGTH, LLAMA_SAVE_LOGITS,
LLAMA_LOGITS, LLAMA_WARMUP, LLAMA_REPEAT, {SHARED_VARIABLES}.
{WHO_LOADS}"""

GENERATE_EPILOG = f"""
Text streams to stdout as it is produced: with one prompt the text itself, with several each
finished line as "[i] line" (i: the prompt's row, from 0); the summary (or --json) follows.
Each row stops at the model's end-of-sequence token(s) or after --max-new-tokens.

Flags may also come from the environment (a flag wins): LLAMA_MAX_NEW_TOKENS, LLAMA_TEMPERATURE,
LLAMA_TOP_P, LLAMA_TOP_K, LLAMA_SEED, LLAMA_IGNORE_EOS, {SHARED_VARIABLES}.
{WHO_LOADS}
The KV cache stays in this process: the server keeps no state, and a decode step sends one
row per unfinished sequence to each linear op whatever the context. In --privacy mix a step
with fewer rows than --mix-block uses otp's one-time pads (a single row cannot be mixed).
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
    add_run_flags(pre, batch_help="sequences; prompts are cycled to fill (default: one per prompt)")
    pre.add_argument(
        "--length",
        dest="prefill_length",
        type=int,
        metavar="N",
        help="tokens per sequence: pad or truncate to N (default 128; at most the model's context)",
    )
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
    pre.add_argument("--warmup", type=int, metavar="N", help="untimed forwards before timing (default 1)")
    pre.add_argument("--repeat", type=int, metavar="N", help="timed forwards; the median is reported (default 1)")

    gen = sub.add_parser(
        "generate",
        help="generate text with a KV cache, streaming it as it comes",
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_flags(
        gen,
        batch_help="sequences; prompts are cycled to fill (default: one per prompt); prompts of "
        "different lengths are padded, each row generating what it would alone",
    )
    gen.add_argument(
        "--max-new-tokens",
        dest="max_new_tokens",
        type=int,
        metavar="N",
        help="new tokens per prompt at most (default 64; prompt plus N within the model's context)",
    )
    gen.add_argument("--temperature", type=float, metavar="T", help="sampling temperature; 0 is greedy (default 0)")
    gen.add_argument(
        "--top-p",
        dest="top_p",
        type=float,
        metavar="P",
        help="sample from the smallest set of tokens whose probability reaches P (default 1: off)",
    )
    gen.add_argument(
        "--top-k", dest="top_k", type=int, metavar="K", help="sample among the K likeliest tokens (default 0: off)"
    )
    gen.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="sampling seed, for a reproducible run (default: drawn at random and reported in the result)",
    )
    gen.add_argument(
        "--ignore-eos",
        dest="ignore_eos",
        action="store_const",
        const=True,
        help="generate exactly --max-new-tokens per prompt (benchmarks)",
    )
    return p.parse_args(argv)


def add_run_flags(p: argparse.ArgumentParser, batch_help: str) -> None:
    """The flags prefill and generate share: prompts, where the linear ops run, privacy, verify, the connection."""
    from tee_client.settings import Attention, Backend, Privacy

    p.add_argument("--endpoint", dest="gpu_endpoint", metavar="URL", help="gpu-server's ipc:///path or tcp://host:port")
    p.add_argument(
        "--prompt", action="append", metavar="TEXT", help="a prompt (repeatable; default: 'The capital of France is')"
    )
    p.add_argument("--prompt-file", dest="prompt_path", metavar="F", help="prompts, one per non-empty line")
    p.add_argument("--batch-size", dest="tee_batch_size", type=int, metavar="B", help=batch_help)
    p.add_argument("--output", dest="tee_result_path", metavar="result.json", help="write the result JSON here")
    p.add_argument("--backend", choices=typing.get_args(Backend), help="where the linear ops run (default remote)")
    p.add_argument(
        "--privacy",
        choices=typing.get_args(Privacy),
        help="what the GPU host may see: plain (everything; the default), otp (uniform one-time-padded ring "
        "elements: nothing about the prompt), mix (tokens mixed in fresh random blocks: heuristic, faster); "
        "otp and mix keep token ids in this process too (attention is here in every mode unless --attention "
        "server) and load --model here",
    )
    p.add_argument(
        "--attention",
        choices=typing.get_args(Attention),
        help="where a prefill's attention runs: tee (here, one fused kernel per layer; the default) or server "
        "(plain only: Q·Kᵀ and P·V as two calls per layer, the scores and probabilities crossing both ways; "
        "the softmax stays here); decode steps always attend here",
    )
    p.add_argument(
        "--verify",
        action="store_const",
        const=True,
        help="check every reply of the GPU host (Freivalds, a fresh secret vector per call) against this "
        "client's own copy of --model; a failed check stops the run (exit 1)",
    )
    p.add_argument(
        "--mix-block",
        dest="mix_block",
        type=int,
        metavar="K",
        help="tokens mixed together in --privacy mix (default 16)",
    )
    # the privacy modes and --verify load the client's own copy on the CPU: --device is for passthrough only
    add_model_flags(
        p, where=" for passthrough/tee-only, the privacy modes and --verify", device_where=" for passthrough"
    )
    p.add_argument(
        "--timeout", dest="rpc_timeout", type=float, metavar="S", help="seconds to wait for one reply (default 30)"
    )
    p.add_argument(
        "--retries", dest="rpc_retries", type=int, metavar="N", help="resends over a fresh socket (default 2)"
    )
    add_curve_flags(p)
    add_shm_flag(p)
    p.add_argument(
        "--expect-fingerprint",
        dest="model_fingerprint",
        metavar="HEX",
        help="refuse a server whose model fingerprint does not start with HEX (12+ hex digits)",
    )
    p.add_argument("--json", action="store_true", help="print the result JSON instead of the summary")


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

    def generate() -> int:
        import json

        from tee_client.generate import run_generate, save_result, summary
        from tee_client.settings import GenerateSettings

        settings = GenerateSettings.from_args(args)
        result = run_generate(settings, out=sys.stdout)
        save_result(settings, result)
        print(json.dumps(result, indent=2) if args.json else summary(result))
        return 0

    return run_cli("tee-client", {"prefill": prefill, "generate": generate}[args.command])


def diagnose_transport(argv=None) -> int:
    """The diagnose-transport command (tee_client.diagnose), with the same start as tee-client."""
    prefer_passive_openmp()  # before torch loads
    keep_freed_memory()
    from tee_client.diagnose import main as diagnose

    return diagnose(argv)


if __name__ == "__main__":
    sys.exit(main())
