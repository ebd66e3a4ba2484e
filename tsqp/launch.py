"""Start a gpu-server child process, wait until it is ready, stop it by its own pid.

Used by `make demo`, the tests and the benchmarks, so that each starts the real server the
same way a user does.
"""

import os
import signal
import subprocess
import sys
import threading
import time


class ServerProcess:
    def __init__(self, endpoint: str, *args: str, env: dict | None = None):
        self.endpoint = endpoint
        self.argv = [sys.executable, "-m", "gpu_server", "--endpoint", endpoint, *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []

    def start(self, timeout: float = 300.0) -> "ServerProcess":
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env
        )
        ready = threading.Event()
        self.reader = threading.Thread(target=self.drain, args=(ready,), daemon=True)
        self.reader.start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gpu-server did not become ready:\n{self.log}")
        return self

    def drain(self, ready: threading.Event) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            if " ready on " in line:
                ready.set()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM by pid, then SIGKILL if it has not exited within `timeout`; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.reader.join(timeout)
        self.proc.stdout.close()
        return self.proc.returncode

    @property
    def log(self) -> str:
        return "".join(self.output)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
