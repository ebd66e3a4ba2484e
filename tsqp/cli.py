"""What every command-line entry point shares: the OpenMP default, the model flags, one way to fail.

Each entry point (gpu-server, tee-client, diagnose-transport, tsqp-keygen, the benchmarks)
calls `prefer_passive_openmp()` before anything imports torch, and runs its body through
`run_cli`, so a user's mistake is one line and exit 1, Ctrl-C is one line and exit 130, and a
real bug keeps its traceback.
"""

import argparse
import os
import sys
import typing
from collections.abc import Callable

from protocol.errors import TSQPError, describe


def prefer_passive_openmp() -> None:
    """Make OpenMP threads wait passively unless the user chose a policy; before torch loads.

    Client and server take turns (every call is synchronous), and on one host spinning
    threads steal the other side's cores: a CPU prefill at length 128 on 2 cores went from
    1.2 s (+-30%) to 0.63 s (+-5%).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_cli(prog: str, body: Callable[[], int]) -> int:
    try:
        return body()
    except TSQPError as e:
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def timeout_arg(text: str) -> float:
    """argparse type for a timeout flag that is not a settings field (same rule as settings.Timeout)."""
    from tsqp.settings import finite_timeout

    try:
        return finite_timeout(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_flags(p: argparse.ArgumentParser, where: str = "") -> None:
    """--model, --device, --dtype: the ModelSettings fields, for gpu-server and tee-client alike."""
    from tsqp.settings import DTypeName

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
