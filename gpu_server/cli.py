"""gpu-server: hold a Llama model's weights on a device and answer tee-client's linear ops."""

import argparse
import logging
import sys

from protocol.endpoints import default_endpoint
from tsqp.cli import add_model_flags, add_shm_flag, prefer_passive_openmp, run_cli

EPILOG = f"""
Each flag can also come from the environment: LLAMA_MODEL_PATH, LLAMA_GPU_ENDPOINT,
LLAMA_GPU_DEVICE, LLAMA_DTYPE, LLAMA_MAX_MESSAGE_MB, LLAMA_MAX_RESULT_MB,
LLAMA_CURVE_SECRET_KEY, LLAMA_CURVE_AUTHORIZED_KEYS, LLAMA_LOG_LEVEL, LLAMA_RECORD_DIR,
LLAMA_SHM (0: no shared memory), LLAMA_SHM_DIR (variable only: where regions are made);
a flag wins.
The default endpoint is {default_endpoint()}, in a folder only you can enter.
The server prints one line containing 'ready' once it answers, and 'gpu-server stopped' when
it is done; SIGINT or SIGTERM stop it after the request in hand. Its log goes to stderr.
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
    add_shm_flag(p)
    p.add_argument(
        "--record",
        dest="record_dir",
        metavar="DIR",
        help="save every tensor every request sends to this server in DIR (what a spying host would keep: "
        "for audits and tests; off by default, loud in the log when on)",
    )
    p.add_argument(
        "--inject-fault",
        metavar="METHOD:N[:shape|:slow]",
        help="tests only, refused unless TSQP_TESTING=1: the N-th reply of METHOD comes back wrong "
        "(what tee-client --verify must catch), with :shape one column short (what every tee-client refuses), "
        "with :slow right but 1.5 s late (what makes a client resend)",
    )
    p.add_argument(
        "--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level (default INFO)"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    prefer_passive_openmp()  # before torch loads
    args = parse_args(argv)

    def serve() -> int:
        from gpu_server.server import Server
        from gpu_server.settings import ServerSettings

        settings = ServerSettings.from_args(args)
        logging.basicConfig(level=settings.log_level, format="gpu-server: %(levelname)s: %(message)s", force=True)
        Server(settings).run()
        return 0

    return run_cli("gpu-server", serve, sigterm=False)  # Server.run installs its own


if __name__ == "__main__":
    sys.exit(main())
