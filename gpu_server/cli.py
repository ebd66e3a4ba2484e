"""gpu-server: hold a Llama model's weights on a device and answer tee-client's linear ops."""

import argparse
import sys
import typing

from pydantic import ValidationError

from gpu_server.checkpoint import CheckpointError
from gpu_server.server import EndpointBusy, Server
from gpu_server.settings import DTypeName, ServerSettings
from protocol.endpoints import default_endpoint
from protocol.errors import describe

EPILOG = f"""
Each flag can also come from the environment: LLAMA_MODEL_PATH, LLAMA_GPU_ENDPOINT,
LLAMA_GPU_DEVICE, LLAMA_DTYPE, LLAMA_MAX_MESSAGE_MB, LLAMA_MAX_RESULT_MB,
LLAMA_CURVE_SECRET_KEY, LLAMA_CURVE_AUTHORIZED_KEYS; a flag wins.
The default endpoint is {default_endpoint()}, in a folder only you can enter.
The server prints one line containing 'ready' once it answers; SIGINT or SIGTERM stop it
after the request in hand.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu-server", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_flags(p)
    p.add_argument("--endpoint", dest="gpu_endpoint", metavar="URL", help="ipc:///path or tcp://host:port")
    p.add_argument(
        "--max-message-mb", type=float, metavar="MB", help="drop inbound messages larger than this (default 1024)"
    )
    p.add_argument(
        "--max-result-mb", type=float, metavar="MB", help="refuse requests whose result is larger (default 2048)"
    )
    p.add_argument("--curve-secret-key", metavar="FILE", help="CURVE on: this server's .key_secret (see tsqp-keygen)")
    p.add_argument("--curve-authorized-keys", metavar="DIR", help="CURVE: folder of the client .key files admitted")
    return p.parse_args(argv)


def add_model_flags(p: argparse.ArgumentParser, where: str = "") -> None:
    """--model, --device, --dtype: the ModelSettings fields, for gpu-server and tee-client alike."""
    p.add_argument(
        "--model",
        dest="model_path",
        metavar="PATH",
        help=f"Hugging Face checkpoint folder or .gguf file{where} (default: the embedded SmolLM2-135M)",
    )
    p.add_argument(
        "--device",
        dest="gpu_device",
        metavar="DEVICE",
        help=f"cpu, cuda or cuda:N{where} (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--dtype", choices=typing.get_args(DTypeName), help=f"weights and wire dtype{where} (default float32)"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        Server(ServerSettings.from_args(args)).run()
    except (CheckpointError, EndpointBusy, ValueError, OSError, ValidationError) as e:
        print(f"gpu-server: error: {describe(e)}", file=sys.stderr)
        return 1
    return 0
