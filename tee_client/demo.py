"""`make demo`: start gpu-server on the embedded model, run one prefill against it, stop it."""

import sys
import tempfile

from tsqp.launch import ServerProcess
from tee_client.cli import main as tee_client


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tsqp-demo-") as tmp:
        endpoint = f"ipc://{tmp}/gpu-server.ipc"
        print(f"starting gpu-server on {endpoint} (the first start converts the embedded model, ~20 s)", flush=True)
        with ServerProcess(endpoint, "--device", "cpu") as server:
            print(server.log, end="", flush=True)
            code = tee_client(
                [
                    "prefill",
                    "--endpoint",
                    endpoint,
                    "--length",
                    "128",
                    "--prompt",
                    "The capital of France is",
                    "--prompt",
                    "The opposite of hot is",
                    "--batch-size",
                    "2",
                ]
            )
        print(f"gpu-server (pid {server.proc.pid}) stopped with exit code {server.proc.returncode}")
    return code


if __name__ == "__main__":
    sys.exit(main())
