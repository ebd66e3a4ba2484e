"""What every command-line entry point shares: the OpenMP default, the model flags, one way to fail.

Each entry point (gpu-server, tee-client, diagnose-transport, tsqp-keygen, the benchmarks)
calls `prefer_passive_openmp()` before anything imports torch, and runs its body through
`run_cli`, so a user's mistake is one line and exit 1, Ctrl-C is one line and exit 130, SIGTERM
one line and exit 143 (both unwind, so temp folders, shared memory and sockets are given back;
gpu-server has its own SIGTERM handler), and a real bug keeps its traceback.
"""

import argparse
import ctypes
import os
import signal
import sys
import threading
import typing
from collections.abc import Callable

from protocol.errors import TSQPError, describe

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
MMAP_THRESHOLD = 1 << 30  # allocations below this come from the heap and are reused after free
TRIM_THRESHOLD = (1 << 31) - 1  # free memory at the heap's top kept up to this much (a C int)


def prefer_passive_openmp() -> None:
    """Make OpenMP threads wait passively unless the user chose a policy; before torch loads.

    Client and server take turns (every call is synchronous), and on one host spinning
    threads steal the other side's cores: a CPU prefill at length 128 on 2 cores went from
    1.2 s (+-30%) to 0.63 s (+-5%).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def keep_freed_memory() -> None:
    """Have glibc keep large freed blocks for the next allocation instead of unmapping them, unless
    the user tuned malloc (MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ set).

    By default every allocation over 32 MiB is a fresh mmap, unmapped again on free, so each one
    pays its page faults anew: a softmax over 1024 tokens' scores (38 MB) took 20 ms into fresh
    memory and 3 ms into reused memory on this 2-core host. A no-op where there is no glibc.

    For the trusted side and the benchmarks (tee-client, diagnose-transport, benchmarks/), not
    gpu-server: memory kept there would stay with the server for every client (its results go
    straight into shared memory anyway).
    """
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        pass


class Terminated(BaseException):
    """SIGTERM, raised where the main thread is (as Ctrl-C raises KeyboardInterrupt), so that every `with`
    on the way out runs: Python's default for SIGTERM is to die on the spot, leaving a temp folder, a
    shared-memory region the server keeps until it idles out, and no word of why."""


def terminate(signum, frame):
    raise Terminated


def run_cli(prog: str, body: Callable[[], int], sigterm: bool = True) -> int:
    """body(), its errors one line each; SIGTERM stops like Ctrl-C unless `sigterm` is False (gpu-server, which
    installs its own handler, a clean stop after the call in hand: until then SIGTERM's default ends it, for an
    exception raised while torch imports is lost there, and the server would carry on)."""
    main = sigterm and threading.current_thread() is threading.main_thread()  # handlers are the main thread's
    previous = signal.signal(signal.SIGTERM, terminate) if main else None
    try:
        return body()
    except TSQPError as e:
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def timeout_arg(text: str) -> float:
    """argparse type for a timeout flag that is not a settings field (same rule as settings.Timeout)."""
    from tsqp.settings import finite_timeout

    try:
        return finite_timeout(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_flags(p: argparse.ArgumentParser, where: str = "", device_where: str | None = None) -> None:
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
        help=f"cpu, cuda or cuda:N{where if device_where is None else device_where} (default: cuda if any, else cpu)",
    )
    p.add_argument(
        "--dtype", choices=typing.get_args(DTypeName), help=f"weights and wire dtype{where} (default float32)"
    )


def add_shm_flag(p: argparse.ArgumentParser) -> None:
    """--no-shm: the TransportSettings.shm field, for gpu-server and tee-client alike."""
    p.add_argument(
        "--no-shm",
        dest="shm",
        action="store_const",
        const=False,
        help="over ipc://, send tensors as ZeroMQ frames instead of through shared memory (LLAMA_SHM=0)",
    )
