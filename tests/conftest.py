from tsqp.cli import prefer_passive_openmp

prefer_passive_openmp()  # before torch loads, as every entry point does

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from transformers import AutoTokenizer, LlamaForCausalLM

from checkpoints import make_checkpoint
from tsqp.launch import ServerProcess
from tee_client.cli import main as tee_client

BIN = Path(sys.executable).parent  # the console scripts installed beside this interpreter

# Hermetic: a developer's exported LLAMA_* settings (a model, a dtype, an endpoint) must not
# leak into the tests or the servers they start. The conversion cache may stay, and so may
# LLAMA_SHM: `LLAMA_SHM=0 pytest` runs every test with tensors as frames instead of shared memory.
for _name in [n for n in os.environ if n.startswith("LLAMA_") and n not in ("LLAMA_CACHE_DIR", "LLAMA_SHM")]:
    del os.environ[_name]

# Every server and client the tests start makes its shared-memory regions in one private folder
# of this session (/dev/shm/tsqp-test-PID-…), checked empty after each test: nothing may stay behind.
# A session killed outright (SIGKILL) cannot remove its folder: the next one removes those whose
# process is gone.
for _stale in Path("/dev/shm").glob("tsqp-test-*-*"):
    _pid = _stale.name.split("-")[2]
    try:
        if _pid.isdigit():
            os.kill(int(_pid), 0)
    except ProcessLookupError:
        shutil.rmtree(_stale, ignore_errors=True)
    except OSError:
        pass  # another user's process, alive
SHM_DIR = Path(tempfile.mkdtemp(prefix=f"tsqp-test-{os.getpid()}-", dir="/dev/shm"))
os.environ["LLAMA_SHM_DIR"] = str(SHM_DIR)


@pytest.fixture(autouse=True)
def nothing_left_in_shared_memory():
    """After each test (and after its servers stopped): no region file left in the session's folder."""
    yield
    left = sorted(p.name for p in SHM_DIR.iterdir())
    assert not left, f"shared memory left behind in {SHM_DIR}: {left}"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SHM_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """checkpoints(variant) -> folder of a tiny random Llama checkpoint, built once per session."""
    root, built = tmp_path_factory.mktemp("ckpt"), {}

    def get(variant: str = "gqa") -> Path:
        if variant not in built:
            built[variant] = make_checkpoint(root / variant, variant)
        return built[variant]

    return get


@pytest.fixture
def ipc_dir():
    """A short folder for ipc sockets (Unix socket paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="tsqp-t-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def start_server(ipc_dir):
    """start_server(*args) -> a ready gpu-server process on a fresh ipc endpoint; stopped after."""
    servers = []

    def start(*args, name="s.ipc", env=None) -> ServerProcess:
        server = ServerProcess(f"ipc://{ipc_dir / name}", "--device", "cpu", *args, env=env).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


def raw_socket(endpoint: str) -> zmq.Socket:
    """A plain REQ socket (linger 0) for sending hand-made frames to a server."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def run_prefill_cli(endpoint: str, out_dir: Path, prompts: list[str], length: int, batch: int, *extra: str):
    """tee-client prefill through its CLI; returns (result dict, npz arrays)."""
    result, logits = out_dir / "result.json", out_dir / "logits.npz"
    args = [
        "prefill",
        "--endpoint",
        endpoint,
        "--length",
        str(length),
        "--batch-size",
        str(batch),
        "--output",
        str(result),
        "--save-logits",
        str(logits),
        "--warmup",
        "0",
        *extra,
    ]
    for p in prompts:
        args += ["--prompt", p]
    assert tee_client(args) == 0
    return json.loads(result.read_text()), dict(np.load(logits))


def reference_logits(
    folder: Path, input_ids: np.ndarray, attention_mask: np.ndarray, dtype=torch.float32
) -> np.ndarray:
    """transformers' own LlamaForCausalLM forward on the same ids."""
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
    return out.logits.float().numpy()


def reference_tokens(folder: Path, prompts: list[str]) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer(p)["input_ids"] for p in prompts]
